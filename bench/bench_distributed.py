"""A run sharded over torch.distributed processes on this machine: rounds per second with 1 and 2
processes, the bytes that cross between processes on ring and complete graphs (dense vs top-k),
and the largest client count whose round runs (sparse graph, small MLP).

    python bench/bench_distributed.py                      # all three parts
    python bench/bench_distributed.py --parts speed --clients 128 --rounds 5
    python bench/bench_distributed.py --parts largest --largest-start 2048 --largest-max 65536

Every figure comes from fresh processes launched as torchrun launches them (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment; gloo on localhost), each with OMP_NUM_THREADS threads:
1 process with all the machine's cores, 1 process with 1 thread, and P processes with 1 thread
each. A round is the training of ``train_round`` (the exchange included, evaluation not),
timed on rank 0 between two all_reduces that line the processes up; the figure is the median
over ``--rounds`` rounds after one warm-up round. Bytes: ``client edges`` counts every directed
client edge (one process would send as much), ``between processes`` what the all_to_all (or
FedAvg's all_reduce) carried: a row once per process that needs it.

The largest-client search doubles N from ``--largest-start`` on a ring while the last round
took less than ``--largest-time`` seconds and the memory it extrapolates (what grows with N
grows at most quadratically: the graph and the per-edge byte counts are [N, N]) fits in the
machine's available memory; it reports the largest N that ran, its round time and the peak
RSS of its processes (setup and one round; the evaluation is chunked, so it adds time, not
memory). Writes a table to stdout and CSV to bench/results/distributed_cpu.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time

import torch

from mhd_fast import config as C
from mhd_fast import distributed as D
from mhd_fast import simulation, train

# The timed round: digits, an MLP with 3 aux heads (bench_round.py's round).
SPEED = dict(dataset="digits", model=["mlp:128x64"], heads=3, batch_size=32, public_batch_size=64,
             steps_per_round=5, public_fraction=0.1, progress=False, checkpoint=False)
# The largest-client search: Fashion-MNIST (enough samples for many clients), a small MLP.
LARGEST = dict(dataset="fashion_mnist", model=["mlp:8"], heads=1, batch_size=8, public_batch_size=16,
               steps_per_round=2, public_fraction=0.1, graph="ring", progress=False,
               checkpoint=False)


# ---- one process of a launch ---------------------------------------------------------------

def worker(spec: dict) -> None:
    """Time spec["rounds"] rounds after one warm-up; rank 0 prints a JSON line."""
    cfg = C.load(None, spec["config"])
    owned = D.init(simulation.resolve_device(cfg.device), cfg.dist_timeout)
    clean = False
    try:
        t0 = time.perf_counter()
        sim = simulation.setup(cfg)
        setup_s = time.perf_counter() - t0
        shard = sim.shard
        times, sent, cross = [], [], []
        for r in range(1 + spec["rounds"]):
            D.all_sum(torch.zeros(1), shard, "the start line")  # every process starts together
            before = sim.bytes_cross_rank
            t0 = time.perf_counter()
            edge_sent, _ = train.train_round(sim, r)
            counts = torch.tensor([int(edge_sent.sum()), sim.bytes_cross_rank - before])
            D.all_sum(counts, shard, "the byte counts")  # sync: the slowest process ends the round
            if r > 0:
                times.append(time.perf_counter() - t0)
                sent.append(int(counts[0]))
                cross.append(int(counts[1]))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        peaks = D.gather_objects(peak, shard, "the peak memory")
        if shard.lead:
            print(json.dumps({"s_per_round": statistics.median(times), "min_s": min(times),
                              "setup_s": setup_s, "bytes_client_edges": statistics.median(sent),
                              "bytes_between_processes": statistics.median(cross),
                              "peak_rss_bytes": max(peaks), "peak_rss_sum_bytes": sum(peaks)}))
        clean = True
    finally:
        if owned:
            D.shutdown(clean)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: dict, procs: int, threads: int, rounds: int, timeout: float) -> dict:
    """One launch of ``procs`` processes (torchrun's environment) -> rank 0's figures, or
    {"error": ...} when it failed or ran past ``timeout`` seconds."""
    spec = json.dumps({"config": config, "rounds": rounds})
    port = _free_port()
    runs = []
    for rank in range(procs):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(procs), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=str(threads))
        runs.append(subprocess.Popen([sys.executable, __file__, "--worker", spec], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in runs]
    except subprocess.TimeoutExpired:
        for p in runs:
            p.kill()
            p.communicate()
        return {"error": f"ran past {timeout:g} s"}
    if any(p.returncode for p in runs):
        err = next(o[1] for p, o in zip(runs, outs) if p.returncode)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit status {runs[0].returncode}"}
    return json.loads(outs[0][0].strip().splitlines()[-1])


# ---- the parts -----------------------------------------------------------------------------

def bench_speed(clients: int, rounds: int, procs: list[int], timeout: float) -> list[dict]:
    cores = os.cpu_count() or 1
    rows = []
    for graph in ("ring", "complete"):
        for topk in (0, 3):
            config = {**SPEED, "clients": clients, "graph": graph, "topk": topk}
            settings = [(1, cores), (1, 1)] + [(p, 1) for p in procs]  # (processes, threads each)
            for p, threads in dict.fromkeys(settings):
                res = launch(config, p, threads, rounds, timeout)
                if "error" not in res:
                    res["rounds_per_s"] = 1 / res["s_per_round"]
                rows.append({"part": "speed", "clients": clients, "graph": graph,
                             "wire": f"top-{topk}" if topk else "dense fp32", "processes": p,
                             "threads": threads, **res})
    return rows


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def bench_largest(start: int, largest: int, procs: int, time_limit: float, timeout: float,
                  dataset: str) -> list[dict]:
    rows, n, previous = [], start, None
    while n <= largest:
        config = {**LARGEST, "clients": n, "dataset": dataset}
        res = launch(config, procs, 1, 1, timeout)
        rows.append({"part": "largest", "clients": n, "graph": "ring", "wire": "dense fp32",
                     "processes": procs, "threads": 1, "dataset": dataset, **res})
        print(f"  {n} clients: " + (res["error"] if "error" in res else
              f"round {res['s_per_round']:.2f} s, setup {res['setup_s']:.1f} s, peak RSS "
              f"{res['peak_rss_sum_bytes'] / 1e9:.2f} GB over {procs} processes"), flush=True)
        if "error" in res or res["s_per_round"] > time_limit:
            break
        # What grows with N grows at most 4x per doubling (quadratically); the rest (torch, the
        # dataset) stays: the next run needs about peak + 4 x (this run's growth).
        peak = res["peak_rss_sum_bytes"]
        need = peak + 4 * max(0, peak - previous) if previous is not None else 2 * peak
        if need > 0.8 * _available_bytes():
            print(f"  stop: {2 * n} clients could need {need / 1e9:.1f} GB, "
                  f"{_available_bytes() / 1e9:.1f} GB available")
            break
        previous, n = peak, 2 * n
    return rows


def _fmt(row: dict) -> str:
    if "error" in row:
        return f"failed: {row['error']}"
    return (f"{row['s_per_round']:8.3f} s/round {1 / row['s_per_round']:7.2f} rounds/s  "
            f"client edges {row['bytes_client_edges'] / 1e6:8.2f} MB  between processes "
            f"{row['bytes_between_processes'] / 1e6:8.2f} MB  peak RSS "
            f"{row['peak_rss_sum_bytes'] / 1e9:5.2f} GB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="speed,largest", help="speed and/or largest (default: both)")
    p.add_argument("--clients", type=int, default=64, help="clients of the timed runs (default: 64)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per figure (default: 5)")
    p.add_argument("--procs", default="2", help="comma list of process counts besides 1 (default: 2)")
    p.add_argument("--largest-start", type=int, default=1024)
    p.add_argument("--largest-max", type=int, default=1 << 16)
    p.add_argument("--largest-procs", type=int, default=2)
    p.add_argument("--largest-time", type=float, default=120.0,
                   help="stop doubling after a round slower than this (s; default: 120)")
    p.add_argument("--largest-dataset", default="fashion_mnist",
                   help="a dataset with enough training samples (default: fashion_mnist)")
    p.add_argument("--timeout", type=float, default=900.0, help="per launch (s; default: 900)")
    p.add_argument("--csv", default=None, help="CSV path (default bench/results/distributed_cpu.csv)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        worker(json.loads(a.worker))
        if D.launched():
            D.leave(0)  # as the CLI does: past gloo's teardown at interpreter exit
        return 0

    parts = set(a.parts.split(","))
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, gloo on localhost")
    rows = []
    if "speed" in parts:
        print(f"# speed: digits, {a.clients} clients, {SPEED['model'][0]}, {SPEED['heads']} aux heads, "
              f"{SPEED['steps_per_round']} steps per round, private batch {SPEED['batch_size']}, "
              f"public batch {SPEED['public_batch_size']}; bytes per round")
        speed = bench_speed(a.clients, a.rounds, [int(x) for x in a.procs.split(",") if x], a.timeout)
        for r in speed:
            print(f"{r['graph']:>9} {r['wire']:>10} {r['processes']} proc x {r['threads']} thr: {_fmt(r)}")
        rows += speed
    if "largest" in parts:
        print(f"# largest: {a.largest_dataset}, {LARGEST['model'][0]}, {LARGEST['heads']} aux head, ring, "
              f"{a.largest_procs} processes, {LARGEST['steps_per_round']} steps per round")
        largest = bench_largest(a.largest_start, a.largest_max, a.largest_procs, a.largest_time,
                                a.timeout, a.largest_dataset)
        ran = [r for r in largest if "error" not in r]
        if ran:
            best = ran[-1]
            print(f"largest client count that ran: {best['clients']} ({_fmt(best)})")
        rows += largest

    path = a.csv or os.path.join(os.path.dirname(__file__), "results", "distributed_cpu.csv")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
