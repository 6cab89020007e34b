"""The quick study end to end: `python scripts/study.py --quick` runs the [quick] sweep of
configs/study.toml (digits, tiny sizes) and writes RESULTS.md with every section, parseable
numbers and its plots. It runs in CI, so the quick sizes keep it to a minute or two."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from mhd_fast.data import FASHION_MNIST_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("## Findings", "## 1. Number of aux heads", "## 2. Data heterogeneity",
            "## 3. Topology", "## 4. Model heterogeneity", "## 5. Communication",
            "## 6. Baselines", "## 7. Teacher aggregation")
PLOTS = ("heads", "skew", "topology", "models", "comm", "baselines", "aggregate")
CELL = re.compile(r"^-?\d+(\.\d+)?( ± \d+(\.\d+)?)?$")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    results = out / "RESULTS.md"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--quick", "--no-progress",
           "--out", str(out / "runs"), "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, results.read_text()


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table of the page: rows of cells, header first, separator dropped."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def test_every_section_and_the_command_that_made_it(quick):
    _, text = quick
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    for part in text.split("\n## ")[2:]:  # every experiment names its command and grid
        assert "Made by `python scripts/study.py --quick`" in part
        assert "One point, one seed: `mhd-fast run " in part
    # the single-run commands are real: the CLI parses and validates them
    from mhd_fast import cli, config

    for flags in re.findall(r"`mhd-fast run ([^`]*)`", text):
        args = cli.build_parser().parse_args(["run", *flags.split()])
        config.load(None, cli._flags(args))
    findings = text.split("## Findings")[1].split("\n## ")[0]
    assert len([l for l in findings.splitlines() if l.startswith("- ")]) >= 7


def test_table_numbers_parse_and_are_accuracies(quick):
    _, text = quick
    found = tables(text)
    assert len(found) >= 7
    accuracies = 0
    for table in found:
        header, *rows = table
        assert rows, header
        for row in rows:
            assert len(row) == len(header)
            for name, cell in zip(header, row):
                if "shared" in name or "private" in name:
                    if cell in ("", "-"):
                        continue  # a head the run does not have
                    assert CELL.match(cell), (name, cell)
                    m = float(cell.split(" ± ")[0])
                    assert 0 <= m <= 100
                    accuracies += 1
    assert accuracies > 50


def test_plots_exist_and_are_png(quick):
    out, text = quick
    for name in PLOTS:
        path = out / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name}.png)" in text


def test_rerun_skips_the_finished_runs(quick):
    out, _ = quick
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--quick",
                           "--no-progress", "--report-only", "--out", str(out / "runs"),
                           "--results", str(out / "again.md")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## 7. Teacher aggregation" in (out / "again.md").read_text()


def test_gap_study_adds_section_8_and_the_study_keeps_it(quick):
    """scripts/gap_study.py --quick: section 8 after sections 1-7, numbers that parse, its
    plots; rewriting sections 1-7 (study.py) keeps it, and a second gap study replaces it."""
    out, _ = quick
    page = out / "gap.md"
    page.write_text((out / "RESULTS.md").read_text())
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "gap_study.py"), "--quick",
           "--no-progress", "--out", str(out / "gap"), "--results", str(page)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = page.read_text()
    assert text.index("## 7. Teacher aggregation") < text.index("## 8. The gap")
    gap = text.split("## 8. The gap")[1]
    assert "Made by `python scripts/gap_study.py --quick`" in gap
    for flags in re.findall(r"`mhd-fast run ([^`]*)`", gap):
        from mhd_fast import cli, config

        config.load(None, cli._flags(cli.build_parser().parse_args(["run", *flags.split()])))
    found = tables(gap)
    assert found
    for header, *rows in found:
        for row in rows:
            for name, cell in zip(header, row):
                if name in ("best aux", "ensemble", "agree") or (name == "teacher" and cell != "-"):
                    assert CELL.match(cell), (name, cell)
    for name in re.findall(r"\(plots/(gap_[a-z_]+)\.png\)", gap):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    proc = subprocess.run(cmd + ["--report-only"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert page.read_text().count("## 8. The gap") == 1
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "study.py"), "--quick",
                           "--no-progress", "--report-only", "--out", str(out / "runs"),
                           "--results", str(page)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = page.read_text()
    assert "## 7. Teacher aggregation" in again and again.count("## 8. The gap") == 1


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason="needs Fashion-MNIST (Debian's dataset-fashion-mnist)")
def test_the_cnn_study_writes_section_9_with_findings_from_its_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "study_cnn.py"), "--quick",
                           "--no-progress", "--out", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "runs" / "RESULTS.md").read_text()
    assert "## 9. Baselines at a larger scale: 8 clients, cnn:8x16-32 on Fashion-MNIST" in text
    final = tables(text)[0]
    assert [row[0] for row in final[1:]] == ["mhd", "mean_distill", "fedavg", "isolated", "centralized",
                                             "mhd, aggregate mean"]
    assert all(CELL.match(c) for row in final[1:] for c in row[1:3])
    # one seed, one measured round (the quick runs measure after their last round only)
    counts = re.findall(r"- (mhd[^:]*): head 1's teacher .* less often than the ensemble's vote in "
                        r"(\d) of (\d) \(seed, round\) cases", text)
    assert [c[0] for c in counts] == ["mhd", "mhd, aggregate mean"]
    assert all(int(c[1]) <= int(c[2]) == 1 for c in counts)
    assert "With the neighbours' mean as the teacher (`--aggregate mean`)" in text
    assert re.search(r"Isolated training has (not )?converged|MHD's best aux head", text)

