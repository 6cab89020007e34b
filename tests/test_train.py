"""The round: the batched simulator against the per-client loop, every method, the exchange
options, determinism and resumption."""
import copy
import dataclasses
import importlib.util
import json
import os
import sys

import pytest
import torch

from mhd_fast import config as C
from mhd_fast import metrics as M
from mhd_fast import evaluation, models, simulation, train
from mhd_fast.exchange import exchange, route

from cases import run_killed_in_round

_LOOP = os.path.join(os.path.dirname(__file__), "..", "bench", "loop_round.py")
_spec = importlib.util.spec_from_file_location("loop_round", _LOOP)
loop_round = sys.modules["loop_round"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop_round)


def small(tmp_path=None, **kw) -> C.Config:
    base = dict(dataset="digits", clients=6, rounds=2, steps_per_round=3, model=["mlp:16x8"],
                heads=2, batch_size=8, public_batch_size=16, progress=False, backend="torch",
                out=str(tmp_path / "run") if tmp_path is not None else None)
    base.update(kw)
    return C.load(None, base)


def _stacked(sim) -> dict:
    """Group 0's weights and buffers."""
    g = sim.groups[0]
    return {k: p.detach().clone() for k, p in {**g.params, **g.buffers}.items()}


@pytest.mark.parametrize("kw", [
    dict(),
    dict(aggregate="mean", include_self=True),
    dict(aggregate="confidence_weighted", graph="ring", tau=2.0),
    dict(nu_main=0.5, graph="star"),
    dict(method="mean_distill"),
    dict(method="isolated"),
    dict(model=["cnn:4-8"]),
    dict(model=["resnet:8:bn", "mlp:16x8"]),
    dict(model=["resnet:8"], method="isolated"),
])
def test_batched_round_equals_the_per_client_loop(kw):
    cfg = small(optimizer="sgd", lr=0.1, **kw)
    sim = simulation.setup(cfg)
    twin = copy.deepcopy(sim)
    init = _stacked(sim)
    clients = loop_round.from_simulation(twin)
    train.train_round(sim, 0)
    loop_round.loop_round(twin, clients, 0)
    got = _stacked(sim)
    want = loop_round.stacked(clients, range(sim.groups[0].start, sim.groups[0].stop))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
        assert not torch.equal(got[k], init[k]), k  # every weight trained
    assert sim.step == twin.step == cfg.steps_per_round


def test_adam_state_is_per_client():
    """Zeroing one client's loss (it has no data in common with the others) must not move
    the others: Adam on stacked weights is elementwise."""
    cfg = small(method="isolated")
    sim = simulation.setup(cfg)
    twin = copy.deepcopy(sim)
    with torch.no_grad():  # perturb client 0 only
        for p in twin.groups[0].params.values():
            p[0].add_(1.0)
    train.train_round(sim, 0)
    train.train_round(twin, 0)
    for k, p in sim.groups[0].params.items():
        torch.testing.assert_close(p[1:], twin.groups[0].params[k][1:], rtol=0, atol=0)


def test_distillation_mixes_clients_only_through_predictions():
    cfg = small(graph="ring")
    sim = simulation.setup(cfg)
    twin = copy.deepcopy(sim)
    with torch.no_grad():
        # client 0 predicts differently (a uniform shift would leave its softmax unchanged)
        bias = twin.groups[0].params["heads.bias"][0]
        bias.add_(torch.linspace(-5.0, 5.0, bias.numel()))
    train.local_step(sim, sim.schedule(0))
    train.local_step(twin, twin.schedule(0))
    w, w2 = sim.groups[0].params["fc0.weight"], twin.groups[0].params["fc0.weight"]
    # ring: clients 1 and 5 hear client 0; client 3 does not
    assert not torch.equal(w[1], w2[1]) and not torch.equal(w[5], w2[5])
    torch.testing.assert_close(w[3], w2[3], rtol=0, atol=0)


def test_fedavg_averages_weights_over_the_graph():
    sim = simulation.setup(small(method="fedavg"))
    for p in sim.groups[0].params.values():  # one common initial model
        assert torch.equal(p, p[:1].expand_as(p))
    sent, _ = train.train_round(sim, 0)
    for p in sim.groups[0].params.values():
        torch.testing.assert_close(p, p[:1].expand_as(p), rtol=0, atol=1e-6)
    per_client = models.num_params_per_client(sim.groups)[0] * 4
    assert int(sent.sum()) == 6 * 5 * per_client  # every directed edge carries all weights


def test_fedavg_on_a_ring_mixes_neighbours():
    sim = simulation.setup(small(method="fedavg", graph="ring", steps_per_round=1))
    before = copy.deepcopy(sim)
    train.local_step(before, before.schedule(0))  # the same step, without the averaging
    train.train_round(sim, 0)
    b = before.groups[0].params["fc0.bias"].detach()
    want = (b[5] + b[0] + b[1]) / 3
    torch.testing.assert_close(sim.groups[0].params["fc0.bias"][0], want, rtol=1e-5, atol=1e-6)


def test_centralized_trains_one_model_judged_on_every_client():
    sim = simulation.setup(small(method="centralized"))
    assert len(sim.groups) == 1 and sim.groups[0].size == 1
    per_client = simulation.setup(small(method="isolated"))  # the same split seed
    assert int(sim.private_count[0]) == int(per_client.private_count.sum())  # the union
    train.train_round(sim, 0)
    private, shared, ensemble = evaluation.evaluate(sim)
    assert private.shape == (6, 1) and torch.all(shared == shared[0])
    assert abs(ensemble - float(shared[0, 0])) < 1e-9  # one main head: its own ensemble


def test_isolated_sends_nothing():
    sim = simulation.setup(small(method="isolated"))
    sent, dense = train.train_round(sim, 0)
    assert int(sent.sum()) == 0 and int(dense.sum()) == 0 and sim.num_heads == 1


def test_topk_and_wire_dtype_shrink_the_bytes():
    dense = simulation.setup(small())
    packed = simulation.setup(small(topk=2, wire_dtype="float16"))
    a, _ = train.train_round(dense, 0)
    b, b_dense = train.train_round(packed, 0)
    assert torch.equal(a, b_dense)
    edges = 6 * 5
    per_row = 2 * 2 + 2 * 2 + 4  # K fp16 values, K int16 indices, fp32 lse
    assert int(b.sum()) == edges * 3 * 2 * 16 * per_row  # 3 steps, 2 heads sent, 16 rows


def test_stale_exchange_refreshes_every_k_steps():
    sim = simulation.setup(small(exchange_every=2, steps_per_round=5))
    sent, _ = train.train_round(sim, 0)
    per_exchange = 6 * 5 * 2 * 16 * 10 * 4
    assert int(sent.sum()) == 3 * per_exchange  # steps 0, 2, 4
    stale = sim.received
    train.local_step(sim, sim.schedule(0))  # step 5: odd, keeps the stale predictions
    assert sim.received is stale


def test_embedding_term_and_heterogeneous_groups_run():
    sim = simulation.setup(small(model=["mlp:16x8", "cnn:4-8"], nu_emb=0.5, topk=3))
    assert [g.size for g in sim.groups] == [3, 3]
    before = sim.groups[1].params["conv0.weight"].detach().clone()
    sent, _ = train.train_round(sim, 0)
    assert sim.received.emb.shape == (6, 16, 8)
    assert not torch.equal(before, sim.groups[1].params["conv0.weight"])
    private, shared, _ = evaluation.evaluate(sim)
    assert private.shape == shared.shape == (6, 3)


def test_time_varying_graph_changes_per_round():
    sim = simulation.setup(small(graph="matching"))
    a, b = sim.schedule(0), sim.schedule(1)
    assert not torch.equal(a, b)
    sent0, _ = train.train_round(sim, 0)
    assert torch.equal(sent0 > 0, a)


def test_evaluate_matches_a_per_client_count():
    sim = simulation.setup(small())
    train.train_round(sim, 0)
    private, shared, _ = evaluation.evaluate(sim, chunk=50)
    x, y = sim.data.x_test, sim.data.y_test
    for i in (0, 4):
        logits = loop_round.forward_client(sim.groups[0].arch,
                                           {k: p[i] for k, p in sim.groups[0].params.items()},
                                           x, sim.num_heads)[0]
        correct = (logits.argmax(-1) == y).double()  # [H1, T]
        w = sim.label_dist[i, y].double()
        torch.testing.assert_close(shared[i], correct.mean(-1))
        torch.testing.assert_close(private[i], (correct * w).sum(-1) / w.sum())


def test_each_round_records_the_gap_to_the_ensemble(tmp_path):
    metrics = train.run(small(tmp_path, clients=4, rounds=1))
    rec = metrics["rounds"][0]
    assert set(rec["teacher_acc"]) == {"head1", "head2"}
    assert set(rec["public_acc"]) == set(rec["ensemble_agreement"]) == {"head0", "head1", "head2"}
    assert rec["ensemble_shared_acc"] == metrics["final"]["ensemble_shared_acc"]
    sim = simulation.setup(small(clients=4))
    gap = evaluation.measure_gap(sim, 0)
    # by hand: client 0 hears 1..3 on the complete graph and takes the most confident
    rows = sim.public_rows[:evaluation.GAP_ROWS]
    y = sim.data.y_train[rows]
    logits, _ = models.forward_groups(sim.groups, sim.data.x_train[rows], shared=True,
                                      num_heads=sim.num_heads)
    p = logits[:, 0].softmax(-1)
    hits = 0
    for i in range(4):
        cand = p[[j for j in range(4) if j != i]]                    # [3, B, V]
        pick = cand.max(-1).values.argmax(0)                         # [B]
        hits += int((cand[pick, torch.arange(len(y))].argmax(-1) == y).sum())
    assert gap["teacher_acc"]["head1"] == pytest.approx(hits / (4 * len(y)))
    ens = p.sum(0).argmax(-1)
    assert gap["ensemble_public_acc"] == pytest.approx(float((ens == y).double().mean()))
    assert evaluation.measure_gap(simulation.setup(small(clients=4, method="isolated")), 0).keys() == {
        "public_acc", "ensemble_public_acc", "ensemble_agreement"}


def test_measurements_do_not_depend_on_their_chunk_bound(monkeypatch):
    sim = simulation.setup(small(clients=4))
    train.train_round(sim, 0)
    whole = evaluation.evaluate(sim), evaluation.measure_gap(sim, 0)
    # 2,000 floats: test rows a few at a time, one client at a time, gap rows in chunks
    monkeypatch.setattr(evaluation, "CHUNK_FLOATS", 2000)
    private, shared, ens = evaluation.evaluate(sim)
    torch.testing.assert_close(private, whole[0][0]), torch.testing.assert_close(shared, whole[0][1])
    assert ens == whole[0][2] and evaluation.measure_gap(sim, 0) == whole[1]


def test_clients_run_one_at_a_time_are_evaluated_in_batches_of_cache_size(monkeypatch):
    sims = {mode: simulation.setup(small(clients=4, model=["cnn:4-8"], conv=mode))
            for mode in ("loop", "grouped")}
    # the memory bound: one client's activations at a time, not all 4 clients'
    floats = {mode: models.forward_floats(s.groups[0], s.data.input_shape, 3 * 10)
              for mode, s in sims.items()}
    assert floats["grouped"] == 4 * 4 * 8 * 8
    assert floats["loop"] == 4 * 8 * 8 + 4 * (8 + 3 * 10)
    rows = {}
    real = models.forward_groups
    for mode, sim in sims.items():
        monkeypatch.setattr(models, "forward_groups", lambda groups, x, mode=mode, **kw: (
            rows.setdefault(mode, []).append(len(x)), real(groups, x, **kw))[1])
        evaluation.evaluate(sim)
    test_rows = len(sims["loop"].data.y_test)
    assert max(rows["loop"]) == evaluation.LOOPED_ROWS < test_rows == sum(rows["loop"])
    assert rows["grouped"] == [test_rows]


def test_measuring_the_gap_changes_no_model_state():
    # BatchNorm statistics: a measurement in train mode would update them on public rows
    sim = simulation.setup(small(clients=3, model=["resnet:8:bn"]))
    train.train_round(sim, 0)
    before = _stacked(sim)
    first = evaluation.measure_gap(sim, 0)
    for k, t in _stacked(sim).items():
        torch.testing.assert_close(t, before[k], rtol=0, atol=0, msg=k)
    assert evaluation.measure_gap(sim, 0) == first


def test_teacher_ema_averages_the_distributions_each_row_was_sent():
    sim = simulation.setup(small(clients=3, teacher_ema=0.75, tau=2.0))
    rows = sim.public_rows[[0, 1, 1]]  # a row drawn twice in one batch
    adj = sim.schedule(0)
    t1, t2 = torch.randn(2, 3, 3, 3, 10, generator=torch.Generator().manual_seed(0))
    t1[:, :, 2] = t1[:, :, 1]  # the same row gives the same predictions
    first = train.smooth_teacher(sim, exchange(t1, None, route(adj), heads=[0, 1]), rows).teacher
    torch.testing.assert_close((first / 2).softmax(-1), (t1 / 2).softmax(-1))
    second = train.smooth_teacher(sim, exchange(t2[:, :, :2], None, route(adj), heads=[0, 1]),
                                  sim.public_rows[[1, 0]]).teacher
    want = 0.75 * (t1[:, :, [1, 0]] / 2).softmax(-1) + 0.25 * (t2[:, :, :2] / 2).softmax(-1)
    torch.testing.assert_close((second / 2).softmax(-1), want)
    assert sim.ema_seen.sum() == 2


def test_learning_rate_schedule():
    cfg = small(lr=1.0, rounds=2, steps_per_round=5)
    assert train.learning_rate(cfg, 0) == 1.0
    assert abs(train.learning_rate(cfg, 9) - 0.1) < 1e-12
    assert train.learning_rate(cfg, 4) < 1.0
    assert train.learning_rate(C.load(None, dict(lr=0.5, lr_decay=False)), 7) == 0.5


def _final(metrics: dict) -> dict:
    m = json.loads(json.dumps(metrics))
    for rec in m["rounds"]:
        rec.pop("time_s")
    return m


def test_same_seeds_same_metrics_other_seed_other_metrics(tmp_path):
    a = train.run(small(tmp_path / "a"))
    b = train.run(small(tmp_path / "b", out=str(tmp_path / "b" / "run")))
    a["config"].pop("out"), b["config"].pop("out")
    assert _final(a) == _final(b)
    c = train.run(small(tmp_path / "c", train_seed=123))
    assert _final(c)["final"] != _final(a)["final"]


def dropout_trunk():
    """A user's trunk with dropout, passed to the Config as the factory itself."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.3))


@pytest.mark.parametrize("kw", [dict(exchange_every=2),
                                dict(exchange_every=2, model=["resnet:8:bn", dropout_trunk], topk=3),
                                dict(teacher_ema=0.5)])
def test_resume_after_a_crash_reaches_the_same_metrics(tmp_path, monkeypatch, kw):
    full = train.run(small(tmp_path, rounds=4, steps_per_round=3, **kw))
    cfg = small(tmp_path, rounds=4, steps_per_round=3, out=str(tmp_path / "cut"), **kw)
    run_killed_in_round(cfg, monkeypatch, 2)
    assert not os.path.exists(os.path.join(cfg.out, "metrics.json"))  # no final output
    state = torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=True)
    assert state["rounds_done"] == 2 and state["received"] is not None  # stale buffers saved
    resumed = train.run(cfg, resume=True)
    full["config"].pop("out"), resumed["config"].pop("out")
    assert _final(resumed) == _final(full)


@pytest.mark.parametrize("kw", [dict(), dict(model=["resnet:8:bn", dropout_trunk], clients=4)])
def test_eval_every_measures_every_kth_round_and_the_last_and_changes_no_number(tmp_path, kw):
    every = train.run(small(tmp_path / "every", rounds=5, **kw))
    sparse = train.run(small(tmp_path / "sparse", rounds=5, eval_every=3, **kw))
    assert [train.measures(C.load(None, dict(rounds=5, eval_every=3)), r) for r in range(5)] == [
        False, False, True, False, True]
    assert [r["round"] for r in sparse["rounds"]] == list(range(5))
    assert [r["round"] for r in M.measured(sparse["rounds"])] == [2, 4]  # rounds 3 and 5, 1-based
    assert set(sparse["rounds"][0]) == {"round", "time_s", "bytes_sent", "bytes_dense",
                                        "bytes_cross_rank", "loss_sum"}
    # measuring draws nothing from training and changes no state (BatchNorm, dropout included)
    a, b = _final(every), _final(sparse)
    assert a["final"] == b["final"]
    for ra, rb in zip(a["rounds"], b["rounds"]):
        assert rb == (ra if "shared_acc" in rb else {k: ra[k] for k in rb})


@pytest.mark.parametrize("killed", [1, 3])  # after a round not measured, after one measured
def test_resume_across_rounds_not_measured_reaches_the_same_metrics(tmp_path, monkeypatch, killed):
    full = train.run(small(tmp_path, rounds=5, eval_every=3))
    cfg = small(tmp_path, rounds=5, eval_every=3, out=str(tmp_path / "cut"))
    run_killed_in_round(cfg, monkeypatch, killed)
    resumed = train.run(cfg, resume=True)
    full["config"].pop("out"), resumed["config"].pop("out")
    assert _final(resumed) == _final(full)


@pytest.mark.parametrize("model", ["cnn:4-8", "resnet:8:bn"])
def test_looped_and_grouped_convolutions_train_alike_and_a_run_resumes_across_them(
        tmp_path, monkeypatch, model):
    kw = dict(model=[model], clients=4, steps_per_round=2)
    sims = {mode: simulation.setup(small(conv=mode, **kw)) for mode in ("loop", "grouped")}
    assert [g.loop_conv for s in sims.values() for g in s.groups] == [True, False]
    assert simulation.setup(small(**kw)).groups[0].loop_conv  # auto: one client at a time on the CPU
    # trunks without convolutions stay one batch
    assert not any(g.loop_conv for g in simulation.setup(
        small(conv="loop", model=["mlp:16x8", dropout_trunk], clients=4)).groups)
    for s in sims.values():
        train.train_round(s, 0)
    for k, p in sims["loop"].groups[0].params.items():
        torch.testing.assert_close(p, sims["grouped"].groups[0].params[k], rtol=1e-4, atol=1e-5)
    # conv and client_chunk change rounding only, so a run may resume with others
    full = train.run(small(tmp_path, rounds=3, conv="loop", **kw))
    cfg = small(tmp_path, rounds=3, conv="loop", out=str(tmp_path / "cut"), **kw)
    run_killed_in_round(cfg, monkeypatch, 1)
    resumed = train.run(dataclasses.replace(cfg, conv="grouped", client_chunk=3), resume=True)
    assert resumed["status"] == "finished" and resumed["config"]["conv"] == "grouped"
    for a, b in zip(M.measured(full["rounds"]), M.measured(resumed["rounds"])):
        for h, acc in a["shared_acc"].items():
            assert abs(acc - b["shared_acc"][h]) <= 0.02, (a["round"], h)


def test_a_round_that_goes_non_finite_stops_the_run_and_keeps_the_last_finite_state(
        tmp_path, monkeypatch):
    finished = train.run(small(tmp_path, out=str(tmp_path / "ok")))
    assert finished["status"] == "finished"

    real_round = train.train_round

    def poisoned(sim, r):  # a weight of client 2 turns NaN during round 1
        out = real_round(sim, r)
        if r == 1:
            with torch.no_grad():
                sim.groups[0].params["fc0.weight"][2, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(train, "train_round", poisoned)
    cfg = small(tmp_path, rounds=3)
    m = train.run(cfg)
    assert m["status"] == "diverged" and "final" not in m
    assert m["diverged"] == {"round": 1, "loss": False, "weights": True}
    assert [r["round"] for r in m["rounds"]] == [0]
    assert json.load(open(os.path.join(cfg.out, "metrics.json"))) == json.loads(json.dumps(m))
    state = torch.load(os.path.join(cfg.out, "checkpoint.pt"), weights_only=True)
    assert state["rounds_done"] == 1  # the state after round 0, the last finite one
    assert all(p.isfinite().all() for g in state["params"] for p in g.values())
    report = open(os.path.join(cfg.out, "report.md")).read()
    assert "The run diverged" in report and "MHD effect" not in report
    assert not os.path.exists(os.path.join(cfg.out, "clients.csv"))


def test_a_non_finite_loss_is_found_without_a_sync_per_step(monkeypatch):
    """The loss is summed on the device and read once a round, with the weights' check."""
    sim = simulation.setup(small(steps_per_round=4))
    reads = []
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or real_item(t))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or real_tolist(t))
    train.train_round(sim, 0)
    monkeypatch.undo()
    assert reads == [] and sim.loss_sum is not None
    # per client and term: ce and the two aux heads' distillation, summed over the 4 steps
    assert list(train.loss_terms(sim)) == ["ce", "aux_head1", "aux_head2"]
    assert sim.loss_sum.shape == (6, 3) and sim.loss_sum.dtype == torch.float64
    assert train.nonfinite(sim).tolist() == [0, 0] and sim.loss_sum is None
    sim.loss_sum = torch.zeros(6, 3, dtype=torch.float64)
    sim.loss_sum[4, 2] = float("inf")
    assert train.nonfinite(sim).tolist() == [1, 0]


def test_resume_refuses_other_options(tmp_path):
    train.run(small(tmp_path))
    with pytest.raises(ValueError, match="skew"):
        train.run(small(tmp_path, skew=0.5), resume=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        train.run(small(tmp_path, out=str(tmp_path / "none")), resume=True)


@pytest.mark.parametrize("spec", ["mlp:16x8", "cnn:4x6-8", "resnet:8:bn", dropout_trunk])
def test_the_memory_check_counts_the_weights_that_setup_draws(spec):
    sim = simulation.setup(small(model=[spec]))
    arch = sim.groups[0].arch
    assert models.num_params(arch, sim.data.input_shape, 10, 3) == models.num_params_per_client(sim.groups)[0]
    assert models.num_params(arch, sim.data.input_shape, 10, 0) < models.num_params_per_client(sim.groups)[0]


def test_the_memory_check_counts_every_layer_output_of_a_module_trunk():
    needs = simulation.memory_needs(small(model=["resnet:8"]), (1, 8, 8), 10)
    info = models.trunk_info(models.parse_arch("resnet:8"), (1, 8, 8))
    option, acts, _ = needs[-1]
    assert acts == 6 * (8 + 16) * info.activations * 4  # 6 clients, 8 private + 16 public rows
    assert option == "--public-batch-size 16" and info.activations > 16 * 8 * 8 * 10


def test_chunks_of_clients_shrink_the_memory_check_and_automatic_picks_them(monkeypatch):
    info = models.trunk_info(models.parse_arch("resnet:8"), (1, 8, 8))
    whole = simulation.memory_needs(small(model=["resnet:8"]), (1, 8, 8), 10)[-1]
    option, acts, _ = simulation.memory_needs(small(model=["resnet:8"], client_chunk=4),
                                              (1, 8, 8), 10)[-1]
    # one chunk's activations, then every client's inputs, logits (3 heads x 10) and embedding
    assert acts == 4 * 24 * info.activations * 4 + 6 * 24 * (64 + 30 + 64) * 4 < whole[1]
    assert option == "--client-chunk 4"
    assert simulation.client_chunk(small(model=["resnet:8"]), (1, 8, 8), 10) == 0  # all fit
    monkeypatch.setattr(simulation, "CHUNK_BYTES", 3 * 24 * info.activations * 4)
    assert simulation.client_chunk(small(model=["resnet:8"]), (1, 8, 8), 10) == 3
    # 256 resnet:8 clients on Fashion-MNIST: chunks of what fits the budget, no longer ~19 GB
    monkeypatch.undo()
    big = small(dataset="fashion_mnist", clients=256, model=["resnet:8"], heads=3,
                batch_size=32, public_batch_size=64)
    assert simulation.client_chunk(big, (1, 28, 28), 10) >= 1
    assert simulation.memory_needs(big, (1, 28, 28), 10)[-1][0] == "--public-batch-size 64"
    assert sum(n for _, n, _ in simulation.memory_needs(big, (1, 28, 28), 10)) < 4 * 2**30


def test_a_chunked_round_trains_like_the_unchunked_one():
    kw = dict(model=["resnet:8:bn"], optimizer="sgd", lr=0.1)
    whole, chunked = simulation.setup(small(**kw)), simulation.setup(small(client_chunk=4, **kw))
    assert whole.client_chunk == 0 and chunked.client_chunk == 4  # chunks of 4 and 2 clients
    train.train_round(whole, 0)
    train.train_round(chunked, 0)
    want, got = _stacked(whole), _stacked(chunked)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda s, k=k: f"{k}: {s}")


@pytest.mark.parametrize("method", ["mhd", "isolated", "fedavg", "mean_distill", "centralized"])
def test_every_method_runs_module_clients(method):
    sim = simulation.setup(small(method=method, model=["resnet:8:bn"], topk=3 if method == "mhd" else 0))
    before = {k: b.clone() for k, b in sim.groups[0].buffers.items()}
    train.train_round(sim, 0)
    private, shared, ensemble = evaluation.evaluate(sim)
    assert private.shape == (6, sim.num_heads) and 0 <= ensemble <= 1
    buffers = sim.groups[0].buffers
    assert not torch.equal(buffers["stem.1.running_mean"], before["stem.1.running_mean"])
    if method == "fedavg":  # averaged weights are equal; the BatchNorm statistics stay local
        for p in sim.groups[0].params.values():
            assert torch.equal(p[0], p[-1])
        assert not torch.equal(buffers["stem.1.running_mean"][0], buffers["stem.1.running_mean"][1])
    elif method != "centralized":
        w = sim.groups[0].params["trunk.stem.0.weight"]
        assert not torch.equal(w[0], w[1])


def test_data_dependent_errors_name_the_option():
    with pytest.raises(ValueError, match="--clients"):
        simulation.setup(small(clients=5000))
    with pytest.raises(ValueError, match="--topk"):
        simulation.setup(small(topk=11))
    with pytest.raises(ValueError, match="data_dir"):
        simulation.setup(small(dataset="mnist", data_dir="/nonexistent"))
