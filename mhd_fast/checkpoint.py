"""A checkpoint after every round, written atomically, that resumes to the same final metrics.

It holds everything the next round reads: the stacked weights, the optimizer state (per
client, elementwise), the training generator, the step counter, the stale exchange buffers
and the public rows they were made on, and the metrics so far. The file is written to a temp
file in the same folder and renamed over the old one, so a kill at any moment leaves either
the previous checkpoint or the new one, never half of one. It holds plain tensors and
containers only, so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os

import torch

from .config import Config, to_dict
from .exchange import Received
from .ops.api import TopKLogits

FILENAME = "checkpoint.pt"
VERSION = 1
# Options that may change between a run and its resumption: they do not change the numbers
# (device and backend agree up to rounding). ``rounds`` may not: it sets the lr schedule.
RESUMABLE_CHANGES = ("progress", "checkpoint", "device", "backend")


def _received_state(got: Received | None) -> dict | None:
    if got is None:
        return None
    teacher = got.teacher
    state = {"adj": got.adj, "edge_bytes": got.edge_bytes, "dense_edge_bytes": got.dense_edge_bytes,
             "emb": got.emb}
    if isinstance(teacher, TopKLogits):
        state.update(values=teacher.values, indices=teacher.indices, lse=teacher.lse)
    else:
        state["logits"] = teacher
    return state


def _received_from(state: dict | None) -> Received | None:
    if state is None:
        return None
    teacher = (TopKLogits(state["values"], state["indices"], state["lse"])
               if "values" in state else state["logits"])
    return Received(teacher, state["emb"], state["adj"], state["edge_bytes"],
                    state["dense_edge_bytes"])


def save(path: str, sim, rounds_done: int, history: list[dict], totals: dict) -> None:
    """Write the state after ``rounds_done`` rounds to ``path`` atomically."""
    state = {
        "version": VERSION,
        "config": to_dict(sim.cfg),
        "rounds_done": rounds_done,
        "step": sim.step,
        "params": [g.params for g in sim.groups],
        "optimizer": sim.optimizer.state_dict(),
        "generator": sim.gen.get_state(),
        "received": _received_state(sim.received),
        "public_batch": sim.public_batch,
        "history": history,
        "totals": totals,
    }
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_compatible(saved: dict, cfg: Config) -> None:
    """ValueError naming the first option whose value differs from the checkpoint's."""
    now = to_dict(cfg)
    for key, value in now.items():
        if key in RESUMABLE_CHANGES:
            continue
        if key not in saved or saved[key] != value:
            raise ValueError(f"--resume: the checkpoint was made with {key} = {saved.get(key)!r}, "
                             f"this run has {key} = {value!r}; use the same options or another --out")


def restore(path: str, sim) -> tuple[int, list[dict], dict]:
    """Load ``path`` into ``sim`` (weights, optimizer, generator, stale buffers, step) and
    return (rounds done, metrics history, byte totals)."""
    if not os.path.exists(path):
        raise ValueError(f"--resume: no checkpoint at {path!r} (run without --resume to start)")
    try:
        state = torch.load(path, map_location=sim.device, weights_only=True)
    except Exception as e:  # any unreadable file: torch raises many kinds
        raise ValueError(f"--resume: cannot read the checkpoint {path!r}: {e}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError(f"--resume: {path!r} is not a version-{VERSION} mhd_fast checkpoint")
    check_compatible(state["config"], sim.cfg)
    with torch.no_grad():
        for group, saved in zip(sim.groups, state["params"]):
            for name, p in group.params.items():
                p.copy_(saved[name])
    sim.optimizer.load_state_dict(state["optimizer"])
    sim.gen.set_state(state["generator"].cpu())
    sim.step = state["step"]
    sim.received = _received_from(state["received"])
    sim.public_batch = state["public_batch"]
    totals = state["totals"]
    totals["edge_bytes"] = totals["edge_bytes"].cpu()
    return state["rounds_done"], state["history"], totals
