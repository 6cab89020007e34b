"""One Markdown table over runs of several methods (their metrics.json files): head 0's mean
private accuracy, head 0's and the best head's mean shared accuracy, the ensemble of main heads,
and the training time (the rounds' time, evaluation excluded).

    python scripts/method_table.py RUN/metrics.json ... [--out result.md]
"""
from __future__ import annotations

import argparse
import json

from mhd_fast.outdir import atomic_write


def row(path: str) -> str:
    with open(path) as f:
        m = json.load(f)
    fin = m["final"]
    best = max(fin["shared_acc"], key=fin["shared_acc"].get)
    train_s = sum(r["time_s"] for r in m["rounds"])
    return (f"| {m['config']['method']} | {100 * fin['private_acc']['head0']:.1f} | "
            f"{100 * fin['shared_acc']['head0']:.1f} | {100 * fin['shared_acc'][best]:.1f} ({best}) | "
            f"{100 * fin['ensemble_shared_acc']:.1f} | {train_s:.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", nargs="+", help="metrics.json of each run")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    lines = ["| method | private head 0 | shared head 0 | shared, best head | ensemble of main heads "
             "| training s |", "|---|---|---|---|---|---|", *(row(m) for m in args.metrics)]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        atomic_write(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
