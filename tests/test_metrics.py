"""Private / shared accuracy, summaries and the output files."""
import csv
import io
import json
import os

import pytest
import torch

from mhd_fast import metrics as M


def test_private_and_shared_accuracy_by_hand():
    y = torch.tensor([0, 0, 1, 2])
    correct = torch.tensor([[[1, 0, 1, 1]], [[1, 1, 0, 0]]], dtype=torch.bool)  # [N=2, H1=1, T=4]
    dist = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    private, shared = M.private_shared(correct, y, dist)
    assert shared[:, 0].tolist() == [0.75, 0.5]
    assert private[0, 0] == pytest.approx(0.5)    # only class-0 rows count: 1 of 2 right
    assert private[1, 0] == pytest.approx(0.0)    # classes 1 and 2: both wrong


def test_private_accuracy_is_shared_accuracy_for_a_uniform_mix_on_a_balanced_test_set():
    y = torch.arange(5).repeat(4)
    correct = torch.rand(3, 2, 20, generator=torch.Generator().manual_seed(0)) > 0.5
    private, shared = M.private_shared(correct, y, torch.full((3, 5), 0.2))
    torch.testing.assert_close(private, shared)


def test_worst_fraction():
    acc = torch.tensor([[0.9, 0.1], [0.5, 0.2], [0.1, 0.3]] + [[1.0, 1.0]] * 17, dtype=torch.float64)
    assert M.worst_fraction(acc).tolist() == pytest.approx([0.3, 0.15])  # ceil(20/10) = 2 lowest
    assert M.worst_fraction(acc[:3]).tolist() == pytest.approx([0.1, 0.1])  # at least one


def test_best_aux():
    assert M.best_aux({"head0": 0.9, "head1": 0.5, "head2": 0.7}) == ("head2", 0.7)
    assert M.best_aux({"head0": 0.9, "head1": 0.7, "head2": 0.7}) == ("head1", 0.7)
    assert M.best_aux({"head0": 0.9}) is None


def _metrics(rounds=3, heads=2):
    recs = []
    for r in range(rounds):
        p = torch.rand(4, heads, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
        recs.append(M.round_record(r, 0.5, 1000 * (r + 1), p, p / 2, 4000))
    p = torch.rand(4, heads, dtype=torch.float64)
    final = M.final_record(p, p / 2, 0.8, 6000, 12000, 500.0)
    cfg = {"name": "t", "method": "mhd", "dataset": "digits", "clients": 4, "partition": "skew",
           "graph": "complete", "model": ["mlp:8"], "heads": heads - 1, "steps_per_round": 2}
    return {"config": cfg, "rounds": recs, "final": final}, p


def test_metrics_json_has_the_issue_shape(tmp_path):
    metrics, p = _metrics()
    M.write_outputs(str(tmp_path), metrics, p, p / 2, {"spectral_gap": 1.0})
    with open(tmp_path / "metrics.json") as f:
        m = json.load(f)
    assert set(m) == {"config", "rounds", "final"}
    rec = m["rounds"][1]
    assert {"round", "time_s", "bytes_sent", "private_acc", "shared_acc"} <= set(rec)
    assert set(rec["private_acc"]) == {"head0", "head1"}
    fin = m["final"]
    assert {"private_acc", "shared_acc", "worst10_shared_acc", "ensemble_shared_acc", "bytes_sent"} <= set(fin)
    assert fin["shared_acc"]["head1"] == pytest.approx(float((p / 2)[:, 1].mean()))
    assert all(0 <= v <= 1 for v in fin["private_acc"].values())


def test_csv_plots_and_report(tmp_path):
    metrics, p = _metrics()
    M.write_outputs(str(tmp_path), metrics, p, p / 2, {"spectral_gap": 0.25})
    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert len(rows) == 3 * 2 and rows[0]["head"] == "head0"
    clients = list(csv.DictReader(io.StringIO((tmp_path / "clients.csv").read_text())))
    assert len(clients) == 4 * 2
    for png in ("accuracy.png", "bytes.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "spectral gap 0.250" in report and "best aux head head1" in report
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_rounds_not_measured_keep_time_bytes_and_losses(tmp_path):
    metrics, p = _metrics()
    metrics["config"]["eval_every"] = 2
    metrics["rounds"][0] = M.round_record(0, 0.5, 1000, None, None, 4000, loss_sum={"ce": 2.0})
    assert set(metrics["rounds"][0]) == {"round", "time_s", "bytes_sent", "bytes_dense",
                                         "bytes_cross_rank", "loss_sum"}
    assert [r["round"] for r in M.measured(metrics["rounds"])] == [1, 2]
    M.write_outputs(str(tmp_path), metrics, p, p / 2, {"spectral_gap": 0.25})
    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert len(rows) == 1 + 2 * 2
    assert (rows[0]["round"], rows[0]["head"], rows[0]["shared_acc"]) == ("0", "", "")
    assert (tmp_path / "accuracy.png").exists()
    assert "measured every 2 rounds" in (tmp_path / "report.md").read_text()

    class Board:
        def __init__(self):
            self.tags = []

        def add_scalar(self, tag, value, step):
            self.tags.append(tag)

        def flush(self):
            pass

    board = Board()
    M.log_round(board, metrics["rounds"][0])
    assert "loss/ce" in board.tags and not any(t.startswith("accuracy/") for t in board.tags)


def test_atomic_write_replaces_whole_files(tmp_path):
    path = str(tmp_path / "f.txt")
    M.atomic_write(path, "one")
    M.atomic_write(path, b"two")
    assert open(path).read() == "two" and os.listdir(tmp_path) == ["f.txt"]


def test_human_bytes():
    assert M.human_bytes(999) == "999 B"
    assert M.human_bytes(1_500_000) == "1.50 MB"
    assert M.human_bytes(3e12) == "3000.00 GB"


@pytest.mark.parametrize("aggregate", ["max_confidence", "mean", "confidence_weighted"])
def test_teacher_hits_count_the_target_each_client_distils_from(aggregate):
    gen = torch.Generator().manual_seed(0)
    n, g, b, v = 5, 2, 7, 4
    teacher = 3 * torch.randn(n, g, b, v, generator=gen)
    adj = torch.rand(n, n, generator=gen) < 0.6
    adj[3] = False  # client 3 hears nobody: no teacher, no hits
    y = torch.randint(v, (b,), generator=gen)
    hits, has = M.teacher_hits(teacher, adj, y, tau=2.0, include_self=False, aggregate=aggregate)
    p = (teacher / 2.0).softmax(-1)
    for i in range(n):
        cand = [j for j in range(n) if adj[i, j] and j != i]
        assert bool(has[i]) == bool(cand)
        for h in range(g):
            right = 0
            for r in range(b):
                ps = torch.stack([p[j, h, r] for j in cand]) if cand else None
                if ps is None:
                    continue
                conf = ps.max(-1).values
                if aggregate == "max_confidence":
                    target = ps[conf.argmax()]
                elif aggregate == "mean":
                    target = ps.mean(0)
                else:
                    target = (conf[:, None] * ps).sum(0) / conf.sum()
                right += int(target.argmax() == y[r])
            assert int(hits[i, h]) == right


def test_gap_record_divides_the_counts():
    rec = M.gap_record(torch.tensor([30, 20]), 4, torch.tensor([10, 40, 20]),
                       torch.tensor([8, 36, 24]), 9, 10, 4)
    assert rec["teacher_acc"] == pytest.approx({"head1": 0.75, "head2": 0.5})
    assert rec["public_acc"] == pytest.approx({"head0": 0.25, "head1": 1.0, "head2": 0.5})
    assert rec["ensemble_agreement"] == pytest.approx({"head0": 0.2, "head1": 0.9, "head2": 0.6})
    assert rec["ensemble_public_acc"] == pytest.approx(0.9)
    assert "teacher_acc" not in M.gap_record(torch.zeros(0, dtype=torch.int64), 0,
                                             torch.tensor([5]), torch.tensor([5]), 9, 10, 4)
