"""Time per round of the batched simulator against the per-client loop of the same round
(bench/loop_round.py), and the peak memory of a round with many clients.

    python bench/bench_round.py                    # 64 clients, MLP, digits; then 1024 clients' memory
    python bench/bench_round.py --clients 16,64 --rounds 5 --memory-clients 256,1024
    python bench/bench_round.py --device cuda --clients 1024 --models mlp,cnn --loop-clients 1024
    python bench/bench_round.py --device cuda --clients 16384 --dataset synthetic --num-classes 100 --no-loop
    python bench/bench_round.py --cases mlp:128x64@digits,module-mlp:128x64@digits \
        --clients 64,256 --memory-clients ''        # the module path against the hand-written MLP
    python bench/bench_round.py --cases cnn:16x32-64@fashion_mnist@2,resnet:8@fashion_mnist@1 \
        --clients 16,64 --rounds 2 --memory-clients '' --csv bench/results/round_models_cpu.csv
    python bench/bench_round.py --clock cpu --threads 1 --flops ...   # a loaded machine

A case is MODEL@DATASET[@STEPS][@KEY=VALUE...] (steps per round, default 5; KEY=VALUE sets
any other option: ``@conv=grouped`` times the grouped convolution, ``@client_chunk=64`` 64
clients without chunks); ``module-mlp:W1xW2`` is the same MLP as ``mlp:W1xW2`` built as an
nn.Sequential and run by the module path (vmap; digits' 64 inputs).

Both implementations start from the same weights and draw the same batches; the ratio is
loop / batched from one run, each figure the median over ``--rounds`` timed rounds after one
warm-up round (training only; evaluation is not part of a round's time). The memory check
runs one round plus the evaluation in a fresh subprocess and reads its peak resident set size
(resource.getrusage), next to the RSS of the same process before the clients were built. On a
GPU every timed row also gives the peak GPU memory of its setup and rounds.
Each row also gives the training step's achieved GFLOP/s: the FLOPs of one step counted
analytically (torch.utils.flop_counter over the loop baseline's step: the matmuls and
convolutions of every client, forward and backward) over the measured time, next to the
machine's fp32 matmul rate (a 2048^3 torch.mm) measured in the same run.
``--clock cpu --threads 1`` times every figure, the matmul's too, in CPU seconds of one
thread: on a machine shared with other jobs the ratios then hold where wall times do not.
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

# Both implementations run with the environment's OpenMP waits (the default spins, which
# favours the loop's many small ops; the CLI's PASSIVE slows the loop ~4x on an idle machine).
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

OMP_WAIT = os.environ.get("OMP_WAIT_POLICY", "(default)")  # what OpenMP was started with
sys.path.insert(0, os.path.dirname(__file__))
import loop_round  # noqa: E402

from mhd_fast import config as C  # noqa: E402
from mhd_fast import evaluation, simulation, train  # noqa: E402

# The benchmarked round: digits, an MLP with 3 aux heads, dense fp32 exchange on a complete graph.
BASE = dict(dataset="digits", model=["mlp:128x64"], heads=3, batch_size=32, public_batch_size=64,
            steps_per_round=5, rounds=100, graph="complete", progress=False, checkpoint=False)
# --models aliases: the architectures the figures are quoted for
MODEL_ALIASES = {"mlp": "mlp:128x64", "cnn": "cnn:16x32-64"}


def make_config(clients: int, device: str, **extra) -> C.Config:
    # 1024 clients need more private rows than digits' default split leaves (943)
    return C.load(None, {**BASE, "clients": clients, "device": device, "public_fraction": 0.1, **extra})


class MLP(nn.Sequential):
    """mlp:W1xW2... as a user would write it: the module path's twin of the built-in MLP."""

    def __init__(self, widths: tuple[int, ...], in_features: int = 64):
        layers = [nn.Flatten()]
        for w in widths:
            layers += [nn.Linear(in_features, w), nn.ReLU()]
            in_features = w
        super().__init__(*layers)


def _value(text: str):
    """An option's value from a case: an int, a float, true / false, or the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def parse_case(text: str) -> dict:
    """MODEL@DATASET[@STEPS][@KEY=VALUE...] -> the Config keys of the case (KEY=VALUE: any
    other option, e.g. conv=grouped or client_chunk=64)."""
    parts = text.split("@")
    options = {}
    while len(parts) > 1 and "=" in parts[-1]:
        key, value = parts.pop().split("=", 1)
        options[key] = _value(value)
    model, dataset = parts[0], parts[1] if len(parts) > 1 else "digits"
    steps = int(parts[2]) if len(parts) > 2 else BASE["steps_per_round"]
    if model.startswith("module-mlp:"):
        widths = tuple(int(w) for w in model.split(":")[1].split("x"))
        def module_mlp():
            return MLP(widths)
        module_mlp.__qualname__ = f"module_mlp_{'x'.join(map(str, widths))}"
        model = module_mlp
    return {"model": [model], "dataset": dataset, "steps_per_round": steps, **options}


# The clocks of --clock: wall time, or this process's CPU seconds, which the load of other
# jobs on a shared machine changes far less than wall time
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def matmul_gflops(clock=time.perf_counter, n: int = 2048, reps: int = 5) -> float:
    """The machine's fp32 matmul rate: the best of ``reps`` n^3 products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b), clock) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn, clock) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def step_flops(sim) -> float:
    """FLOPs of one training step of all clients, counted on the loop baseline's step."""
    twin = copy.deepcopy(sim)
    clients = loop_round.from_simulation(twin)
    with FlopCounterMode(display=False) as counter:
        loop_round.loop_step(twin, clients, twin.schedule(0).to(twin.device))
    return counter.get_total_flops()


def _peak_gpu_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_rounds(fn, rounds: int, device: str, clock=time.perf_counter) -> list[float]:
    fn(0)  # warm-up: first-touch allocations and lazy initialisation stay out of the figures
    _sync(device)
    times = []
    for r in range(1, rounds + 1):
        t0 = clock()
        fn(r)
        _sync(device)
        times.append(clock() - t0)
    return times


def bench_speed(clients: int, rounds: int, device: str, with_loop: bool, case: str = "",
                flops: bool = False, clock=time.perf_counter, **extra) -> list[dict]:
    _peak_gpu_reset(device)
    cfg = make_config(clients, device, **{**extra, **(parse_case(case) if case else {})})
    sim = simulation.setup(cfg)
    twin = copy.deepcopy(sim) if with_loop else None
    step = step_flops(sim) if flops else None
    rows = []
    batched = time_rounds(lambda r: train.train_round(sim, r), rounds, device, clock)
    rows.append(_row(cfg, case, "batched", batched, step))
    if with_loop:
        del sim
        _peak_gpu_reset(device)
        clients_state = loop_round.from_simulation(twin)
        loop = time_rounds(lambda r: loop_round.loop_round(twin, clients_state, r), rounds, device,
                           clock)
        rows.append(_row(cfg, case, "per-client loop", loop, step))
        rows[-1]["speedup"] = rows[-1]["s_per_round"] / rows[0]["s_per_round"]
    rows[0]["speedup"] = 1.0
    return rows


def _row(cfg: C.Config, case: str, impl: str, times: list[float], step: float | None) -> dict:
    med = statistics.median(times)
    row = {"case": case or f"{cfg.model[0]}@{cfg.dataset}", "clients": cfg.clients, "impl": impl,
           "model": str(cfg.model[0]), "dataset": cfg.dataset,
           "backend": train.mhd_fast.resolve_backend(cfg.backend, torch.device(cfg.device)),
           "s_per_round": med, "ms_per_step": 1000 * med / cfg.steps_per_round,
           "min_s": min(times), "max_s": max(times), "rounds_timed": len(times)}
    if step is not None:
        row["gflop_per_step"] = step / 1e9
        row["gflops"] = step * cfg.steps_per_round / med / 1e9
    if cfg.device.startswith("cuda"):
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(cfg.device)
    return row


def memory_child(clients: int, device: str, extra: dict) -> None:
    """In a fresh process: RSS before the clients exist, then the peak over a round + evaluation."""
    case = extra.pop("case", "")  # MODEL@DATASET[@STEPS]: a factory does not go through JSON
    cfg = make_config(clients, device, **{**extra, **(parse_case(case) if case else {})})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    sim = simulation.setup(cfg)
    t0 = time.perf_counter()
    train.train_round(sim, 0)
    _sync(device)
    round_s = time.perf_counter() - t0
    evaluation.evaluate(sim)
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
    p.add_argument("--cases", default="", help="comma list of MODEL@DATASET[@STEPS] (default: the "
                   "digits MLP round above)")
    p.add_argument("--flops", action="store_true", help="count each step's FLOPs, give GFLOP/s "
                   "next to the machine's matmul rate")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per figure (default: 5)")
    p.add_argument("--memory-clients", default="1024", help="comma list for the memory check ('' = none)")
    p.add_argument("--memory-limit-gb", type=float, default=4.0)
    p.add_argument("--no-loop", action="store_true", help="time the batched round only")
    p.add_argument("--loop-clients", default=None,
                   help="comma list of the client counts that also time the per-client loop "
                        "(default: every count on CPU, none on a GPU)")
    p.add_argument("--models", default="mlp",
                   help=f"comma list of architectures or aliases {MODEL_ALIASES} on --dataset, "
                        "when --cases is not given (default: mlp)")
    p.add_argument("--dataset", default=BASE["dataset"], help="the simulator's --dataset (default: digits)")
    p.add_argument("--num-classes", type=int, default=None, help="the simulator's --num-classes (synthetic)")
    p.add_argument("--data-dir", default=None, help="the simulator's --data-dir")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (with --threads 1 on a shared, "
                        "loaded machine; CPU only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--csv", default=None, help="CSV path (default bench/results/round_<device>.csv)")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.memory_child is not None:
        memory_child(a.memory_child, a.device, json.loads(a.extra))
        return 0
    if a.clock == "cpu" and a.device != "cpu":
        p.error("--clock cpu times CPU work; a GPU's is not in it")
    clock = CLOCKS[a.clock]
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    data = {**({"num_classes": a.num_classes} if a.num_classes else {}),
            **({"data_dir": a.data_dir} if a.data_dir else {})}
    cases = ([c for c in a.cases.split(",") if c] if a.cases else
             [f"{MODEL_ALIASES.get(m, m)}@{a.dataset}" for m in a.models.split(",") if m])
    counts = [int(x) for x in a.clients.split(",") if x]
    loop_counts = (set() if a.no_loop else set(counts) if a.loop_clients is None and a.device == "cpu"
                   else {int(x) for x in (a.loop_clients or "").split(",") if x})

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{OMP_WAIT}, device {a.device}, {a.clock} clock")
    print(f"# round = MODEL@DATASET[@STEPS] of each case ({BASE['steps_per_round']} steps unless it "
          f"says), {BASE['heads']} aux heads, private batch {BASE['batch_size']}, public batch "
          f"{BASE['public_batch_size']}, complete graph")
    rows = []
    peak = matmul_gflops(clock) if a.flops else None
    if peak is not None:
        print(f"# fp32 matmul 2048^3: {peak:.1f} GFLOP/s")
    gpu = a.device.startswith("cuda")
    print(f"{'case':>34} {'clients':>7} {'impl':>16} {'s/round':>9} {'ms/step':>9} {'speedup':>8}"
          + (f" {'GFLOP/s':>8} {'%mm':>5}" if peak else "") + ("  peak GPU GB" if gpu else ""),
          flush=True)
    for case in cases:
        for n in counts:
            new = bench_speed(n, a.rounds, a.device, n in loop_counts, case, a.flops, clock, **data)
            for r in new:
                if peak is not None:
                    r["matmul_gflops"] = peak
                    r["pct_of_matmul"] = 100 * r["gflops"] / peak
                print(f"{r['case']:>34} {r['clients']:>7} {r['impl']:>16} {r['s_per_round']:>9.4f} "
                      f"{r['ms_per_step']:>9.2f} {r['speedup']:>7.2f}x"
                      + (f" {r['gflops']:>8.1f} {r['pct_of_matmul']:>5.1f}" if peak else "")
                      + (f" {r['peak_gpu_bytes'] / 1e9:12.2f}" if "peak_gpu_bytes" in r else ""), flush=True)
            rows += new

    ok = True
    for n in [int(x) for x in a.memory_clients.split(",") if x]:
        m = bench_memory(n, a.device, {**data, "case": cases[0]})
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
