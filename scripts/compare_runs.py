"""Compare an MHD run with an isolated run (two metrics.json files) and check the claim:
the best aux head's mean shared accuracy at least --min-gain points above isolated head 0's,
and MHD head 0's mean private accuracy within --max-private-drop points of isolated's.

    python scripts/compare_runs.py MHD/metrics.json ISOLATED/metrics.json [--out result.md]

Prints a Markdown table (and writes it to --out); exits 1 when the claim does not hold.
"""
from __future__ import annotations

import argparse
import json
import sys

from mhd_fast.metrics import atomic_write, best_aux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mhd")
    p.add_argument("isolated")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--min-gain", type=float, default=15.0, help="points (default: 15)")
    p.add_argument("--max-private-drop", type=float, default=2.0, help="points (default: 2)")
    args = p.parse_args(argv)
    with open(args.mhd) as f:
        mhd = json.load(f)
    with open(args.isolated) as f:
        iso = json.load(f)
    fm, fi = mhd["final"], iso["final"]
    head, aux_shared = best_aux(fm["shared_acc"])
    iso_shared, iso_private = fi["shared_acc"]["head0"], fi["private_acc"]["head0"]
    gain = 100 * (aux_shared - iso_shared)
    drop = 100 * (iso_private - fm["private_acc"]["head0"])
    cfg = mhd["config"]
    seconds = {name: sum(r["time_s"] for r in m["rounds"]) for name, m in (("mhd", mhd), ("isolated", iso))}
    lines = [
        f"{cfg['dataset']}, {cfg['clients']} clients, partition {cfg['partition']} "
        f"(skew {cfg['skew']}), graph {cfg['graph']}, model {' + '.join(cfg['model'])}, "
        f"{cfg['heads']} aux heads, {cfg['rounds']} rounds x {cfg['steps_per_round']} steps, seed {cfg['seed']}",
        "",
        "| run | head | mean private acc | mean shared acc | worst-10% shared |",
        "|---|---|---|---|---|",
    ]
    for name, fin in (("isolated", fi), ("mhd", fm)):
        for h in fin["shared_acc"]:
            lines.append(f"| {name} | {h} | {fin['private_acc'][h]:.4f} | {fin['shared_acc'][h]:.4f} | "
                         f"{fin['worst10_shared_acc'][h]:.4f} |")
    ok_gain = gain >= args.min_gain
    ok_private = drop <= args.max_private_drop
    lines += [
        "",
        f"- best aux head ({head}) shared accuracy {aux_shared:.4f} vs isolated {iso_shared:.4f}: "
        f"{gain:+.1f} points (claim: >= +{args.min_gain:g}) {'OK' if ok_gain else 'MISSED'}",
        f"- head0 private accuracy {fm['private_acc']['head0']:.4f} vs isolated {iso_private:.4f}: "
        f"{-drop:+.1f} points (claim: within {args.max_private_drop:g}) {'OK' if ok_private else 'MISSED'}",
        f"- training time: mhd {seconds['mhd']:.0f} s, isolated {seconds['isolated']:.0f} s; "
        f"mhd sent {fm['bytes_sent'] / 1e9:.2f} GB over all edges",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write(args.out, text)
    return 0 if ok_gain and ok_private else 1


if __name__ == "__main__":
    sys.exit(main())
