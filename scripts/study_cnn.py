"""The baselines at a larger scale: run the sweep of configs/study_cnn.toml (64 CNN clients on
Fashion-MNIST, every method, 3 seeds), then write section 9 of docs/RESULTS.md with its
tables, its plot and the compute it took.

    python scripts/study_cnn.py                # the sweep -> docs/RESULTS.md §9, docs/plots/cnn_*.png
    python scripts/study_cnn.py --quick        # tiny sizes -> runs/study_cnn-quick/RESULTS.md
    python scripts/study_cnn.py --report-only  # rewrite the section from the runs already made

The sweep is the one `mhd-fast sweep configs/study_cnn.toml --jobs 2 --out runs/study_cnn`
runs (resumable). Its runs measure the accuracies every few rounds (``eval_every``): the
curves have a point per measured round. The section replaces an earlier section 9 of the page
and leaves the rest as it is.
"""
from __future__ import annotations

import json
import os

from mhd_fast import metrics as M
from mhd_fast import summary, sweep

import study as S  # scripts/study.py: the page helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("configs", "study_cnn.toml")
MARK = "## 9. "  # the section this script owns
# Points of accuracy (shared and private) that a run may still move between its last two
# measured rounds and count as converged
CONVERGED_POINTS = 1.0


# ---- numbers of the runs -------------------------------------------------------------------

def round_records(plan: sweep.Plan, row: dict) -> list[list[dict]]:
    """The round records of every finished seed of a summary row."""
    out = []
    for rel in row["dirs"]:
        with open(os.path.join(plan.out, rel, "metrics.json")) as f:
            out.append(json.load(f)["rounds"])
    return out


def _over_seeds(vals: list[float]) -> dict:
    mean, std = summary.mean_std(vals)
    return {"mean": mean, "std": std, "values": vals}


def private_ce(plan: sweep.Plan, row: dict) -> list[dict]:
    """Per round (every round, measured or not), over seeds: the training cross-entropy of
    head 0 on the private batches, a mean over the round's steps and the models."""
    cfg = plan.config(plan_run(plan, row), plan.seeds[0])
    models = 1 if cfg.method == "centralized" else cfg.clients
    runs = round_records(plan, row)
    return [_over_seeds([recs[i]["loss_sum"]["ce"] / (cfg.steps_per_round * models)
                         for recs in runs]) for i in range(len(runs[0]))]


def plan_run(plan: sweep.Plan, row: dict) -> sweep.Run:
    return next(r for r in plan.runs if (r.variant, r.name) == (row["variant"], row["run"]))


def best_aux_or_head0(shared: dict) -> float:
    best = M.best_aux(shared)
    return shared["head0"] if best is None else best[1]


def curves(plan: sweep.Plan, row: dict) -> tuple[list[int], dict[str, list[dict]]]:
    """The measured rounds (1-based) and, per round, {"mean", "std", "values"} over seeds of:
    private and shared accuracy of head 0 and the best aux head's shared accuracy (head 0's
    without aux heads)."""
    runs = [M.measured(recs) for recs in round_records(plan, row)]
    picks = {"private head 0": lambda rec: rec["private_acc"]["head0"],
             "shared head 0": lambda rec: rec["shared_acc"]["head0"],
             "shared best aux": lambda rec: best_aux_or_head0(rec["shared_acc"])}
    out = {}
    for name, pick in picks.items():
        out[name] = []
        for i in range(len(runs[0])):
            out[name].append(_over_seeds([pick(recs[i]) for recs in runs]))
    return [rec["round"] + 1 for rec in runs[0]], out


def label(row: dict) -> str:
    """A row's name: its method, then any other option its grid sets ('mhd, aggregate mean')."""
    point = row["point"]
    return ", ".join([point["method"]] + [f"{k} {v}" for k, v in sorted(point.items())
                                          if k != "method"])


# What head 1's teacher is, by --aggregate
TEACHERS = {"max_confidence": "the most confident of the neighbours' head 0",
            "mean": "the mean of the neighbours' head-0 distributions",
            "confidence_weighted": "the neighbours' head-0 distributions weighted by confidence"}


def teacher_finding(plan: sweep.Plan, row: dict) -> str:
    """How often head 1's teachers are right on the measured public rows, against a client's
    own head 0 and the ensemble's vote, at the first and the last measured round."""
    runs = [M.measured(recs) for recs in round_records(plan, row)]
    cases = []  # (round, [(teacher, head 0, ensemble) per seed])
    for i in ((0, -1) if len(runs[0]) > 1 else (0,)):
        cases.append((runs[0][i]["round"] + 1,
                      [(rec["teacher_acc"]["head1"], rec["public_acc"]["head0"], rec["ensemble_public_acc"])
                       for rec in (recs[i] for recs in runs)]))
    every = [x for _, parts in cases for x in parts]
    below_ens = sum(t < e for t, _, e in every)
    below_own = sum(t < h for t, h, _ in every)

    def pcts(parts, k):
        return " / ".join(f"{100 * p[k]:.0f}" for p in parts) + "%"

    shown = "; ".join(f"round {r}: teacher {pcts(p, 0)}, head 0 {pcts(p, 1)}, ensemble {pcts(p, 2)}"
                      for r, p in cases)
    aggregate = plan.config(plan_run(plan, row), plan.seeds[0]).aggregate
    return (f"{label(row)}: head 1's teacher for a public row is {TEACHERS[aggregate]}. "
            f"On the measured public rows it is right less often than the ensemble's vote in "
            f"{below_ens} of {len(every)} (seed, round) cases and less often than the client's "
            f"own head 0 in {below_own} (by seed; {shown}).")


# ---- the section ---------------------------------------------------------------------------

def section(plan: sweep.Plan, rows: list[dict], sessions: list[dict], command: str,
            plots_dir: str, results_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    study = S.Study(plan, rows)
    base_row = study.base_row("")
    base = study.config(base_row, plan.seeds[0])
    runs = len(plan.runs) * len(plan.seeds)
    page = S.Page(study, command, plots_dir, results_dir)
    page.add(f"## 9. Baselines at a larger scale: {base.clients} clients, "
             f"{' + '.join(base.model)} on {study.dataset('')}", "",
             f"Made by `{command}`: the sweep `{CONFIG}` ({len(plan.runs)} methods × "
             f"{len(plan.seeds)} seeds = {runs} runs, `mhd-fast sweep {CONFIG} --jobs 2`), then "
             "this section and its plot. Mean ± std (ddof = 1) over seeds "
             f"{list(plan.seeds)} of a mean over clients; accuracies in percent.", "",
             f"Setup: {base.clients} clients on {study.dataset('')}, Dirichlet(α = "
             f"{base.dirichlet}) label mixes, at most {base.samples_per_client} private images "
             f"per client, a public fraction of {base.public_fraction}, {base.graph} graph, model "
             f"{' + '.join(base.model)} with {base.heads} aux heads for mhd (ν_aux = "
             f"{base.nu_aux}), {base.rounds} rounds × {base.steps_per_round} steps (private "
             f"batch {base.batch_size}, public batch {base.public_batch_size}), {base.optimizer} "
             f"lr {base.lr}{' with cosine decay' if base.lr_decay else ''}. The accuracies are "
             f"measured every {base.eval_every} rounds and after the last (`--eval-every "
             f"{base.eval_every}`). One run: `mhd-fast run {study.flags(base_row, plan.seeds[0])}`.",
             "")

    left = [label(r) for r in rows if not r["seeds"]]
    rows = [r for r in rows if r["seeds"]]
    body, findings = [], []
    if left:
        findings.append(f"Not finished when this section was written: {', '.join(left)}.")
    for r in rows:
        body.append([label(r), S.pct(S.stat(r, "private_acc.head0")),
                     S.pct(S.stat(r, "shared_acc.head0")), S.pct(S.stat(r, "best_aux_shared_acc")),
                     S.pct(S.stat(r, "ensemble_shared_acc")), M.human_bytes(S.mean(r, "bytes_sent")),
                     f"{S.mean(r, 'train_time_s'):.0f}", str(len(r["seeds"]))])
    page.add("Final accuracies (the ensemble: the mean of the clients' head-0 softmax on the "
             "test set; bytes: over all directed edges of a run; train s: the training part of "
             "a run's wall time, without evaluation):", "")
    page.table(["method", "private head 0", "shared head 0", "shared best aux", "ensemble shared",
                "bytes sent", "train s", "seeds"], body)

    fig, axes = plt.subplots(1, 3, figsize=(17, 3.8))
    conv_body, changes = [], []
    rounds = []
    for i, r in enumerate(rows):
        method = label(r)
        rounds, c = curves(plan, r)
        for ax, key in ((axes[0], "private head 0"), (axes[1], "shared head 0")):
            S._errorbar(ax, rounds, c[key], label=method, color=f"C{i}")
        if S.stat(r, "best_aux_shared_acc") is not None:
            S._errorbar(axes[1], rounds, c["shared best aux"], label=f"{method} best aux",
                        color=f"C{i}", linestyle="--")
        best = c["shared best aux"]
        if len(best) > 1:
            changes.append((method, best[-1]["mean"] - best[-2]["mean"]))
        conv_body.append([method, "shared head 0"] + [S.pct(s) for s in c["shared head 0"]])
        if S.stat(r, "best_aux_shared_acc") is not None:
            conv_body.append([method, "shared best aux"] + [S.pct(s) for s in c["shared best aux"]])
        ce = private_ce(plan, r)
        axes[2].errorbar(range(1, len(ce) + 1), [x["mean"] for x in ce],
                         yerr=[x["std"] or 0.0 for x in ce], capsize=3, marker="o",
                         label=method, color=f"C{i}")
        if method == "isolated":
            conv_body.append([method, "private head 0"] + [S.pct(s) for s in c["private head 0"]])
            findings.append(
                "Isolated training's private cross-entropy (training loss, mean over steps and "
                "clients) by round: " + ", ".join(f"{x['mean']:.3f}" for x in ce) + ".")
            sh, pr = c["shared head 0"], c["private head 0"]
            if len(sh) > 1:
                moved = max(abs(sh[-1]["mean"] - sh[-2]["mean"]), abs(pr[-1]["mean"] - pr[-2]["mean"]))
                state = ("has converged" if moved < CONVERGED_POINTS else
                         f"has not converged (it moves by {CONVERGED_POINTS:g} point or more)")
                findings.append(
                    f"Isolated training {state}: from round {rounds[-2]} to round "
                    f"{rounds[-1]} its shared accuracy moves by "
                    f"{S.signed(sh[-1]['mean'] - sh[-2]['mean'])} points "
                    f"({S.pct(sh[-2])}% → {S.pct(sh[-1])}%) and its private accuracy by "
                    f"{S.signed(pr[-1]['mean'] - pr[-2]['mean'])} points "
                    f"({S.pct(pr[-2])}% → {S.pct(pr[-1])}%).")
    for ax, title in zip(axes, ("private accuracy, head 0", "shared accuracy")):
        ax.set(title=title, xlabel="round (accuracies measured)", ylabel="accuracy (%)")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside: no curve hidden
    axes[2].set(title="private cross-entropy of head 0 (training)", xlabel="round",
                ylabel="mean over steps and clients")
    axes[2].set_xticks(range(1, base.rounds + 1, -(-base.rounds // 16)))  # at most 16 ticks
    axes[2].grid(alpha=0.3)
    fig.suptitle(f"{base.clients} clients, {' + '.join(base.model)} on {study.dataset('')}")
    page.add("Accuracy at each measured round (1-based), the convergence of every method:", "")
    page.table(["method", "accuracy"] + [f"round {x}" for x in rounds], conv_body)
    page.plot(fig, "cnn_rounds", f"{base.clients} CNN clients on {study.dataset('')}: private "
              "accuracy of head 0 and shared accuracy of head 0 (solid) and of MHD's best aux "
              "head (dashed) at each measured round, and the training cross-entropy of head 0 "
              "on the private batches every round; mean ± std over seeds")

    if len(rounds) > 1:
        findings.append(
            f"Change of the shared accuracy of the best head from round {rounds[-2]} to round "
            f"{rounds[-1]} (points): " + ", ".join(
                f"{m} {S.signed(d)}" for m, d in changes) + "; a method still rising there "
            "has not converged in this budget.")
    ranked = sorted(rows, key=lambda r: -S.best_shared(r)["mean"])
    findings.append("By shared accuracy (the best head): " + ", ".join(
        f"{label(r)} {S.pct(S.best_shared(r))}%" for r in ranked) + ".")
    by = {label(r): r for r in rows}
    if "mhd" in by and "isolated" in by and S.stat(by["mhd"], "best_aux_shared_acc"):
        mhd, iso = by["mhd"], by["isolated"]
        findings.append(
            f"MHD's best aux head is {S.signed(S.mean(mhd, 'best_aux_shared_acc') - S.mean(mhd, 'shared_acc.head0'))} "
            f"points over its own head 0 and {S.signed(S.mean(mhd, 'best_aux_shared_acc') - S.mean(iso, 'shared_acc.head0'))} "
            f"points over isolated training (shared accuracy); its head 0 keeps a private accuracy of "
            f"{S.pct(S.stat(mhd, 'private_acc.head0'))}% against isolated's "
            f"{S.pct(S.stat(iso, 'private_acc.head0'))}%. Its best aux head by seed: " + ", ".join(
                f"{100 * v:.1f}%" for v in S.stat(mhd, "best_aux_shared_acc")["values"]) + ".")

    mean = by.get("mhd, aggregate mean")
    if "mhd" in by and mean is not None and S.stat(mean, "best_aux_shared_acc"):
        findings.append(
            "With the neighbours' mean as the teacher (`--aggregate mean`), MHD's best aux head "
            f"reaches {S.pct(S.stat(mean, 'best_aux_shared_acc'))}% shared (by seed: " + ", ".join(
                f"{100 * v:.1f}%" for v in S.stat(mean, "best_aux_shared_acc")["values"])
            + f"), against {S.pct(S.stat(by['mhd'], 'best_aux_shared_acc'))}% with the most "
            f"confident neighbour, while its head 0 keeps {S.pct(S.stat(mean, 'private_acc.head0'))}% "
            "private accuracy" + (f" (mean_distill, which distils the same mean into head 0: "
                                  f"{S.pct(S.stat(by['mean_distill'], 'private_acc.head0'))}% private, "
                                  f"{S.pct(S.stat(by['mean_distill'], 'shared_acc.head0'))}% shared)"
                                  if "mean_distill" in by else "") + ".")
    for name in ("mhd", "mhd, aggregate mean"):
        if name in by:
            findings.append(teacher_finding(plan, by[name]))

    runs = sum(len(r["seeds"]) for r in rows)
    train_s = sum(S.mean(r, "train_time_s") * len(r["seeds"]) for r in rows)
    wall = sum(x["wall_s"] for x in sessions)
    cpu = sum(x.get("cpu_s", 0.0) for x in sessions)
    jobs = max(x["jobs"] for x in sessions)
    compute = [f"Compute: {S._timing(sessions)}"]
    loads = [x["load_mean"] for x in sessions if "load_mean" in x]
    if loads:
        compute.append(f"The 1-min load average, sampled every 30 s, was "
                       f"{sum(loads) / len(loads):.1f} on average: the 2 cores were shared "
                       "with other work.")
    if cpu > 0:
        compute.append(f"The CPU budget of 60 minutes on 2 cores is 120 CPU-min; the sweep used "
                       f"{cpu / 60:.1f} CPU-min.")
    compute.append(f"The training parts of the {runs} runs took {train_s / 60:.1f} min of wall "
                   f"time in all, {100 * train_s / max(1e-9, jobs * wall):.0f}% of the sweep's "
                   f"{jobs} workers × {wall / 60:.1f} min; the rest is evaluation (each run "
                   f"measures {len(rounds)} rounds of {base.rounds}) and setup; the wall times "
                   "include waiting for the cores.")
    page.add("Findings:", "", *(f"- {f}" for f in findings), "", " ".join(compute), "")
    return page.lines


def main(argv: list[str] | None = None) -> int:
    p = S.parser(__doc__, "study_cnn", "to add section 9 to")
    p.add_argument("--partial", action="store_true",
                   help="with --report-only: the seeds finished so far (a sweep still running)")
    args = p.parse_args(argv)

    os.chdir(ROOT)
    out, results, command = S.places(args, "study_cnn", "study_cnn.py")

    def work() -> str:
        plan = sweep.load_plan(CONFIG, out, quick=args.quick)
        rows, sessions = S.run_timed(plan, args, partial=args.partial)
        results_dir = os.path.dirname(os.path.abspath(results))
        lines = section(plan, rows, sessions, command, os.path.join(results_dir, "plots"),
                        results_dir)
        S.write_section(results, MARK, lines)
        return f"wrote section 9 of {results}"

    return S.reporting("study_cnn", work)


if __name__ == "__main__":
    raise SystemExit(main())
