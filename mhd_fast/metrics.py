"""Private and shared accuracy per client and head (docs/method.md §4), their summaries, and the files a
run leaves: metrics.json, metrics.csv, clients.csv, accuracy.png, bytes.png, report.md.

Accuracies are in [0, 1]. For client i, head h, test rows t with labels y_t:
    shared[i, h]  = mean_t correct[i, h, t]                           (the uniform test set)
    private[i, h] = Σ_t d_i(y_t) · correct[i, h, t] / Σ_t d_i(y_t)     (d_i = client i's
                    training label distribution: the test set re-weighted to its label mix)
worst-10 %: the mean over the ceil(N / 10) clients with the lowest accuracy, per head.
ensemble: the argmax of the mean over clients of softmax(head 0), on the test set.

Each round also records how far the aux heads are from what they could learn (``gap_record``),
on a fixed sample of public rows whose labels are read for this measure only:
    teacher_acc[h]        how often the target of aux head h (its teachers' head h−1,
                          aggregated as in training, SPEC §2) puts its top class on the label
    public_acc[h]         each head's accuracy on those rows
    ensemble_public_acc   the ensemble of all main heads on those rows
    ensemble_agreement[h] how often head h's top class equals the ensemble's
and ensemble_shared_acc, the ensemble on the test set.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os

import torch
from torch import Tensor

from .ops import reference as R
from .outdir import atomic_write


def private_shared(correct: Tensor, y: Tensor, label_dist: Tensor) -> tuple[Tensor, Tensor]:
    """correct [N, H1, T] bool, y [T] int64, label_dist [N, V] (rows sum to 1)
    -> (private [N, H1], shared [N, H1]) float64 on the CPU."""
    c = correct.to(torch.float64)
    w = label_dist.to(torch.float64)[:, y]  # [N, T]: each test row weighted by the client's mix
    private = torch.einsum("nt,nht->nh", w, c) / w.sum(dim=1, keepdim=True)
    return private.cpu(), c.mean(dim=-1).cpu()


def worst_fraction(acc: Tensor, fraction: float = 0.1) -> Tensor:
    """acc [N, H1] -> [H1]: the mean over the ceil(fraction · N) lowest clients of each head."""
    k = max(1, math.ceil(fraction * acc.shape[0]))
    return acc.sort(dim=0).values[:k].mean(dim=0)


def by_head(values: Tensor) -> dict[str, float]:
    """[H1] -> {"head0": x, "head1": ...} as plain floats (JSON-ready)."""
    return {f"head{h}": float(v) for h, v in enumerate(values.tolist())}


def round_record(r: int, time_s: float, bytes_sent: int, private: Tensor | None,
                 shared: Tensor | None, bytes_dense: int, bytes_cross_rank: int = 0,
                 loss_sum: dict[str, float] | None = None, gap: dict | None = None) -> dict:
    """One entry of metrics.json's "rounds": per-head means over clients and worst-10 %.
    bytes_cross_rank: what the processes of a sharded run sent each other (0 in one process).
    loss_sum: the round's loss terms by name, each summed over its steps and the clients;
    gap: the ``gap_record`` of the round, merged in. private = shared = None: a round that
    was not measured (--eval-every), whose record holds no accuracy (``measured``)."""
    rec = {"round": r, "time_s": time_s, "bytes_sent": bytes_sent, "bytes_dense": bytes_dense,
           "bytes_cross_rank": bytes_cross_rank}
    if private is not None:
        rec.update({"private_acc": by_head(private.mean(0)), "shared_acc": by_head(shared.mean(0)),
                    "worst10_private_acc": by_head(worst_fraction(private)),
                    "worst10_shared_acc": by_head(worst_fraction(shared))})
    return {**rec, "loss_sum": dict(loss_sum or {}), **(gap or {})}


def measured(rounds: list[dict]) -> list[dict]:
    """The records of the rounds whose accuracies were measured (all of them with
    --eval-every 1; with k, every k-th round and the last)."""
    return [rec for rec in rounds if "shared_acc" in rec]


def teacher_hits(teacher: Tensor, adj: Tensor, y: Tensor, *, tau: float, include_self: bool,
                 aggregate: str) -> tuple[Tensor, Tensor]:
    """How often each client's distillation target is right.

    teacher [M, G, B, V] the candidates' logits of the teaching heads (head h−1 for aux head h),
    adj [M, M] bool, y [B] int64 labels -> (hits [M, G] int64: rows whose target, the
    candidates' distributions aggregated as the loss does (docs/method.md §2), has its largest
    probability on y; has [M] bool: the client has a candidate). Reads the reference."""
    lse, logconf = R.teacher_stats(teacher, tau)
    idx, has = R.select(logconf, adj, include_self)
    w = R.aggregate_weights(logconf, idx, adj, include_self, aggregate)
    p = R.mix(w, adj, include_self, (teacher.to(lse.dtype) / tau - lse.unsqueeze(-1)).exp())
    hits = (p.argmax(-1) == y).sum(-1)
    return torch.where(has[:, None], hits, torch.zeros_like(hits)), has


def gap_record(teacher_hits: Tensor, teachers: Tensor, public_hits: Tensor, agree: Tensor,
               ensemble_hits: float, rows: int, num_models: int) -> dict:
    """The round's distances to the ensemble (counts summed over every client of the run):
    teacher_hits [G] over ``teachers`` client rows that had a teacher, public_hits [H1] and
    agree [H1] over num_models · rows, ensemble_hits over rows. -> plain floats by head
    (teacher_acc keyed by the aux head it teaches, head1..headH)."""
    out = {"public_acc": by_head(public_hits / (num_models * rows)),
           "ensemble_public_acc": ensemble_hits / rows,
           "ensemble_agreement": by_head(agree / (num_models * rows))}
    if len(teacher_hits) and teachers > 0:
        acc = (teacher_hits / (teachers * rows)).tolist()
        out["teacher_acc"] = {f"head{h + 1}": float(a) for h, a in enumerate(acc)}
    return out


def final_record(private: Tensor, shared: Tensor, ensemble: float, bytes_sent: int,
                 bytes_dense: int, bytes_per_edge: float, bytes_cross_rank: int = 0) -> dict:
    """metrics.json's "final": means over clients per head, worst-10 %, the main-head
    ensemble and the bytes of the whole run (bytes_per_edge: the mean over directed edges;
    bytes_cross_rank: between the processes of a sharded run)."""
    return {"private_acc": by_head(private.mean(0)), "shared_acc": by_head(shared.mean(0)),
            "worst10_private_acc": by_head(worst_fraction(private)),
            "worst10_shared_acc": by_head(worst_fraction(shared)),
            "ensemble_shared_acc": ensemble, "bytes_sent": bytes_sent,
            "bytes_dense": bytes_dense, "bytes_per_edge": bytes_per_edge,
            "bytes_cross_rank": bytes_cross_rank}


def best_aux(shared_acc: dict[str, float]) -> tuple[str, float] | None:
    """The aux head with the highest mean shared accuracy, or None without aux heads."""
    aux = {h: v for h, v in shared_acc.items() if h != "head0"}
    if not aux:
        return None
    head = max(aux, key=lambda h: (aux[h], -int(h[4:])))
    return head, aux[head]


# ---- files ---------------------------------------------------------------------------------

def rounds_csv(metrics: dict) -> str:
    """One row per (round, head): round, time_s, bytes_sent, bytes_dense, bytes_cross_rank,
    head, private, shared; a round not measured has one row, its last three cells empty."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["round", "time_s", "bytes_sent", "bytes_dense", "bytes_cross_rank", "head",
                "private_acc", "shared_acc"])
    for rec in metrics["rounds"]:
        cells = [rec["round"], f"{rec['time_s']:.4f}", rec["bytes_sent"], rec["bytes_dense"],
                 rec["bytes_cross_rank"]]
        if "shared_acc" not in rec:  # not measured: one row, head and accuracies empty
            w.writerow(cells + ["", "", ""])
        for head, priv in rec.get("private_acc", {}).items():
            w.writerow(cells + [head, f"{priv:.6f}", f"{rec['shared_acc'][head]:.6f}"])
    return buf.getvalue()


def clients_csv(private: Tensor, shared: Tensor) -> str:
    """One row per (client, head) of the final accuracies."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["client", "head", "private_acc", "shared_acc"])
    for i in range(private.shape[0]):
        for h in range(private.shape[1]):
            w.writerow([i, f"head{h}", f"{float(private[i, h]):.6f}", f"{float(shared[i, h]):.6f}"])
    return buf.getvalue()


def plot(metrics: dict, out: str) -> list[str]:
    """accuracy.png (mean private and shared accuracy per head vs the rounds measured) and
    bytes.png (cumulative bytes sent vs round, dense fp32 for comparison). Returns the file
    names."""
    # Figures without pyplot: files only, and the caller's matplotlib backend stays theirs.
    from matplotlib.figure import Figure

    rounds = [rec["round"] for rec in metrics["rounds"]]
    recs = measured(metrics["rounds"])
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in ((axes[0], "private_acc", "private accuracy"),
                           (axes[1], "shared_acc", "shared accuracy")):
        for head in recs[0][key] if recs else ():
            ax.plot([rec["round"] for rec in recs], [rec[key][head] for rec in recs],
                    marker="." if len(recs) < len(rounds) else None, label=head)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean over clients")
    if recs:
        axes[1].legend()
    fig.suptitle(metrics["config"]["name"])
    fig.tight_layout()
    _save(fig, os.path.join(out, "accuracy.png"))

    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    sent, dense, total_sent, total_dense = [], [], 0, 0
    for rec in metrics["rounds"]:
        total_sent += rec["bytes_sent"]
        total_dense += rec["bytes_dense"]
        sent.append(total_sent)
        dense.append(total_dense)
    ax.plot(rounds, sent, label="sent")
    ax.plot(rounds, dense, "--", label="dense fp32")
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative bytes over all edges")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, os.path.join(out, "bytes.png"))
    return ["accuracy.png", "bytes.png"]


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())


def tensorboard(folder: str, name: str, first_round: int):
    """A TensorBoard writer for run ``name`` in folder/name. Its first event drops what an
    earlier run of that name, or the part of this run a resume repeats, logged from round
    ``first_round`` on: every round keeps one point."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ValueError(f"--tensorboard: cannot load tensorboard: {e}") from None
    try:
        return SummaryWriter(os.path.join(folder, name), purge_step=first_round)
    except OSError as e:
        raise ValueError(f"--tensorboard: cannot write to {folder!r}: {e.strerror or e}") from None


def log_round(writer, rec: dict) -> None:
    """One round's record as scalars at step = round: accuracy/{private,shared,worst10_private,
    worst10_shared}/headH, loss/NAME (the round's sums), bytes/{sent,dense,cross_rank} and
    time/round_s. Flushed, so a killed run keeps every round it logged."""
    step = rec["round"]
    for kind in ("private", "shared", "worst10_private", "worst10_shared"):
        for head, acc in rec.get(f"{kind}_acc", {}).items():  # none in a round not measured
            writer.add_scalar(f"accuracy/{kind}/{head}", acc, step)
    for term, value in rec["loss_sum"].items():
        writer.add_scalar(f"loss/{term}", value, step)
    for kind in ("sent", "dense", "cross_rank"):
        writer.add_scalar(f"bytes/{kind}", rec[f"bytes_{kind}"], step)
    writer.add_scalar("time/round_s", rec["time_s"], step)
    writer.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def divergence(metrics: dict) -> str:
    """One line on a diverged run: the round, what was not finite, what is kept."""
    d, cfg = metrics["diverged"], metrics["config"]
    what = " and ".join(k for k in ("loss", "weights") if d[k])
    kept = (f"{d['round']} finished rounds in metrics.json"
            + (f", their state in {os.path.join(cfg['out'], 'checkpoint.pt')}"
               if cfg["checkpoint"] and d["round"] > 0 else ", no checkpoint"))
    return (f"diverged in round {d['round']} (0-based) of {cfg['rounds']}: the {what} "
            f"{'were' if ' and ' in what else 'was'} not finite (NaN or inf); kept: {kept}")


def report_md(metrics: dict, graph_info: dict) -> str:
    """A short human summary of a run: the final accuracies of a finished one, what happened
    to a diverged one."""
    cfg = metrics["config"]
    total_time = sum(rec["time_s"] for rec in metrics["rounds"])
    lines = [f"# {cfg['name']}", "",
             f"method **{cfg['method']}** on **{cfg['dataset']}**: {cfg['clients']} clients, "
             f"partition {cfg['partition']}, graph {cfg['graph']} (spectral gap "
             f"{graph_info.get('spectral_gap', float('nan')):.3f}), model {' + '.join(cfg['model'])}, "
             f"{cfg['heads']} aux heads, {len(metrics['rounds'])} rounds x {cfg['steps_per_round']} steps"
             + (f", accuracies measured every {cfg['eval_every']} rounds and after the last."
                if cfg.get("eval_every", 1) > 1 else "."),
             ""]
    if metrics.get("status") == "diverged":
        lines += [f"**The run diverged**: {divergence(metrics)}. It has no final accuracies; "
                  "lower --lr, or the loss weights, and run again.", ""]
        recs = measured(metrics["rounds"])
        if recs:
            last = recs[-1]
            lines += [f"Mean accuracies after round {last['round']}, the last finite one measured:", "",
                      "| head | private acc | shared acc |", "|---|---|---|"]
            lines += [f"| {h} | {last['private_acc'][h]:.4f} | {last['shared_acc'][h]:.4f} |"
                      for h in last["shared_acc"]]
            lines.append("")
        lines += ["Files: metrics.json, metrics.csv (per round and head)"
                  + (", accuracy.png, bytes.png" if metrics["rounds"] else "") + ".", ""]
        return "\n".join(lines)
    fin = metrics["final"]
    lines += ["| head | private acc | shared acc | worst-10% shared |", "|---|---|---|---|"]
    for head in fin["shared_acc"]:
        lines.append(f"| {head} | {fin['private_acc'][head]:.4f} | {fin['shared_acc'][head]:.4f} | "
                     f"{fin['worst10_shared_acc'][head]:.4f} |")
    lines += ["", f"- ensemble of all main heads, shared accuracy: {fin['ensemble_shared_acc']:.4f}"]
    best = best_aux(fin["shared_acc"])
    if best is not None:
        head, acc = best
        gain = acc - fin["shared_acc"]["head0"]
        lines.append(f"- best aux head {head}: shared accuracy {acc:.4f}, "
                     f"{100 * gain:+.1f} points over head0 (the MHD effect)")
    lines += [f"- bytes sent: {human_bytes(fin['bytes_sent'])} in total "
              f"(dense fp32 would be {human_bytes(fin['bytes_dense'])}), "
              f"{human_bytes(fin['bytes_per_edge'])} per directed edge",
              *([f"- sharded over {metrics['world_size']} processes (torch.distributed): "
                 f"{human_bytes(fin['bytes_cross_rank'])} crossed between them"]
                if metrics.get("world_size", 1) > 1 else []),
              f"- training time: {total_time:.1f} s ({total_time / max(1, len(metrics['rounds'])):.3f} s per round)",
              "", "Files: metrics.json, metrics.csv (per round and head), clients.csv (per client and head), "
              "accuracy.png, bytes.png.", ""]
    return "\n".join(lines)


def write_outputs(out: str, metrics: dict, private: Tensor | None, shared: Tensor | None,
                  graph_info: dict) -> None:
    """Every output file, each written atomically; metrics.json last, so that its presence
    means the run ended (its "status" says how). A diverged run (private = shared = None)
    has no clients.csv, and no plots when no round finished."""
    atomic_write(os.path.join(out, "metrics.csv"), rounds_csv(metrics))
    if private is not None:
        atomic_write(os.path.join(out, "clients.csv"), clients_csv(private, shared))
    if metrics["rounds"]:
        plot(metrics, out)
    atomic_write(os.path.join(out, "report.md"), report_md(metrics, graph_info))
    atomic_write(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1) + "\n")
