"""A/B of the fused ops between two checkouts of this repository, on a machine shared with
other jobs: CPU seconds of one thread (time.process_time), not wall time, and the two trees'
processes alternating, so that a change in the load hits both alike.

    python bench/ab_ops.py BEFORE_TREE AFTER_TREE [--pairs 4] [--calls 100] [--csv out.csv]

Each tree needs its extension built in place (``python setup.py build_ext --inplace``). A
figure is the median over ``--pairs`` processes of each process's median of ``--calls``
calls after 20 warm-up calls; the cases are bench_ops.py's CPU shapes and modes.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys

CASES = [("S1", "fwd"), ("S1", "fwd_bwd"), ("S1", "topk"), ("S2", "fwd"), ("S2", "fwd_bwd"),
         ("S2", "topk"), ("S2k", "fwd"), ("S2k", "fwd_bwd"), ("S3", "fwd"), ("S3", "fwd_bwd"),
         ("S3", "topk")]

# Run inside the tree under test: its bench_ops and its mhd_fast.
CHILD = """
import statistics, sys, time
sys.path[:0] = [{tree!r}, {bench!r}]
import torch
torch.set_num_threads(1)
import bench_ops as B
fn = B.runner(B.make_case(B.SHAPES[{shape!r}], "cpu"), {mode!r}, "fused")
for _ in range(20):
    fn()
times = []
for _ in range({calls}):
    t0 = time.process_time()
    fn()
    times.append(time.process_time() - t0)
print(statistics.median(times))
"""


def one(tree: str, shape: str, mode: str, calls: int) -> float:
    code = CHILD.format(tree=tree, bench=os.path.join(tree, "bench"), shape=shape, mode=mode,
                        calls=calls)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(out.split()[-1]) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--cases", default=None, help="comma list of SHAPE:MODE (default: all)")
    p.add_argument("--csv", default=None)
    a = p.parse_args(argv)
    cases = [tuple(c.split(":")) for c in a.cases.split(",")] if a.cases else CASES
    rows = []
    print("| shape | mode | before ms | after ms | after/before |")
    print("|---|---|---|---|---|")
    for shape, mode in cases:
        runs = {"before": [], "after": []}
        for _ in range(a.pairs):
            for side in runs:
                runs[side].append(one(os.path.abspath(getattr(a, side)), shape, mode, a.calls))
        b, n = statistics.median(runs["before"]), statistics.median(runs["after"])
        print(f"| {shape} | {mode} | {b:.3f} | {n:.3f} | {n / b:.2f} |", flush=True)
        rows.append({"shape": shape, "mode": mode, "before_ms": b, "after_ms": n,
                     "after_over_before": n / b,
                     "before_runs": " ".join(f"{x:.3f}" for x in runs["before"]),
                     "after_runs": " ".join(f"{x:.3f}" for x in runs["after"])})
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
