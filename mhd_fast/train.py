"""The simulator: decentralized MHD training of all clients at once, round by round.

Reads top to bottom: ``setup`` turns a Config into data, clients, graph and models;
``train_round`` runs the local steps of one round (private CE step, predictions on the public
batch, exchange over the graph, the fused distillation loss, one optimizer step for all
clients); ``evaluate`` measures private and shared accuracy; ``run`` loops over rounds with a
checkpoint after each and writes the outputs.

One step, for all N clients at once (the loss is the SUM over clients of each client's own
loss, so each client's gradient is its own):
    L_i = CE(head 0 on i's private batch)
        + nu_aux  · Σ_h mean_b mhd_loss[i, h, b]           (aux head h <- teachers' head h−1)
        + nu_main · mean_b distill_loss(head 0 <- neighbours' head 0)[i, b]
        + nu_emb  · mean_{b,e} (emb[i] − mean_{j ∈ C(i)} emb_j)²  (C(i): i's candidates)
Teachers are the predictions received in the latest exchange: this step's own predictions
(detached) when exchange_every = 1, else up to exchange_every − 1 steps stale, on the public
batch of that exchange.

Host-device syncs are marked "# sync:" — a CUDA run pays for each of them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import mhd_fast
from . import checkpoint as ckpt
from . import metrics as M
from . import models
from .config import Config, to_dict
from .data import Dataset, load_dataset, split_public
from .exchange import WIRE_DTYPES, Received, exchange, heads_sent, neighbour_mean
from .ops.api import TopKLogits
from .partition import label_distribution, partition
from .topology import describe, make_schedule


@dataclass
class Simulation:
    """Everything a run holds; plain tensors and lists, no hidden state."""

    cfg: Config
    device: torch.device
    data: Dataset                 # x_train / y_train / x_test / y_test on ``device``
    private_rows: Tensor          # [N_model, L] int64 indices into x_train, padded by repetition
    private_count: Tensor         # [N_model] int64 (CPU): real rows per model client
    public_rows: Tensor           # [P] int64 indices into x_train (labels never used)
    label_dist: Tensor            # [N, V] each client's training label distribution
    groups: list[models.Group]    # client groups, one per architecture, batched
    optimizer: torch.optim.Optimizer
    schedule: object              # round -> adj [N, N] bool
    num_heads: int                # H1 = 1 + aux heads
    heads_sent: list[int]         # heads whose predictions cross the edges
    gen: torch.Generator          # the training stream: batches (CPU, so any device replays it)
    step: int = 0                 # local steps done over the whole run
    received: Received | None = None     # the latest exchange (stale between refreshes)
    public_batch: Tensor | None = None   # [B] the public rows of that exchange

    @property
    def distills(self) -> bool:
        c = self.cfg
        return c.method in ("mhd", "mean_distill") and (c.nu_aux > 0 or c.nu_main > 0 or c.nu_emb > 0)

    @property
    def num_clients(self) -> int:
        return self.cfg.clients


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


def setup(cfg: Config) -> Simulation:
    """Data, partition, graph, models and optimizer of a resolved, validated Config.
    Raises ValueError (naming the option) for anything that depends on the data."""
    device = resolve_device(cfg.device)
    split_gen = torch.Generator().manual_seed(cfg.split_seed)
    seeds = torch.randint(0, 2**31 - 1, (3,), generator=split_gen).tolist()  # data, partition, graph

    try:
        data = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=seeds[0],
                            num_classes=cfg.num_classes)
    except OSError as e:
        raise ValueError(f"--data-dir: cannot read the {cfg.dataset} files: {e}") from None
    v = data.num_classes
    if cfg.topk > v:
        raise ValueError(f"--topk must be <= the number of classes V = {v} of {cfg.dataset}, got {cfg.topk}")
    private_idx, public_idx = split_public(len(data.y_train), cfg.public_fraction, seed=seeds[0])
    if cfg.clients > len(private_idx):
        raise ValueError(f"--clients {cfg.clients} is more than the {len(private_idx)} private "
                         f"training samples of {cfg.dataset}")
    parts = partition(data.y_train[private_idx], cfg.clients, method=cfg.partition, seed=seeds[1],
                      skew=cfg.skew, alpha=cfg.dirichlet, shards_per_client=cfg.shards,
                      samples_per_client=cfg.samples_per_client)
    parts = [private_idx[p] for p in parts]  # positions in the private slice -> training rows
    label_dist = label_distribution(data.y_train, parts, v)
    schedule = make_schedule(cfg.graph, cfg.clients, seed=seeds[2], **cfg.graph_options)

    if cfg.method == "centralized":  # one model on the union of private data (upper bound)
        parts = [torch.cat(parts)]
    rows, counts = _pad_rows(parts)

    num_heads = 1 + cfg.heads
    n_model = len(parts)
    archs = [models.parse_arch(s, option="--model") for s in cfg.model]
    init_gen = torch.Generator().manual_seed(cfg.init_seed)
    groups = []
    for arch, start, stop in models.split_groups(n_model, archs[:n_model]):
        params = models.init_params(arch, stop - start, data.input_shape, v, num_heads, init_gen)
        if cfg.method == "fedavg":
            # FedAvg starts every client from one (server) model: averaging independently
            # drawn networks would destroy them, as their hidden units do not line up.
            params = {k: p[:1].expand_as(p).clone() for k, p in params.items()}
        params = {k: p.to(device).requires_grad_() for k, p in params.items()}
        groups.append(models.Group(arch, start, stop, params))
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
    return Simulation(cfg, device, data, rows.to(device), counts, public_idx.to(device),
                      label_dist.to(device), groups, optimizer, schedule, num_heads,
                      heads_sent(num_heads, nu_aux=cfg.nu_aux, nu_main=cfg.nu_main),
                      torch.Generator().manual_seed(cfg.train_seed))


# ---- one round -----------------------------------------------------------------------------

def _head_slice(teacher: Tensor | TopKLogits, heads: slice) -> Tensor | TopKLogits:
    if isinstance(teacher, TopKLogits):
        return TopKLogits(*(t[:, heads] for t in teacher))
    return teacher[:, heads]


def _sample_private(sim: Simulation) -> Tensor:
    """[N_model, B] training rows: each client draws uniformly (with replacement) from its own."""
    u = torch.rand(sim.private_rows.shape[0], sim.cfg.batch_size, generator=sim.gen)
    pos = (u * sim.private_count.unsqueeze(1)).long()
    return sim.private_rows.gather(1, pos.to(sim.device))


def _fedavg(sim: Simulation, adj: Tensor) -> Tensor:
    """Each client's weights <- the mean over itself and the clients it hears (complete graph:
    FedAvg with equal client weights). Returns the bytes per directed edge [N, N] (all fp32
    weights over every edge)."""
    eye = torch.eye(sim.num_clients, dtype=torch.bool, device=adj.device)
    mix = (adj | eye).to(torch.float32)
    mix = mix / mix.sum(dim=1, keepdim=True)
    with torch.no_grad():
        for p in models.parameters(sim.groups):
            p.copy_(torch.einsum("ij,j...->i...", mix, p))
    return (adj & ~eye).to(torch.int64) * (sum(models.num_params_per_client(sim.groups)) * 4)


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
        sim.public_batch = sim.public_rows[pick.to(sim.device)]
    return rows, refresh


def local_step(sim: Simulation, adj: Tensor) -> Received | None:
    """One step for every client; returns the exchange it refreshed, if any."""
    cfg, d = sim.cfg, sim.data
    rows, refresh = sample_batches(sim)                                  # [N, Bp]
    x, y = d.x_train[rows], d.y_train[rows]
    bp = cfg.batch_size
    if sim.distills:
        x_pub = d.x_train[sim.public_batch]
        # One forward for private and public rows: every client sees the same public rows.
        x = torch.cat([x, x_pub.unsqueeze(0).expand(x.shape[0], *x_pub.shape)], dim=1)

    logits, emb = models.forward_groups(sim.groups, x, shared=False, num_heads=sim.num_heads)
    v = logits.shape[-1]
    ce = F.cross_entropy(logits[:, 0, :bp].reshape(-1, v), y.reshape(-1), reduction="none")
    loss = ce.view(-1, bp).mean(dim=1).sum()  # sum over clients of each client's mean CE

    fresh = None
    if sim.distills:
        z = logits[:, :, bp:]                                            # [N, H1, B, V]
        emb_pub = emb[:, bp:] if emb is not None else None
        if refresh:
            sim.received = fresh = exchange(z, emb_pub if cfg.nu_emb > 0 else None, adj,
                                            heads=sim.heads_sent, topk=cfg.topk,
                                            wire_dtype=WIRE_DTYPES[cfg.wire_dtype], tau=cfg.tau,
                                            backend=cfg.backend)
        got = sim.received
        opts = dict(tau=cfg.tau, include_self=cfg.include_self, aggregate=cfg.aggregate,
                    backend=cfg.backend)
        if cfg.nu_aux > 0 and sim.num_heads > 1:
            aux = mhd_fast.mhd_loss(z, got.teacher, got.adj, **opts)     # [N, H, B]
            loss = loss + cfg.nu_aux * aux.mean(dim=-1).sum()
        if cfg.nu_main > 0:
            main = mhd_fast.distill_loss(z[:, :1], _head_slice(got.teacher, slice(0, 1)),
                                         got.adj, **opts)                # [N, 1, B]
            loss = loss + cfg.nu_main * main.mean(dim=-1).sum()
        if cfg.nu_emb > 0:
            target, has = neighbour_mean(got.emb, got.adj, include_self=cfg.include_self)
            mse = (emb_pub - target).square().mean(dim=(1, 2))
            loss = loss + cfg.nu_emb * torch.where(has, mse, torch.zeros_like(mse)).sum()

    sim.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in sim.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, sim.step)
    sim.optimizer.step()
    sim.step += 1
    return fresh


def train_round(sim: Simulation, r: int) -> tuple[Tensor, Tensor]:
    """The local steps of round r (0-based), then FedAvg's averaging for that method.
    Returns the bytes of the round per directed edge [N, N] int64: (sent, dense fp32)."""
    adj = sim.schedule(r).to(sim.device)  # the graph of this round (time-varying schedules)
    sent = torch.zeros(adj.shape, dtype=torch.int64, device=sim.device)
    dense = torch.zeros_like(sent)
    for _ in range(sim.cfg.steps_per_round):
        got = local_step(sim, adj)
        if got is not None:
            sent += got.edge_bytes
            dense += got.dense_edge_bytes
    if sim.cfg.method == "fedavg":
        weights = _fedavg(sim, adj)
        sent += weights
        dense += weights
    return sent, dense


# ---- evaluation ----------------------------------------------------------------------------

@torch.no_grad()
def evaluate(sim: Simulation, chunk: int | None = None) -> tuple[Tensor, Tensor, float]:
    """Private [N, H1] and shared [N, H1] accuracy of every client and head on the test set,
    and the shared accuracy of the ensemble of all main heads. Test rows go in chunks so that
    the activations of N clients stay bounded."""
    x_test, y_test = sim.data.x_test, sim.data.y_test
    n_model = sim.private_rows.shape[0]
    v = sim.data.num_classes
    per_row = sum(g.size * models.activation_floats(g.arch, sim.data.input_shape, sim.num_heads * v)
                  for g in sim.groups)
    chunk = chunk or max(1, min(len(y_test), 2**25 // per_row))  # ~128 MB per activation
    correct, votes = [], []
    for start in range(0, len(y_test), chunk):
        logits, _ = models.forward_groups(sim.groups, x_test[start:start + chunk], shared=True,
                                          num_heads=sim.num_heads)      # [N, H1, b, V]
        correct.append(logits.argmax(-1) == y_test[start:start + chunk])
        votes.append(logits[:, 0].float().softmax(-1).mean(0).argmax(-1))
    correct = torch.cat(correct, dim=-1)
    if n_model != sim.num_clients:  # centralized: one model, judged on every client's label mix
        correct = correct.expand(sim.num_clients, *correct.shape[1:])
    private, shared = M.private_shared(correct, y_test, sim.label_dist)
    ensemble = float((torch.cat(votes) == y_test).double().mean())  # sync: one scalar
    return private, shared, ensemble


# ---- the run -------------------------------------------------------------------------------

def run(cfg: Config, *, resume: bool = False) -> dict:
    """Train for cfg.rounds rounds, checkpointing after each; write the outputs to cfg.out.
    Returns the metrics dict (the content of metrics.json)."""
    from tqdm import tqdm

    sim = setup(cfg)
    path = os.path.join(cfg.out, ckpt.FILENAME)
    history: list[dict] = []
    n = cfg.clients
    totals = {"edge_bytes": torch.zeros(n, n, dtype=torch.int64), "bytes_dense": 0}
    start = 0
    if resume:
        start, history, totals = ckpt.restore(path, sim)
    os.makedirs(cfg.out, exist_ok=True)

    graph_info = describe(sim.schedule)
    bar = tqdm(range(start, cfg.rounds), initial=start, total=cfg.rounds, desc=cfg.name,
               unit="round", disable=not cfg.progress, dynamic_ncols=True)
    private = shared = ensemble = None
    for r in bar:
        t0 = time.perf_counter()
        edge_sent, edge_dense = train_round(sim, r)
        sent, dense = int(edge_sent.sum()), int(edge_dense.sum())  # sync: also an honest round time
        time_s = time.perf_counter() - t0
        totals["edge_bytes"] += edge_sent.cpu()
        totals["bytes_dense"] += dense
        private, shared, ensemble = evaluate(sim)
        rec = M.round_record(r, time_s, sent, private, shared, dense)
        history.append(rec)
        bar.set_postfix(_postfix(rec))
        if cfg.checkpoint:
            ckpt.save(path, sim, r + 1, history, totals)
    if private is None:  # resumed a run that had already finished: measure the final state
        private, shared, ensemble = evaluate(sim)

    edge_bytes = totals["edge_bytes"]
    used = int((edge_bytes > 0).sum())  # directed edges that carried anything in the run
    metrics = {"config": to_dict(cfg), "rounds": history,
               "final": M.final_record(private, shared, ensemble, int(edge_bytes.sum()),
                                       totals["bytes_dense"], int(edge_bytes.sum()) / max(1, used))}
    M.write_outputs(cfg.out, metrics, private, shared, graph_info)
    return metrics


def _postfix(rec: dict) -> dict:
    out = {"priv0": f"{rec['private_acc']['head0']:.3f}", "shared0": f"{rec['shared_acc']['head0']:.3f}"}
    best = M.best_aux(rec["shared_acc"])
    if best is not None:
        out[f"shared_{best[0]}"] = f"{best[1]:.3f}"
    return out
