"""The study: run the sweep of configs/study.toml, then write docs/RESULTS.md with
one table and one plot per experiment and the findings, stated with their numbers.

    python scripts/study.py            # the full study -> docs/RESULTS.md, docs/plots/*.png
    python scripts/study.py --quick    # tiny sizes (CI) -> runs/study-quick/RESULTS.md
    python scripts/study.py --report-only   # rewrite the page from the runs already made

The sweep is resumable (finished runs are skipped), so a killed study continues with the same
command. Accuracies are in percent, "mean ± std" over seeds (std with ddof = 1). "Best aux"
is, per seed, the aux head with the highest mean shared accuracy over clients (docs/method.md §4).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import sys
import time
import warnings

import torch

from mhd_fast import config as C
from mhd_fast import models, summary, sweep, topology
from mhd_fast.metrics import human_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("configs", "study.toml")
STUDY_JSON = "study.json"
GAP_MARK = "## 8. "  # the section scripts/gap_study.py writes after these
PAPER_NOTE = ("Expected from the method (Zhmoginov et al., *Decentralized Learning with "
              "Multi-Headed Distillation*, CVPR 2023)")


# ---- reading the sweep ---------------------------------------------------------------------

class Study:
    """The plan, its summary rows and helpers to read them by variant and grid."""

    def __init__(self, plan: sweep.Plan, rows: list[dict]):
        self.plan = plan
        self.rows = rows
        self.runs = {(r.variant, r.name): r for r in plan.runs}

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(r["variant"] for r in self.rows))

    def grid(self, variant: str, grid: str) -> list[dict]:
        return [r for r in self.rows if r["variant"] == variant and r["grid"] == grid]

    def config(self, row: dict, seed: int) -> C.Config:
        return self.plan.config(self.runs[(row["variant"], row["run"])], seed)

    def flags(self, row: dict, seed: int) -> str:
        """`mhd-fast run` flags of one seed of a row's run."""
        return f"{run_flags(self.plan.settings(self.runs[(row['variant'], row['run'])]))} --seed {seed}"

    def base_row(self, variant: str) -> dict:
        """The run of base itself (every grid lists it under the point that equals base)."""
        return next(r for r in self.rows if r["variant"] == variant and r["run"] == "base")

    def dataset(self, variant: str) -> str:
        return {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "digits": "digits"}.get(
            self.config(self.base_row(variant), self.plan.seeds[0]).dataset, variant)


def stat(row: dict, name: str) -> dict | None:
    return row["metrics"].get(name)


def pct(st: dict | None) -> str:
    """'52.3 ± 1.2' (percent) or '-' when the run has no such metric."""
    if st is None:
        return "-"
    mean = 100 * st["mean"]
    return f"{mean:.1f}" if st["std"] is None else f"{mean:.1f} ± {100 * st['std']:.1f}"


def mean(row: dict, name: str) -> float:
    st = stat(row, name)
    return float("nan") if st is None else st["mean"]


def heads_of(row: dict) -> list[str]:
    heads = [k.split(".")[1] for k in row["metrics"] if k.startswith("shared_acc.")]
    return sorted(heads, key=lambda h: int(h[4:]))


def best_shared(row: dict) -> dict | None:
    """MHD's shared accuracy: the best aux head's, or head 0's for a method without aux heads."""
    return stat(row, "best_aux_shared_acc") or stat(row, "shared_acc.head0")


def signed(x: float) -> str:
    """'+1.2' / '-0.3' points from a fraction, never '-0.0'."""
    return f"{round(100 * x, 1) + 0.0:+.1f}"  # -0.0 + 0.0 is +0.0


def diff_std(a: dict, b: dict) -> float:
    """Std of the difference of two means over seeds (independent runs)."""
    var = sum((s["std"] or 0.0) ** 2 for s in (a, b))
    return var ** 0.5


# ---- commands ------------------------------------------------------------------------------

def run_flags(cfg: C.Config) -> str:
    """The `mhd-fast run` flags that make ``cfg`` (its keys that differ from the defaults)."""
    default = C.Config()
    parts = []
    for name in C.FIELDS:
        value = getattr(cfg, name)
        if value == getattr(default, name):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, list):
            parts.append(f"{flag} {' '.join(map(str, value))}")
        elif isinstance(value, dict):
            parts.append(f"{flag} {' '.join(f'{k}={v}' for k, v in value.items())}")
        else:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


class Page:
    """The markdown page under construction and the plots it links."""

    def __init__(self, study: Study, command: str, plots_dir: str, results_dir: str):
        self.study = study
        self.command = command
        self.plots_dir = plots_dir
        self.results_dir = results_dir
        self.lines: list[str] = []
        self.findings: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        self.add(*("| " + " | ".join(r) + " |" for r in rows))
        self.add("")

    def made_by(self, grids: tuple[str, ...], example: dict | None = None) -> None:
        names = ", ".join(f"`{g}`" for g in grids)
        self.add(f"Made by `{self.command}` (grid {names} of `{CONFIG}`).")
        if example is not None:
            self.add(f"One point, one seed: `mhd-fast run {self.study.flags(example, self.study.plan.seeds[0])}`.")
        self.add("")

    def plot(self, fig, name: str, caption: str) -> None:
        os.makedirs(self.plots_dir, exist_ok=True)
        path = os.path.join(self.plots_dir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        rel = os.path.relpath(path, self.results_dir)
        self.add(f"![{caption}]({rel})", "", f"*{caption}.* Plot made by `{self.command}`.", "")


def _figure(n: int, title: str, width: float = 5.0):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(width * n, 3.8), squeeze=False)
    fig.suptitle(title)
    return fig, axes[0]


def _errorbar(ax, xs, sts, **kw):
    ys = [100 * s["mean"] if s else float("nan") for s in sts]
    es = [100 * (s["std"] or 0.0) if s else 0.0 for s in sts]
    ax.errorbar(xs, ys, yerr=es, capsize=3, marker="o", **kw)


# ---- the experiments -----------------------------------------------------------------------

def section_heads(page: Page, variants: list[str]) -> None:
    s = page.study
    fig, axes = _figure(len(variants), "Shared accuracy per head, by number of aux heads H")
    for ax, v in zip(axes, variants):
        rows = s.grid(v, "heads")
        width = max(len(heads_of(r)) for r in rows)
        page.add(f"**{s.dataset(v)}** (shared accuracy per head, %; private accuracy of head 0)", "")
        body = []
        for r in rows:
            heads = heads_of(r)
            body.append([str(len(heads) - 1) + (" (isolated)" if len(heads) == 1 else "")]
                        + [pct(stat(r, f"shared_acc.head{h}")) if h < len(heads) else ""
                           for h in range(width)]
                        + [pct(stat(r, "private_acc.head0")), str(len(r["seeds"]))])
            _errorbar(ax, list(range(len(heads))), [stat(r, f"shared_acc.{h}") for h in heads],
                      label=f"H = {len(heads) - 1}")
        page.table(["H"] + [f"head {h}" for h in range(width)] + ["private head 0", "seeds"], body)
        ax.set(title=s.dataset(v), xlabel="head", ylabel="shared accuracy (%)")
        ax.set_xticks(range(width))
        ax.legend()
        ax.grid(alpha=0.3)

        deepest = max(rows, key=lambda r: len(heads_of(r)))
        heads = heads_of(deepest)
        accs = [mean(deepest, f"shared_acc.{h}") for h in heads]
        monotone = all(b >= a for a, b in zip(accs, accs[1:]))
        iso = next((r for r in rows if len(heads_of(r)) == 1), None)
        rise = accs[-1] - accs[0]
        text = (f"{s.dataset(v)}, H = {len(heads) - 1}: shared accuracy goes from "
                f"{100 * accs[0]:.1f}% (head 0) to {100 * accs[-1]:.1f}% (head {len(heads) - 1}), "
                f"{signed(rise)} points; " + ("it rises at every head" if monotone else
                "it does not rise at every head (per head: "
                + ", ".join(f"{100 * a:.1f}" for a in accs) + ")")
                + f"; the best head is head {max(range(len(accs)), key=accs.__getitem__)}")
        if iso is not None:
            text += (f"; isolated training reaches {pct(stat(iso, 'shared_acc.head0'))}% shared")
        page.findings.append(text + ".")
    page.plot(fig, "heads", "Mean shared accuracy of each head (over clients), for H aux heads")
    page.made_by(("heads",), s.grid(variants[0], "heads")[-1])


def section_skew(page: Page, variants: list[str]) -> None:
    s = page.study
    fig, axes = _figure(len(variants), "Shared accuracy against label skew s")
    for ax, v in zip(axes, variants):
        page.add(f"**{s.dataset(v)}** (accuracy %, isolated training against MHD)", "")
        body, curves = [], {"isolated head 0": {}, "MHD head 0": {}, "MHD best aux": {}}
        for grid, key, label in (("skew", "skew", "skew s = {}"), ("dirichlet", "dirichlet", "Dirichlet α = {}")):
            rows = s.grid(v, grid)
            for value in sorted(set(r["point"][key] for r in rows)):
                iso = next(r for r in rows if r["point"][key] == value and r["point"]["method"] == "isolated")
                mhd = next(r for r in rows if r["point"][key] == value and r["point"]["method"] == "mhd")
                gain = mean(mhd, "best_aux_shared_acc") - mean(iso, "shared_acc.head0")
                body.append([label.format(value), pct(stat(iso, "private_acc.head0")),
                             pct(stat(iso, "shared_acc.head0")), pct(stat(mhd, "private_acc.head0")),
                             pct(stat(mhd, "shared_acc.head0")), pct(stat(mhd, "best_aux_shared_acc")),
                             signed(gain)])
                if grid == "skew":
                    curves["isolated head 0"][value] = stat(iso, "shared_acc.head0")
                    curves["MHD head 0"][value] = stat(mhd, "shared_acc.head0")
                    curves["MHD best aux"][value] = stat(mhd, "best_aux_shared_acc")
        page.table(["partition", "isolated private", "isolated shared", "MHD private head 0",
                    "MHD shared head 0", "MHD shared best aux", "gain (points)"], body)
        for label, pts in curves.items():
            _errorbar(ax, list(pts), list(pts.values()), label=label)
        ax.set(title=s.dataset(v), xlabel="skew s", ylabel="shared accuracy (%)")
        ax.legend()
        ax.grid(alpha=0.3)
        skews = sorted(curves["isolated head 0"])
        lo, hi = curves["isolated head 0"][skews[0]], curves["isolated head 0"][skews[-1]]
        page.findings.append(
            f"{s.dataset(v)}, heterogeneity: MHD's best aux head minus isolated shared accuracy is "
            + ", ".join(f"{row[0]}: {row[-1]}" for row in body) + " points (largest at "
            f"{max(body, key=lambda row: float(row[-1]))[0]}); isolated shared "
            f"accuracy goes from {pct(lo)}% at s = {skews[0]} to {pct(hi)}% at s = {skews[-1]}.")
    page.plot(fig, "skew", "Shared accuracy against label skew: isolated training, MHD's main "
              "head and MHD's best aux head")
    page.made_by(("skew", "dirichlet"), s.grid(variants[0], "skew")[-1])


def graph_info(cfg: C.Config) -> dict:
    """topology.describe of the graph a run used. The graph's seed is drawn the way
    simulation.setup draws it: the third of three ints from the split seed's generator."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    graph_seed = torch.randint(0, 2**31 - 1, (3,), generator=gen).tolist()[2]
    return topology.describe(topology.make_schedule(cfg.graph, cfg.clients, seed=graph_seed,
                                                    **cfg.graph_options))


def _spearman(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def section_topology(page: Page, variants: list[str]) -> None:
    s = page.study
    fig, axes = _figure(len(variants), "Shared accuracy against the spectral gap of the graph")
    for ax, v in zip(axes, variants):
        rows = s.grid(v, "topology")
        page.add(f"**{s.dataset(v)}** (16 clients; accuracy %)", "")
        body, gaps, best, head0 = [], [], [], []
        for r in rows:
            infos = [graph_info(s.config(r, seed)) for seed in r["seeds"]]
            gap = sum(i["spectral_gap"] for i in infos) / len(infos)
            gaps.append(gap)
            best.append(stat(r, "best_aux_shared_acc"))
            head0.append(stat(r, "shared_acc.head0"))
            body.append([r["point"]["graph"], f"{gap:.3f}", f"{infos[0]['degree_mean']:.1f}",
                         str(infos[0]["components"]), pct(head0[-1]), pct(best[-1]),
                         pct(stat(r, "worst10_shared_acc.head0"))])
        page.table(["graph", "spectral gap", "mean degree", "components", "shared head 0",
                    "shared best aux", "worst-10% shared head 0"], body)
        _errorbar(ax, gaps, best, linestyle="none", label="best aux head")
        _errorbar(ax, gaps, head0, linestyle="none", label="head 0")
        for g, st, r in zip(gaps, best, rows):
            ax.annotate(r["point"]["graph"], (g, 100 * st["mean"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set(title=s.dataset(v), xlabel="spectral gap", ylabel="shared accuracy (%)")
        ax.legend()
        ax.grid(alpha=0.3)
        rho = _spearman(gaps, [b["mean"] for b in best])
        order = sorted(zip(gaps, [r["point"]["graph"] for r in rows], best), key=lambda t: t[0])
        page.findings.append(
            f"{s.dataset(v)}, topology: Spearman correlation between spectral gap and the best aux "
            f"head's shared accuracy is {rho:+.2f} over {len(rows)} graphs ("
            + ", ".join(f"{name} gap {g:.2f}: {pct(st)}%" for g, name, st in order) + ").")
    page.plot(fig, "topology", "Shared accuracy (best aux head and head 0) against the spectral "
              "gap of each 16-client graph")
    page.made_by(("topology",), s.grid(variants[0], "topology")[1])


def _group_stats(study: Study, row: dict) -> list[tuple[str, dict, dict]]:
    """Per architecture group of a run: (arch, shared head 0, shared best aux) over seeds,
    read from each seed's clients.csv."""
    cfg = study.config(row, row["seeds"][0])
    archs = [models.parse_arch(a) for a in cfg.model]
    spans = models.split_groups(cfg.clients, archs)
    per_group = [([], []) for _ in spans]
    for rel in row["dirs"]:
        acc: dict[tuple[int, str], float] = {}
        with open(os.path.join(study.plan.out, rel, "clients.csv")) as f:
            for rec in csv.DictReader(f):
                acc[(int(rec["client"]), rec["head"])] = float(rec["shared_acc"])
        heads = sorted({h for _, h in acc}, key=lambda h: int(h[4:]))
        for (arch, lo, hi), (h0, best) in zip(spans, per_group):
            means = {h: sum(acc[(i, h)] for i in range(lo, hi)) / (hi - lo) for h in heads}
            h0.append(means["head0"])
            best.append(max(means[h] for h in heads[1:]) if len(heads) > 1 else means["head0"])
    out = []
    for (arch, _, _), (h0, best) in zip(spans, per_group):
        out.append((str(arch), *({"mean": m, "std": sd} for m, sd in map(summary.mean_std, (h0, best)))))
    return out


def section_models(page: Page, variants: list[str]) -> None:
    s = page.study
    fig, axes = _figure(len(variants), "Shared accuracy of small and large models, alone and mixed")
    for ax, v in zip(axes, variants):
        rows = s.grid(v, "models")
        page.add(f"**{s.dataset(v)}** (accuracy %, per architecture group)", "")
        body, alone, mixed = [], {}, {}
        for r in rows:
            groups = _group_stats(s, r)
            setting = " + ".join(g[0] for g in groups) if len(groups) > 1 else f"all {groups[0][0]}"
            for arch, h0, best in groups:
                body.append([setting, arch, pct(h0), pct(best)])
                (mixed if len(groups) > 1 else alone)[arch] = best
        page.table(["clients", "group", "shared head 0", "shared best aux"], body)
        archs = list(alone)
        for k, (label, src) in enumerate((("homogeneous", alone), ("mixed graph", mixed))):
            xs = [i + 0.15 * (2 * k - 1) for i in range(len(archs))]
            ax.bar(xs, [100 * src[a]["mean"] for a in archs], width=0.3,
                   yerr=[100 * (src[a]["std"] or 0) for a in archs], capsize=3, label=label)
        ax.set_xticks(range(len(archs)), archs)
        ax.set(title=s.dataset(v), ylabel="shared accuracy, best aux (%)")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        page.findings.append(
            f"{s.dataset(v)}, model heterogeneity: best aux shared accuracy "
            + "; ".join(f"{a} alone {pct(alone[a])}%, in the mixed graph {pct(mixed[a])}%"
                        for a in archs if a in mixed) + ".")
    page.plot(fig, "models", "Best aux head's shared accuracy of each architecture, in a "
              "homogeneous graph and in a graph of half small, half large clients")
    page.made_by(("models",), s.grid(variants[0], "models")[-1])


def diverged(row: dict) -> int:
    """How many seeds of a run diverged (its loss or weights became NaN or inf, which stopped
    it); the row's numbers are those of the other seeds."""
    return len(row["diverged"])


def section_comm(page: Page, variants: list[str]) -> None:
    s = page.study
    grids = ("topk", "wire", "topk_mean")
    fig, axes = _figure(len(variants), "Shared accuracy against bytes sent")
    markers = {"float32": "o", "float16": "s", "bfloat16": "^"}
    for ax, v in zip(axes, variants):
        rows = list({r["run"]: r for g in grids for r in s.grid(v, g)}.values())
        cfgs = [s.config(r, s.plan.seeds[0]) for r in rows]  # a run's options: any seed's
        dense = {c.aggregate: r for r, c in zip(rows, cfgs)
                 if c.topk == 0 and c.wire_dtype == "float32"}
        page.add(f"**{s.dataset(v)}** (bytes over all edges of the run; accuracy %; the last "
                 "column against dense fp32 logits with the same aggregate)", "")
        body = []
        bad = {r["run"]: diverged(r) for r in rows}
        for r, cfg in zip(rows, cfgs):
            ref = dense[cfg.aggregate]
            ratio = mean(r, "bytes_dense") / mean(r, "bytes_sent")
            delta = mean(r, "best_aux_shared_acc") - mean(ref, "best_aux_shared_acc")
            what = "dense" if cfg.topk == 0 else f"top-{cfg.topk}"
            body.append([cfg.aggregate, what, cfg.wire_dtype, human_bytes(mean(r, "bytes_sent")),
                         f"{ratio:.2f}×", pct(stat(r, "shared_acc.head0")),
                         pct(stat(r, "best_aux_shared_acc")),
                         signed(delta) + (f" (diverged: {bad[r['run']]} seeds)"
                                                  if bad[r["run"]] else "")])
            color = "C0" if cfg.aggregate == "max_confidence" else "C1"
            st = stat(r, "best_aux_shared_acc")
            if st is not None:  # None: every seed diverged
                ax.errorbar([mean(r, "bytes_sent")], [100 * st["mean"]],
                            yerr=[100 * (st["std"] or 0)], marker=markers[cfg.wire_dtype],
                            capsize=3, color=color)
                ax.annotate(what, (mean(r, "bytes_sent"), 100 * st["mean"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
            if cfg.topk == 2:
                ok = ratio >= 3 and delta >= -0.01 and not bad[r["run"]]
                page.findings.append(
                    f"{s.dataset(v)}, top-2 packets, {cfg.wire_dtype} values, aggregate "
                    f"{cfg.aggregate}: {ratio:.2f}× fewer bytes than dense fp32 logits, "
                    f"{signed(delta)} ± "
                    f"{100 * diff_std(stat(r, 'best_aux_shared_acc'), stat(ref, 'best_aux_shared_acc')):.1f}"
                    " points of best aux shared accuracy against dense"
                    + (f" (diverged in {bad[r['run']]} of {bad[r['run']] + len(r['seeds'])} seeds)"
                       if bad[r["run"]] else "")
                    + f"; the target (≥ 3× fewer bytes, ≤ 1 point less) is {'met' if ok else 'not met'}"
                    + ("" if ratio >= 3 else " (bytes: a packet row costs k·(value + 2-byte "
                       "index) + 4 bytes of lse against 10 fp32 values dense)") + ".")
        page.table(["aggregate", "wire", "values", "bytes sent", "fewer than dense fp32",
                    "shared head 0", "shared best aux", "vs dense (points)"], body)
        if any(bad.values()):
            page.add("*Diverged*: the loss or the weights of that many seeds became NaN or inf, "
                     "which stopped those runs; the numbers of the row are those of the other "
                     "seeds.", "")
        from matplotlib.lines import Line2D

        handles = ([Line2D([], [], color=c, marker="o", linestyle="none", label=a)
                    for a, c in (("max_confidence", "C0"), ("mean", "C1"))]
                   + [Line2D([], [], color="gray", marker=m, linestyle="none", label=d)
                      for d, m in markers.items()])
        ax.legend(handles=handles, fontsize=7)
        ax.set_xscale("log")
        ax.set(title=s.dataset(v), xlabel="bytes sent over all edges (log)",
               ylabel="shared accuracy, best aux (%)")
        ax.grid(alpha=0.3)
    page.plot(fig, "comm", "Best aux head's shared accuracy against the bytes the run sent "
              "(blue: max_confidence, orange: mean; circle fp32, square fp16, triangle bf16 values)")
    page.made_by(grids, s.grid(variants[0], "topk")[2])


def section_baselines(page: Page, variants: list[str]) -> None:
    s = page.study
    fig, axes = _figure(len(variants), "Baselines: shared and private accuracy")
    for ax, v in zip(axes, variants):
        rows = s.grid(v, "baselines")
        page.add(f"**{s.dataset(v)}** (accuracy %; MHD's best aux head next to its head 0)", "")
        body = []
        for r in rows:
            method = r["point"]["method"]
            body.append([method, pct(stat(r, "private_acc.head0")), pct(stat(r, "shared_acc.head0")),
                         pct(stat(r, "best_aux_shared_acc")), pct(stat(r, "ensemble_shared_acc")),
                         human_bytes(mean(r, "bytes_sent"))])
        page.table(["method", "private head 0", "shared head 0", "shared best aux",
                    "ensemble shared", "bytes sent"], body)
        names = [r["point"]["method"] for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [100 * mean(r, "private_acc.head0") for r in rows], width=0.4,
               yerr=[100 * (stat(r, "private_acc.head0")["std"] or 0) for r in rows], capsize=3,
               label="private, head 0")
        ax.bar([x + 0.2 for x in xs], [100 * best_shared(r)["mean"] for r in rows], width=0.4,
               yerr=[100 * (best_shared(r)["std"] or 0) for r in rows], capsize=3,
               label="shared, best head")
        ax.set_xticks(list(xs), names, rotation=20)
        ax.set(title=s.dataset(v), ylabel="accuracy (%)")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        ranked = sorted(rows, key=lambda r: -best_shared(r)["mean"])
        page.findings.append(
            f"{s.dataset(v)}, baselines by shared accuracy (best head): "
            + ", ".join(f"{r['point']['method']} {pct(best_shared(r))}%" for r in ranked) + ".")
    page.plot(fig, "baselines", "Private accuracy of head 0 and shared accuracy of the best head "
              "(MHD: best aux head) of each method")
    page.made_by(("baselines",), s.grid(variants[0], "baselines")[2])


def section_aggregate(page: Page, variants: list[str]) -> None:
    s = page.study
    fig, axes = _figure(len(variants), "Shared accuracy per head, by teacher aggregation")
    for ax, v in zip(axes, variants):
        rows = s.grid(v, "aggregate")
        heads = heads_of(rows[0])
        page.add(f"**{s.dataset(v)}** (shared accuracy per head, %)", "")
        page.table(["aggregate"] + heads + ["best aux", "private head 0"],
                   [[r["point"]["aggregate"]] + [pct(stat(r, f"shared_acc.{h}")) for h in heads]
                    + [pct(stat(r, "best_aux_shared_acc")), pct(stat(r, "private_acc.head0"))]
                    for r in rows])
        for r in rows:
            _errorbar(ax, list(range(len(heads))), [stat(r, f"shared_acc.{h}") for h in heads],
                      label=r["point"]["aggregate"])
        ax.set(title=s.dataset(v), xlabel="head", ylabel="shared accuracy (%)")
        ax.set_xticks(range(len(heads)))
        ax.legend()
        ax.grid(alpha=0.3)
        ranked = sorted(rows, key=lambda r: -mean(r, "best_aux_shared_acc"))
        page.findings.append(
            f"{s.dataset(v)}, aggregation by best aux shared accuracy: "
            + ", ".join(f"{r['point']['aggregate']} {pct(stat(r, 'best_aux_shared_acc'))}%"
                        for r in ranked) + ".")
    page.plot(fig, "aggregate", "Mean shared accuracy of each head for each way of aggregating "
              "the candidates' predictions")
    page.made_by(("aggregate",), s.grid(variants[0], "aggregate")[1])


# The experiments in page order: (title, the function writing its section).
SECTIONS = (("1. Number of aux heads", section_heads),
            ("2. Data heterogeneity", section_skew),
            ("3. Topology", section_topology),
            ("4. Model heterogeneity", section_models),
            ("5. Communication: top-k and wire dtype", section_comm),
            ("6. Baselines", section_baselines),
            ("7. Teacher aggregation", section_aggregate))


# ---- the page ------------------------------------------------------------------------------

def _backend() -> str:
    import mhd_fast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback warning: the name is what we report
        return mhd_fast.resolve_backend("auto", torch.device("cpu"))


def _timing(sessions: list[dict]) -> str:
    """The wall time of the study, over every invocation that ran part of it, with the
    machine's load (other processes share the cores, so the wall time depends on them)."""
    wall = sum(x["wall_s"] for x in sessions)
    ran = sum(x["ran"] for x in sessions)
    parts = [f"{x['wall_s'] / 60:.1f} min for {x['ran']} runs ({x['jobs']} jobs × {x['threads']} "
             f"thread(s)"
             + (f", {x['cpu_s'] / 60:.1f} CPU-min" if "cpu_s" in x else "")
             + f", 1-min load average {x['load_start']:.1f} at the start, "
             f"{x['load_end']:.1f} at the end)" for x in sessions]
    if len(sessions) == 1:
        return f"Wall time of this study: {parts[0]}."
    return (f"Wall time of this study: {wall / 60:.1f} min for {ran} runs in "
            f"{len(sessions)} invocations: " + "; ".join(parts) + ".")


def write_page(study: Study, results: str, command: str, sessions: list[dict]) -> str:
    """Build the markdown page and its plots; returns the page's text (also written)."""
    results_dir = os.path.dirname(os.path.abspath(results))
    page = Page(study, command, os.path.join(results_dir, "plots"), results_dir)
    variants = study.variants
    plan = study.plan
    for title, write_section in SECTIONS:
        page.add(f"## {title}", "")
        write_section(page, variants)

    base = study.config(study.base_row(variants[0]), plan.seeds[0])
    total_runs = len(plan.runs) * len(plan.seeds)
    head = [
        "# Results: multi-headed distillation, reproduced",
        "",
        f"Made by `{command}`: the sweep `{CONFIG}` ({len(plan.runs)} configurations × "
        f"{len(plan.seeds)} seeds = {total_runs} runs, {len(variants)} dataset{'s' if len(variants) > 1 else ''}), then this page "
        f"and its plots. Every number is the mean ± std (ddof = 1) over seeds {list(plan.seeds)} "
        "of a mean over clients; accuracies in percent. *Shared* accuracy is on the uniform test "
        "set, *private* accuracy on the test set re-weighted to a client's own label mix "
        "(docs/method.md §4). *Best aux* is the aux head with the highest shared accuracy in each seed.",
        "",
        f"Setup (every run unless its table says otherwise): {base.clients} clients, label skew "
        f"s = {base.skew}, {base.graph} graph, model {' + '.join(base.model)} with {base.heads} "
        f"aux heads, ν_aux = {base.nu_aux} per head, τ = {base.tau}, aggregate {base.aggregate}, "
        f"dense fp32 logits, {base.rounds} rounds × {base.steps_per_round} steps (private batch "
        f"{base.batch_size}, public batch {base.public_batch_size}), {base.optimizer} lr {base.lr}. "
        + " ".join(f"{study.dataset(v)}: `mhd-fast run {study.flags(study.base_row(v), plan.seeds[0])}`."
                   for v in variants),
        "",
        f"Machine: {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch "
        f"{torch.__version__}, fused-op backend `{_backend()}`. {_timing(sessions)}",
        "",
        "## Findings",
        "",
        f"{PAPER_NOTE}: shared accuracy rising from head 0 to the last aux head; MHD helping more "
        "as the data grow more heterogeneous; better connected graphs (larger spectral gap) "
        "giving higher shared accuracy; top-2 packets on 10 classes sending ≥ 3× fewer bytes "
        "than dense logits at ≤ 1 point less shared accuracy. What this study measured:",
        "",
        *(f"- {f}" for f in page.findings),
        "",
    ]
    text = "\n".join(head + page.lines)
    if os.path.exists(results):  # keep the sections written by scripts/gap_study.py
        with open(results) as f:
            old = f.read()
        if GAP_MARK in old:
            text = text.rstrip("\n") + "\n\n" + old[old.index(GAP_MARK):]
    os.makedirs(results_dir, exist_ok=True)
    with open(results, "w") as f:
        f.write(text)
    return text


# ---- command line --------------------------------------------------------------------------

def parser(doc: str, runs: str, page: str) -> argparse.ArgumentParser:
    """The options of the study scripts: runs in runs/RUNS[-quick], PAGE says what is written."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (the [quick] tables), for CI")
    p.add_argument("--out", default=None, help=f"runs folder (default: runs/{runs}[-quick])")
    p.add_argument("--results", default=None,
                   help=f"the page {page} (default: docs/RESULTS.md; --quick: OUT/RESULTS.md)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--report-only", action="store_true", help="do not run; use the runs made")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def reporting(prog: str, work) -> int:
    """work() -> the line to print, status 0; a ValueError or OSError is one line, status 2."""
    try:
        said = work()
    except (ValueError, OSError) as e:
        sys.stderr.write(f"{prog}: error: {str(e).splitlines()[0]}\n")
        return 2
    print(said)
    return 0


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its children that have ended (the
    sweep's workers, once their pool has shut down)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_timed(plan: sweep.Plan, args: argparse.Namespace,
              partial: bool = False) -> tuple[list[dict], list[dict]]:
    """Run ``plan`` (or, with --report-only, read the runs made) -> (summary rows, sessions).
    Each invocation that ran part of the sweep adds a session to OUT/study.json: its wall and
    CPU time, jobs, threads and the machine's load, so a resumed study adds up. ValueError
    when a run is missing, unless ``partial`` (the rows then hold the seeds that finished)."""
    stamp = os.path.join(plan.out, STUDY_JSON)
    sessions = []
    if os.path.exists(stamp):
        with open(stamp) as f:
            sessions = json.load(f)["sessions"]
    if args.report_only:
        if not sessions:
            raise ValueError(f"--report-only: no study has run in {plan.out!r}")
        rows = sweep.summarize(plan)
    else:
        threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
        load = os.getloadavg()[0]
        t0, cpu0 = time.perf_counter(), _cpu_s()
        result = sweep.run_plan(plan, jobs=args.jobs, threads=threads, progress=args.progress)
        sessions.append({"wall_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0,
                         "ran": result["ran"], "skipped": result["skipped"], "jobs": args.jobs,
                         "threads": threads, "load_start": load, "load_end": os.getloadavg()[0]})
        with open(stamp, "w") as f:
            json.dump({"sessions": sessions}, f, indent=1)
        rows = result["summary"]
    missing = [f"{r['variant']}/{r['run']}" for r in rows
               if len(r["seeds"]) + len(r["diverged"]) < len(plan.seeds)]
    if missing and not partial:
        raise ValueError(f"runs not finished: {', '.join(sorted(set(missing)))} "
                         "(run without --report-only to make them)")
    return rows, sessions


def splice(page: str, mark: str, section_text: str) -> str:
    """``page`` with the section whose heading starts with ``mark`` (up to the next '## '
    heading or the end) replaced by ``section_text``, or with ``section_text`` appended."""
    if mark in page:
        start = page.index(mark)
        rest = page.find("\n## ", start + 1)
        tail = page[rest + 1:] if rest >= 0 else ""
        return page[:start] + section_text + ("\n" + tail if tail else "")
    return page.rstrip("\n") + "\n\n" + section_text


def places(args: argparse.Namespace, runs: str, script: str) -> tuple[str, str, str]:
    """(runs folder, page to write, the command that writes it) of a study script's options:
    runs/RUNS[-quick] and docs/RESULTS.md (with --quick: the runs folder's RESULTS.md)."""
    out = args.out or os.path.join("runs", f"{runs}-quick" if args.quick else runs)
    results = args.results or (os.path.join(out, "RESULTS.md") if args.quick
                               else os.path.join("docs", "RESULTS.md"))
    return out, results, f"python scripts/{script}" + (" --quick" if args.quick else "")


def write_section(results: str, mark: str, lines: list[str]) -> None:
    """The page ``results`` (made if missing) with its section ``mark`` replaced by ``lines``."""
    page = ""
    if os.path.exists(results):
        with open(results) as f:
            page = f.read()
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "w") as f:
        f.write(splice(page, mark, "\n".join(lines)))


def main(argv: list[str] | None = None) -> int:
    args = parser(__doc__, "study", "to write").parse_args(argv)

    os.chdir(ROOT)  # the config, runs/ and docs/ are relative to the repository
    out, results, command = places(args, "study", "study.py")

    def work() -> str:
        plan = sweep.load_plan(CONFIG, out, quick=args.quick)
        rows, sessions = run_timed(plan, args)
        write_page(Study(plan, rows), results, command, sessions)
        return f"wrote {results} and its plots in {os.path.join(os.path.dirname(results), 'plots')}"

    return reporting("study", work)


if __name__ == "__main__":
    raise SystemExit(main())
