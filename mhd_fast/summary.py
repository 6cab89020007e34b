"""A sweep's summary: the numbers of each finished run (``run_metrics``), their mean ± std
over seeds, and the summary files (summary.csv, summary.json) and text table a sweep writes.
``sweep.summarize`` reads the runs of a plan into the rows these take.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os

from .outdir import atomic_write

SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"


def point_value(value) -> str:
    """A grid value as it stands in run names and the summary: lists and dicts joined."""
    if isinstance(value, list):
        return "+".join(map(point_value, value))
    if isinstance(value, dict):
        return "+".join(f"{k}-{point_value(v)}" for k, v in sorted(value.items()))
    return str(value).lower() if isinstance(value, bool) else str(value)


def run_metrics(final: dict, rounds: list[dict]) -> dict[str, float]:
    """The numbers of one finished run, flat: 'shared_acc.head0', 'best_aux_shared_acc', ...
    (best aux: the aux head with the highest mean shared accuracy, absent without aux heads)."""
    from .metrics import best_aux

    out: dict[str, float] = {}
    for key in ("shared_acc", "private_acc", "worst10_shared_acc", "worst10_private_acc"):
        for head, value in final.get(key, {}).items():
            out[f"{key}.{head}"] = value
    best = best_aux(final["shared_acc"])
    if best is not None:
        out["best_aux_shared_acc"] = best[1]
        last = max(final["shared_acc"], key=lambda h: int(h[4:]))
        out["last_head_shared_acc"] = final["shared_acc"][last]
    for key in ("ensemble_shared_acc", "bytes_sent", "bytes_dense", "bytes_per_edge"):
        if key in final:
            out[key] = final[key]
    out["train_time_s"] = sum(r["time_s"] for r in rounds)
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summary_csv(rows: list[dict]) -> str:
    """variant, grid, run, point (key=value;...), n_seeds (finished), n_diverged, then
    METRIC_mean / METRIC_std columns."""
    names = sorted({k for r in rows for k in r["metrics"]})
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variant", "grid", "run", "point", "n_seeds", "n_diverged"]
               + [f"{n}_{s}" for n in names for s in ("mean", "std")])
    for r in rows:
        cells = []
        for n in names:
            st = r["metrics"].get(n)
            cells += ["", ""] if st is None else [
                f"{st['mean']:.6g}", "" if st["std"] is None else f"{st['std']:.6g}"]
        w.writerow([r["variant"], r["grid"], r["run"], ";".join(f"{k}={point_value(v)}" for k, v in r["point"].items()),
                    len(r["seeds"]), len(r["diverged"])] + cells)
    return buf.getvalue()


def write_summary(out: str, rows: list[dict]) -> None:
    os.makedirs(out, exist_ok=True)
    atomic_write(os.path.join(out, SUMMARY_CSV), summary_csv(rows))
    atomic_write(os.path.join(out, SUMMARY_JSON), json.dumps(rows, indent=1) + "\n")


def load_summary(out: str) -> list[dict]:
    """The rows of OUT/summary.json. ValueError when the sweep has not written one."""
    path = os.path.join(out, SUMMARY_JSON)
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ValueError(f"--out: no sweep summary at {path!r} ({e.strerror or e})") from None


def format_table(rows: list[dict]) -> str:
    """A short text table: grid, run, finished and diverged seeds, shared accuracy of head 0
    and of the best aux."""
    def cell(st):
        if st is None:
            return "-"
        return f"{st['mean']:.4f}" + ("" if st["std"] is None else f" ± {st['std']:.4f}")

    lines = [f"{'grid':<14} {'run':<48} {'seeds':>5} {'diverged':>8}  {'shared head0':>17}  "
             f"{'best aux shared':>17}"]
    for r in rows:
        m = r["metrics"]
        run = os.path.join(r["variant"], r["run"]) if r["variant"] else r["run"]
        lines.append(f"{r['grid']:<14} {run:<48} {len(r['seeds']):>5} {len(r['diverged']):>8}  "
                     f"{cell(m.get('shared_acc.head0')):>17}  {cell(m.get('best_aux_shared_acc')):>17}")
    return "\n".join(lines)
