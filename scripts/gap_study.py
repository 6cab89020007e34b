"""Where the gap between MHD's aux heads and the ensemble of the clients' main heads comes
from: the sweeps configs/gap.toml (digits, one knob at a time around the default run) and
configs/gap_fashion.toml (Fashion-MNIST, the knobs that matter), then section 8 of
docs/RESULTS.md with its tables, plots and findings.

    python scripts/gap_study.py                # both sweeps -> docs/RESULTS.md §8, docs/plots/gap_*.png
    python scripts/gap_study.py --quick        # tiny sizes (CI) -> runs/gap-quick/RESULTS.md
    python scripts/gap_study.py --report-only  # rewrite the section from the runs already made

Every run records per round (metrics.json, ``metrics.gap_record``) how often the teacher of
each aux head is right on 512 public rows and each head's agreement with the ensemble. The
section replaces an earlier section 8 of the page and leaves the rest as it is; the page's
sections 1-7 (scripts/study.py) keep it when they are written again.
"""
from __future__ import annotations

import json
import os
import time

from mhd_fast import config as C
from mhd_fast import metrics as M
from mhd_fast import summary, sweep

import study as S  # scripts/study.py: the page helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each sweep file and the suffix of its runs folder (OUT, OUT_fashion).
SWEEPS = ((os.path.join("configs", "gap.toml"), ""),
          (os.path.join("configs", "gap_fashion.toml"), "_fashion"))
MARK = "## 8. "  # the section this script owns
TITLE = "8. The gap between the aux heads and the ensemble"


# ---- numbers of one run ----------------------------------------------------------------------

def aux_heads(shared: dict) -> dict:
    return {h: v for h, v in shared.items() if h != "head0"}


def seed_numbers(m: dict) -> dict:
    """The numbers of one finished run (one seed), as fractions.

    best: the final best aux head's shared accuracy (head 0's without aux heads); ensemble:
    the ensemble of main heads, final; gap = ensemble − best; teacher: how often the best aux
    head's teacher was right on the public rows in the last round; teacher1: the same for
    head 1 (whose teachers are main heads); public: the best aux head's own accuracy on those
    rows (against teacher: how much of its teacher it learnt); agree: its agreement with the
    ensemble on those rows; peak: the best aux head's best round; jitter: the mean change of the
    best aux accuracy from one measured round to the next over the second half of the run."""
    recs = M.measured(m["rounds"])
    fin, last = m["final"], recs[-1]
    aux = aux_heads(fin["shared_acc"])
    head = max(aux, key=aux.get) if aux else "head0"
    best = fin["shared_acc"][head]
    out = {"head0": fin["shared_acc"]["head0"], "best": best,
           "ensemble": fin["ensemble_shared_acc"], "gap": fin["ensemble_shared_acc"] - best,
           "agree": last["ensemble_agreement"][head], "public": last["public_acc"][head]}
    if "teacher_acc" in last:
        out["teacher"] = last["teacher_acc"][head]
        out["teacher1"] = last["teacher_acc"]["head1"]
    curve = [max(aux_heads(r["shared_acc"]).values() or [r["shared_acc"]["head0"]])
             for r in recs]
    out["peak"] = max(curve)
    half = curve[len(curve) // 2:]
    out["jitter"] = (sum(abs(b - a) for a, b in zip(half, half[1:])) / (len(half) - 1)
                     if len(half) > 1 else 0.0)
    return out


def load_runs(plan: sweep.Plan, row: dict) -> list[dict]:
    """metrics.json of every finished seed of a summary row."""
    out = []
    for rel in row["dirs"]:
        with open(os.path.join(plan.out, rel, "metrics.json")) as f:
            out.append(json.load(f))
    return out


def numbers(plan: sweep.Plan, row: dict) -> dict:
    """{name: {"mean", "std", "values"}} over the row's seeds (``seed_numbers``)."""
    per_seed = [seed_numbers(m) for m in load_runs(plan, row)]
    out = {}
    for key in per_seed[0]:
        vals = [p[key] for p in per_seed]
        mean, std = summary.mean_std(vals)
        out[key] = {"mean": mean, "std": std, "values": vals}
    return out


def curves(plan: sweep.Plan, row: dict) -> tuple[list[int], dict]:
    """The rounds measured (0-based) and, per round, means over seeds: shared accuracy of
    every head, the ensemble, the teachers."""
    runs = [M.measured(m["rounds"]) for m in load_runs(plan, row)]
    out: dict[str, list[float]] = {}

    def add(name, pick):
        vals = [[pick(recs[r]) for recs in runs] for r in range(len(runs[0]))]
        out[name] = [sum(v) / len(v) for v in vals]

    for h in runs[0][0]["shared_acc"]:
        add(f"shared {h}", lambda rec, h=h: rec["shared_acc"][h])
    add("ensemble", lambda rec: rec["ensemble_shared_acc"])
    for h in runs[0][0].get("teacher_acc", {}):
        add(f"teacher {h}", lambda rec, h=h: rec["teacher_acc"][h])
    return [rec["round"] for rec in runs[0]], out


# ---- the section -----------------------------------------------------------------------------

def knob_value(row: dict) -> str:
    return ", ".join(f"{k} = {v}" for k, v in row["point"].items()) or "base"


def fmt(st: dict | None) -> str:
    return S.pct(st)


def table(lines: list[str], header: list[str], rows: list[list[str]]) -> None:
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]


def section(plans: list[tuple[str, sweep.Plan]], summaries: list[list[dict]], command: str,
            plots_dir: str, results_dir: str) -> tuple[list[str], list[str]]:
    """The lines of section 8 and its findings."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, findings = [], []
    add = lines.extend
    add([f"## {TITLE}", "",
          "Each round of every run records, on 512 public rows (their labels read for this "
          "measure only), how often the *teacher* of each aux head is right (the target it "
          "distils from: its candidates' head h−1 aggregated as in training) and how often each "
          "head agrees with the ensemble of all main heads; and the ensemble's shared accuracy "
          "on the test set (`docs/method.md` §4). Columns, mean ± std over seeds, in %: *best "
          "aux* the final best aux head's shared accuracy; *peak* its best round; *ensemble* "
          "the final ensemble of main heads; *gap* = ensemble − best aux; *teacher* how often "
          "the best aux head's teacher is right in the last round; *aux on public* the best aux "
          "head itself on those rows (teacher − aux on public: what it has not learnt of its "
          "teacher); *teacher h1* the same for "
          "head 1, whose teachers are main heads; *agree* the best aux head's agreement with "
          "the ensemble; *jitter* the mean change of the best aux accuracy from one round to "
          "the next over the second half of the run (points). Runs without aux heads "
          "(isolated) show head 0 under best aux.", "",
          f"The defaults of `mhd-fast run` after this study: ν_aux = {C.Config().nu_aux}, "
          f"aggregate {C.Config().aggregate}, teacher EMA {C.Config().teacher_ema} (off): the "
          "method of `docs/method.md`. `--teacher-ema` and `--aggregate mean` are options, "
          "side by side below. The base runs below spell out the earlier defaults "
          "(ν_aux = 1.0).", ""])
    os.makedirs(plots_dir, exist_ok=True)

    def save(fig, name, caption):
        fig.tight_layout()
        path = os.path.join(plots_dir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        add([f"![{caption}]({os.path.relpath(path, results_dir)})", "",
             f"*{caption}.* Plot made by `{command}`.", ""])

    scatter = []
    for (path, plan), rows in zip(plans, summaries):
        variant = rows[0]["variant"]
        study = S.Study(plan, rows)
        name = study.dataset(variant)
        base = next(r for r in rows if r["run"] == "base")
        if not base["seeds"]:
            continue  # nothing to read yet
        add([f"### {name}", "",
             f"Base run (every other row changes one knob of it): `mhd-fast run "
             f"{study.flags(base, plan.seeds[0]).strip()}`, seeds {list(plan.seeds)}. Made by "
             f"`{command}` (`{path}`).", ""])
        body, by_run = [], {}
        found = {}
        # the base run once, first; then each knob's other values
        for r in sorted(rows, key=lambda r: r["run"] != "base"):
            if not r["seeds"]:
                continue
            first = r["run"] not in by_run
            if first:
                by_run[r["run"]] = numbers(plan, r)
            n = found[(r["grid"], r["run"])] = by_run[r["run"]]
            if not first:
                continue
            scatter += [(t, b, name) for t, b in zip(n.get("teacher", {}).get("values", []),
                                                      n["best"]["values"])]
            grid, value = ("base", "(as above)") if r["run"] == "base" else (r["grid"], knob_value(r))
            body.append([grid, value, fmt(n["best"]), fmt(n["peak"]),
                         fmt(n["ensemble"]), S.signed(n["gap"]["mean"]), fmt(n.get("teacher")),
                         fmt(n["public"]),
                         fmt(n.get("teacher1")), fmt(n["agree"]),
                         f"{100 * n['jitter']['mean']:.1f}", str(len(r["seeds"]))])
        table(lines, ["knob", "value", "best aux", "peak", "ensemble", "gap",
                      "teacher", "aux on public", "teacher h1", "agree", "jitter", "seeds"], body)

        # accuracy over training: the base run and the variants that matter
        show = list({r["run"]: r for r in [base] + [
            r for r in rows if r["seeds"] and r["run"] != "base"
            and (r["grid"] in ("aggregate", "teacher_ema") or r["run"] == "nu_aux=0.25")]}.values())
        fig, axes = plt.subplots(1, len(show), figsize=(4.2 * len(show), 3.6), squeeze=False,
                                 sharey=True)
        for ax, r in zip(axes[0], show):
            xs, c = curves(plan, r)
            for k, v in c.items():
                style = "--" if k.startswith("teacher") else ("k-" if k == "ensemble" else "-")
                ax.plot(xs, [100 * y for y in v], style, label=k, lw=1.2)
            ax.set(title=knob_value(r) if r["run"] != "base" else "base", xlabel="round")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy (%), mean over seeds")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(f"{name}: shared accuracy per head, ensemble of main heads, and how often "
                     "each aux head's teacher is right (dashed), by round")
        save(fig, f"gap_curves_{variant}", f"{name}: shared accuracy of every head, the "
             "ensemble of main heads and the teachers' accuracy on public rows (dashed) over "
             "training: the base run, ν_aux = 0.25 (the new default), the teacher aggregations "
             "and the teacher EMA")

        grids = list(dict.fromkeys(r["grid"] for r in rows if r["grid"] != "length"))
        if grids:
            cols = min(6, len(grids))
            nrows = -(-len(grids) // cols)
            fig, axes = plt.subplots(nrows, cols, figsize=(2.8 * cols, 3.2 * nrows),
                                     squeeze=False, sharey=True)
            for ax in axes.flat[len(grids):]:
                ax.axis("off")
            for ax, g in zip(axes.flat, grids):
                pts = sorted((r for r in rows if r["grid"] == g and (g, r["run"]) in found),
                             key=lambda r: [str(v) if isinstance(v, str) else f"{float(v):020.6f}"
                                            for v in r["point"].values()])
                xs = list(range(len(pts)))
                for key, label, color in (("best", "best aux", "C0"), ("teacher", "teacher", "C1"),
                                          ("ensemble", "ensemble", "k")):
                    sts = [found[(g, r["run"])].get(key) for r in pts]
                    S._errorbar(ax, xs, sts, label=label, color=color)
                ax.set_xticks(xs, [", ".join(str(v) for v in r["point"].values()) for r in pts],
                              rotation=30, fontsize=7)
                ax.set_title(g, fontsize=9)
                ax.grid(alpha=0.3)
            for row in axes:
                row[0].set_ylabel("accuracy (%)")
            axes.flat[len(grids) - 1].legend(fontsize=7)
            save(fig, f"gap_knobs_{variant}", f"{name}: final best aux head, its teacher and "
                 "the ensemble of main heads, one knob at a time (mean ± std over seeds)")
        rounds, c = curves(plan, base)
        if "teacher head1" in c:
            t, e = c["teacher head1"], c["ensemble"]
            peak = max(range(len(t)), key=t.__getitem__)
            findings.append(
                f"{name}, base run: the teacher of head 1 (the most confident neighbour's main "
                f"head) is right on {100 * t[0]:.1f}% of the public rows after round "
                f"{rounds[0]}, when the ensemble of main heads is at {100 * e[0]:.1f}% shared; "
                f"it peaks at {100 * t[peak]:.1f}% in round {rounds[peak]} and ends at "
                f"{100 * t[-1]:.1f}%, while the ensemble ends at {100 * e[-1]:.1f}% (means over "
                "seeds).")
        unique: dict = {}
        for key in found:  # a run listed under two grids counts once, under the first
            unique.setdefault(key[1], key)
        ranked = sorted(((found[key]["best"]["mean"], key) for run, key in unique.items()
                         if run != "base" and "teacher" in found[key]), reverse=True)
        b0 = found[next(k for k in found if k[1] == "base")]["best"]["mean"]
        if ranked:
            findings.append(
                f"{name}, each run against the base run's best aux head "
                f"({100 * b0:.1f}%): "
                + "; ".join(f"{knob_value(next(r for r in rows if (r['grid'], r['run']) == key))} "
                            f"{S.signed(m - b0)}" for m, key in ranked) + " points.")
        shaky = sorted(((found[key]["jitter"]["mean"], key) for run, key in unique.items()
                        if run != "base"), reverse=True)
        findings.append(
            f"{name}, round-to-round change of the best aux head over the second half of the "
            "run (points, mean over seeds): "
            + "; ".join(f"{knob_value(next(r for r in rows if (r['grid'], r['run']) == key))} "
                        f"{100 * j:.1f}" for j, key in shaky[:4])
            + f" (largest four); base {100 * found[next(k for k in found if k[1] == 'base')]['jitter']['mean']:.1f}.")

    if scatter:
        fig, ax = plt.subplots(figsize=(5, 4))
        for i, name in enumerate(dict.fromkeys(s[2] for s in scatter)):
            pts = [s for s in scatter if s[2] == name]
            ax.scatter([100 * t for t, _, _ in pts], [100 * b for _, b, _ in pts], s=12,
                       color=f"C{i}", label=name)
        lo = min(100 * min(t, b) for t, b, _ in scatter)
        ax.plot([lo, 100], [lo, 100], "k:", lw=1)
        ax.set(xlabel="teacher right on public rows (%), last round",
               ylabel="best aux head, shared accuracy (%)")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "gap_teacher", "Every run and seed: the best aux head's shared accuracy "
             "against how often its teacher is right (dotted: equal)")
        for name in dict.fromkeys(s[2] for s in scatter):
            t = [s[0] for s in scatter if s[2] == name]
            b = [s[1] for s in scatter if s[2] == name]
            diff = sum(y - x for x, y in zip(t, b)) / len(t)
            findings.append(
                f"{name}, every run and seed ({len(t)}): the best aux head's shared accuracy "
                f"is its teacher's accuracy on the public rows {S.signed(diff)} points on "
                f"average (Pearson r = {_pearson(t, b):.2f}).")
    lines += [
        "### Reading", "",
        "On digits an aux head ends where its teacher is (the scatter above), so the gap to the "
        "ensemble is the teacher's gap: the most confident neighbour is right less often than "
        "the ensemble's vote once the main heads have fitted their skewed private data "
        "(private accuracy ≈ 96 %), and it gets worse with more training (the curves). What "
        "keeps the teacher closer to the ensemble closes the gap: a smaller ν_aux, an EMA of the "
        "teachers with β = 0.9, mean or confidence-weighted teachers, a larger public batch, a "
        "smaller public fraction (which also gives each client more private data); a larger "
        "τ, include_self and a stale exchange widen it. A constant lr ends higher but its best "
        "aux head jumps by about 10 points from round to round. On "
        "Fashion-MNIST the teacher is right more often than the ensemble and the aux heads stay "
        "below their teacher, by about 2 points on the public rows they distil on and more on "
        "the test set: there the gap is what the heads have not learnt of it.", "",
        "The larger scale (64 CNN clients on Fashion-MNIST) is section 9 "
        "(`python scripts/study_cnn.py`): there one evaluation of all clients on the 10,000 "
        "test images costs as much as 50 to 130 local steps, so its runs measure the "
        "accuracies every few rounds (`--eval-every`).", ""]
    return lines, findings


def _pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else float("nan")


# ---- the page --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = S.parser(__doc__, "gap", "to add section 8 to").parse_args(argv)

    os.chdir(ROOT)
    out, results, command = S.places(args, "gap", "gap_study.py")

    def work() -> str:
        plans, summaries = [], []
        for path, suffix in SWEEPS:
            if args.quick and "quick" not in sweep.read_sweep(path):
                continue  # a sweep without a [quick] table needs data CI may not have
            plan = sweep.load_plan(path, out + suffix, quick=args.quick)
            if args.report_only:
                rows = sweep.summarize(plan)
            else:
                t0 = time.perf_counter()
                rows = sweep.run_plan(plan, jobs=args.jobs, threads=args.threads,
                                      progress=args.progress)["summary"]
                print(f"{path}: {time.perf_counter() - t0:.0f} s")
            plans.append((path, plan))
            summaries.append(rows)
        results_dir = os.path.dirname(os.path.abspath(results))
        lines, findings = section(plans, summaries, command, os.path.join(results_dir, "plots"),
                                  results_dir)
        at = next(i for i, line in enumerate(lines) if line.startswith("The defaults of")) + 2
        lines[at:at] = ["Findings:", "", *(f"- {f}" for f in findings), ""]
        S.write_section(results, MARK, lines)
        return f"wrote section 8 of {results}"

    return S.reporting("gap_study", work)


if __name__ == "__main__":
    raise SystemExit(main())
