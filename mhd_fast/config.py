"""The run configuration: one dataclass with commented defaults (nanoGPT style), overridden by a
TOML or YAML file, then by command-line flags. Unknown keys are rejected by name.

Every field is also a flag: ``public_fraction`` is ``--public-fraction``. ``load`` merges the
layers, ``validate`` checks every value (ValueError naming the option) and ``resolve`` applies
what a method implies (e.g. ``isolated`` has no aux heads) and derives the seeds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field

import yaml

METHODS = ("mhd", "isolated", "fedavg", "mean_distill", "centralized")
OPTIMIZERS = ("adam", "sgd")
CONV_MODES = ("auto", "loop", "grouped")
DEVICES_HELP = "cpu, cuda or cuda:N"


@dataclass
class Config:
    # ---- data --------------------------------------------------------------------------
    dataset: str = "digits"          # digits (bundled, offline) | fashion_mnist | mnist | cifar10 | cifar100 | synthetic
    data_dir: str | None = None      # where IDX / pickle files are; None = the dataset's default location
    num_classes: int = 10            # classes of the synthetic Gaussian mixture (the others fix their own)
    public_fraction: float = 0.3     # share of the training set held out as the unlabeled public set
    # ---- clients, partition, graph -----------------------------------------------------
    clients: int = 16                # N
    partition: str = "skew"          # skew | dirichlet | shards | iid
    skew: float = 0.9                # skew s: a fraction s of each client's data from its primary classes
    dirichlet: float = 0.1           # Dirichlet alpha (partition = dirichlet)
    shards: int = 2                  # classes per client (partition = shards)
    samples_per_client: int | None = None  # cap on private samples per client; None = all of them
    graph: str = "complete"          # a topology of docs/method.md §5 (mhd-fast graph NAME describes it)
    graph_options: dict = field(default_factory=dict)  # passed to the topology, e.g. {k = 2} or {path = "edges.txt"}
    # ---- model -------------------------------------------------------------------------
    model: list = field(default_factory=lambda: ["mlp:128x64"])  # one or more archs; several = heterogeneous client groups
    heads: int = 3                   # aux heads H (head 0 is the main head); methods other than mhd use 0
    # ---- method and losses -------------------------------------------------------------
    method: str = "mhd"              # mhd | isolated | fedavg | mean_distill | centralized
    nu_aux: float = 0.25             # weight of each aux head's distillation (mhd); 0.25 beat 1.0 on digits and Fashion-MNIST (docs/RESULTS.md §8)
    nu_main: float = 0.0             # weight of head 0's distillation from neighbours' head 0 (mean_distill: 1 if 0)
    nu_emb: float = 0.0              # weight of the MSE to the mean of neighbours' public embeddings
    tau: float = 1.0                 # distillation temperature
    include_self: bool = False       # a client is its own teacher candidate
    aggregate: str = "max_confidence"  # max_confidence | mean | confidence_weighted (mean_distill: mean)
    topk: int = 0                    # 0 = dense logits on the wire, else top-k packets of K classes
    wire_dtype: str = "float32"      # float32 | float16 | bfloat16 for what crosses an edge
    exchange_every: int = 1          # refresh the received predictions every this many steps (stale in between)
    teacher_ema: float = 0.0         # beta of an EMA, per public row, of the teachers' distributions over the exchanges that drew it (0 = off: the method as specified; dense logits, one process)
    # ---- optimisation ------------------------------------------------------------------
    rounds: int = 40                 # rounds; metrics are taken after each (or every eval_every)
    steps_per_round: int = 20        # local steps per round, each one private + one public batch
    batch_size: int = 32             # private rows per client per step
    public_batch_size: int = 64      # public rows per step (the same rows for every client)
    optimizer: str = "adam"          # adam | sgd (state is per client: elementwise on stacked weights)
    lr: float = 1e-3
    lr_decay: bool = True            # cosine decay from lr to lr / 10 over all steps (nanoGPT style)
    momentum: float = 0.9            # sgd only
    weight_decay: float = 0.0
    # ---- run ---------------------------------------------------------------------------
    seed: int = 0                    # derives split_seed, init_seed and train_seed when they are None
    split_seed: int | None = None    # public split, partition, graph
    init_seed: int | None = None     # model weights
    train_seed: int | None = None    # batches
    device: str = "cpu"              # cpu | cuda | cuda:N
    backend: str = "auto"            # fused-op backend: auto | torch | cpp | triton
    conv: str = "auto"               # how a group's convolutional clients run: loop (one client's trunk at a time) | grouped (all at once, each convolution grouped, groups = N) | auto (loop on CPU, grouped on GPU); bench/bench_conv.py measures both
    client_chunk: int = 0            # clients whose activations a step keeps at once, the others recomputed in the backward (less memory, more compute); 0 = automatic: all, unless their activations exceed 1 GiB (CPU) or a quarter of the GPU's memory
    compile: bool = False            # torch.compile a step's forward, exchange and losses (CUDA graphs on CUDA when exchange_every = 1)
    name: str | None = None          # run name; None = DATASET-METHOD-sSEED
    out: str | None = None           # output folder; None = runs/NAME
    progress: bool = True            # tqdm bar per round
    checkpoint: bool = True          # write OUT/checkpoint.pt atomically after every round
    eval_every: int = 1              # measure the accuracies after every this many rounds and after the last (other rounds: time, bytes, losses)
    tensorboard: str | None = None   # folder of TensorBoard logs, a subfolder per run NAME (needs the tensorboard package); None = none
    dist_timeout: float = 300.0      # seconds a process of a torchrun launch waits for the others before it stops with an error


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def field_help(name: str) -> str:
    """The comment after a field in the Config source: the flag's help text."""
    m = re.search(rf"^\s+{name}:[^#\n]*#\s*(.*)$", inspect.getsource(Config), re.M)
    return m.group(1) if m else ""


def field_kind(name: str):
    """The value type of a field: int, float, str, bool, list or dict (None allowed where
    the hint says so)."""
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def optional(name: str) -> bool:
    return type(None) in typing.get_args(_HINTS[name])


def read_file(path: str) -> dict:
    """A TOML (.toml) or YAML (.yaml/.yml) file -> dict. ValueError naming --config."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".toml", ".yaml", ".yml"):
        raise ValueError(f"--config must be a .toml, .yaml or .yml file, got {path!r}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f) if ext == ".toml" else yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"--config: cannot read {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--config: {path!r} is not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start:e.start + 1]!r})") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"--config: {path!r} is not valid {ext[1:].upper()}: "
                         f"{str(e).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path!r} must hold a table of keys, got {type(data).__name__}")
    return data


def coerce(name: str, value, source: str):
    """A value from a file or a flag -> the field's type; ValueError naming the key."""
    if name not in FIELDS:
        raise ValueError(f"unknown key {name!r} in {source}; known keys: {', '.join(FIELDS)}")
    kind = field_kind(name)
    if value is None:
        if optional(name):
            return None
        raise ValueError(f"{name} in {source} must not be empty")
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list: isinstance(value, (list, str)) or (name == "model" and callable(value)),
        dict: isinstance(value, dict),
    }[kind]
    if not ok:
        raise ValueError(f"{name} in {source} must be {kind.__name__}, got {value!r}")
    if kind is float:
        return float(value)
    if kind is list:
        return list(value) if isinstance(value, list) else [value]
    return value


# Giving one of these keys (without ``partition`` in the same layer) picks its partition.
_IMPLIES_PARTITION = {"dirichlet": "dirichlet", "shards": "shards", "skew": "skew"}


def merge(cfg: Config, overrides: dict, source: str) -> Config:
    """cfg with the keys of one layer (a file or the flags) replaced; unknown keys rejected."""
    values = {k: coerce(k, v, source) for k, v in overrides.items()}
    if "partition" not in values:
        implied = [p for k, p in _IMPLIES_PARTITION.items() if k in values]
        if len(implied) == 1:
            values["partition"] = implied[0]
    return dataclasses.replace(cfg, **values)


def load(path: str | None = None, flags: dict | None = None, source: str = "the flags") -> Config:
    """Defaults, then the file at ``path``, then ``flags`` (named ``source`` in errors);
    validated and resolved."""
    cfg = Config()
    if path is not None:
        cfg = merge(cfg, read_file(path), f"--config {path!r}")
    if flags:
        cfg = merge(cfg, flags, source)
    validate(cfg)
    return resolve(cfg)


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def flag(name: str) -> str:
    """The command-line flag of a Config field: public_fraction -> --public-fraction."""
    return "--" + name.replace("_", "-")


# A collective that waits longer than this is stuck; beyond it timedelta and the process
# group's millisecond clocks overflow.
MAX_DIST_TIMEOUT = 7 * 24 * 3600.0
MAX_SEED = 2**63 - 1  # what TOML integers hold and derive_seed gives


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a name from undecodable bytes (surrogate escapes)
        return False


def validate(cfg: Config) -> None:
    """Checks that need no data: ranges and choices. Data-dependent checks (more clients than
    samples, topk > classes, a missing data dir) are made when the run is set up."""
    from . import models  # noqa: PLC0415  (models imports torch; keep config light to import)
    from .data import DATASETS
    from .exchange import WIRE_DTYPES
    from .ops import BACKENDS, MAX_TAU
    from .ops.reference import AGGREGATES
    from .partition import PARTITIONS
    from .topology import GRAPHS, check_options

    for name in FIELDS:  # inf or nan passes a range check written as "> 0" or ">= 0"
        value = getattr(cfg, name)
        if field_kind(name) is float and not math.isfinite(value):
            raise ValueError(f"{flag(name)} must be a finite number, got {value}")
    _need(cfg.method in METHODS, f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    _need(cfg.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    _need(cfg.partition in PARTITIONS, f"--partition must be one of {', '.join(PARTITIONS)}, "
          f"got {cfg.partition!r}")
    _need(cfg.graph in GRAPHS, f"--graph must be one of {', '.join(GRAPHS)}, got {cfg.graph!r}")
    try:
        check_options(cfg.graph, cfg.graph_options)
    except ValueError as e:
        raise ValueError(f"--graph-options: {e}") from None
    _need(cfg.clients >= 1, f"--clients must be >= 1, got {cfg.clients}")
    _need(0 < cfg.public_fraction < 1, f"--public-fraction must be in (0, 1), got {cfg.public_fraction}")
    _need(cfg.num_classes >= 2, f"--num-classes must be >= 2, got {cfg.num_classes}")
    _need(0 <= cfg.skew <= 1, f"--skew must be in [0, 1], got {cfg.skew}")
    _need(cfg.dirichlet > 0, f"--dirichlet must be > 0, got {cfg.dirichlet}")
    _need(cfg.shards >= 1, f"--shards must be >= 1, got {cfg.shards}")
    _need(cfg.samples_per_client is None or cfg.samples_per_client >= 1,
          f"--samples-per-client must be >= 1, got {cfg.samples_per_client}")
    _need(len(cfg.model) >= 1, "--model needs at least one architecture")
    archs = [models.parse_arch(spec, option="--model") for spec in cfg.model]
    # every architecture is a group of clients: one without clients would be silently dropped
    _need(len(cfg.model) <= cfg.clients, f"--model lists {len(cfg.model)} architectures for "
          f"{cfg.clients} clients; each architecture needs at least one client")
    _need(cfg.method != "centralized" or len(cfg.model) == 1, "--method centralized trains one "
          f"model, so it takes one --model architecture, got {model_names(cfg)}")
    _need(cfg.heads >= 0, f"--heads must be >= 0, got {cfg.heads}")
    _need(cfg.method != "mhd" or cfg.heads >= 1, f"--heads must be >= 1 for method mhd, got {cfg.heads}")
    for name in ("nu_aux", "nu_main", "nu_emb", "weight_decay"):
        _need(getattr(cfg, name) >= 0, f"{flag(name)} must be >= 0, got {getattr(cfg, name)}")
    _need(0 < cfg.tau <= MAX_TAU, f"--tau must be in (0, {MAX_TAU:g}] (where the fp32 loss is "
          f"accurate), got {cfg.tau}")
    _need(cfg.aggregate in AGGREGATES, f"--aggregate must be one of {', '.join(AGGREGATES)}, got {cfg.aggregate!r}")
    _need(cfg.topk >= 0, f"--topk must be 0 (dense) or >= 1, got {cfg.topk}")
    _need(cfg.wire_dtype in WIRE_DTYPES, f"--wire-dtype must be one of {', '.join(WIRE_DTYPES)}, got {cfg.wire_dtype!r}")
    _need(cfg.exchange_every >= 1, f"--exchange-every must be >= 1, got {cfg.exchange_every}")
    _need(0 <= cfg.teacher_ema < 1, f"--teacher-ema must be in [0, 1), got {cfg.teacher_ema}")
    _need(cfg.teacher_ema == 0 or cfg.topk == 0, "--teacher-ema averages dense distributions, so "
          f"it needs --topk 0, got --topk {cfg.topk}")
    _need(cfg.rounds >= 1, f"--rounds must be >= 1, got {cfg.rounds}")
    _need(cfg.eval_every >= 1, f"--eval-every must be >= 1, got {cfg.eval_every}")
    _need(cfg.steps_per_round >= 1, f"--steps-per-round must be >= 1, got {cfg.steps_per_round}")
    _need(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    _need(cfg.public_batch_size >= 1, f"--public-batch-size must be >= 1, got {cfg.public_batch_size}")
    _need(cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    _need(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    _need(cfg.dist_timeout > 0, f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    _need(cfg.dist_timeout <= MAX_DIST_TIMEOUT, f"--dist-timeout must be <= "
          f"{MAX_DIST_TIMEOUT:.0f} seconds (a week), got {cfg.dist_timeout}")
    for name in ("split_seed", "init_seed", "train_seed"):
        value = getattr(cfg, name)
        _need(value is None or 0 <= value <= MAX_SEED,
              f"{flag(name)} must be in [0, 2**63 - 1], got {value}")
    _need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1), got {cfg.momentum}")
    _need(cfg.client_chunk >= 0, f"--client-chunk must be 0 (automatic) or a number of clients "
          f">= 1, got {cfg.client_chunk}")
    _need(cfg.conv in CONV_MODES, f"--conv must be one of {', '.join(CONV_MODES)}, got {cfg.conv!r}")
    _need(cfg.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    _need(cfg.device == "cpu" or cfg.device == "cuda" or cfg.device.startswith("cuda:"),
          f"--device must be {DEVICES_HELP}, got {cfg.device!r}")
    _need(cfg.name is None or (cfg.name and "/" not in cfg.name and cfg.name not in (".", "..")
                               and _utf8(cfg.name)),
          f"--name must be a plain folder name in UTF-8, got {cfg.name!r}")
    if cfg.tensorboard is not None:
        _need(cfg.tensorboard != "" and _utf8(cfg.tensorboard),
              f"--tensorboard must be a folder path in UTF-8, got {cfg.tensorboard!r}")
        _need(importlib.util.find_spec("tensorboard") is not None, "--tensorboard needs the "
              "tensorboard package, which is not installed (the extra: pip install -e "
              "'.[tensorboard]', or pip install tensorboard)")
    if cfg.method == "fedavg":
        _need(len(cfg.model) == 1, "--method fedavg averages weights, so all clients need one "
              f"architecture; got --model {model_names(cfg)}")
    if cfg.nu_emb > 0 and cfg.method in ("mhd", "mean_distill"):
        # a module trunk's E is known once it is built on the data's inputs (simulation.setup)
        dims = {a.emb_dim for a in archs if isinstance(a, models.Arch)}
        _need(len(dims) == 1, f"--nu-emb needs one embedding size (last hidden width) in every "
              f"--model architecture, got {sorted(dims)}")


def model_names(cfg: Config) -> str:
    """The --model values as text: a factory passed in Python is named 'module:MOD:NAME'."""
    return " ".join(s if isinstance(s, str) else factory_spec(s) for s in cfg.model)


def factory_spec(fn) -> str:
    """'module:MOD:QUALNAME' of a factory passed in Python."""
    return f"module:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"


def derive_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose, derived from --seed: independent streams, stable across runs."""
    digest = hashlib.sha256(f"mhd_fast:{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve(cfg: Config) -> Config:
    """What the method implies, the derived seeds, the run name and the output folder.

    isolated / fedavg / centralized: no aux heads and no distillation. mean_distill (FedMD /
    FedDF style): no aux heads, head 0 distils from the mean of its neighbours' head 0
    (aggregate = mean, nu_main = 1 unless set). mhd: as configured.
    """
    changes: dict = {}
    if cfg.method != "mhd":
        changes.update(heads=0, nu_aux=0.0)
    if cfg.method in ("isolated", "fedavg", "centralized"):
        changes.update(nu_main=0.0, nu_emb=0.0, topk=0, teacher_ema=0.0)
    if cfg.method == "mean_distill":
        changes.update(aggregate="mean", nu_main=cfg.nu_main or 1.0)
    for purpose in ("split", "init", "train"):
        if getattr(cfg, f"{purpose}_seed") is None:
            changes[f"{purpose}_seed"] = derive_seed(cfg.seed, purpose)
    name = cfg.name or f"{cfg.dataset}-{cfg.method}-s{cfg.seed}"
    changes.update(name=name, out=cfg.out or os.path.join("runs", name))
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Config) -> dict:
    """Plain data (what metrics.json and checkpoints record): a factory is named by its spec."""
    out = dataclasses.asdict(cfg)
    out["model"] = [s if isinstance(s, str) else factory_spec(s) for s in cfg.model]
    return out


def from_dict(data: dict) -> Config:
    """A Config from to_dict's output (a checkpoint), keys checked."""
    return merge(Config(), data, "the checkpoint")
