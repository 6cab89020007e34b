"""Time per round of the batched simulator against the per-client loop of the same round
(bench/loop_round.py), and the peak memory of a round with many clients.

    python bench/bench_round.py                    # 64 clients, MLP, digits; then 1024 clients' memory
    python bench/bench_round.py --clients 16,64 --rounds 5 --memory-clients 256,1024
    python bench/bench_round.py --device cuda --clients 1024 --models mlp,cnn --loop-clients 1024
    python bench/bench_round.py --device cuda --clients 16384 --dataset synthetic --num-classes 100 --no-loop

Both implementations start from the same weights and draw the same batches; the ratio is
loop / batched from one run, each figure the median over ``--rounds`` timed rounds after one
warm-up round (training only; evaluation is not part of a round's time). The memory check
runs one round plus the evaluation in a fresh subprocess and reads its peak resident set size
(resource.getrusage), next to the RSS of the same process before the clients were built. On a
GPU every timed row also gives the peak GPU memory of its setup and rounds.
Writes a table to stdout and CSV to bench/results/round_<device>.csv (or --csv).
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# torch loads OpenMP here, before mhd_fast could set OMP_WAIT_POLICY=PASSIVE: both
# implementations run with the environment's OpenMP waits (the default spins, which favours
# the loop's many small ops; PASSIVE slows the loop ~4x on an idle machine).
import torch

OMP_WAIT = os.environ.get("OMP_WAIT_POLICY", "(default)")  # what OpenMP was started with
sys.path.insert(0, os.path.dirname(__file__))
import loop_round  # noqa: E402

from mhd_fast import config as C  # noqa: E402
from mhd_fast import train  # noqa: E402

# The benchmarked round: digits, an MLP with 3 aux heads, dense fp32 exchange on a complete graph.
BASE = dict(dataset="digits", model=["mlp:128x64"], heads=3, batch_size=32, public_batch_size=64,
            steps_per_round=5, rounds=100, graph="complete", progress=False, checkpoint=False)
# --models aliases: the architectures the figures are quoted for
MODEL_ALIASES = {"mlp": "mlp:128x64", "cnn": "cnn:16x32-64"}


def make_config(clients: int, device: str, **extra) -> C.Config:
    # 1024 clients need more private rows than digits' default split leaves (943)
    return C.load(None, {**BASE, "clients": clients, "device": device, "public_fraction": 0.1, **extra})


def _peak_gpu_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_rounds(fn, rounds: int, device: str) -> list[float]:
    fn(0)  # warm-up: first-touch allocations and lazy initialisation stay out of the figures
    _sync(device)
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        fn(r)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def bench_speed(clients: int, rounds: int, device: str, with_loop: bool, **extra) -> list[dict]:
    _peak_gpu_reset(device)
    cfg = make_config(clients, device, **extra)
    sim = train.setup(cfg)
    twin = copy.deepcopy(sim) if with_loop else None
    rows = []
    batched = time_rounds(lambda r: train.train_round(sim, r), rounds, device)
    rows.append(_row(cfg, "batched", batched))
    if with_loop:
        del sim
        _peak_gpu_reset(device)
        clients_state = loop_round.from_simulation(twin)
        loop = time_rounds(lambda r: loop_round.loop_round(twin, clients_state, r), rounds, device)
        rows.append(_row(cfg, "per-client loop", loop))
        rows[-1]["speedup"] = rows[-1]["s_per_round"] / rows[0]["s_per_round"]
    rows[0]["speedup"] = 1.0
    return rows


def _row(cfg: C.Config, impl: str, times: list[float]) -> dict:
    med = statistics.median(times)
    row = {"clients": cfg.clients, "model": cfg.model[0], "dataset": cfg.dataset, "impl": impl,
           "backend": train.mhd_fast.resolve_backend(cfg.backend, torch.device(cfg.device)),
           "s_per_round": med, "ms_per_step": 1000 * med / cfg.steps_per_round,
           "min_s": min(times), "max_s": max(times), "rounds_timed": len(times)}
    if cfg.device.startswith("cuda"):
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(cfg.device)
    return row


def memory_child(clients: int, device: str, extra: dict) -> None:
    """In a fresh process: RSS before the clients exist, then the peak over a round + evaluation."""
    cfg = make_config(clients, device, **extra)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    sim = train.setup(cfg)
    t0 = time.perf_counter()
    train.train_round(sim, 0)
    _sync(device)
    round_s = time.perf_counter() - t0
    train.evaluate(sim)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"clients": clients, "rss_before_bytes": before, "peak_rss_bytes": peak,
                      "round_s": round_s,
                      "params": sum(p.numel() for p in train.models.parameters(sim.groups))}))


def bench_memory(clients: int, device: str, extra: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--memory-child", str(clients), "--device", device,
                          "--extra", json.dumps(extra)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clients", default="64", help="comma list of client counts to time (default: 64)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per figure (default: 5)")
    p.add_argument("--memory-clients", default="1024", help="comma list for the memory check ('' = none)")
    p.add_argument("--memory-limit-gb", type=float, default=4.0)
    p.add_argument("--no-loop", action="store_true", help="time the batched round only")
    p.add_argument("--loop-clients", default=None,
                   help="comma list of the client counts that also time the per-client loop "
                        "(default: every count on CPU, none on a GPU)")
    p.add_argument("--models", default="mlp",
                   help=f"comma list of architectures or aliases {MODEL_ALIASES} (default: mlp)")
    p.add_argument("--dataset", default=BASE["dataset"], help="the simulator's --dataset (default: digits)")
    p.add_argument("--num-classes", type=int, default=None, help="the simulator's --num-classes (synthetic)")
    p.add_argument("--data-dir", default=None, help="the simulator's --data-dir")
    p.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--csv", default=None, help="CSV path (default bench/results/round_<device>.csv)")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child is not None:
        memory_child(a.memory_child, a.device, json.loads(a.extra))
        return 0
    data = {"dataset": a.dataset, **({"num_classes": a.num_classes} if a.num_classes else {}),
            **({"data_dir": a.data_dir} if a.data_dir else {})}
    archs = [MODEL_ALIASES.get(m, m) for m in a.models.split(",") if m]
    counts = [int(x) for x in a.clients.split(",") if x]
    loop_counts = (set() if a.no_loop else set(counts) if a.loop_clients is None and a.device == "cpu"
                   else {int(x) for x in (a.loop_clients or "").split(",") if x})

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{OMP_WAIT}, device {a.device}")
    print(f"# round = {BASE['steps_per_round']} steps; {a.dataset}, {BASE['heads']} aux heads, "
          f"private batch {BASE['batch_size']}, public batch {BASE['public_batch_size']}, complete graph")
    rows = []
    for arch in archs:
        for n in counts:
            rows += bench_speed(n, a.rounds, a.device, n in loop_counts, model=[arch], **data)
    print(f"{'clients':>8} {'model':>14} {'impl':>16} {'backend':>8} {'s/round':>9} {'ms/step':>9} {'speedup':>8}"
          f"{'  peak GPU GB' if a.device.startswith('cuda') else ''}")
    for r in rows:
        gpu = f" {r['peak_gpu_bytes'] / 1e9:12.2f}" if "peak_gpu_bytes" in r else ""
        print(f"{r['clients']:>8} {r['model']:>14} {r['impl']:>16} {r['backend']:>8} {r['s_per_round']:>9.4f} "
              f"{r['ms_per_step']:>9.2f} {r['speedup']:>7.1f}x{gpu}")

    ok = True
    for n in [int(x) for x in a.memory_clients.split(",") if x]:
        m = bench_memory(n, a.device, {"model": [archs[0]], **data})
        gb = m["peak_rss_bytes"] / 1e9
        within = gb <= a.memory_limit_gb
        ok &= within
        print(f"memory: {n} clients ({m['params'] / 1e6:.1f} M weights), one round in {m['round_s']:.2f} s + "
              f"evaluation: peak RSS {gb:.2f} GB (before the clients: {m['rss_before_bytes'] / 1e9:.2f} GB); "
              f"limit {a.memory_limit_gb:g} GB {'OK' if within else 'EXCEEDED'}")
        rows.append({"clients": n, "impl": "batched", "backend": "", "s_per_round": m["round_s"],
                     "peak_rss_bytes": m["peak_rss_bytes"], "rss_before_bytes": m["rss_before_bytes"]})

    path = a.csv or os.path.join(os.path.dirname(__file__), "results", f"round_{a.device}.csv")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in rows[0], k))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
