"""The sweep: grid expansion (variants, axes, dedup, names), --quick, input errors, and running:
finished runs skipped, a run killed mid-way resumed to the same numbers, the summary."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mhd_fast import outdir, summary, sweep, train

TINY = """
seeds = [0, 1]
[base]
dataset = "digits"
clients = 4
rounds = 2
steps_per_round = 2
batch_size = 8
public_batch_size = 8
model = ["mlp:16"]
heads = 2
"""


def write(tmp_path, text: str, name: str = "sweep.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def plan_of(tmp_path, text: str, **kw) -> sweep.Plan:
    return sweep.load_plan(write(tmp_path, text), str(tmp_path / "out"), **kw)


# ---- expansion -----------------------------------------------------------------------------

def test_grid_is_the_cartesian_product_of_its_axes(tmp_path):
    plan = plan_of(tmp_path, TINY + """
        [grid.g]
        graph = ["ring", "complete"]
        topk = [0, 2, 3]
        tau = 2.0
    """)
    assert len(plan.runs) == 6
    assert len(plan.jobs()) == 12  # x 2 seeds
    names = {r.name for r in plan.runs}
    assert "graph=ring,tau=2.0,topk=2" in names
    assert "graph=complete,tau=2.0,topk=0" in names
    cfg = plan.config(next(r for r in plan.runs if r.name == "graph=ring,tau=2.0,topk=3"), 1)
    assert (cfg.graph, cfg.topk, cfg.tau, cfg.seed, cfg.clients) == ("ring", 3, 2.0, 1, 4)
    assert cfg.out == os.path.join(str(tmp_path / "out"), "graph=ring,tau=2.0,topk=3", "s1")


def test_points_equal_to_base_share_one_run_named_base(tmp_path):
    plan = plan_of(tmp_path, TINY + """
        [grid.a]
        heads = [1, 2]
        [grid.b]
        graph = ["complete", "ring"]
    """)
    assert [r.name for r in plan.runs] == ["heads=1", "base", "graph=ring"]
    base = plan.runs[1]
    assert [g for g, _ in base.points] == ["a", "b"]


def test_points_that_resolve_alike_are_one_run(tmp_path):
    # isolated drops the aux heads: heads = 1 and 2 are one run, named with the resolved value
    plan = plan_of(tmp_path, TINY + """
        [grid.methods]
        method = ["isolated", "mhd"]
        heads = [1, 2]
    """)
    assert [r.name for r in plan.runs] == ["heads=0,method=isolated", "heads=1,method=mhd", "base"]
    iso = plan.runs[0]
    assert len(iso.points) == 1  # listed once in its grid
    assert plan.config(iso, 0).heads == 0
    assert (plan.settings(iso).method, plan.settings(iso).heads) == ("isolated", 0)


def test_a_key_that_implies_the_partition_names_it(tmp_path):
    # dirichlet = 0.1 is the default value, yet it switches the partition: not base
    plan = plan_of(tmp_path, TINY + """
        [grid.d]
        dirichlet = [0.1, 1.0]
    """)
    names = [r.name for r in plan.runs]
    assert names == ["dirichlet=0.1,partition=dirichlet", "dirichlet=1.0,partition=dirichlet"]
    assert all(plan.config(r, 0).partition == "dirichlet" for r in plan.runs)


def test_model_axis_is_a_list_of_lists_and_a_flat_list_is_one_value(tmp_path):
    plan = plan_of(tmp_path, TINY + """
        [grid.axis]
        model = [["mlp:8"], ["mlp:8", "mlp:16x8"]]
        [grid.one]
        model = ["mlp:8", "mlp:16x8"]
    """)
    assert [r.name for r in plan.runs] == ["model=mlp:8", "model=mlp:8+mlp:16x8"]
    assert [g for g, _ in plan.runs[1].points] == ["axis", "one"]
    assert plan.config(plan.runs[1], 0).model == ["mlp:8", "mlp:16x8"]


def test_variants_repeat_the_grid_in_their_own_folders(tmp_path):
    plan = plan_of(tmp_path, TINY + """
        [variants.small]
        clients = 3
        [variants.big]
        clients = 5
        [grid.g]
        heads = [1, 2]
    """)
    assert [r.folder for r in plan.runs] == [os.path.join("small", "heads=1"),
                                             os.path.join("small", "base"),
                                             os.path.join("big", "heads=1"),
                                             os.path.join("big", "base")]
    assert [plan.config(r, 0).clients for r in plan.runs] == [3, 3, 5, 5]
    assert plan.config(plan.runs[3], 1).name == "big-base-s1"


def test_quick_merges_tables_and_selects_variants(tmp_path):
    text = TINY + """
        [variants.a]
        clients = 3
        [variants.b]
        clients = 5
        [grid.g]
        heads = [1, 2]
        [quick]
        seeds = [7]
        variants = ["b"]
        [quick.base]
        rounds = 1
        [quick.grid.g]
        heads = [1]
    """
    plan = plan_of(tmp_path, text, quick=True)
    assert plan.seeds == (7,)
    assert [r.folder for r in plan.runs] == [os.path.join("b", "heads=1")]
    cfg = plan.config(plan.runs[0], 7)
    assert (cfg.rounds, cfg.heads, cfg.clients) == (1, 1, 5)
    # without --quick the file is unchanged
    assert len(plan_of(tmp_path, text).runs) == 4


@pytest.mark.parametrize("text, match", [
    ("[grid.g]\nheads = [1]\nbogus = 3\n", "unknown key 'bogus'"),
    ("[grid.g]\nheads = []\n", "axis 'heads' is an empty list"),
    ("[grid.g]\nskew = [0.5, 2.0]\n", r"--skew must be in \[0, 1\], got 2.0"),
    ("[grid.g]\nheads = ['two']\n", "heads .* must be int"),
    ("[grid.g]\nseed = [1, 2]\n", "the sweep sets"),
    ("[variants.x]\nout = 'elsewhere'\n[grid.g]\nheads = [1]\n", "the sweep sets"),
    ("", "no \\[grid.NAME\\] table"),
])
def test_bad_files_are_value_errors_naming_the_problem(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        plan_of(tmp_path, TINY + text)


@pytest.mark.parametrize("text, match", [
    ('seeds = "0"\n[grid.g]\nheads = [1]\n', "seeds must be a non-empty list"),
    ("seeds = [1, 1]\n[grid.g]\nheads = [1]\n", "seeds must not repeat"),
    ("whatever = 1\n[grid.g]\nheads = [1]\n", "unknown top-level key"),
    ("[base]\nwhatever = 1\n[grid.g]\nheads = [1]\n", "unknown key 'whatever' in \\[base\\]"),
])
def test_bad_top_level(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        plan_of(tmp_path, text)


def test_quick_errors(tmp_path):
    with pytest.raises(ValueError, match="no \\[quick\\] table"):
        plan_of(tmp_path, TINY + "[grid.g]\nheads = [1]\n", quick=True)
    with pytest.raises(ValueError, match="names no grid"):
        plan_of(tmp_path, TINY + "[grid.g]\nheads = [1]\n[quick.grid.h]\nheads = 1\n", quick=True)
    with pytest.raises(ValueError, match="must name some of"):
        plan_of(tmp_path, TINY + "[grid.g]\nheads = [1]\n[quick]\nvariants = ['zz']\n", quick=True)


def test_cli_bad_input_is_one_line_and_status_2(tmp_path, capsys):
    assert sweep.main([str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mhd-fast: error: CONFIG: cannot read") and err.count("\n") == 1
    assert sweep.main([write(tmp_path, "[grid.g]\nclients = [0]\n"), "--out", str(tmp_path)]) == 2
    assert "--clients must be >= 1" in capsys.readouterr().err
    assert sweep.main([write(tmp_path, TINY + "[grid.g]\nheads = [1]\n"), "--jobs", "0",
                       "--out", str(tmp_path / "o")]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err


# ---- running -------------------------------------------------------------------------------

def finals(plan: sweep.Plan) -> dict:
    out = {}
    for run, seed in plan.jobs():
        with open(os.path.join(plan.config(run, seed).out, "metrics.json")) as f:
            m = json.load(f)
        out[(run.name, seed)] = (m["final"], [r["shared_acc"] for r in m["rounds"]])
    return out


SMALL_GRID = TINY + """
[grid.g]
heads = [1, 2]
"""


def test_run_skip_and_summary(tmp_path):
    plan = plan_of(tmp_path, SMALL_GRID)
    first = sweep.run_plan(plan, progress=False, threads=1)
    assert (first["ran"], first["skipped"]) == (4, 0)
    again = sweep.run_plan(plan, progress=False, threads=1)
    assert (again["ran"], again["skipped"]) == (0, 4)

    rows = summary.load_summary(plan.out)
    assert [(r["grid"], r["run"], r["seeds"]) for r in rows] == [("g", "heads=1", [0, 1]),
                                                                ("g", "base", [0, 1])]
    done = finals(plan)
    st = rows[1]["metrics"]["shared_acc.head2"]
    values = [done[("base", s)][0]["shared_acc"]["head2"] for s in (0, 1)]
    assert st["values"] == values
    assert st["mean"] == pytest.approx(sum(values) / 2)
    assert st["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert rows[1]["dirs"] == [os.path.join("base", "s0"), os.path.join("base", "s1")]
    assert "shared_acc.head2" not in rows[0]["metrics"]  # heads = 1 has no head 2
    with open(os.path.join(plan.out, "summary.csv")) as f:
        table = list(csv.DictReader(f))
    assert [t["run"] for t in table] == ["heads=1", "base"]
    assert float(table[1]["shared_acc.head2_mean"]) == pytest.approx(st["mean"], rel=1e-5)
    assert table[0]["shared_acc.head2_mean"] == ""
    text = summary.format_table(rows)
    assert "heads=1" in text and "±" in text


def test_a_killed_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    whole = plan_of(tmp_path, SMALL_GRID)
    sweep.run_plan(whole, progress=False, threads=1)

    # The same sweep elsewhere, killed during the second round of its third run: the first
    # two runs are finished, the third has the checkpoint of round 1 and no metrics.json.
    killed = sweep.load_plan(write(tmp_path, SMALL_GRID), str(tmp_path / "killed"))
    calls = {"n": 0}
    real = train.evaluate

    def dying(sim, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 2:  # rounds = 2 per run: the 2nd evaluation of the 3rd run
            raise KeyboardInterrupt
        return real(sim, *a, **kw)

    monkeypatch.setattr(train, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_plan(killed, progress=False, threads=1)
    monkeypatch.setattr(train, "evaluate", real)
    states = [sweep.status(killed.config(r, s)) for r, s in killed.jobs()]
    assert states == ["done", "done", "resume", "new"]

    result = sweep.run_plan(killed, progress=False, threads=1)
    assert (result["ran"], result["skipped"]) == (2, 2)
    assert finals(killed) == finals(whole)


def test_a_folder_of_another_run_is_an_error(tmp_path):
    plan = plan_of(tmp_path, TINY + "[grid.g]\nheads = [2]\n")
    sweep.run_plan(plan, progress=False, threads=1)
    other = sweep.load_plan(write(tmp_path, TINY.replace("clients = 4", "clients = 5")
                                  + "[grid.g]\nheads = [2]\n"), plan.out)
    with pytest.raises(ValueError, match="holds a run made with clients = 4"):
        sweep.run_plan(other, progress=False, threads=1)


def test_parallel_jobs_match_one_job(tmp_path):
    text = TINY.replace("seeds = [0, 1]", "seeds = [0]") + "[grid.g]\nheads = [1, 2]\n"
    one = sweep.load_plan(write(tmp_path, text), str(tmp_path / "one"))
    two = sweep.load_plan(write(tmp_path, text), str(tmp_path / "two"))
    sweep.run_plan(one, progress=False, threads=1)
    assert sweep.run_plan(two, jobs=2, threads=1, progress=False)["ran"] == 2
    assert finals(two) == finals(one)


def test_mean_std():
    assert summary.mean_std([1.0]) == (1.0, None)
    m, s = summary.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)


def test_an_error_found_with_the_data_names_the_run(tmp_path, capsys):
    # topk > classes is only known once the dataset is loaded
    path = write(tmp_path, TINY + "[grid.g]\ntopk = [11]\n")
    assert sweep.main([path, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mhd-fast: error: run topk=11-s0: --topk must be <=") and err.count("\n") == 1


def test_cli_sweep_subcommand_reports_bad_file(tmp_path, capsys):
    from mhd_fast.cli import main
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CONFIG" in err[0] and "missing.toml" in err[0]


def test_a_sweep_checks_every_run_with_its_data_before_the_first(tmp_path, capsys):
    path = write(tmp_path, TINY.replace("seeds = [0, 1]", "seeds = [0]")
                 + "[grid.g]\ntopk = [2, 11]\n")
    out = tmp_path / "o"
    assert sweep.main([path, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mhd-fast: error: run topk=11-s0: --topk must be <=") and err.count("\n") == 1
    assert not out.exists()  # topk = 2 did not run first


def test_a_second_sweep_on_the_same_out_is_refused(tmp_path):
    plan = plan_of(tmp_path, SMALL_GRID)
    with outdir.claim(plan.out, what="sweep"):  # as another sweep process holds it
        with pytest.raises(ValueError, match="is in use by another sweep"):
            sweep.run_plan(plan, progress=False, threads=1)
    assert os.listdir(plan.out) == [outdir.LOCK]  # no run started


def test_a_sweep_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "s.toml"
    path.write_bytes(b"seeds = [0]\n# \xff\n")
    with pytest.raises(ValueError, match=r"^CONFIG: .*s.toml' is not UTF-8 text \(byte 14"):
        sweep.load_plan(str(path))


def test_diverged_runs_are_reported_and_not_run_again(tmp_path, capsys):
    text = TINY.replace("seeds = [0, 1]", "seeds = [0]").replace(
        'heads = 2', 'heads = 2\noptimizer = "sgd"') + "[grid.g]\nlr = [0.01, 1e30]\n"
    path, out = write(tmp_path, text), str(tmp_path / "o")
    for _ in range(2):  # the second time both are known: nothing runs, the divergence stays
        assert sweep.main([path, "--out", out, "--no-progress"]) == 3
        std = capsys.readouterr()
        assert std.err == ('mhd-fast: 1 run(s) diverged (status "diverged" in their metrics.json): '
                           f"{os.path.join('lr=1e+30', 's0')}\n")
    assert "0 run(s) made, 2 already done" in std.out
    rows = {r["run"]: r for r in summary.load_summary(out)}
    assert rows["lr=1e+30"]["diverged"] == [0] and rows["lr=1e+30"]["seeds"] == []
    assert rows["lr=1e+30"]["metrics"] == {}
    assert rows["lr=0.01"]["diverged"] == [] and rows["lr=0.01"]["seeds"] == [0]
    with open(os.path.join(out, "summary.csv")) as f:
        table = {t["run"]: t for t in csv.DictReader(f)}
    assert (table["lr=1e+30"]["n_seeds"], table["lr=1e+30"]["n_diverged"]) == ("0", "1")


def _children(pid: int) -> set[int]:
    """Every process whose parent is ``pid`` (Linux /proc)."""
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
@pytest.mark.parametrize("how", ["SIGKILL", "Ctrl-C"])  # SIGTERM ends the sweep as SIGKILL does
def test_workers_end_with_the_sweep(tmp_path, how):
    text = TINY.replace("rounds = 2", "rounds = 100000").replace("steps_per_round = 2",
                                                                 "steps_per_round = 1")
    path, out = write(tmp_path, text + "[grid.g]\nheads = [1, 2]\n"), tmp_path / "o"
    # SIGINT as a terminal leaves it: a shell's background job (CI's, say) starts ignoring it
    proc = subprocess.Popen([sys.executable, "-m", "mhd_fast", "sweep", path, "--out", str(out),
                             "--jobs", "2", "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        ckpts = [out / name / f"s{s}" / "checkpoint.pt" for name in ("heads=1", "base") for s in (0, 1)]
        while sum(c.exists() for c in ckpts) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert sum(c.exists() for c in ckpts) == 2, "the workers did not start training"
        workers = {p for p in _children(proc.pid) if _alive(p)}
        assert len(workers) >= 2
        if how == "Ctrl-C":  # the terminal sends SIGINT to the whole foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, how))
        proc.wait(timeout=30)
        deadline = time.time() + 10
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if _alive(p)], f"workers left running after {how}"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
