"""The command line end to end: a digits run, one-line errors with exit status 2 and no output
left behind, `mhd-fast graph`, a run killed mid-way that resumes to the same metrics, a diverged
run (exit status 3), one run per output folder, and an output folder that cannot be written."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mhd_fast import cli, outdir, train

SMALL = ["--clients", "6", "--rounds", "3", "--steps-per-round", "4", "--model", "mlp:32x16",
         "--heads", "2", "--lr", "1e-2", "--no-progress"]


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mhd_fast", *args], capture_output=True,
                          text=True, timeout=timeout)


def _without_time(metrics: dict) -> dict:
    for rec in metrics["rounds"]:
        rec.pop("time_s")
    metrics["config"].pop("out")
    return metrics


def test_end_to_end_run_on_digits(tmp_path):
    out = tmp_path / "run"
    res = _run("run", *SMALL, "--topk", "3", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "best aux head" in res.stdout and str(out) in res.stdout
    files = set(os.listdir(out))
    assert {"metrics.json", "metrics.csv", "clients.csv", "accuracy.png", "bytes.png",
            "report.md", "checkpoint.pt"} <= files
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "finished"
    assert [r["round"] for r in m["rounds"]] == [0, 1, 2]
    assert set(m["final"]["shared_acc"]) == {"head0", "head1", "head2"}
    assert m["config"]["topk"] == 3 and m["final"]["bytes_sent"] < m["final"]["bytes_dense"]
    assert all(0 <= v <= 1 for v in m["final"]["private_acc"].values())
    # the head-0 private accuracy of a skewed client beats chance by far after 12 steps
    assert m["final"]["private_acc"]["head0"] > 0.5


def test_progress_bar_shows_mean_accuracies(tmp_path):
    res = _run("run", *SMALL[:-1], "--rounds", "1", "--out", str(tmp_path / "p"))
    assert res.returncode == 0, res.stderr
    assert "priv0=" in res.stderr and "shared0=" in res.stderr and "round" in res.stderr


@pytest.mark.parametrize("args,option", [
    (["--dataset", "imagenet"], "--dataset"),
    (["--graph", "hypercube"], "--graph"),
    (["--method", "fedprox"], "--method"),
    (["--clients", "100000"], "--clients"),
    (["--topk", "11"], "--topk"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "data_dir"),
    (["--config", "/nonexistent/run.toml"], "--config"),
    (["--skew", "2"], "--skew"),
    (["--rounds", "0"], "--rounds"),
    (["--eval-every", "0"], "--eval-every"),
    (["--rounds", "many"], "--rounds"),
    (["--graph", "kring", "--graph-options", "q=1"], "--graph-options"),
    (["--device", "cuda:99"], "--device"),
    (["--resume"], "--resume"),
    (["--tau", "inf"], "--tau"),
    (["--dist-timeout", "inf"], "--dist-timeout"),
    (["--lr", "nan"], "--lr"),
    (["--client-chunk", "-2"], "--client-chunk"),
    (["--split-seed", str(2**70)], "--split-seed"),
    (["--clients", "2", "--model", "mlp:16", "mlp:8", "mlp:4"], "--model"),
    (["--graph", "ring", "--graph-options", "k=2"], "--graph-options"),
    (["--graph", "kring", "--graph-options", "k=9"], "--graph-options"),
    (["--partition", "shards", "--shards", "1000"], "--partition"),
    (["--batch-size", "10000000000"], "--batch-size"),
    (["--model", "mlp:10000000000"], "--model"),
    (["--name", "x" * 300], "--out"),
    (["--name", "bad\udcff"], "--name"),  # how Python passes an argument that is not UTF-8
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, monkeypatch, args,
                                                          option):
    out = tmp_path / "never"
    if "--name" in args:  # the folder is runs/NAME: run from tmp_path
        monkeypatch.chdir(tmp_path)
        out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        cli.main(["run", *args, *([] if "--name" in args else ["--out", str(out)]), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mhd-fast: error:") and option in err[0], err
    assert not out.exists()


def test_bad_config_file_from_the_real_entry_point(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("clients = 4\nwidth = 3\n")
    res = _run("run", "--config", str(path), "--out", str(tmp_path / "never"))
    assert res.returncode == 2
    assert res.stderr.strip() == ("mhd-fast: error: unknown key 'width' in --config "
                                  f"{str(path)!r}; known keys: " + ", ".join(
                                      __import__("mhd_fast.config").config.FIELDS))
    assert "Traceback" not in res.stderr and not (tmp_path / "never").exists()


@pytest.mark.parametrize("case", ["a file", "below a file", "too long", "not UTF-8"])
def test_an_unusable_out_is_one_line_before_any_training(tmp_path, capsys, monkeypatch, case):
    (tmp_path / "f").write_text("keep")
    out = {"a file": tmp_path / "f", "below a file": tmp_path / "f" / "run",
           "too long": tmp_path / ("x" * 300), "not UTF-8": tmp_path / "bad\udcff"}[case]
    monkeypatch.setattr(train, "train_round", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--clients", "3", "--model", "mlp:8", "--rounds", "1", "--out", str(out),
                  "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mhd-fast: error: --out"), err
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_text() == "keep"


def _read_only(monkeypatch, folder) -> None:
    """Make files impossible to create in ``folder``: its mode, and for root (whom modes do
    not stop) a refusal of outdir's file creation there."""
    os.chmod(folder, 0o555)
    if os.geteuid() == 0:
        real = os.open

        def refuse(path, flags, *a, **kw):
            if os.path.dirname(os.path.abspath(path)) == str(folder) and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real(path, flags, *a, **kw)

        def refuse_open(path, mode="r", *a, **kw):
            if "x" in mode or "w" in mode:
                refuse(path, os.O_CREAT)
            return open(path, mode, *a, **kw)

        monkeypatch.setattr(outdir.os, "open", refuse)
        monkeypatch.setattr(outdir, "open", refuse_open, raising=False)


def test_an_unwritable_out_fails_before_training_even_without_checkpoints(tmp_path, capsys,
                                                                           monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    _read_only(monkeypatch, out)
    monkeypatch.setattr(train, "train_round", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--clients", "3", "--model", "mlp:8", "--rounds", "1", "--out", str(out),
                  "--no-checkpoint", "--no-progress"])
    os.chmod(out, 0o755)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mhd-fast: error: --out: cannot"), err
    assert str(out) in err[0] and err[0].endswith("Permission denied")


@pytest.mark.parametrize("victim", ["checkpoint.pt", "metrics.json"])
def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, capsys, monkeypatch, victim):
    """A write that fails with ENOSPC (torch.save turns it into a RuntimeError) stops the run
    with one line naming the file; the temp file goes, the previous files stay whole."""
    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, *a, **kw):
        f = open(path, *a, **kw)
        return Full(f) if os.path.basename(path).startswith(victim + ".") else f

    monkeypatch.setattr(outdir, "open", full_open, raising=False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--clients", "3", "--model", "mlp:8", "--rounds", "2", "--steps-per-round",
                  "2", "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mhd-fast: error: --out: cannot write {str(out / victim)!r}: No space left "
                   "on device"]
    left = os.listdir(out)
    assert not [f for f in left if f.endswith(".tmp")], left
    assert victim not in left


def test_a_diverging_run_stops_with_status_diverged_and_exit_3(tmp_path):
    out = tmp_path / "nan"
    res = _run("run", "--rounds", "2", "--steps-per-round", "5", "--optimizer", "sgd", "--lr", "1e6",
               "--no-progress", "--out", str(out))
    assert res.returncode == 3, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mhd-fast: diverged in round 0 (0-based) of 2: the "
                                               "loss and weights were not finite"), err
    m = json.loads((out / "metrics.json").read_text())
    assert m["status"] == "diverged" and m["rounds"] == [] and "final" not in m
    assert m["diverged"] == {"round": 0, "loss": True, "weights": True}
    report = (out / "report.md").read_text()
    assert "diverged" in report and "MHD effect" not in report
    assert not (out / "checkpoint.pt").exists()  # no finite round to keep


def _wait_for(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists() and proc.poll() is None, "the run ended before it could be watched"


def test_one_run_per_out_and_a_killed_runs_lock_is_free(tmp_path, capsys):
    out = tmp_path / "busy"
    args = ["run", "--clients", "3", "--model", "mlp:8", "--rounds", "100000", "--steps-per-round",
            "1", "--no-progress", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "mhd_fast", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for(out / "checkpoint.pt", first)
        for extra in ([], ["--resume"]):  # a second run, here, while the first one trains
            with pytest.raises(SystemExit) as e:
                cli.main([*args, *extra])
            assert e.value.code == 2
            assert capsys.readouterr().err == (
                f"mhd-fast: error: --out: {str(out)!r} is in use by another run (pid {first.pid}); "
                "wait for it to finish or use another --out\n")
    finally:
        first.kill()
        first.wait()
    stale = out / f"checkpoint.pt.{first.pid}.0123abcd.tmp"  # as a kill mid-write leaves it
    stale.write_bytes(b"half")
    with outdir.claim(str(out)):  # the dead run's lock went with it
        assert not stale.exists() and (out / "checkpoint.pt").exists()


def test_graph_command_prints_the_spectral_gap(capsys):
    assert cli.main(["graph", "ring", "--clients", "8"]) == 0
    out = capsys.readouterr().out
    assert "spectral_gap: 0.1464" in out and "degree_mean: 2.0000" in out
    assert cli.main(["graph", "kring", "--clients", "10", "--graph-options", "k=2"]) == 0
    assert "degree_mean: 4.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["graph", "nope"])


@pytest.mark.parametrize("args,message", [
    (["graph", "ring", "--seed", "-1"], "--seed must be in [0, 2**63 - 1], got -1"),
    (["graph", "ring", "--graph-options", "k=2"], "--graph-options: graph 'ring' takes no options"),
    (["graph", "hypercube"], "NAME must be one of"),
])
def test_graph_command_errors_name_the_option(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mhd-fast: error: {message}"), err


def test_an_empty_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--clients", "3", "--model", "mlp:8", "--rounds", "1", "--resume",
                  "--out", str(tmp_path), "--no-progress"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"mhd-fast: error: --resume: cannot read the checkpoint "
                                       f"{str(tmp_path / 'checkpoint.pt')!r}: the file is empty\n")


def test_flags_override_the_config_file(tmp_path, capsys):
    path = tmp_path / "run.toml"
    path.write_text('clients = 5\nrounds = 9\nmodel = ["mlp:16"]\nheads = 1\nsteps_per_round = 2\n')
    out = tmp_path / "o"
    assert cli.main(["run", "--config", str(path), "--rounds", "1", "--out", str(out),
                     "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["clients"] == 5 and m["config"]["rounds"] == 1 and len(m["rounds"]) == 1


def test_killed_run_resumes_to_the_same_final_metrics(tmp_path):
    args = ["run", "--clients", "8", "--rounds", "12", "--steps-per-round", "8", "--model",
            "mlp:32x16", "--heads", "2", "--exchange-every", "3", "--no-progress"]
    whole = tmp_path / "whole"
    assert _run(*args, "--out", str(whole)).returncode == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "mhd_fast", *args, "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cut / "checkpoint.pt"
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            done = torch.load(ckpt, weights_only=True)["rounds_done"]  # whole files only: renamed in
            if done >= 2:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 2 <= done < 12
    assert not (cut / "metrics.json").exists()

    res = _run(*args, "--out", str(cut), "--resume")
    assert res.returncode == 0, res.stderr
    a = _without_time(json.loads((whole / "metrics.json").read_text()))
    b = _without_time(json.loads((cut / "metrics.json").read_text()))
    assert a == b


def test_keep_freed_memory_leaves_the_users_malloc_settings(monkeypatch):
    """The command keeps freed memory in glibc's heap (no page faults for each large tensor of
    a step), unless the user set glibc's own knobs."""
    import platform
    for var in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.setenv(var, "131072")
        assert cli.keep_freed_memory() is False
        monkeypatch.delenv(var)
    if platform.libc_ver()[0] == "glibc":
        assert cli.keep_freed_memory() is True


FACTORIES = """
import torch
def good():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU())
def raises():
    raise RuntimeError("no weights file")
def not_a_module():
    return 3
def no_parameters():
    return torch.nn.Flatten()
def wrong_shape():
    return torch.nn.Conv2d(1, 2, 3)
"""


@pytest.mark.parametrize("spec,what", [
    ("module:no_such_factories:good", "cannot import"),
    ("module:user_factories:missing", "cannot import"),
    ("module:user_factories:raises", "raised RuntimeError"),
    ("module:user_factories:not_a_module", "nn.Module"),
    ("module:user_factories:no_parameters", "no parameters"),
    ("module:user_factories:wrong_shape", "embedding [B, E]"),
    ("resnet:10", "6n + 2"),
])
def test_a_bad_module_factory_is_one_line_naming_model(tmp_path, capsys, monkeypatch, spec, what):
    (tmp_path / "user_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)  # a module of the current folder is importable
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--clients", "3", "--model", spec, "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mhd-fast: error: --model") and what in err[0], err
    assert not out.exists()


def test_a_module_of_the_current_folder_runs_next_to_a_builtin(tmp_path, monkeypatch):
    (tmp_path / "user_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    res = subprocess.run([sys.executable, "-m", "mhd_fast", "run", "--clients", "4", "--rounds", "1",
                          "--steps-per-round", "2", "--model", "module:user_factories:good",
                          "resnet:8", "--out", "out", "--no-progress"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["config"]["model"] == ["module:user_factories:good", "resnet:8"]
