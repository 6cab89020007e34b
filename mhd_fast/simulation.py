"""A simulation's state and how it is built: ``setup`` turns a Config into data, the public
split, the clients' private rows, the graph schedule, the batched client models and their
optimizer, after checking (``check``) everything that depends on the data, memory included.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from . import distributed as D
from . import metrics as M
from . import models
from .config import Config, model_names
from .conv import loop_conv
from .data import Dataset, load_dataset, split_public, synthetic_bytes
from .exchange import Received, heads_sent
from .partition import label_distribution, partition
from .topology import make_schedule

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
    client_chunk: int = 0         # clients per chunk of a training step (``client_chunk``; 0 = all)

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


# The activations a step keeps at once, at most, when client_chunk = 0 (automatic). On the CPU
# a fixed size, not a share of the machine: the chunks (and the masks of random layers, drawn
# per chunk) are then the same on every machine; 1 GiB still gives the CPU's kernels large
# batches (resnet:8 on 28x28 images: 13 clients, 1,248 rows per convolution). A GPU needs
# larger ones to be busy: there, a quarter of its memory.
CHUNK_BYTES = 2**30


def _step_groups(cfg: Config, input_shape: tuple[int, ...], v: int, held: int | None):
    """Per group of the run: (arch, clients held, floats per client and row of a step's
    activations, whether its widest activation is the heads' output)."""
    n_model = 1 if cfg.method == "centralized" else cfg.clients
    held = n_model if held is None else held
    out_features = (1 + cfg.heads) * v
    archs = [models.parse_arch(m, option="--model") for m in cfg.model]
    for arch, start, stop in models.split_groups(n_model, archs):
        n = (stop - start) * held // n_model  # a sharded run splits every group over the ranks
        width = models.activation_floats(arch, input_shape, out_features)
        trunk_width = models.activation_floats(arch, input_shape, 0)
        if isinstance(arch, models.ModuleArch):  # a deep trunk keeps every layer's output
            trunk_width = max(trunk_width, models.trunk_info(arch, input_shape).activations)
            width = max(width, trunk_width)
        yield arch, n, width, width > trunk_width


def _step_rows(cfg: Config) -> int:
    return cfg.batch_size + (cfg.public_batch_size if cfg.method in ("mhd", "mean_distill") else 0)


def client_chunk(cfg: Config, input_shape: tuple[int, ...], v: int,
                 held: int | None = None) -> int:
    """The clients per chunk of a training step (``models.forward_groups``' chunk; 0 = all at
    once) of a process holding ``held`` clients: --client-chunk, or when 0 all at once if
    their activations fit ``CHUNK_BYTES`` (a quarter of the GPU's memory on CUDA), else the
    most clients whose activations fit it (at least 1)."""
    if cfg.client_chunk > 0:
        return cfg.client_chunk
    device = resolve_device(cfg.device)
    budget = _memory_limit(device)[0] // 4 if device.type == "cuda" else CHUNK_BYTES
    per_client = [(n, _step_rows(cfg) * width * 4)
                  for _, n, width, _ in _step_groups(cfg, input_shape, v, held)]
    if sum(n * b for n, b in per_client) <= budget:
        return 0
    return max(1, budget // max(b for _, b in per_client))


def memory_needs(cfg: Config, input_shape: tuple[int, ...], v: int,
                 held: int | None = None) -> list[tuple[str, int, str]]:
    """Lower bounds of what a process holding ``held`` of the clients (default all) needs,
    each with the option that sets it: the weights of the trunks and of the heads with their
    gradients and optimizer state, and one step's activations (the widest layer of every
    client on its private and public rows; in chunks of clients (``client_chunk``), those of
    one chunk and the inputs and outputs of all)."""
    n_model = 1 if cfg.method == "centralized" else cfg.clients
    held = n_model if held is None else held
    num_heads = 1 + cfg.heads
    copies = 4 * (2 + (2 if cfg.optimizer == "adam" else int(cfg.momentum > 0)))  # fp32 w, g, state
    public = cfg.public_batch_size if cfg.method in ("mhd", "mean_distill") else 0
    rows = _step_rows(cfg)
    chunk = client_chunk(cfg, input_shape, v, held)
    trunks = heads = acts = live = 0
    wide_heads = chunked = False
    for arch, n, width, wide in _step_groups(cfg, input_shape, v, held):
        trunk = models.num_params(arch, input_shape, v, 0)
        trunks += n * trunk * copies
        heads += n * (models.num_params(arch, input_shape, v, num_heads) - trunk) * copies
        if 0 < chunk < n:  # one chunk's activations at a time; every client's inputs and outputs
            kept = math.prod(input_shape) + num_heads * v + models.emb_dim(arch, input_shape)
            acts += n * rows * kept * 4
            live = max(live, chunk * rows * width * 4)
            chunked = True
        else:
            acts += n * rows * width * 4
        wide_heads |= wide
    option = (f"--batch-size {cfg.batch_size}" if cfg.batch_size >= public
              else f"--public-batch-size {cfg.public_batch_size}")
    if wide_heads:
        option = f"--heads {cfg.heads}"
    what = f"one step's activations of {held} clients on {rows} rows each"
    if chunked:
        if cfg.client_chunk:  # a chunk of 1 (automatic at worst) leaves the rows to blame
            option = f"--client-chunk {cfg.client_chunk}"
        what = (f"one step's activations of {chunk} clients at a time and the inputs and "
                f"outputs of all {held} on {rows} rows each")
    state = "with their gradients and optimizer state"
    return [(f"--model {model_names(cfg)}", trunks, f"the weights of {held} clients {state}"),
            (f"--heads {cfg.heads}", heads, f"the heads of {held} clients ({num_heads} of "
             f"{v} classes each) {state}"),
            (option, acts + live, what)]


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
    held = None if cfg.method == "centralized" else shard.size
    _check_memory(cfg, memory_needs(cfg, data.input_shape, v, held=held))

    if cfg.method == "centralized":  # one model on the union of private data (upper bound)
        parts = [torch.cat(parts)]
    n_model = len(parts)
    mine = shard.clients if n_model == cfg.clients else range(n_model)
    rows, counts = _pad_rows(parts[mine.start:mine.stop])

    num_heads = 1 + cfg.heads
    archs = [models.parse_arch(s, option="--model") for s in cfg.model]
    layout = models.split_groups(n_model, archs)
    init_gen = torch.Generator().manual_seed(cfg.init_seed)
    groups, loop = [], loop_conv(cfg.conv, device)
    for arch, start, stop in layout:  # every group is drawn, so the generator runs as in one process
        keep = D.overlap(range(start, stop), mine)
        # FedAvg starts every client from one (server) model, its first client's: averaging
        # independently drawn networks would destroy them, as their hidden units do not line up.
        drawn = (range(1) if cfg.method == "fedavg"
                 else range(keep.start - start, keep.stop - start) if keep else range(0))
        net, buffers = None, {}
        if isinstance(arch, models.ModuleArch):
            net, params, buffers = models.init_module(arch, stop - start, data.input_shape, v,
                                                      num_heads, init_gen, rows=drawn, device=device,
                                                      loop_conv=loop)
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
                                   buffers, net, models.looped(arch, net, loop)))
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
                      torch.Generator().manual_seed(cfg.train_seed),
                      client_chunk=client_chunk(cfg, data.input_shape, v, held))
