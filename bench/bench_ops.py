"""Benchmark of the fused ops against the naive per-client loop, the vectorized eager torch
reference and torch.compile of the reference, side by side in one run.

    python bench/bench_ops.py                      # CPU: S1, S2, S2k, S3; fused column = cpp
    python bench/bench_ops.py --device cuda        # GPU: S1, S2, S2k, S3, S4; fused column = triton
    python bench/bench_ops.py --shapes S1 --modes fwd_bwd --csv out.csv

Modes: ``fwd`` (mhd_loss forward), ``fwd_bwd`` (forward + backward to the student logits),
``topk`` (top-k compression of the teacher logits; its eager baseline is torch.topk +
torch.logsumexp). Each figure is the median of ``--reps`` (>= 20) timed runs after warm-up,
the runs of the implementations interleaved.
GB/s counts the fewest bytes the op must move (read the logits once, write the outputs once),
printed next to the measured copy bandwidth of the device (a large copy into a touched buffer,
read + write, timed in the same interleaved runs as each row) and, on GPU, the card's peak
memory bandwidth: from the data sheet for the cards in PEAK_BW, else the measured copy
(peak_source says which).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import mhd_fast
from mhd_fast.ops import naive, reference

MODES = ("fwd", "fwd_bwd", "topk")
IMPLS = ("naive", "eager", "compile", "fused")

# Peak memory bandwidth (bytes/s) by device name, from the vendors' data sheets.
PEAK_BW = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
           "A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12,
           "L40S": 0.864e12, "A10G": 0.6e12}


@dataclass(frozen=True)
class Shape:
    name: str
    n: int
    h1: int
    b: int
    v: int
    graph: str
    teacher: str = "dense"  # or "topk": the teacher arrives as top-k packets
    k: int = 32
    dtype: torch.dtype = torch.float32
    value_dtype: torch.dtype = torch.bfloat16
    gpu_only: bool = False
    modes: tuple[str, ...] = MODES  # the modes it runs by default


SHAPES = {
    "S1": Shape("S1", 16, 4, 256, 100, "complete"),
    "S2": Shape("S2", 256, 4, 64, 10, "regular8", k=2),  # top-2 of 10 classes, as in the study
    # S2's students against top-2 packets of its teachers (the study's --topk 2); its top-k is S2's
    "S2k": Shape("S2k", 256, 4, 64, 10, "regular8", teacher="topk", k=2, modes=("fwd", "fwd_bwd")),
    "S3": Shape("S3", 8, 2, 64, 32000, "complete", teacher="topk", k=32),
    "S4": Shape("S4", 64, 4, 512, 32000, "complete", dtype=torch.bfloat16, gpu_only=True),
}


def make_adj(graph: str, n: int, device) -> torch.Tensor:
    """complete, or a random d-regular graph ("regular8") from the project's topology module."""
    if graph == "complete":
        return ~torch.eye(n, dtype=torch.bool, device=device)
    from mhd_fast.topology import make_graph
    return make_graph("regular", n, degree=int(graph.removeprefix("regular")), seed=0).to(device)


@dataclass
class Case:
    shape: Shape
    z: torch.Tensor        # [N, H1, B, V] student logits, requires grad
    t: torch.Tensor        # [N, H1, B, V] teacher logits
    adj: torch.Tensor
    packet: mhd_fast.TopKLogits | None  # teacher packets when shape.teacher == "topk"
    fused: str             # "cpp" or "triton"


def make_case(shape: Shape, device: str) -> Case:
    g = torch.Generator(device="cpu").manual_seed(0)
    size = (shape.n, shape.h1, shape.b, shape.v)
    z = (torch.randn(size, generator=g) * 2).to(device=device, dtype=shape.dtype).requires_grad_()
    t = (torch.randn(size, generator=g) * 3).to(device=device, dtype=shape.dtype)
    packet = None
    if shape.teacher == "topk":
        packet = mhd_fast.topk_compress(t, shape.k, value_dtype=shape.value_dtype, backend="torch")
    fused = "triton" if device == "cuda" else "cpp"
    return Case(shape, z, t, make_adj(shape.graph, shape.n, device), packet, fused)


def _teacher(c: Case):
    return c.packet if c.packet is not None else c.t


def loss_fn(c: Case, impl: str):
    """A function of the student logits returning the summed MHD loss, for one implementation."""
    teacher = _teacher(c)
    if impl == "naive":
        if c.packet is not None:
            v, i, lse = (x[:, :-1] for x in c.packet)
            return lambda z: naive.distill_topk_loop(z[:, 1:], v, i, lse, c.adj).sum()
        return lambda z: naive.distill_loop(z[:, 1:], c.t[:, :-1], c.adj).sum()
    backend = {"eager": "torch", "compile": "torch", "fused": c.fused}[impl]

    def f(z):
        return mhd_fast.mhd_loss(z, teacher, c.adj, reduction="sum", backend=backend)
    return torch.compile(f, fullgraph=True, dynamic=False) if impl == "compile" else f


def topk_fn(c: Case, impl: str):
    """Top-k compression of the teacher logits."""
    k = c.shape.k
    if impl == "fused":
        return lambda t: mhd_fast.topk_compress(t, k, backend=c.fused)

    def eager(t):  # the obvious torch: topk + logsumexp
        x = t.float()
        return torch.topk(x, k, dim=-1).values, torch.logsumexp(x, dim=-1)
    if impl == "naive":
        return lambda t: [eager(t[i]) for i in range(t.shape[0])]
    if impl == "compile":
        return torch.compile(eager, fullgraph=True, dynamic=False)
    return eager


def runner(c: Case, mode: str, impl: str):
    """A zero-argument callable doing one measured unit of work."""
    if mode == "topk":
        f = topk_fn(c, impl)
        t = c.t.detach()
        return lambda: f(t)
    f = loss_fn(c, impl)
    z = c.z
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return f(z)
        return run
    return lambda: torch.autograd.grad(f(z), z)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()  # host-device sync: timings must cover the kernels


def time_median(fn, device: str, reps: int, warmup: int = 3) -> float:
    """Median seconds of ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict, device: str, reps: int, warmup: int = 3) -> dict:
    """Median seconds of ``reps`` runs of each callable, the runs interleaved (one run of each in
    turn, the order rotating each round) so that a noisy neighbour slows every column alike
    instead of whichever implementation happened to be running. Rotation keeps the cycle, so
    each callable always runs right after the same one (in bench(): the fused column after
    torch.compile's run, which has just read the same logits, as a loss call follows the
    forward that made them; the naive loop after the copy)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(times[name]) for name in names}


def nbytes(shape: Shape, mode: str) -> int:
    """The fewest bytes the op must move: read the logits once, write the outputs once."""
    el = torch.tensor([], dtype=shape.dtype).element_size()
    g = shape.h1 - 1
    aux = shape.n * g * shape.b * shape.v * el  # student aux heads, and teacher heads 0..H1-2
    rows = shape.n * g * shape.b
    packet_row = shape.k * (torch.tensor([], dtype=shape.value_dtype).element_size()
                            + (2 if shape.v <= 32767 else 4)) + 4
    if mode == "topk":
        all_rows = shape.n * shape.h1 * shape.b
        return all_rows * shape.v * el + all_rows * packet_row
    teacher = rows * packet_row if shape.teacher == "topk" else aux
    total = aux + teacher + rows * 4  # read Z and the teacher, write the fp32 loss rows
    return total + (aux if mode == "fwd_bwd" else 0)  # write dZ


class Copy:
    """The device copy, as a runner: read + write of a tensor far larger than the caches, into
    a destination already touched, so that the figure is the memory's and not the page faults
    of a fresh allocation (a clone of 256 MiB on this CPU spent most of its time faulting in the
    new pages and read as 6.4 GB/s against 46 GB/s for the copy itself). bench() times it
    interleaved with the implementations of every row, so that each row's share of the copy
    bandwidth compares the two under the same load of the shared host (measured once at the
    start, it read 76.5 GB/s in one run and 43-45 GB/s in the next two)."""

    def __init__(self, device: str, mib: int = 256):
        self.x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
        self.y = torch.empty_like(self.x).fill_(0.0)
        self.bytes = 2 * self.x.numel() * 4

    def __call__(self):
        self.y.copy_(self.x)


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def peak_bandwidth(device: str) -> float | None:
    """The card's data-sheet peak (bytes/s), None on CPU or for a card not in PEAK_BW."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in PEAK_BW.items() if key in name), None)


def bench(device: str, shapes: list[str], modes: list[str], impls: list[str],
          reps: int) -> tuple[list[dict], float]:
    copy = Copy(device)
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        if shape.gpu_only and device != "cuda":
            continue
        c = make_case(shape, device)
        for mode in (m for m in modes if m in shape.modes):
            res = time_interleaved({**{impl: runner(c, mode, impl) for impl in impls}, "copy": copy},
                                   device, reps)
            copy_bw = copy.bytes / res.pop("copy")
            for impl in impls:
                print(f"  {name} {mode:8s} {impl:8s} {res[impl] * 1e3:10.3f} ms", file=sys.stderr)
            fused = res.get("fused")
            gbs = nbytes(shape, mode) / fused if fused else None
            row = {"device": device, "machine": machine(device), "shape": name, "mode": mode,
                   **{f"{k}_ms": round(v * 1e3, 4) for k, v in res.items()},
                   **{f"fused_vs_{k}": round(v / fused, 2) for k, v in res.items()
                      if fused and k != "fused"},
                   "fused_GBps": round(gbs / 1e9, 2) if gbs else None,
                   "copy_GBps": round(copy_bw / 1e9, 2),
                   "pct_copy_bw": round(100 * gbs / copy_bw, 1) if gbs else None}
            peak = peak_bandwidth(device)
            if device == "cuda" and gbs:
                row["peak_source"] = "datasheet" if peak else "copy"
                row["pct_peak_bw"] = round(100 * gbs / (peak or copy_bw), 1)
            rows.append(row)
        del c
    return rows, statistics.median(r["copy_GBps"] for r in rows) * 1e9


def print_table(rows: list[dict], device: str, copy_bw: float) -> None:
    fused = "triton" if device == "cuda" else "cpp"
    cols = ["shape", "mode", "naive_ms", "eager_ms", "compile_ms", "fused_ms", "fused_vs_naive",
            "fused_vs_eager", "fused_vs_compile", "fused_GBps", "copy_GBps", "pct_copy_bw"]
    if any("pct_peak_bw" in r for r in rows):
        cols += ["pct_peak_bw", "peak_source"]
    head = [c.replace("fused", fused) for c in cols]
    print(f"\n{datetime.date.today()}  {machine(device)}  copy bandwidth {copy_bw / 1e9:.1f} GB/s "
          "(median of the rows; each row's own in copy_GBps)")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")


def write_csv(rows: list[dict], path: str) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help="comma list of S1, S2, S2k, S3, S4 (default: all for the device)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    p.add_argument("--reps", type=int, default=20, help="timed runs per figure (>= 20 for reported figures)")
    p.add_argument("--csv", default=None, help="CSV path (default bench/results/ops_<device>.csv)")
    a = p.parse_args(argv)
    shapes = a.shapes.split(",") if a.shapes else [s for s, v in SHAPES.items()
                                                      if a.device == "cuda" or not v.gpu_only]
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}, expected some of {tuple(SHAPES)}")
    modes, impls = a.modes.split(","), a.impls.split(",")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r}, expected some of {MODES}")
    for i in impls:
        if i not in IMPLS:
            p.error(f"--impls: unknown implementation {i!r}, expected some of {IMPLS}")
    rows, copy_bw = bench(a.device, shapes, modes, impls, a.reps)
    print_table(rows, a.device, copy_bw)
    path = a.csv or os.path.join(os.path.dirname(__file__), "results", f"ops_{a.device}.csv")
    write_csv(rows, path)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
