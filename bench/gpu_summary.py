"""The one table of bench/gpu.sh: each target of the GPU run beside the figure measured, from
the CSV files that bench_ops.py and bench_round.py wrote in the same run.

    python bench/gpu_summary.py --ops OPS.csv --rounds ROUND.csv [ROUND.csv ...] [--csv OUT.csv]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys


def read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def targets(ops: list[dict], rounds: list[dict]) -> list[dict]:
    """(what, figure, target, met) rows; a figure that was not measured reads "not run"."""
    def op(shape, mode, key):
        return next((_num(r.get(key)) for r in ops if r["shape"] == shape and r["mode"] == mode), None)

    def loop_ratio(clients, model):
        return next((_num(r.get("speedup")) for r in rounds if r["impl"] == "per-client loop"
                     and int(r["clients"]) == clients and r.get("model", "").startswith(model)), None)

    big = [r for r in rounds if r["impl"] == "batched" and int(r["clients"]) == 16384
           and r.get("model", "").startswith("mlp") and _num(r.get("s_per_round"))]
    out = [("S4 fwd+bwd vs torch.compile", op("S4", "fwd_bwd", "fused_vs_compile"), 2.0, "x"),
           ("S4 fwd % of peak bandwidth", op("S4", "fwd", "pct_peak_bw"), 70.0, "%"),
           ("S3 fwd+bwd vs torch.compile", op("S3", "fwd_bwd", "fused_vs_compile"), 1.5, "x"),
           ("round, 1024 cnn: loop / batched", loop_ratio(1024, "cnn"), 50.0, "x"),
           ("round, 1024 mlp: loop / batched", loop_ratio(1024, "mlp"), None, "x")]
    rows = [{"what": w, "figure": "not run" if v is None else f"{v:g}{unit}",
             "target": "" if t is None else f">= {t:g}{unit}",
             "met": "" if v is None or t is None else ("yes" if v >= t else "NO")} for w, v, t, unit in out]
    if big:
        r = big[0]
        gb = _num(r.get("peak_gpu_bytes"))
        rows.append({"what": "16384 mlp clients train on one GPU",
                     "figure": f"{float(r['s_per_round']):.3f} s/round" + (f", peak {gb / 1e9:.1f} GB" if gb else ""),
                     "target": "trains", "met": "yes"})
    else:
        rows.append({"what": "16384 mlp clients train on one GPU", "figure": "not run", "target": "trains",
                     "met": ""})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", required=True, help="bench_ops.py CSV")
    p.add_argument("--rounds", nargs="*", default=[], help="bench_round.py CSVs")
    p.add_argument("--csv", default=None, help="write the table here too")
    a = p.parse_args(argv)
    ops = read(a.ops)
    rounds = [r for path in a.rounds for r in read(path)]
    card = next((r.get("machine") for r in ops if r.get("machine")), "unknown device")
    rows = targets(ops, rounds)
    print(f"\n{card}: one run of bench/gpu.sh")
    print("| target | measured | wanted | met |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['figure']} | {r['target']} | {r['met']} |")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["device", *rows[0]])
            w.writeheader()
            w.writerows({"device": card, **r} for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
