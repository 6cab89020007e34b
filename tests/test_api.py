"""The Python API: ``mhd_fast.simulate`` gives the command's metrics for the same options, calls
back after every round, writes nothing without ``out``, names the option of bad input, reports a
diverged run and leaves the caller's global state alone; ``--tensorboard`` logs every round once;
``import mhd_fast`` changes nothing process-wide."""
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import mhd_fast
from mhd_fast import checkpoint as ckpt
from mhd_fast import cli, train
from mhd_fast.outdir import OutputError

SMALL = dict(clients=6, rounds=3, steps_per_round=4, model="mlp:32x16", heads=2, lr=1e-2,
             progress=False)
FLAGS = ["--clients", "6", "--rounds", "3", "--steps-per-round", "4", "--model", "mlp:32x16",
         "--heads", "2", "--lr", "1e-2", "--no-progress"]


def _comparable(metrics: dict, *config_keys: str) -> dict:
    """metrics without the times and the given config keys (JSON types, as metrics.json)."""
    m = json.loads(json.dumps(metrics))
    for rec in m["rounds"]:
        rec.pop("time_s")
    for key in config_keys:
        m["config"].pop(key)
    return m


def test_simulate_gives_the_metrics_of_the_command(tmp_path):
    assert cli.main(["run", *FLAGS, "--out", str(tmp_path / "cli")]) == 0
    want = json.loads((tmp_path / "cli" / "metrics.json").read_text())

    with_out = mhd_fast.simulate(**SMALL, out=tmp_path / "api")
    assert json.loads((tmp_path / "api" / "metrics.json").read_text()) == json.loads(json.dumps(with_out))
    assert (tmp_path / "api" / "checkpoint.pt").exists() and (tmp_path / "api" / "report.md").exists()
    assert _comparable(with_out, "out") == _comparable(want, "out")

    bare = mhd_fast.simulate(**SMALL)
    assert bare["config"]["out"] is None and bare["config"]["checkpoint"] is False
    assert _comparable(bare, "out", "checkpoint") == _comparable(want, "out", "checkpoint")
    assert bare["status"] == "finished" and bare["final"]["private_acc"]["head0"] > 0.5


def test_the_round_records_hold_worst10_and_the_loss_terms():
    m = mhd_fast.simulate(**SMALL, nu_main=0.5)
    for rec in m["rounds"]:
        assert set(rec["worst10_shared_acc"]) == {"head0", "head1", "head2"}
        assert all(rec["worst10_shared_acc"][h] <= rec["shared_acc"][h] for h in rec["shared_acc"])
        loss = rec["loss_sum"]
        assert list(loss) == ["total", "ce", "aux_head1", "aux_head2", "main"]
        assert all(v > 0 for v in loss.values())
        nu = m["config"]["nu_aux"]
        assert loss["total"] == pytest.approx(loss["ce"] + nu * (loss["aux_head1"] + loss["aux_head2"])
                                              + 0.5 * loss["main"], rel=1e-12)
    assert m["rounds"][-1]["loss_sum"]["ce"] < m["rounds"][0]["loss_sum"]["ce"]  # it learns
    assert list(mhd_fast.simulate(**{**SMALL, "rounds": 1}, method="isolated")["rounds"][0]
                ["loss_sum"]) == ["total", "ce"]


def test_on_round_is_called_after_each_round_with_its_record():
    calls = []
    m = mhd_fast.simulate(**SMALL, on_round=lambda r, rec: calls.append((r, json.dumps(rec))))
    assert [r for r, _ in calls] == [0, 1, 2]
    assert [json.loads(rec) for _, rec in calls] == json.loads(json.dumps(m["rounds"]))


def test_without_out_nothing_is_written(tmp_path, monkeypatch):
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(), tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    m = mhd_fast.simulate(**SMALL)
    assert m["status"] == "finished"
    assert os.listdir(cwd) == [] and os.listdir(tmp) == []


@pytest.mark.parametrize("options,option", [
    (dict(clientz=4), "'clientz'"),
    (dict(lr=-1.0), "--lr"),
    (dict(clients="8"), "clients"),
    (dict(model="mlp:abc"), "--model"),
    (dict(graph="hypercube"), "--graph"),
    (dict(checkpoint=True), "checkpoint"),
    (dict(resume=True), "resume"),
    (dict(on_round=3), "on_round"),
    (dict(out=3), "out"),
])
def test_bad_options_raise_value_error_naming_the_option_before_any_work(tmp_path, monkeypatch,
                                                                          options, option):
    monkeypatch.setattr(train, "setup", lambda *a, **k: pytest.fail("set up a run"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=option):
        mhd_fast.simulate(**{**SMALL, **options})
    assert os.listdir(tmp_path) == []


def test_a_diverging_run_returns_status_diverged():
    m = mhd_fast.simulate(rounds=2, steps_per_round=5, optimizer="sgd", lr=1e6, progress=False)
    assert m["status"] == "diverged" and m["rounds"] == [] and "final" not in m
    assert m["diverged"] == {"round": 0, "loss": True, "weights": True}


def test_simulate_leaves_the_callers_global_state(tmp_path):
    import matplotlib

    torch.manual_seed(1234)
    rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    env, threads = dict(os.environ), torch.get_num_threads()
    dtype, grad, backend = torch.get_default_dtype(), torch.is_grad_enabled(), matplotlib.get_backend()
    m = mhd_fast.simulate(**SMALL, out=tmp_path / "o")  # out: the plots and the checkpoint too
    assert m["status"] == "finished" and (tmp_path / "o" / "accuracy.png").exists()
    assert torch.equal(torch.get_rng_state(), rng)
    assert str(np.random.get_state()) == str(np_rng) and random.getstate() == py_rng
    assert dict(os.environ) == env and torch.get_num_threads() == threads
    assert (torch.get_default_dtype(), torch.is_grad_enabled()) == (dtype, grad)
    assert matplotlib.get_backend() == backend


# ---- TensorBoard ----------------------------------------------------------------------------

def _scalars(folder) -> dict:
    """{tag: [(step, value), ...]} of the TensorBoard logs in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_every_round_once_and_a_resume_adds_no_step(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    board = tmp_path / "tb"
    opts = dict(SMALL, rounds=4, name="tiny", tensorboard=str(board))
    real_save = ckpt.save

    def dies_saving_round_2(path, sim, rounds_done, *rest):  # after round 2 was logged
        if rounds_done == 3:
            raise OutputError("disk full")
        real_save(path, sim, rounds_done, *rest)

    monkeypatch.setattr(ckpt, "save", dies_saving_round_2)
    with pytest.raises(OutputError):
        mhd_fast.simulate(**opts, out=tmp_path / "o")
    monkeypatch.setattr(ckpt, "save", real_save)
    assert [s for s, _ in _scalars(board / "tiny")["loss/ce"]] == [0, 1, 2]
    m = mhd_fast.simulate(**opts, out=tmp_path / "o", resume=True)

    logged = _scalars(board / "tiny")
    heads = ("head0", "head1", "head2")
    want = {f"accuracy/{kind}/{h}" for kind in ("private", "shared", "worst10_private",
                                                "worst10_shared") for h in heads}
    want |= {"loss/total", "loss/ce", "loss/aux_head1", "loss/aux_head2", "bytes/sent",
             "bytes/dense", "bytes/cross_rank", "time/round_s"}
    assert set(logged) == want
    for tag, points in logged.items():
        assert [s for s, _ in points] == [0, 1, 2, 3], tag
    for rec in m["rounds"]:
        r = rec["round"]
        assert logged["accuracy/shared/head1"][r][1] == pytest.approx(rec["shared_acc"]["head1"])
        assert logged["accuracy/worst10_private/head0"][r][1] == pytest.approx(
            rec["worst10_private_acc"]["head0"])
        assert logged["loss/aux_head2"][r][1] == pytest.approx(rec["loss_sum"]["aux_head2"])
        assert logged["bytes/sent"][r][1] == pytest.approx(rec["bytes_sent"])

    mhd_fast.simulate(**{**opts, "rounds": 2})  # a new run of that name replaces the old curves
    assert [s for s, _ in _scalars(board / "tiny")["loss/ce"]] == [0, 1]


def test_tensorboard_from_the_command(tmp_path):
    pytest.importorskip("tensorboard")
    assert cli.main(["run", *FLAGS, "--rounds", "2", "--name", "cmd", "--out", str(tmp_path / "o"),
                     "--tensorboard", str(tmp_path / "tb")]) == 0
    assert [s for s, _ in _scalars(tmp_path / "tb" / "cmd")["accuracy/private/head0"]] == [0, 1]


def test_tensorboard_without_the_package_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        cli.main(["run", *FLAGS, "--out", str(tmp_path / "o"), "--tensorboard", str(tmp_path / "tb")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mhd-fast: error: --tensorboard needs"), err
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="--tensorboard"):
        mhd_fast.simulate(**SMALL, tensorboard=str(tmp_path / "tb"))


# ---- importing ------------------------------------------------------------------------------

def _python(code: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr


def test_import_changes_no_process_wide_state():
    # the package alone loads no torch, so OpenMP and torch can still be set up after it
    _python("import os, sys\n"
            "env = dict(os.environ)\n"
            "import mhd_fast\n"
            "assert 'torch' not in sys.modules, 'torch loaded'\n"
            "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n")
    # nor do its names, the ops they load, or the simulator's modules change anything
    _python("import os, torch\n"
            "env, threads, rng = dict(os.environ), torch.get_num_threads(), torch.get_rng_state()\n"
            "import mhd_fast\n"
            "mhd_fast.mhd_loss, mhd_fast.simulate, mhd_fast.TopKLogits\n"
            "import mhd_fast.train, mhd_fast.cli, mhd_fast.sweep\n"
            "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
            "assert torch.get_num_threads() == threads\n"
            "assert torch.equal(torch.get_rng_state(), rng)\n"
            "assert 'simulate' in dir(mhd_fast) and 'simulate' in mhd_fast.__all__\n")


def test_the_command_sets_passive_openmp_waits_unless_the_user_chose():
    code = ("import os\n"
            "from mhd_fast import cli\n"
            "assert cli.main(['graph', 'ring', '--clients', '4']) == 0\n"
            "print(os.environ['OMP_WAIT_POLICY'])\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**env, **({"OMP_WAIT_POLICY": given} if given else {})},
                             timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines()[-1] == want
