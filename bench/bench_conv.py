"""One convolution layer of N clients, forward + backward, three ways: N conv2d calls (NCHW),
the same in channels-last, and one grouped convolution (groups = N) — what the ``conv``
option's auto choice (conv.loop_conv) rests on. CIFAR-ResNet / cnn layer shapes on 28x28.

    python bench/bench_conv.py [--clients 64] [--rows 96] [--reps 1]
    OMP_NUM_THREADS=1 python bench/bench_conv.py --csv bench/results/conv_cpu_1thread.csv

Writes bench/results/conv_<device>.csv (or --csv); times are the best of --reps after one
warm-up, from one run, so the ratios between columns are what to read.
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch
import torch.nn.functional as F

LAYERS = [(1, 16, 28, 1), (16, 16, 28, 1), (16, 32, 28, 2), (32, 32, 14, 1), (64, 64, 7, 1)]


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--csv", default=os.path.join(os.path.dirname(__file__), "results", "conv_cpu.csv"))
    a = p.parse_args()
    n, b = a.clients, a.rows
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ci, co, hw, s in LAYERS:
        x = torch.randn(n, b, ci, hw, hw, generator=gen)
        w = torch.randn(n, co, ci, 3, 3, generator=gen, requires_grad=True)
        xl = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (n, b))

        def loop(x=x):
            torch.stack([F.conv2d(x[i], w[i], None, s, 1) for i in range(n)]).sum().backward()

        def grouped():
            xx = x.transpose(0, 1).reshape(b, n * ci, hw, hw)
            F.conv2d(xx, w.reshape(n * co, ci, 3, 3), None, s, 1, 1, n).sum().backward()

        row = {"c_in": ci, "c_out": co, "hw": hw, "stride": s, "clients": n, "rows": b,
               "loop_ms": 1000 * _best(loop, a.reps),
               "loop_channels_last_ms": 1000 * _best(lambda: loop(xl), a.reps),
               "grouped_ms": 1000 * _best(grouped, a.reps)}
        print(row, flush=True)
        rows.append(row)
    with open(a.csv, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
