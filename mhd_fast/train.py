"""The simulator: decentralized MHD training of all clients at once, round by round.

Reads top to bottom: ``setup`` turns a Config into data, clients, graph and models;
``train_round`` runs the local steps of one round (private CE step, predictions on the public
batch, exchange over the graph, the fused distillation loss, one optimizer step for all
clients); ``evaluate`` measures private and shared accuracy; ``run`` loops over rounds with a
checkpoint after each and writes the outputs. A round whose loss or weights are not finite
stops the run ("diverged"): its state is not saved, so the last checkpoint stays the last
finite state.

One step, for all N clients at once (the loss is the SUM over clients of each client's own
loss, so each client's gradient is its own):
    L_i = CE(head 0 on i's private batch)
        + nu_aux  · Σ_h mean_b mhd_loss[i, h, b]           (aux head h <- teachers' head h−1)
        + nu_main · mean_b distill_loss(head 0 <- neighbours' head 0)[i, b]
        + nu_emb  · mean_{b,e} (emb[i] − mean_{j ∈ C(i)} emb_j)²  (C(i): i's candidates)
Teachers are the predictions received in the latest exchange: this step's own predictions
(detached) when exchange_every = 1, else up to exchange_every − 1 steps stale, on the public
batch of that exchange.

A process holds the clients of its shard (``distributed``): all of them in one process, a
contiguous block of them under torchrun. Every random stream is drawn for all clients and each
process keeps its rows, and the exchange brings each process the rows of the clients its own
clients hear, so the numbers do not depend on the number of processes.

Host-device syncs are marked "# sync:" — a CUDA run pays for each of them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import mhd_fast
from . import checkpoint as ckpt
from . import distributed as D
from . import metrics as M
from . import models
from . import outdir
from .config import Config, model_names, to_dict
from .data import Dataset, load_dataset, split_public, synthetic_bytes
from . import exchange as ex
from .exchange import WIRE_DTYPES, Received, heads_sent, neighbour_mean, students
from .ops import map_teacher
from .ops.inputs import trusted_packets
from .partition import label_distribution, partition
from .topology import describe, make_schedule


@dataclass
class Simulation:
    """Everything a run holds; plain tensors and lists, no hidden state."""

    cfg: Config
    device: torch.device
    shard: D.Shard                # the clients this process holds: [shard.start, shard.stop)
    data: Dataset                 # x_train / y_train / x_test / y_test on ``device``
    layout: list                  # (arch, start, stop) of every group of the run's model clients
    model_rows: range             # this process's rows of the N_model model clients
    private_rows: Tensor          # [n_model, L] int64 indices into x_train, padded by repetition
    private_count: Tensor         # [n_model] int64 (CPU): real rows per model client
    public_rows: Tensor           # [P] int64 indices into x_train (labels never used)
    label_dist: Tensor            # [n, V] the training label distribution of this process's clients
    groups: list[models.Group]    # this process's client groups, one per architecture, batched
    optimizer: torch.optim.Optimizer
    schedule: object              # round -> adj [N, N] bool
    num_heads: int                # H1 = 1 + aux heads
    heads_sent: list[int]         # heads whose predictions cross the edges
    gen: torch.Generator          # the training stream: batches (CPU, so any device replays it)
    step: int = 0                 # local steps done over the whole run
    received: Received | None = None     # the latest exchange (stale between refreshes)
    public_batch: Tensor | None = None   # [B] the public rows of that exchange
    bytes_cross_rank: int = 0     # bytes this process sent to other processes, over the run
    loss_sum: Tensor | None = None  # [n, T] fp64 (device): each client's ``loss_terms`` summed
                                    # over the steps since the last ``nonfinite`` check
    ema: Tensor | None = None     # --teacher-ema: [N, H1, P, V] the teachers' softmax(T/τ) per public row
    ema_seen: Tensor | None = None  # [P] bool: the rows some exchange has drawn

    @property
    def distills(self) -> bool:
        c = self.cfg
        return c.method in ("mhd", "mean_distill") and (c.nu_aux > 0 or c.nu_main > 0 or c.nu_emb > 0)

    @property
    def num_clients(self) -> int:
        return self.cfg.clients

    @property
    def num_model(self) -> int:
        """N_model: the run's client models (1 for centralized, else N)."""
        return self.layout[-1][2]


# ---- setup ---------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _pad_rows(parts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Ragged per-client index lists -> [N, L] (each row repeated cyclically to L) and counts.
    Sampling position u·count from a padded row reads only the client's real rows."""
    counts = torch.tensor([len(p) for p in parts], dtype=torch.int64)
    flat = torch.cat(parts)
    starts = counts.cumsum(0) - counts
    k = torch.arange(int(counts.max()))
    return flat[starts[:, None] + k[None, :] % counts[:, None]], counts


def load_data(cfg: Config) -> Dataset:
    """The dataset of ``cfg`` (ValueError naming the option when it cannot be read)."""
    if cfg.dataset == "synthetic":  # its size is an option: check it before drawing it
        _check_memory(cfg, [(f"--num-classes {cfg.num_classes}",
                             synthetic_bytes(cfg.num_classes), "the synthetic dataset's draws")])
    try:
        return load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=_seeds(cfg)[0],
                            num_classes=cfg.num_classes)
    except OSError as e:
        raise ValueError(f"--data-dir: cannot read the {cfg.dataset} files: {e}") from None


def _split(cfg: Config, data: Dataset, seeds: list[int]):
    """The public split, the clients' private rows and the graph schedule; ValueError naming
    the option for what the data cannot give."""
    if cfg.topk > data.num_classes:
        raise ValueError(f"--topk must be <= the number of classes V = {data.num_classes} of "
                         f"{cfg.dataset}, got {cfg.topk}")
    private_idx, public_idx = split_public(len(data.y_train), cfg.public_fraction, seed=seeds[0])
    if cfg.clients > len(private_idx):
        raise ValueError(f"--clients {cfg.clients} is more than the {len(private_idx)} private "
                         f"training samples of {cfg.dataset}")
    try:
        parts = partition(data.y_train[private_idx], cfg.clients, method=cfg.partition,
                          seed=seeds[1], skew=cfg.skew, alpha=cfg.dirichlet,
                          shards_per_client=cfg.shards, samples_per_client=cfg.samples_per_client)
    except ValueError as e:
        raise ValueError(f"--partition {cfg.partition}: {e}") from None
    parts = [private_idx[p] for p in parts]  # positions in the private slice -> training rows
    try:
        schedule = make_schedule(cfg.graph, cfg.clients, seed=seeds[2], **cfg.graph_options)
    except ValueError as e:
        raise ValueError(f"--graph {cfg.graph} --graph-options: {e}") from None
    return public_idx, parts, schedule


def _memory_limit(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"memory of {device}"
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "memory of this machine"


def _check_memory(cfg: Config, needs: list[tuple[str, int, str]]) -> None:
    """ValueError naming the option behind the largest of ``needs`` ((option, bytes, what),
    lower bounds) when together they exceed the device's memory: a run that cannot fit stops
    here with one line, not in the allocator."""
    limit, where = _memory_limit(resolve_device(cfg.device))
    total = sum(n for _, n, _ in needs)
    if total > limit:
        option, need, what = max(needs, key=lambda x: x[1])
        raise ValueError(f"{option}: {what} need at least {M.human_bytes(need)}"
                         + (f" ({M.human_bytes(total)} in all)" if total > 1.01 * need else "")
                         + f", more than the {M.human_bytes(limit)} {where}")


def memory_needs(cfg: Config, input_shape: tuple[int, ...], v: int,
                 held: int | None = None) -> list[tuple[str, int, str]]:
    """Lower bounds of what a process holding ``held`` of the clients (default all) needs,
    each with the option that sets it: the weights of the trunks and of the heads with their
    gradients and optimizer state, and one step's activations (the widest layer of every
    client on its private and public rows)."""
    n_model = 1 if cfg.method == "centralized" else cfg.clients
    held = n_model if held is None else held
    num_heads = 1 + cfg.heads
    copies = 4 * (2 + (2 if cfg.optimizer == "adam" else int(cfg.momentum > 0)))  # fp32 w, g, state
    public = cfg.public_batch_size if cfg.method in ("mhd", "mean_distill") else 0
    trunks = heads = acts = 0
    wide_heads = False  # whether the heads' output is a step's widest activation
    archs = [models.parse_arch(m, option="--model") for m in cfg.model]
    for arch, start, stop in models.split_groups(n_model, archs):
        n = (stop - start) * held // n_model  # a sharded run splits every group over the ranks
        trunk = models.num_params(arch, input_shape, v, 0)
        trunks += n * trunk * copies
        heads += n * (models.num_params(arch, input_shape, v, num_heads) - trunk) * copies
        width = models.activation_floats(arch, input_shape, num_heads * v)
        trunk_width = models.activation_floats(arch, input_shape, 0)
        if isinstance(arch, models.ModuleArch):  # a deep trunk keeps every layer's output
            trunk_width = max(trunk_width, models.trunk_info(arch, input_shape).activations)
            width = max(width, trunk_width)
        acts += n * (cfg.batch_size + public) * width * 4
        wide_heads |= width > trunk_width
    rows = (f"--batch-size {cfg.batch_size}" if cfg.batch_size >= public
            else f"--public-batch-size {cfg.public_batch_size}")
    state = "with their gradients and optimizer state"
    return [(f"--model {model_names(cfg)}", trunks, f"the weights of {held} clients {state}"),
            (f"--heads {cfg.heads}", heads, f"the heads of {held} clients ({num_heads} of "
             f"{v} classes each) {state}"),
            (f"--heads {cfg.heads}" if wide_heads else rows, acts,
             f"one step's activations of {held} clients on {cfg.batch_size + public} rows each")]


def _check_models(cfg: Config, input_shape: tuple[int, ...]) -> None:
    """What a module trunk can only show once built on the data's inputs: that it builds and
    maps [B, *in] to [B, E], and one E for all when embeddings are distilled."""
    dims = {models.emb_dim(models.parse_arch(s, option="--model"), input_shape) for s in cfg.model}
    if cfg.nu_emb > 0 and cfg.method in ("mhd", "mean_distill") and len(dims) > 1:
        raise ValueError(f"--nu-emb needs one embedding size (last hidden width) in every "
                         f"--model architecture, got {sorted(dims)}")


def _seeds(cfg: Config) -> list[int]:
    split_gen = torch.Generator().manual_seed(cfg.split_seed)
    return torch.randint(0, 2**31 - 1, (3,), generator=split_gen).tolist()  # data, partition, graph


def check(cfg: Config, data: Dataset | None = None) -> None:
    """Every check of ``setup`` that needs the data (the split, the partition, the graph, the
    memory), without building anything: what a sweep runs for all its runs before it starts
    one. ``data``: the loaded dataset (its sizes are what matters), read when None.
    Raises ValueError naming the option."""
    data = data if data is not None else load_data(cfg)
    _split(cfg, data, _seeds(cfg))
    _check_models(cfg, data.input_shape)
    _check_memory(cfg, memory_needs(cfg, data.input_shape, data.num_classes))


def setup(cfg: Config, shard: D.Shard | None = None) -> Simulation:
    """Data, partition, graph, models and optimizer of a resolved, validated Config, for the
    clients of ``shard`` (default: this process's shard, every client without torchrun).
    Raises ValueError (naming the option) for anything that depends on the data."""
    device = resolve_device(cfg.device)
    shard = shard or D.current(cfg.clients, cfg.dist_timeout)
    if shard.world > 1 and cfg.teacher_ema > 0:
        raise ValueError(f"--teacher-ema keeps every client's teachers in one process; it does "
                         f"not run over {shard.world} ranks")
    if shard.world > 1 and cfg.method == "centralized":
        raise ValueError(f"--method centralized trains one model on the union of the data; it "
                         f"runs in one process, not over {shard.world} ranks")
    device = D.rank_device(device, shard)
    seeds = _seeds(cfg)
    data = load_data(cfg)
    v = data.num_classes
    public_idx, parts, schedule = _split(cfg, data, seeds)
    label_dist = label_distribution(data.y_train, parts, v)
    _check_models(cfg, data.input_shape)
    _check_memory(cfg, memory_needs(cfg, data.input_shape, v,
                                    held=None if cfg.method == "centralized" else shard.size))

    if cfg.method == "centralized":  # one model on the union of private data (upper bound)
        parts = [torch.cat(parts)]
    n_model = len(parts)
    mine = shard.clients if n_model == cfg.clients else range(n_model)
    rows, counts = _pad_rows(parts[mine.start:mine.stop])

    num_heads = 1 + cfg.heads
    archs = [models.parse_arch(s, option="--model") for s in cfg.model]
    layout = models.split_groups(n_model, archs)
    init_gen = torch.Generator().manual_seed(cfg.init_seed)
    groups = []
    for arch, start, stop in layout:  # every group is drawn, so the generator runs as in one process
        keep = D.overlap(range(start, stop), mine)
        # FedAvg starts every client from one (server) model, its first client's: averaging
        # independently drawn networks would destroy them, as their hidden units do not line up.
        drawn = (range(1) if cfg.method == "fedavg"
                 else range(keep.start - start, keep.stop - start) if keep else range(0))
        net, buffers = None, {}
        if isinstance(arch, models.ModuleArch):
            net, params, buffers = models.init_module(arch, stop - start, data.input_shape, v,
                                                      num_heads, init_gen, rows=drawn, device=device)
        else:
            params = models.init_params(arch, stop - start, data.input_shape, v, num_heads,
                                        init_gen, rows=drawn)
        if cfg.method == "fedavg":
            params, buffers = ({k: p.expand(len(keep), *p.shape[1:]).clone() for k, p in d.items()}
                               for d in (params, buffers))
        if not keep:
            continue
        params = {k: p.to(device).requires_grad_() for k, p in params.items()}
        groups.append(models.Group(arch, keep.start - mine.start, keep.stop - mine.start, params,
                                   buffers, net))
    params = models.parameters(groups)
    # Both are elementwise, so the state of stacked weights is per client; the fused kernels
    # update all of a tensor in one pass (~10x faster than the per-op loop on CPU).
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay, fused=True)

    data = dataclasses.replace(data, x_train=data.x_train.to(device), y_train=data.y_train.to(device),
                               x_test=data.x_test.to(device), y_test=data.y_test.to(device))
    return Simulation(cfg, device, shard, data, layout, mine, rows.to(device), counts,
                      public_idx.to(device), label_dist[shard.start:shard.stop].to(device), groups,
                      optimizer, schedule, num_heads,
                      heads_sent(num_heads, nu_aux=cfg.nu_aux, nu_main=cfg.nu_main),
                      torch.Generator().manual_seed(cfg.train_seed))


# ---- one round -----------------------------------------------------------------------------

def _sample_private(sim: Simulation) -> Tensor:
    """[n_model, B] training rows: each client draws uniformly (with replacement) from its own.
    The draw covers all N_model clients and keeps this process's rows."""
    u = torch.rand(sim.num_model, sim.cfg.batch_size, generator=sim.gen)
    u = u[sim.model_rows.start:sim.model_rows.stop]
    pos = (u * sim.private_count.unsqueeze(1)).long()
    return sim.private_rows.gather(1, _to_device(pos, sim.device))


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the device without a host sync: on CUDA copied from pinned memory,
    asynchronously (a pageable copy waits for the stream)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def _fedavg(sim: Simulation, route: ex.Route) -> Tensor:
    """FedAvg's averaging over the round's route (``exchange.average_weights``). Returns the
    bytes per directed edge into this process's clients [n, N] (all weights over every edge)."""
    edge_bytes, sent = ex.average_weights(models.parameters(sim.groups), route)
    sim.bytes_cross_rank += sent
    return edge_bytes


def learning_rate(cfg: Config, step: int) -> float:
    """Cosine decay from lr to lr / 10 over rounds · steps_per_round steps (or constant).
    A function of the step alone, so a resumed run follows the same schedule."""
    if not cfg.lr_decay:
        return cfg.lr
    progress = min(1.0, step / max(1, cfg.rounds * cfg.steps_per_round - 1))
    return cfg.lr / 10 + 0.5 * (cfg.lr - cfg.lr / 10) * (1 + math.cos(math.pi * progress))


def sample_batches(sim: Simulation) -> tuple[Tensor, bool]:
    """The step's draws from the training generator: private rows [N_model, Bp] and, when the
    exchange is refreshed, a new public batch (stored in sim.public_batch). Between refreshes
    the students keep training on the public rows the stale predictions were made on.
    Returns (private rows, refresh)."""
    rows = _sample_private(sim)
    refresh = sim.distills and (sim.received is None or sim.step % sim.cfg.exchange_every == 0)
    if refresh:
        pick = torch.randint(len(sim.public_rows), (sim.cfg.public_batch_size,), generator=sim.gen)
        sim.public_batch = sim.public_rows[_to_device(pick, sim.device)]
    return rows, refresh


def smooth_teacher(sim: Simulation, got: Received, rows: Tensor) -> Received:
    """--teacher-ema β: the teachers of the public rows ``rows`` [B] (indices into x_train)
    replaced by an EMA of what the exchanges that drew each row sent, per client, head and
    row: p̄ <- β·p̄ + (1 − β)·softmax(T/τ) (the first draw sets p̄), sent on as τ·log p̄, whose
    softmax at τ is p̄. Teachers then change slowly while the clients' predictions jump from
    step to step. One process, dense logits (``validate`` and ``setup`` check both)."""
    cfg = sim.cfg
    p = (got.teacher.float() / cfg.tau).softmax(-1)                      # [N, H1, B, V]
    if sim.ema is None:
        sim.ema = p.new_zeros(*p.shape[:2], len(sim.public_rows), p.shape[-1])
        sim.ema_seen = torch.zeros(len(sim.public_rows), dtype=torch.bool, device=p.device)
    where = torch.full((len(sim.data.y_train),), -1, dtype=torch.int64, device=p.device)
    where[sim.public_rows] = torch.arange(len(sim.public_rows), device=p.device)
    pos = where[rows]  # a row drawn twice in one batch gets the same value twice
    seen = sim.ema_seen[pos][:, None]
    old = sim.ema[:, :, pos]
    sim.ema[:, :, pos] = torch.where(seen, cfg.teacher_ema * old + (1 - cfg.teacher_ema) * p, p)
    sim.ema_seen[pos] = True
    teacher = (cfg.tau * sim.ema[:, :, pos].log()).to(got.teacher.dtype)
    return dataclasses.replace(got, teacher=teacher)


def local_step(sim: Simulation, adj: Tensor, route: ex.Route | None = None) -> Received | None:
    """One step for every client of this process; returns the exchange it refreshed, if any.
    adj: the round's graph [N, N]; route: its ``exchange.route`` (made here if None)."""
    cfg, d = sim.cfg, sim.data
    rows, refresh = sample_batches(sim)                                  # [N, Bp]
    x, y = d.x_train[rows], d.y_train[rows]
    if sim.distills:
        x_pub = d.x_train[sim.public_batch]
        # One forward for private and public rows: every client sees the same public rows.
        x = torch.cat([x, x_pub.unsqueeze(0).expand(x.shape[0], *x_pub.shape)], dim=1)
    if refresh and route is None:
        route = ex.route(adj, sim.shard)
    step_loss = _compiled(_step_loss, sim) if cfg.compile else _step_loss
    with trusted_packets():  # the exchange's packets come from its own topk_compress
        loss, terms, fresh = step_loss(sim, x, y, route, refresh)

    # Summed on the device, read once a round (``nonfinite`` and the round's record): no host
    # sync per step. Per client in fp64, so that the sums do not depend on the sharding (and a
    # copy: a CUDA graph's output is overwritten by its next replay).
    terms = terms.detach().double()
    sim.loss_sum = terms if sim.loss_sum is None else sim.loss_sum + terms
    sim.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in sim.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, sim.step)
    sim.optimizer.step()
    sim.step += 1
    return fresh


_COMPILED: dict = {}


def _compiled(fn, sim: Simulation):
    """fn under torch.compile, made once per function and device kind: on CUDA
    mode="reduce-overhead" (CUDA graphs) when every step refreshes the exchange (a stale one
    would read a graph output that the next replay overwrote), else the default mode."""
    graphs = sim.device.type == "cuda" and sim.cfg.exchange_every == 1
    key = (fn, graphs)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, mode="reduce-overhead" if graphs else None, dynamic=False)
    return _COMPILED[key]


def _step_loss(sim: Simulation, x: Tensor, y: Tensor, route: ex.Route | None,
               refresh: bool) -> tuple[Tensor, Tensor, Received | None]:
    """The step's compute before its backward: forward of all clients on x [N, Bp (+ B), ...],
    the exchange when refreshed, the losses -> (summed loss, the per-client loss terms [n, *]
    before the weights nu (``loss_terms``), the fresh exchange or None)."""
    cfg = sim.cfg
    bp = cfg.batch_size
    logits, emb = models.forward_groups(sim.groups, x, shared=False, num_heads=sim.num_heads,
                                        train=True, seed=models.step_seed(cfg.train_seed, sim.step))
    v = logits.shape[-1]
    ce = F.cross_entropy(logits[:, 0, :bp].reshape(-1, v), y.reshape(-1), reduction="none")
    ce = ce.view(-1, bp).mean(dim=1)                                     # [n] each client's mean
    loss = ce.sum()
    terms = [ce.unsqueeze(1)]

    fresh = None
    if sim.distills:
        z = logits[:, :, bp:]                                            # [N, H1, B, V]
        emb_pub = emb[:, bp:] if emb is not None else None
        if refresh:
            sim.received = fresh = ex.exchange(z, emb_pub if cfg.nu_emb > 0 else None, route,
                                               heads=sim.heads_sent, topk=cfg.topk,
                                               wire_dtype=WIRE_DTYPES[cfg.wire_dtype],
                                               tau=cfg.tau, backend=cfg.backend)
            if cfg.teacher_ema > 0:
                sim.received = fresh = smooth_teacher(sim, fresh, sim.public_batch)
        got = sim.received
        # One call covers every student of this process: the loss runs over the M candidates
        # of the exchange (this process's clients at got.rows, the teachers they heard around).
        zc = students(z, got)                                            # [M, H1, B, V]
        opts = dict(tau=cfg.tau, include_self=cfg.include_self, aggregate=cfg.aggregate,
                    backend=cfg.backend)
        if cfg.nu_aux > 0 and sim.num_heads > 1:
            aux = mhd_fast.mhd_loss(zc, got.teacher, got.adj, **opts)[got.rows]  # [n, H, B]
            aux = aux.mean(dim=-1)
            loss = loss + cfg.nu_aux * aux.sum()
            terms.append(aux)
        if cfg.nu_main > 0:
            main = mhd_fast.distill_loss(zc[:, :1], map_teacher(lambda t: t[:, :1], got.teacher),
                                         got.adj, **opts)[got.rows]      # [n, 1, B]
            main = main.mean(dim=-1)
            loss = loss + cfg.nu_main * main.sum()
            terms.append(main)
        if cfg.nu_emb > 0:
            target, has = neighbour_mean(got.emb, got.adj, include_self=cfg.include_self)
            target, has = target[got.rows], has[got.rows]
            mse = (emb_pub - target).square().mean(dim=(1, 2))
            mse = torch.where(has, mse, torch.zeros_like(mse))
            loss = loss + cfg.nu_emb * mse.sum()
            terms.append(mse.unsqueeze(1))
    return loss, torch.cat(terms, dim=1), fresh


def train_round(sim: Simulation, r: int) -> tuple[Tensor, Tensor]:
    """The local steps of round r (0-based), then FedAvg's averaging for that method.
    Returns the bytes of the round per directed edge into this process's clients [n, N]
    int64: (sent, dense fp32); the bytes sent to other processes add to sim.bytes_cross_rank."""
    adj = sim.schedule(r).to(sim.device)  # the graph of this round (time-varying schedules)
    route = ex.route(adj, sim.shard)
    sent = torch.zeros(sim.shard.size, adj.shape[1], dtype=torch.int64, device=sim.device)
    dense = torch.zeros_like(sent)
    for _ in range(sim.cfg.steps_per_round):
        got = local_step(sim, adj, route)
        if got is not None:
            sent += got.edge_bytes
            dense += got.dense_edge_bytes
            sim.bytes_cross_rank += got.cross_rank_bytes
    if sim.cfg.method == "fedavg":
        weights = _fedavg(sim, route)
        sent += weights
        dense += weights
    return sent, dense


def loss_terms(sim: Simulation) -> dict[str, float]:
    """The columns of ``sim.loss_sum`` in order, each with its weight in the loss: "ce" (head
    0 on the private rows), "aux_head1" .. "aux_headH" (the aux heads' distillation), "main"
    (head 0's distillation) and "emb" (the embedding MSE), the ones this run has."""
    cfg, terms = sim.cfg, {"ce": 1.0}
    if sim.distills:
        if cfg.nu_aux > 0 and sim.num_heads > 1:
            terms.update({f"aux_head{h}": cfg.nu_aux for h in range(1, sim.num_heads)})
        if cfg.nu_main > 0:
            terms["main"] = cfg.nu_main
        if cfg.nu_emb > 0:
            terms["emb"] = cfg.nu_emb
    return terms


def nonfinite(sim: Simulation) -> Tensor:
    """[2] int64 on the device: whether the steps' loss since the last call was not finite,
    and how many weight tensors of this process hold a NaN or inf. Starts a new loss sum."""
    loss = sim.loss_sum if sim.loss_sum is not None else torch.zeros((), device=sim.device)
    sim.loss_sum = None
    weights = torch.stack([p.isfinite().all() for p in models.parameters(sim.groups)])
    return torch.stack([~loss.isfinite().all(), (~weights).sum()]).long()


# ---- evaluation ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(sim: Simulation, chunk: int | None = None) -> tuple[Tensor | None, Tensor | None, float]:
    """Private [N, H1] and shared [N, H1] accuracy of every client and head on the test set,
    and the shared accuracy of the ensemble of all main heads. Test rows go in chunks so that
    the activations of N clients stay bounded. Each process measures its own clients; the
    accuracies are gathered to rank 0 (None on the other ranks), the ensemble's votes are
    summed over ranks."""
    x_test, y_test = sim.data.x_test, sim.data.y_test
    v = sim.data.num_classes
    per_row = sum(g.size * models.activation_floats(g.arch, sim.data.input_shape, sim.num_heads * v)
                  for g in sim.groups)
    chunk = chunk or max(1, min(len(y_test), 2**25 // per_row))  # ~128 MB per activation
    correct = []
    votes = torch.zeros(len(y_test), v, dtype=torch.float64, device=sim.device)
    for start in range(0, len(y_test), chunk):
        logits, _ = models.forward_groups(sim.groups, x_test[start:start + chunk], shared=True,
                                          num_heads=sim.num_heads, train=False)  # [n, H1, b, V]
        correct.append(logits.argmax(-1) == y_test[start:start + chunk])
        # fp64 sums: the vote does not depend on how the clients are split over ranks
        votes[start:start + chunk] = logits[:, 0].float().softmax(-1).sum(0, dtype=torch.float64)
    D.all_sum(votes, sim.shard, "the ensemble's votes")
    correct = torch.cat(correct, dim=-1)
    if sim.num_model != sim.num_clients:  # centralized: one model, judged on every client's label mix
        correct = correct.expand(sim.num_clients, *correct.shape[1:])
    private, shared = M.private_shared(correct, y_test, sim.label_dist)
    ensemble = float((votes.argmax(-1) == y_test).double().mean())  # sync: one scalar
    parts = D.gather_objects((private, shared), sim.shard, "gathering the accuracies")
    if parts is None:
        return None, None, ensemble
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts]), ensemble


# Public rows the gap to the ensemble is measured on each round: a fixed sample (the public
# rows are in random order), large enough for a stable mean, small next to a round's steps.
GAP_ROWS = 512


@torch.no_grad()
def measure_gap(sim: Simulation, r: int) -> dict:
    """``metrics.gap_record`` of round r: the predictions of every client on the first GAP_ROWS
    public rows, their exchange over the round's graph (dense fp32, fresh: the teachers a
    refresh would give now, or their EMA with --teacher-ema) and the targets the aux heads
    would get from it, against the rows' labels, and each head against the ensemble of all main heads. Counts are summed over
    ranks; every rank returns the record."""
    rows = sim.public_rows[:GAP_ROWS]
    y = sim.data.y_train[rows]
    logits, _ = models.forward_groups(sim.groups, sim.data.x_train[rows], shared=True,
                                      num_heads=sim.num_heads)           # [n, H1, B, V]
    votes = logits[:, 0].float().softmax(-1).sum(0, dtype=torch.float64)
    D.all_sum(votes, sim.shard, "the ensemble's votes on public rows")
    ens = votes.argmax(-1)
    pred = logits.argmax(-1)
    g = sim.num_heads - 1
    hits = torch.zeros(g, dtype=torch.int64, device=sim.device)
    teachers = torch.zeros((), dtype=torch.int64, device=sim.device)
    if g > 0 and sim.num_model == sim.num_clients:
        adj = sim.schedule(r).to(sim.device)
        got = ex.exchange(logits, None, ex.route(adj, sim.shard), heads=list(range(g)),
                          tau=sim.cfg.tau, backend=sim.cfg.backend)
        if sim.ema is not None:  # the smoothed teachers of the rows drawn so far
            seen = sim.ema_seen[:len(rows)][:, None]
            got.teacher = torch.where(seen, sim.cfg.tau * sim.ema[:, :, :len(rows)].log(),
                                      got.teacher)
        right, has = M.teacher_hits(got.teacher[:, :-1], got.adj, y, tau=sim.cfg.tau,
                                    include_self=sim.cfg.include_self,
                                    aggregate=sim.cfg.aggregate)
        hits, teachers = right[got.rows].sum(0), has[got.rows].sum()
    # every rank holds the whole ensemble: rank 0 alone counts its hits
    counts = torch.cat([hits, teachers[None], (pred == y).sum((0, 2)), (pred == ens).sum((0, 2)),
                        (ens == y).sum()[None] * int(sim.shard.lead)])
    D.all_sum(counts, sim.shard, "the gap counts")
    counts = counts.cpu()  # sync: one small vector a round
    h1 = sim.num_heads
    return M.gap_record(counts[:g], int(counts[g]), counts[g + 1:g + 1 + h1],
                        counts[g + 1 + h1:g + 1 + 2 * h1], int(counts[-1]), len(rows),
                        sim.num_model)


# ---- the run -------------------------------------------------------------------------------

def run(cfg: Config, *, resume: bool = False,
        on_round: Callable[[int, dict], object] | None = None) -> dict | None:
    """Train for cfg.rounds rounds, checkpointing after each; write the outputs to cfg.out.
    Returns the metrics dict (the content of metrics.json): ``status`` "finished", or
    "diverged" when a round's loss or weights were not finite (the run stops there; its
    checkpoint is the last finite state). Under torchrun the run is sharded over the ranks,
    rank 0 writes and returns the metrics, the others return None ({"status": "diverged"} alone
    when the run diverged). While it runs it holds
    cfg.out (``outdir.claim``): another run on the same folder raises ValueError.
    cfg.out None: no file at all (no lock, checkpoint, report or plots).
    on_round(r, record): called on rank 0 after round r with its entry of metrics["rounds"]."""
    if cfg.out is None and resume:
        raise ValueError("--resume needs --out, the folder of the checkpoint to resume from")
    owned = D.init(resolve_device(cfg.device), cfg.dist_timeout)
    clean = False
    try:
        out = _run(cfg, resume, on_round)
        clean = True
        return out
    finally:
        if owned:
            D.shutdown(clean)


def _claim(out: str, shard: D.Shard) -> outdir.Claim | None:
    """Rank 0 (which alone writes) claims the output folder; every rank stops with its error."""
    held, error = None, None
    if shard.lead:
        try:
            held = outdir.claim(out)
        except ValueError as e:
            error = str(e)
    error = D.scatter_objects([error] * shard.world if shard.lead else None, shard,
                              "claiming the output folder")
    if error is not None:
        raise ValueError(error)
    return held


def _run(cfg: Config, resume: bool, on_round) -> dict | None:
    sim = setup(cfg)
    history: list[dict] = []
    totals = {"edge_bytes": torch.zeros(sim.shard.size, cfg.clients, dtype=torch.int64),
              "bytes_dense": 0}
    start = 0
    if resume:
        start, history, totals = ckpt.restore(os.path.join(cfg.out, ckpt.FILENAME), sim)
    held = _claim(cfg.out, sim.shard) if cfg.out is not None else None
    board = None
    try:
        if cfg.tensorboard is not None and sim.shard.lead:
            board = M.tensorboard(cfg.tensorboard, cfg.name, start)
        return _rounds(sim, start, history, totals, on_round, board)
    finally:
        if board is not None:
            board.close()
        if held is not None:
            held.release()


def _rounds(sim: Simulation, start: int, history: list[dict], totals: dict,
            on_round, board) -> dict | None:
    """Rounds start .. cfg.rounds − 1, then the outputs (rank 0's metrics, None elsewhere).
    board: rank 0's TensorBoard writer, or None."""
    from tqdm import tqdm

    cfg, lead = sim.cfg, sim.shard.lead
    writes = cfg.out is not None
    bar = tqdm(range(start, cfg.rounds), initial=start, total=cfg.rounds, desc=cfg.name,
               unit="round", disable=not (cfg.progress and lead), dynamic_ncols=True)
    evaluated = False
    diverged = None
    for r in bar:
        t0 = time.perf_counter()
        cross_before = sim.bytes_cross_rank
        edge_sent, edge_dense = train_round(sim, r)
        losses = sim.loss_sum.sum(dim=0)  # [T] over this process's clients
        counts = torch.cat([torch.stack([edge_sent.sum(), edge_dense.sum(),
                                         edge_sent.new_tensor(sim.bytes_cross_rank - cross_before)]),
                            nonfinite(sim)])
        # sync: also an honest round time, and the round's divergence check on every rank
        sent, dense, cross, bad_loss, bad_weights = D.all_sum(counts, sim.shard,
                                                              "the byte counts").tolist()
        if bad_loss or bad_weights:
            diverged = {"round": r, "loss": bool(bad_loss), "weights": bool(bad_weights)}
            break
        time_s = time.perf_counter() - t0
        losses = D.all_sum(losses, sim.shard, "the loss sums").tolist()
        totals["edge_bytes"] += edge_sent.cpu()
        totals["bytes_dense"] += dense
        private, shared, ensemble = evaluate(sim)
        gap = dict(measure_gap(sim, r), ensemble_shared_acc=ensemble)
        evaluated = True
        if lead:
            rec = M.round_record(r, time_s, sent, private, shared, dense, bytes_cross_rank=cross,
                                 loss_sum=_loss_record(sim, losses), gap=gap)
            history.append(rec)
            bar.set_postfix(_postfix(rec))
            if board is not None:  # before the checkpoint: a resume re-logs, never skips, a round
                M.log_round(board, rec)
        if cfg.checkpoint and writes:
            ckpt.save(os.path.join(cfg.out, ckpt.FILENAME), sim, r + 1, history, totals)
        if lead and on_round is not None:  # after the checkpoint: if it raises, round r is kept
            on_round(r, rec)
    bar.close()
    if diverged is not None:
        if not lead:  # so that every rank's exit status says the run failed
            return {"status": "diverged"}
        metrics = {"status": "diverged", "config": to_dict(cfg), "world_size": sim.shard.world,
                   "rounds": history, "diverged": diverged}
        if writes:
            M.write_outputs(cfg.out, metrics, None, None, describe(sim.schedule))
        return metrics
    if not evaluated:  # resumed a run that had already finished: measure the final state
        private, shared, ensemble = evaluate(sim)

    edge_bytes = totals["edge_bytes"]
    counts = torch.stack([edge_bytes.sum(), (edge_bytes > 0).sum(),
                          torch.tensor(sim.bytes_cross_rank)]).to(sim.device)
    # used: directed edges that carried anything in the run
    total, used, cross = D.all_sum(counts, sim.shard, "the byte totals").tolist()
    if not lead:
        return None
    metrics = {"status": "finished", "config": to_dict(cfg), "world_size": sim.shard.world,
               "rounds": history,
               "final": M.final_record(private, shared, ensemble, total, totals["bytes_dense"],
                                       total / max(1, used), bytes_cross_rank=cross)}
    if writes:
        M.write_outputs(cfg.out, metrics, private, shared, describe(sim.schedule))
    return metrics


def _loss_record(sim: Simulation, sums: list[float]) -> dict[str, float]:
    """A round's loss sums by name: "total" (the objective, each term times its weight nu),
    then each of ``loss_terms``."""
    terms = loss_terms(sim)
    total = sum(nu * x for nu, x in zip(terms.values(), sums))
    return {"total": total, **dict(zip(terms, sums))}


def _postfix(rec: dict) -> dict:
    out = {"priv0": f"{rec['private_acc']['head0']:.3f}", "shared0": f"{rec['shared_acc']['head0']:.3f}"}
    best = M.best_aux(rec["shared_acc"])
    if best is not None:
        out[f"shared_{best[0]}"] = f"{best[1]:.3f}"
    return out
