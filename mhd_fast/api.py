"""``simulate``: the simulator as a Python function, for scripts and notebooks.

    metrics = mhd_fast.simulate(clients=8, rounds=5, heads=2, model="mlp:64",
                                on_round=lambda r, rec: print(r, rec["shared_acc"]))

The options are the fields of ``config.Config`` (the flags of ``mhd-fast run`` with ``_``
for ``-``), checked as the command checks them; the result is what metrics.json holds.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from . import config as C


def simulate(*, out: str | os.PathLike | None = None, resume: bool = False,
             on_round: Callable[[int, dict], object] | None = None, **options) -> dict | None:
    """Train and evaluate one run; return its metrics, the content of metrics.json:
    "status" ("finished", or "diverged" when a round's loss or weights were not finite),
    "config" (every option, resolved), "rounds" (one record per round: accuracies per head,
    worst-10 %, loss sums per term, bytes, time) and "final" (a finished run) or "diverged"
    (the round and what was not finite).

    options: Config fields by name, e.g. ``clients=8, model=["mlp:64", "cnn:8x16-32"],
        graph="ring", graph_options={"k": 2}``; an unknown name or a bad value raises
        ValueError naming the option, before any work.
    out: None (default) writes no file at all: no lock, checkpoint, report or plots (a
        ``tensorboard`` folder, when given, is still written). A folder: what
        ``mhd-fast run --out PATH`` writes there, checkpoint included.
    resume: continue the run whose checkpoint is in ``out`` (``mhd-fast run --resume``).
    on_round: called as ``on_round(round, record)`` after each round (0-based), with the
        record that metrics["rounds"] gets (no accuracies in a round that ``eval_every``
        skips); an exception it raises ends the run (the round's checkpoint is written first).

    Under torchrun, the processes other than rank 0 return None. The caller's global state
    (torch's RNG, the environment, the thread count, torch's defaults) is left as it was.
    """
    unknown = sorted(set(options) - set(C.FIELDS))
    if unknown:
        raise ValueError(f"simulate() got an unknown option {unknown[0]!r}; the options are "
                         f"out, resume, on_round and {', '.join(C.FIELDS)}")
    if on_round is not None and not callable(on_round):
        raise ValueError(f"on_round must be a function (round, record) or None, got {on_round!r}")
    if not isinstance(resume, bool):
        raise ValueError(f"resume must be True or False, got {resume!r}")
    if out is None:
        if resume:
            raise ValueError("resume=True needs out, the folder of the checkpoint to resume from")
        if options.get("checkpoint"):
            raise ValueError("checkpoint=True needs out: with out=None simulate writes no file")
    else:
        if not isinstance(out, (str, os.PathLike)):
            raise ValueError(f"out must be a folder path or None, got {out!r}")
        options["out"] = os.fspath(out)
    cfg = C.load(None, options, source="simulate()")
    if out is None:
        cfg = dataclasses.replace(cfg, out=None, checkpoint=False)
    from .train import run  # torch loads here, not when mhd_fast is imported
    return run(cfg, resume=resume, on_round=on_round)
