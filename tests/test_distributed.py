"""Clients sharded over torch.distributed ranks (gloo on localhost): the shards and the cut of a
graph, processes that give the metrics of one process with the same seeds (dense, top-k,
embeddings, FedAvg, uneven shards, torchrun end to end), a dead or hung rank that stops the
others with a one-line error within --dist-timeout, and checkpoints that resume with another
number of processes."""
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mhd_fast import config as C
from mhd_fast import distributed as D
from mhd_fast import exchange as ex
from mhd_fast import models, simulation, train

from cases import make_graph, run_killed_in_round

SMALL = dict(dataset="digits", clients=6, rounds=2, steps_per_round=3, model=["mlp:16x8"], heads=2,
             batch_size=8, public_batch_size=16, progress=False, backend="torch")
CLI = ["--clients", "6", "--steps-per-round", "3", "--model", "mlp:16x8", "--heads", "2",
       "--batch-size", "8", "--public-batch-size", "16", "--backend", "torch", "--graph", "ring",
       "--no-progress"]


def small(out, **kw) -> C.Config:
    return C.load(None, {**SMALL, "out": str(out), **kw})


def _comparable(metrics: dict) -> dict:
    """What must not depend on the number of processes: everything but times, the output
    folder, the process count and the bytes between processes."""
    m = json.loads(json.dumps(metrics))
    m["config"].pop("out")
    m.pop("world_size")
    for rec in m["rounds"]:
        rec.pop("time_s")
        rec.pop("bytes_cross_rank")
    m["final"].pop("bytes_cross_rank")
    return m


def _assert_same_metrics(got: dict, want: dict, acc_abs: float = 1e-9) -> None:
    """acc_abs: the accuracies' tolerance. Bit-identical weights give identical accuracies;
    a run trained for many rounds on another number of processes may flip a test row."""
    a, b = _comparable(got), _comparable(want)
    assert a.keys() == b.keys() and len(a["rounds"]) == len(b["rounds"])
    assert a["config"] == b["config"]
    for x, y in zip(a["rounds"] + [a["final"]], b["rounds"] + [b["final"]]):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if key == "loss_sum":  # fp32 losses: a process's forward over fewer clients (other
                # matmul blocking) rounds differently in the last bits; accuracies do not move
                assert value == pytest.approx(y[key], rel=1e-6), key
            elif isinstance(value, dict):
                assert value == pytest.approx(y[key], abs=acc_abs), key
            else:
                assert value == pytest.approx(y[key], rel=1e-12), key


# ---- shards and cuts (one process, no process group) ---------------------------------------

def test_shards_are_balanced_contiguous_blocks():
    assert D.shard_bounds(7, 3) == (0, 3, 5, 7)
    assert D.shard_bounds(6, 2) == (0, 3, 6)
    assert D.shard_bounds(5, 5) == (0, 1, 2, 3, 4, 5)
    shard = D.make_shard(7, 1, 3)
    assert (shard.start, shard.stop, shard.size, shard.num_clients) == (3, 5, 2, 7)
    assert not shard.lead and D.make_shard(7, 0, 3).lead
    with pytest.raises(ValueError, match="--clients 2 must be >= the number of ranks 3"):
        D.make_shard(2, 0, 3)
    assert D.overlap(range(2, 6), range(4, 9)) == range(4, 6) and not D.overlap(range(0, 2), range(3, 5))


@pytest.mark.parametrize("graph", ["ring", "directed", "lonely", "selfloops", "complete"])
@pytest.mark.parametrize("world", [2, 3])
def test_the_cut_sends_each_rank_exactly_the_rows_it_needs(graph, world):
    n = 8
    adj = make_graph(graph, n, seed=3)
    cuts = [D.make_cut(adj, D.make_shard(n, r, world)) for r in range(world)]
    for r, cut in enumerate(cuts):
        shard = D.make_shard(n, r, world)
        # the candidates: own clients and everybody they hear, ascending; rows of the others empty
        need = adj[shard.start:shard.stop].any(0)
        need[shard.start:shard.stop] = True
        candidates = need.nonzero().squeeze(1)
        assert cut.adj.shape == (len(candidates), len(candidates))
        assert torch.equal(candidates[cut.rows], torch.arange(shard.start, shard.stop))
        assert torch.equal(cut.adj[cut.rows], adj[shard.start:shard.stop][:, candidates])
        others = torch.ones(len(candidates), dtype=torch.bool)
        others[cut.rows] = False
        assert not cut.adj[others].any()
        # what rank s sends r is, in order, r's candidates held by s
        for s in range(world):
            sent = cuts[s].send[r] + D.make_shard(n, s, world).start
            held = D.make_shard(n, s, world).clients
            want = candidates[(candidates >= held.start) & (candidates < held.stop)] if s != r else sent
            assert torch.equal(sent, want) and len(sent) == (cut.recv[s] if s != r else 0)


def test_one_process_is_the_identity_route():
    adj = make_graph("ring", 5)
    for shard in (None, D.make_shard(5)):
        route = ex.route(adj, shard)
        assert route.adj is adj and route.rows == slice(0, 5) and route.clients == range(5)
        assert route.self_contained
        assert route.send(lambda: pytest.fail("nothing crosses in one process"), "x") == ([], 0)


def test_init_rows_are_the_rows_of_the_full_draw(monkeypatch):
    monkeypatch.setattr(models, "_DRAW_FLOATS", 500)  # several chunks of clients
    arch = models.parse_arch("cnn:3-5x4")
    full_gen, part_gen = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    full = models.init_params(arch, 9, (1, 8, 8), 5, 3, full_gen)
    part = models.init_params(arch, 9, (1, 8, 8), 5, 3, part_gen, rows=range(2, 7))
    for k in full:
        assert torch.equal(full[k][2:7], part[k]), k
    assert torch.equal(full_gen.get_state(), part_gen.get_state())  # the next group draws alike
    with pytest.raises(ValueError, match="rows"):
        models.init_params(arch, 9, (1, 8, 8), 5, 3, part_gen, rows=range(3, 12))


@pytest.mark.parametrize("kw", [dict(), dict(model=["mlp:16x8", "cnn:4-8", "mlp:12x8"]),
                                dict(method="fedavg"), dict(model=["resnet:8:bn", "mlp:16x8"]),
                                dict(method="fedavg", model=["resnet:8"])])
def test_a_shard_holds_the_rows_of_the_whole_run(tmp_path, kw):
    whole = simulation.setup(small(tmp_path, clients=7, **kw))
    ranks = [simulation.setup(small(tmp_path, clients=7, **kw), D.make_shard(7, r, 3)) for r in range(3)]
    for name in ("private_rows", "private_count", "label_dist"):
        torch.testing.assert_close(torch.cat([getattr(s, name) for s in ranks]), getattr(whole, name),
                                   rtol=0, atol=0, msg=name)
    x = whole.data.x_test[:20]
    want, _ = models.forward_groups(whole.groups, x, shared=True, num_heads=whole.num_heads)
    got = torch.cat([models.forward_groups(s.groups, x, shared=True, num_heads=s.num_heads)[0]
                     for s in ranks])
    # the same weights, client by client; a convolution over fewer clients may round differently
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    rows = [train.sample_batches(s)[0] for s in ranks]
    torch.testing.assert_close(torch.cat(rows), train.sample_batches(whole)[0], rtol=0, atol=0)
    if whole.public_batch is not None:
        assert all(torch.equal(s.public_batch, whole.public_batch) for s in ranks)


def test_centralized_refuses_ranks_and_the_timeout_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="centralized .* one process, not over 2 ranks"):
        simulation.setup(small(tmp_path, method="centralized"), D.make_shard(6, 0, 2))
    with pytest.raises(ValueError, match="--dist-timeout must be > 0"):
        small(tmp_path, dist_timeout=0.0)


# ---- several processes ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list, out: str) -> None:
    """One process of a spawned group: the runs of ``jobs`` (name, config dict, resume), rank 0
    writing each run's metrics to out/NAME.json."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    clean = False
    try:
        for name, cfg, resume in jobs:
            metrics = train.run(C.load(None, cfg), resume=resume)
            assert (metrics is None) == (rank != 0)
            if metrics is not None:
                with open(os.path.join(out, f"{name}.json"), "w") as f:
                    json.dump(metrics, f)
        clean = True
    finally:
        D.shutdown(clean)
    D.leave(0)  # as the CLI does: no interpreter finalization, where gloo's teardown can abort


def _spawn(world: int, jobs: list, out) -> dict:
    mp.spawn(_worker, args=(world, _free_port(), jobs, str(out)), nprocs=world, join=True)
    return {name: json.loads((out / f"{name}.json").read_text()) for name, _, _ in jobs}


# name -> options; each runs in one process and in a spawned group, with the same seeds
CASES = {
    "dense_ring": dict(graph="ring"),
    "topk_complete_stale": dict(topk=3, wire_dtype="float16", exchange_every=2),
    "mean_distill": dict(method="mean_distill", graph="kring", graph_options={"k": 2}),
    "isolated": dict(method="isolated"),
    "fedavg_allreduce": dict(method="fedavg"),
    "fedavg_ring": dict(method="fedavg", graph="ring"),
    "module_topk": dict(model=["resnet:8:bn", "mlp:16x8"], topk=3),
    "module_fedavg": dict(method="fedavg", model=["resnet:8"]),
}


def test_two_processes_give_the_metrics_of_one(tmp_path):
    jobs = [(name, {**SMALL, **kw, "out": str(tmp_path / "two" / name)}, False)
            for name, kw in CASES.items()]
    two = _spawn(2, jobs, tmp_path)
    row = 2 * 16 * 10 * 4  # what crosses per client row: 2 heads x 16 rows x 10 fp32 logits
    for name, kw in CASES.items():
        one = train.run(small(tmp_path / "one" / name, **kw))
        _assert_same_metrics(two[name], one)
        assert two[name]["world_size"] == 2
        assert ((tmp_path / "two" / name / "clients.csv").read_text()
                == (tmp_path / "one" / name / "clients.csv").read_text())  # gathered in client order
    # ring of 6 on ranks {0,1,2} {3,4,5}: each rank needs 2 rows (0 <-> 5, 2 <-> 3), 3 exchanges
    assert [r["bytes_cross_rank"] for r in two["dense_ring"]["rounds"]] == [3 * 4 * row] * 2
    # complete graph: each rank sends its 3 clients' packets once, not once per listener
    packet = 2 * 16 * (3 * 2 + 3 * 2 + 4)
    assert [r["bytes_cross_rank"] for r in two["topk_complete_stale"]["rounds"]] == [2 * 6 * packet, 6 * packet]
    assert two["isolated"]["final"]["bytes_cross_rank"] == 0
    params = sum(models.num_params_per_client(simulation.setup(small(tmp_path, method="fedavg")).groups))
    allreduce = 2 * (2 - 1) * params * 4 // 2  # per rank, counted as a ring all_reduce
    assert two["fedavg_allreduce"]["final"]["bytes_cross_rank"] == 2 * 2 * allreduce
    assert two["fedavg_ring"]["final"]["bytes_cross_rank"] == 2 * 4 * params * 4


def test_uneven_shards_of_three_processes_and_a_resume_from_one(tmp_path, monkeypatch):
    kw = dict(clients=7, model=["mlp:16x8", "cnn:4-8"], nu_emb=0.5, topk=4, aggregate="mean",
              include_self=True, graph="exponential", exchange_every=2, rounds=4, eval_every=3)
    # a one-process run that dies in round 2 (rounds 0 and 1 not measured), to be resumed by
    # three processes, which all measure rounds 2 and 3 alone
    cut = small(tmp_path / "cut", **kw)
    run_killed_in_round(cut, monkeypatch, 2)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["rounds_done"] == 2

    jobs = [("three", {**SMALL, **kw, "out": str(tmp_path / "three")}, False),
            ("resumed", {**SMALL, **kw, "out": str(tmp_path / "cut")}, True)]
    got = _spawn(3, jobs, tmp_path)
    one = train.run(small(tmp_path / "one", **kw))
    _assert_same_metrics(got["three"], one)
    _assert_same_metrics(got["resumed"], one)


def _env(rank: int, world: int, port: int) -> dict:
    """What torchrun gives each process."""
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1")


def _launch(world: int, args: list[str]) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "mhd_fast", "run", *args], env=_env(r, world, port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(world)]


def _rounds_done(out) -> int:
    try:  # whole files only: the checkpoint is renamed into place
        return torch.load(out / "checkpoint.pt", weights_only=True)["rounds_done"]
    except (OSError, RuntimeError, EOFError):
        return 0


def _wait_for_round(procs, out, rounds: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        done = _rounds_done(out)
        if done >= rounds:
            return done
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of round {rounds}: {[p.poll() for p in procs]}")


def _stops_with_one_line(proc: subprocess.Popen, limit: float, match: str) -> float:
    t0 = time.time()
    _, err = proc.communicate(timeout=limit)
    lines = [line for line in err.strip().splitlines() if line]
    assert proc.returncode == 1, err
    assert len(lines) == 1 and lines[0].startswith("mhd-fast: error: rank 0 of 2:"), err
    assert match in lines[0] and "--dist-timeout" in lines[0], lines[0]
    return time.time() - t0


def test_a_killed_rank_stops_the_other_and_the_run_resumes_in_one_process(tmp_path):
    out = tmp_path / "cut"
    args = [*CLI, "--rounds", "40", "--topk", "3", "--exchange-every", "2", "--dist-timeout", "20"]
    procs = _launch(2, [*args, "--out", str(out)])
    done = _wait_for_round(procs, out, 2)
    procs[1].send_signal(signal.SIGKILL)
    # a dead peer closes its connections: the survivor stops at once, far inside the timeout
    assert _stops_with_one_line(procs[0], 20, "Connection") < 15
    procs[1].wait()
    done = _rounds_done(out)
    assert 2 <= done < 40 and not (out / "metrics.json").exists()

    res = subprocess.run([sys.executable, "-m", "mhd_fast", "run", *args, "--out", str(out),
                          "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    whole = train.run(C.load(None, {**SMALL, "graph": "ring", "rounds": 40, "topk": 3,
                                    "exchange_every": 2, "out": str(tmp_path / "whole")}))
    resumed = json.loads((out / "metrics.json").read_text())
    resumed["config"]["dist_timeout"] = whole["config"]["dist_timeout"]
    # The rounds before the kill ran on 2 processes, whose matmuls over fewer clients round
    # differently in the last bits; how many rounds that is depends on the machine's load, and
    # over 40 rounds those bits can flip a test row (seen: 4e-5 in one head's mean accuracy).
    _assert_same_metrics(resumed, whole, acc_abs=2e-3)


def test_a_hung_rank_stops_the_other_after_the_timeout(tmp_path):
    out = tmp_path / "hang"
    procs = _launch(2, [*CLI, "--rounds", "400", "--dist-timeout", "5", "--out", str(out)])
    try:
        _wait_for_round(procs, out, 1)
        procs[1].send_signal(signal.SIGSTOP)  # alive, connected, silent
        took = _stops_with_one_line(procs[0], 60, "Timed out")
        assert took < 5 + 20  # the timeout, then the interpreter's exit
    finally:
        procs[1].kill()
        procs[1].communicate()


def test_a_diverged_sharded_run_exits_3_on_every_rank(tmp_path):
    out = tmp_path / "nan"
    procs = _launch(2, [*CLI, "--rounds", "3", "--optimizer", "sgd", "--lr", "1e6",
                        "--dist-timeout", "60", "--out", str(out)])
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [3, 3], results
    said = [err.strip().splitlines() for _, err in results]
    assert len(said[0]) == 1 and said[0][0].startswith("mhd-fast: diverged in round"), said
    assert said[1] == [], said  # rank 0 alone says where
    assert json.loads((out / "metrics.json").read_text())["status"] == "diverged"


def test_torchrun_launch_writes_the_outputs_of_one_process(tmp_path):
    args = [*CLI, "--rounds", "2", "--topk", "3"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "mhd_fast", "run", *args,
                          "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("best aux head") == 1  # rank 0 alone reports
    files = set(os.listdir(tmp_path / "two"))
    assert {"metrics.json", "metrics.csv", "clients.csv", "report.md", "checkpoint.pt"} <= files
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = train.run(C.load(None, {**SMALL, "graph": "ring", "topk": 3, "out": str(tmp_path / "one")}))
    _assert_same_metrics(two, one)
    assert two["final"]["bytes_cross_rank"] > 0
    assert "sharded over 2 processes" in (tmp_path / "two" / "report.md").read_text()
