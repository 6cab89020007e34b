"""A grid of runs from one TOML file: expanded, run (resumably, optionally in parallel) and
summarised as mean ± std over seeds.

    mhd-fast sweep CONFIG [--out DIR] [--quick] [--jobs J] [--threads T]

The sweep file::

    seeds = [0, 1, 2]              # every grid point runs once per seed
    [base]                         # Config keys shared by every run (as in `mhd-fast run --config`)
    clients = 16
    [variants.fashion]             # optional: the whole sweep once per variant, each a layer
    dataset = "fashion_mnist"      # of Config keys over base (e.g. a dataset and its sizes)
    samples_per_client = 256
    [variants.digits]
    dataset = "digits"
    [grid.heads]                   # one or more named grids; a list value is an axis, a
    heads = [1, 2, 4]              # scalar a fixed override; each grid is the cartesian
    [grid.topology]                # product of its axes, over base (and the variant)
    graph = ["ring", "complete"]
    [quick]                        # optional: what --quick changes (tiny sizes for CI):
    seeds = [0]                    # seeds replaced, variants = [names] keeps only those,
    [quick.base]                   # tables merged key by key over base / variants.NAME /
    rounds = 2                     # grid.NAME

For list-valued Config keys (``model``) a grid axis is a list of lists (``model =
[["mlp:32"], ["mlp:32", "mlp:128x64"]]``); a plain list of strings is one value (one
heterogeneous model). Grid points that resolve to the same Config (``method = "isolated"``
with any ``heads``) are one run, listed under every grid that names it.

Each run lives in ``OUT/[VARIANT/]NAME/sSEED`` where NAME joins what the run changes in base
(``graph=ring,heads=4``; ``base`` when nothing). A run whose ``metrics.json`` is complete is
skipped and a run with a checkpoint resumes from it (``run --resume``), so a killed sweep is
continued by the same command. A run that diverged (its loss or weights stopped being finite)
is not run again, since it would diverge the same way: the summary lists it under
``diverged`` and the command exits with status 3 after every other run. ``OUT/summary.json``
and ``OUT/summary.csv`` hold one row per variant and grid point: its overrides and the mean,
std (ddof = 1) and per-seed values of every final metric of its finished runs.

Every run is checked before the first one starts, the checks that need the data included; bad
input is one line ``mhd-fast: error: ...`` and exit status 2. The sweep holds OUT (a second
sweep on it is refused) and each run holds its own folder. Worker processes (``--jobs``) end
with the sweep: when it stops (Ctrl-C, an error) and when it is killed.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import tomllib
from dataclasses import dataclass

from . import config as C
from .cmdline import PROG, Parser
from .summary import (SUMMARY_CSV, SUMMARY_JSON, format_table, mean_std, point_value,
                      run_metrics, write_summary)
_TOP_KEYS = ("seeds", "base", "variants", "grid", "quick")
# Per-run keys the sweep sets itself: no layer of the file may set them.
_SWEEP_OWNED = ("seed", "name", "out", "progress")
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,:-]")


@dataclass(frozen=True)
class Run:
    """One configuration of the sweep, run once per seed.

    variant    the variant it belongs to ("" when the file has none)
    name       folder name (from what it changes in base and the variant)
    overrides  {key: value} that change: the first grid point that produced it, resolved
    points     ((grid name, {axis: value}), ...) the grid points that resolve to this run
    """

    variant: str
    name: str
    overrides: dict
    points: tuple

    @property
    def folder(self) -> str:
        return os.path.join(self.variant, self.name) if self.variant else self.name


@dataclass(frozen=True)
class Plan:
    """An expanded sweep: the base layer, the variants, the runs, the seeds, the output folder."""

    base: dict
    variants: dict
    grids: tuple      # grid names in file order
    runs: tuple
    seeds: tuple
    out: str

    def settings(self, run: Run) -> C.Config:
        """What the file asks for ``run``: defaults, base, variant and overrides, before the
        method's implications and the seeds are resolved (the flags a user would give)."""
        return _layered(self.base, self.variants.get(run.variant, {}), run.overrides, run.folder)

    def config(self, run: Run, seed: int) -> C.Config:
        """The resolved Config of ``run`` with ``seed``, writing to OUT/[VARIANT/]NAME/sSEED."""
        cfg = dataclasses.replace(self.settings(run), name="-".join(filter(None, (run.variant, run.name, f"s{seed}"))),
                                  out=os.path.join(self.out, run.folder, f"s{seed}"))
        return _resolved(cfg, seed, run.folder)

    def jobs(self) -> list[tuple[Run, int]]:
        return [(run, seed) for run in self.runs for seed in self.seeds]


# ---- the sweep file ------------------------------------------------------------------------

def read_sweep(path: str) -> dict:
    """The TOML file at ``path`` -> its table, checked for top-level keys. ValueError naming
    CONFIG."""
    if not path.lower().endswith(".toml"):
        raise ValueError(f"CONFIG must be a .toml sweep file, got {path!r}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"CONFIG: cannot read {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"CONFIG: {path!r} is not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start:e.start + 1]!r})") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"CONFIG: {path!r} is not valid TOML: {str(e).splitlines()[0]}") from None
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"CONFIG {path!r}: unknown top-level key(s) {unknown}; "
                         f"expected {', '.join(_TOP_KEYS)}")
    return data


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}: [{key}] must be a table, got {value!r}")
    return value


def _merge_named(tables: dict, extra: dict, kind: str, where: str) -> dict:
    """{name: table} with extra[name] merged key by key into each; unknown names rejected."""
    out = dict(tables)
    for name, more in extra.items():
        if name not in out:
            raise ValueError(f"{where}: [quick.{kind}.{name}] names no {kind} entry; "
                             f"known: {', '.join(out) or 'none'}")
        out[name] = {**out[name], **more}
    return out


def apply_quick(data: dict, where: str) -> dict:
    """The sweep with its [quick] table applied: seeds replaced; base, variants.NAME and
    grid.NAME merged key by key; ``variants = [names]`` keeps only those variants.
    ValueError when there is no [quick] table or it names what does not exist."""
    quick = data.get("quick")
    if not isinstance(quick, dict):
        raise ValueError(f"--quick: {where} has no [quick] table saying what a quick sweep changes")
    unknown = sorted(set(quick) - {"seeds", "base", "variants", "grid"})
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} in [quick]; expected seeds, base, "
                         "variants, grid")
    out = {k: v for k, v in data.items() if k != "quick"}
    if "seeds" in quick:
        out["seeds"] = quick["seeds"]
    out["base"] = {**_table(data, "base", where), **_table(quick, "base", f"{where} [quick]")}
    variants = _table(data, "variants", where)
    keep = quick.get("variants", {})
    if isinstance(keep, list):
        missing = [v for v in keep if v not in variants]
        if missing or not keep:
            raise ValueError(f"{where}: [quick] variants = {keep!r} must name some of "
                             f"{', '.join(variants) or 'no variants'}")
        variants = {name: variants[name] for name in keep}
    else:
        variants = _merge_named(variants, _table(quick, "variants", f"{where} [quick]"),
                                "variants", where)
    out["variants"] = variants
    out["grid"] = _merge_named(_table(data, "grid", where),
                               _table(quick, "grid", f"{where} [quick]"), "grid", where)
    return out


def _axis(key: str, value, where: str) -> list:
    """A grid value -> the list of values it stands for (a scalar: one value)."""
    if key not in C.FIELDS:
        raise ValueError(f"{where}: unknown key {key!r}; known keys: {', '.join(C.FIELDS)}")
    if not isinstance(value, list):
        return [value]
    if not value:
        raise ValueError(f"{where}: the axis {key!r} is an empty list")
    if C.field_kind(key) is list and not all(isinstance(v, list) for v in value):
        return [value]  # model = ["mlp:32", "mlp:64"]: one heterogeneous value, not an axis
    return value


def run_name(overrides: dict) -> str:
    """'graph=ring,heads=4' from {'heads': 4, 'graph': 'ring'}; 'base' for no overrides.
    Characters outside [A-Za-z0-9._=+,:-] become '_' so the name is a plain folder name."""
    if not overrides:
        return "base"
    return _UNSAFE.sub("_", ",".join(f"{k}={point_value(v)}" for k, v in sorted(overrides.items())))


def _check_layer(layer: dict, where: str) -> None:
    owned = sorted(set(layer) & set(_SWEEP_OWNED))
    if owned:
        raise ValueError(f"{where} sets {owned}, which the sweep sets for every run "
                         "(seeds go in the top-level seeds list)")


def _layered(base: dict, variant: dict, point: dict, where: str) -> C.Config:
    """Defaults, then base, the variant and the point, each its own layer, so that a key
    implies what it implies on the command line (dirichlet -> partition = dirichlet)."""
    try:
        cfg = C.merge(C.Config(), base, "[base]")
        cfg = C.merge(cfg, variant, "the variant")
        return C.merge(cfg, point, "the grid point")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _resolved(cfg: C.Config, seed: int, where: str) -> C.Config:
    """cfg with ``seed``, validated and resolved; ValueError naming ``where``."""
    cfg = dataclasses.replace(cfg, seed=seed)
    try:
        C.validate(cfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return C.resolve(cfg)


def _identity(cfg: C.Config) -> str:
    """What makes two runs the same run: the resolved Config without the per-run fields."""
    d = {k: v for k, v in C.to_dict(cfg).items() if k not in ("name", "out", "progress")}
    return json.dumps(d, sort_keys=True)


def expand(data: dict, out: str, where: str = "CONFIG") -> Plan:
    """A sweep table (read_sweep's output, --quick applied) -> Plan. Every run's Config is
    built and validated here, so bad input fails before anything runs."""
    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ValueError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds must not repeat, got {seeds!r}")
    base = _table(data, "base", where)
    _check_layer(base, f"{where}: [base]")
    variants = _table(data, "variants", where)
    for vname, layer in variants.items():
        if not isinstance(layer, dict) or _UNSAFE.search(vname):
            raise ValueError(f"{where}: [variants.{vname}] must be a table named with letters, "
                             f"digits, '.', '_' or '-', got {layer!r}")
        _check_layer(layer, f"{where}: [variants.{vname}]")
    grids = _table(data, "grid", where)
    if not grids:
        raise ValueError(f"{where}: no [grid.NAME] table; a sweep needs at least one grid")
    for gname, grid in grids.items():
        if not isinstance(grid, dict):
            raise ValueError(f"{where}: [grid.{gname}] must be a table, got {grid!r}")
        _check_layer(grid, f"{where}: [grid.{gname}]")

    runs: list[Run] = []
    for vname, layer in (variants or {"": {}}).items():
        start = _layered(base, layer, {}, f"{where} [variants.{vname}]" if vname else where)
        found: dict[str, dict] = {}  # identity -> {"overrides", "points"}; insertion-ordered
        for gname, grid in grids.items():
            axes = [(k, _axis(k, v, f"{where} [grid.{gname}]")) for k, v in grid.items()]
            for values in itertools.product(*(vals for _, vals in axes)):
                point = dict(zip((k for k, _ in axes), values))
                label = f"{where} [grid.{gname}] point {run_name(point)}"
                cfg = _layered(base, layer, point, label)
                # A run is named by what it changes: every field that differs (also one a key
                # implies, like partition for dirichlet) and the keys the point gives, with the
                # values the method resolves them to (isolated: heads = 0).
                changed = [k for k in C.FIELDS if getattr(cfg, k) != getattr(start, k)]
                keys = sorted(set(changed) | set(point)) if changed else []
                resolved = _resolved(cfg, seeds[0], label)
                entry = found.setdefault(_identity(resolved), {
                    "overrides": {k: getattr(resolved, k) for k in keys}, "points": []})
                if all(g != gname for g, _ in entry["points"]):  # one row per run in each grid
                    entry["points"].append((gname, point))
        names = set()
        for entry in found.values():
            name = run_name(entry["overrides"])
            if name in names:  # only when sanitising made two different names equal
                raise ValueError(f"{where}: two different runs would share the folder {name!r}; "
                                 "use values that differ in letters or digits")
            names.add(name)
            runs.append(Run(vname, name, entry["overrides"], tuple(entry["points"])))
    return Plan(dict(base), dict(variants), tuple(grids), tuple(runs), tuple(seeds), out)


def load_plan(path: str, out: str | None = None, *, quick: bool = False) -> Plan:
    """The Plan of the sweep file at ``path``; OUT defaults to runs/sweep-STEM[-quick]."""
    data = read_sweep(path)
    if quick:
        data = apply_quick(data, f"CONFIG {path!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    out = out or os.path.join("runs", f"sweep-{stem}" + ("-quick" if quick else ""))
    return expand(data, out, f"CONFIG {path!r}")


# ---- running -------------------------------------------------------------------------------

def _comparable(d: dict) -> dict:
    from .checkpoint import RESUMABLE_CHANGES

    return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES}


def status(cfg: C.Config) -> str:
    """'done' (metrics.json complete for these options), 'diverged' (metrics.json of a run
    that diverged), 'resume' (a checkpoint to continue from) or 'new'. ValueError when the
    folder holds a run made with other options."""
    from .checkpoint import FILENAME

    path = os.path.join(cfg.out, "metrics.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                metrics = json.load(f)
            saved = metrics["config"]
        except (OSError, ValueError, KeyError, TypeError):
            saved = None  # an unreadable or foreign file: the checkpoint decides below
        if saved is not None:
            want = _comparable(C.to_dict(cfg))
            got = _comparable(saved)
            if got != want:
                key = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
                raise ValueError(f"--out: {cfg.out!r} holds a run made with {key} = "
                                 f"{got.get(key)!r}, this sweep has {want.get(key)!r}; "
                                 "remove that folder or use another --out")
            if metrics.get("status") == "diverged":
                return "diverged"
            if len(metrics.get("rounds", [])) == cfg.rounds and "final" in metrics:
                return "done"
    return "resume" if os.path.exists(os.path.join(cfg.out, FILENAME)) else "new"


def _execute(cfg: C.Config, resume: bool, threads: int) -> dict:
    """One run in this process with ``threads`` intra-op threads; returns metrics.json's
    content. Module-level so that worker processes can pickle it."""
    import torch

    from .outdir import OutputError
    from .train import run

    torch.set_num_threads(threads)
    try:
        return run(cfg, resume=resume)
    except (ValueError, OutputError) as e:  # its folder in use, a full disk: name the run
        raise type(e)(f"run {cfg.name}: {e}") from None


def _end_with_the_sweep(sweep_pid: int, stop) -> None:
    """A worker's initializer: the worker ends when the sweep process stops it (``stop`` set:
    Ctrl-C or an error there) or dies (SIGKILL or SIGTERM leave no handler to stop it).
    A watching thread kills it within a fraction of a second; its run loses at most the
    round in progress (the checkpoint is whole, the run's folder lock goes with it). Ctrl-C
    is the sweep process's to handle: it reaches the whole process group."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch():
        while not stop.wait(0.2) and os.getppid() == sweep_pid:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="end-with-the-sweep").start()


def check_runs(todo: list[C.Config]) -> None:
    """The checks of every run that need the data (``simulation.check``), before any run starts:
    a bad point fails the sweep at once, not after the runs before it. Each dataset is read
    once (the checks need its sizes, which no seed changes)."""
    from .simulation import check, load_data

    datasets: dict = {}
    for cfg in todo:
        key = (cfg.dataset, cfg.data_dir, cfg.num_classes)
        try:
            if key not in datasets:
                datasets[key] = load_data(cfg)
            check(cfg, datasets[key])
        except ValueError as e:
            raise ValueError(f"run {cfg.name}: {e}") from None


def run_plan(plan: Plan, *, jobs: int = 1, threads: int | None = None,
             progress: bool = True) -> dict:
    """Run every (run, seed) of ``plan`` not yet done, ``jobs`` at a time, then write the
    summary. Every run is checked first (``check_runs``). Returns {"ran": n, "skipped": n
    (finished or diverged before), "diverged": [run folders relative to OUT], "summary": rows}."""
    from tqdm import tqdm

    from .outdir import claim

    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    # One process per core by default: intra-op threads of several jobs competing for the same
    # cores make every one of them far slower than a single thread each.
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    todo = []
    for run, seed in plan.jobs():
        cfg = dataclasses.replace(plan.config(run, seed), progress=progress and jobs == 1)
        state = status(cfg)
        if state not in ("done", "diverged"):
            todo.append((cfg, state == "resume"))
    check_runs([cfg for cfg, _ in todo])
    skipped = len(plan.runs) * len(plan.seeds) - len(todo)
    held = claim(plan.out, what="sweep")
    bar = tqdm(total=len(todo) + skipped, initial=skipped, desc="sweep", unit="run",
               disable=not progress, dynamic_ncols=True)

    def done(cfg: C.Config, metrics: dict) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{cfg.name}: diverged" if metrics["status"] == "diverged" else
                            f"{cfg.name}: shared head0 "
                            f"{metrics['final']['shared_acc']['head0']:.3f}")

    try:
        if jobs == 1:
            for cfg, resume in todo:
                done(cfg, _execute(cfg, resume, threads))
        elif todo:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's thread pools
            stop = ctx.Event()
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                        initializer=_end_with_the_sweep,
                                        initargs=(os.getpid(), stop)) as pool:
                futures = {pool.submit(_execute, cfg, resume, threads): cfg for cfg, resume in todo}
                try:
                    for fut in cf.as_completed(futures):
                        done(futures[fut], fut.result())
                except BaseException:
                    stop.set()  # the workers end now, not after their runs
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        rows = summarize(plan)
        write_summary(plan.out, rows)
    finally:
        bar.close()
        held.release()
    diverged = [os.path.join(r["variant"], r["run"], f"s{s}") for r in _unique_runs(rows)
                for s in r["diverged"]]
    return {"ran": len(todo), "skipped": skipped, "diverged": diverged, "summary": rows}


def _unique_runs(rows: list[dict]) -> list[dict]:
    """One row per run (a run listed under several grids has a row in each)."""
    return list({(r["variant"], r["run"]): r for r in rows}.values())


# ---- summary -------------------------------------------------------------------------------

def summarize(plan: Plan) -> list[dict]:
    """One row per variant and grid point: {"variant", "grid", "point", "run", "seeds", "dirs"
    (run folders relative to OUT), "diverged" (the seeds whose run diverged), "metrics":
    {name: {"mean", "std", "values"}}}. Seeds whose run has not finished are left out of
    seeds, dirs and metrics."""
    rows = []
    for run in plan.runs:
        seeds, dirs, values, diverged = [], [], {}, []
        for seed in plan.seeds:
            cfg = plan.config(run, seed)
            state = status(cfg)
            if state == "diverged":
                diverged.append(seed)
            if state != "done":
                continue
            with open(os.path.join(cfg.out, "metrics.json")) as f:
                m = json.load(f)
            seeds.append(seed)
            dirs.append(os.path.relpath(cfg.out, plan.out))
            for k, v in run_metrics(m["final"], m["rounds"]).items():
                values.setdefault(k, []).append(v)
        stats = {}
        for k, vals in values.items():
            if len(vals) == len(seeds):  # a metric every seed has (heads are fixed per run)
                mean, std = mean_std(vals)
                stats[k] = {"mean": mean, "std": std, "values": vals}
        for gname, point in run.points:
            rows.append({"variant": run.variant, "grid": gname, "point": point, "run": run.name,
                         "seeds": seeds, "dirs": dirs, "diverged": diverged, "metrics": stats})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    # Stable sort: by variant, then grid in file order, then points in the order they were made.
    return sorted(rows, key=lambda r: (variants.index(r["variant"]), plan.grids.index(r["grid"])))


# ---- command line --------------------------------------------------------------------------

def add_subcommand(subparsers) -> argparse.ArgumentParser:
    """Add ``sweep CONFIG [--out DIR] [--quick] [--jobs J] [--threads T]`` to ``subparsers``."""
    p = subparsers.add_parser("sweep", help="a grid of runs from a TOML sweep file (resumable)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("config", metavar="CONFIG", help="the TOML sweep file")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder of the runs and the summary (default: runs/sweep-STEM)")
    p.add_argument("--quick", action="store_true", help="apply the file's [quick] table (tiny sizes)")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="runs at a time (default: 1)")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="torch threads per run (default: CPU cores / jobs)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    p.set_defaults(func=sweep_main)
    return p


def sweep_main(args: argparse.Namespace) -> int:
    """Run the sweep of ``args`` and print its summary table. Bad input: one line on stderr
    and status 2; some runs diverged: one line naming them and status 3."""
    from .outdir import OutputError

    try:
        plan = load_plan(args.config, args.out, quick=args.quick)
        result = run_plan(plan, jobs=args.jobs, threads=args.threads, progress=args.progress)
    except (ValueError, OutputError) as e:
        sys.stderr.write(f"{PROG}: error: {str(e).splitlines()[0]}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted (the same command resumes the sweep)\n")
        return 130
    print(format_table(result["summary"]))
    print(f"{result['ran']} run(s) made, {result['skipped']} already done; summary in "
          f"{os.path.join(plan.out, SUMMARY_CSV)} and {SUMMARY_JSON}")
    if result["diverged"]:
        sys.stderr.write(f"{PROG}: {len(result['diverged'])} run(s) diverged (status "
                         f"\"diverged\" in their metrics.json): {', '.join(result['diverged'])}\n")
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog=PROG)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_subcommand(sub)
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
