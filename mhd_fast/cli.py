"""The command line: ``mhd-fast run`` trains, ``mhd-fast graph`` describes a topology.

    mhd-fast run [--config FILE] [--dataset ...] [--clients N] [--graph NAME] [--heads H]
                 [--skew S | --dirichlet A] [--rounds R] [--topk K] [--method M] [--device D]
                 [--seed S] [--out DIR] [--resume] ...
    mhd-fast graph NAME --clients N [--seed S] [--graph-options k=2 ...]

Every field of ``config.Config`` is a flag of ``run`` (``public_fraction`` ->
``--public-fraction``); flags override the file, the file overrides the defaults. Bad input
prints one line ``mhd-fast: error: ...`` naming the option and exits with status 2, as does an
output folder that cannot be written (or is in use by another run). A run whose loss or weights
stop being finite prints one line ``mhd-fast: diverged in round R ...`` and exits with status 3.

Under torchrun (``torchrun --nproc-per-node P -m mhd_fast run ...``) the same command shards
the clients over the P processes (``mhd_fast.distributed``); rank 0 prints and writes the
outputs. A process whose peer died or hangs past ``--dist-timeout`` prints one line and exits
with status 1.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

from . import config as C
from .cmdline import PROG, Parser


def _parse_option(text: str) -> tuple[str, object]:
    """'k=2' -> ('k', 2); values are int, float, true/false or a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    return key, raw


def _int_or_none(text: str):
    return None if text.lower() == "none" else int(text)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Config field; default None = not given (the file or the default stands)."""
    for name in C.FIELDS:
        flag = "--" + name.replace("_", "-")
        kind = C.field_kind(name)
        comment = f"{C.field_help(name)} (default: {getattr(C.Config(), name)!r})".strip()
        if kind is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=comment)
        elif kind is list:
            p.add_argument(flag, dest=name, nargs="+", default=None, metavar="ARCH",
                           help=f"mlp:W1xW2, cnn:C1xC2-W1, resnet:DEPTH[:bn] or module:PKG.MOD:FN "
                           f"(FN() returns an nn.Module [B, *in] -> [B, E]); {comment}")
        elif kind is dict:
            p.add_argument(flag, dest=name, nargs="+", type=_parse_option, default=None,
                           metavar="KEY=VALUE", help=comment)
        elif kind is int and C.optional(name):
            p.add_argument(flag, dest=name, type=_int_or_none, default=None, help=comment)
        else:
            p.add_argument(flag, dest=name, type=kind, default=None, help=comment)


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Decentralized learning with multi-headed distillation: "
               "batched simulation of many clients.")
    sub = p.add_subparsers(dest="command", metavar="{run,graph,sweep}", parser_class=Parser)
    run = sub.add_parser("run", help="train and evaluate (the digits default with no options)")
    run.add_argument("--config", default=None, metavar="FILE", help="a TOML or YAML file of Config keys")
    run.add_argument("--resume", action="store_true",
                     help="continue from OUT/checkpoint.pt (same options, same final metrics)")
    _add_config_flags(run)
    graph = sub.add_parser("graph", help="describe a topology: degrees, connectivity, spectral gap")
    graph.add_argument("name", help="the topology (see the GRAPHS list of mhd_fast.topology)")
    graph.add_argument("--clients", type=int, default=16, help="N (default: 16)")
    graph.add_argument("--seed", type=int, default=0, help="seed of random topologies (default: 0)")
    graph.add_argument("--graph-options", nargs="+", type=_parse_option, default=None,
                       metavar="KEY=VALUE", help="options of the topology, e.g. k=2")
    from .sweep import add_subcommand as add_sweep
    add_sweep(sub)
    return p


def _flags(args: argparse.Namespace) -> dict:
    flags = {name: getattr(args, name) for name in C.FIELDS if getattr(args, name) is not None}
    if "graph_options" in flags:
        flags["graph_options"] = dict(flags["graph_options"])
    return flags


def cmd_run(args: argparse.Namespace) -> int:
    from . import metrics as M
    from .train import run

    cfg = C.load(args.config, _flags(args))
    metrics = run(cfg, resume=args.resume)
    if metrics is None:  # a rank other than 0 of a torchrun launch, finished: rank 0 reports
        return 0
    if metrics["status"] == "diverged":
        if "diverged" in metrics:  # rank 0 (or the only process) says where; every rank exits 3
            sys.stderr.write(f"{PROG}: {M.divergence(metrics)}\n")
        return 3
    fin = metrics["final"]
    heads = "  ".join(f"{h}: private {fin['private_acc'][h]:.4f} shared {fin['shared_acc'][h]:.4f}"
                      for h in fin["shared_acc"])
    print(f"{cfg.name}: {heads}")
    best = M.best_aux(fin["shared_acc"])
    if best is not None:
        print(f"best aux head {best[0]}: shared {best[1]:.4f} "
              f"({100 * (best[1] - fin['shared_acc']['head0']):+.1f} points over head0)")
    print(f"ensemble shared {fin['ensemble_shared_acc']:.4f}, bytes sent "
          f"{M.human_bytes(fin['bytes_sent'])}; outputs in {cfg.out}")
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from .topology import GRAPHS, describe, make_schedule

    if args.name not in GRAPHS:
        raise ValueError(f"NAME must be one of {', '.join(GRAPHS)}, got {args.name!r}")
    if args.clients < 1:
        raise ValueError(f"--clients must be >= 1, got {args.clients}")
    if not 0 <= args.seed <= C.MAX_SEED:
        raise ValueError(f"--seed must be in [0, 2**63 - 1], got {args.seed}")
    opts = dict(args.graph_options or [])
    try:
        schedule = make_schedule(args.name, args.clients, seed=args.seed, **opts)
    except ValueError as e:
        raise ValueError(f"--graph-options: {e}") from None
    info = describe(schedule)
    print(f"graph {args.name}, {args.clients} clients" + (f", options {opts}" if opts else ""))
    for key, value in info.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep what this process frees. By default it hands freed memory at
    the top of the heap back to the OS and maps some large blocks afresh, so that a training
    step pays a page fault for each 4 KiB of many large tensors it allocates (about 1600 faults,
    1-3 ms, for the 6.5 MB gradient of the S1 benchmark; the batched round of bench_round.py
    ran about 18 % faster without them). Peak memory stays the same; memory freed after the
    peak is kept for reuse. Blocks of 32 MiB and more are still mapped on their own. Skipped
    when MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ is set (glibc's own knobs: the user
    chose) or the C library has no mallopt. Returns whether it changed anything."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while they wait take the cores from every other process of a
    # small shared machine (rounds ~10x slower under load); sleeping waits cost little here.
    # OpenMP reads it when torch loads it, so this module imports torch only below; a user's
    # own setting wins. The command's choice, not the library's: importing mhd_fast sets nothing.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv if argv is not None else sys.argv[1:])])
    if args.command == "sweep":
        from .sweep import sweep_main
        return sweep_main(args)  # prints its own one-line errors (status 2)
    from .distributed import PeerFailure, launched, leave
    from .outdir import OutputError
    try:
        status = cmd_run(args) if args.command == "run" else cmd_graph(args)
        if launched():
            leave(status)  # past gloo's teardown at interpreter exit (distributed.leave)
        return status
    except (ValueError, TypeError, OutputError) as e:
        # TypeError: a topology given an option it does not take (its keyword arguments).
        # OutputError: a write to --out failed (a full disk); the last checkpoint is whole.
        where = f"rank {os.environ.get('RANK', '?')}: " if launched() else ""
        parser.error(where + (str(e).splitlines()[0] if str(e) else type(e).__name__))
    except PeerFailure as e:  # another process of a torchrun launch died or hangs
        sys.stderr.write(f"{PROG}: error: {e}\n")
        if launched():
            # The process group is broken: tearing it down at interpreter exit can abort in
            # gloo's / NCCL's worker threads ("terminate called ...", status -6 instead of 1).
            # Nothing is left to save (checkpoints are written atomically each round), so leave
            # without running destructors.
            leave(1)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted (resume with --resume)\n")
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
