"""A checkpoint after every round, written atomically, that resumes to the same final metrics.

It holds everything the next round reads: the stacked weights and buffers (a module trunk's
BatchNorm statistics), the optimizer state (per
client, elementwise), the training generator, the step counter, the stale exchange buffers
and the public rows they were made on, the teachers' EMA (--teacher-ema), and the metrics so
far. The file is written to a temp file in the same folder and renamed over the old one (``outdir.atomic_write``), so a kill at
any moment leaves either the previous checkpoint or the new one, never half of one. It holds plain tensors and
containers only, so it loads with ``torch.load(weights_only=True)``.

One file per run, whatever the number of processes: every per-client tensor is whole
(clients on the first dimension). A sharded run gathers each process's rows to rank 0, which
writes; a resumed run reads on rank 0 and scatters to each process the rows of its own shard,
which may differ from the shards that wrote it. The stale exchange is saved as what each
client sent (its wire rows, all heads) with the graph it went over; a resumed process routes
those rows again, as the exchange did.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from . import distributed as D
from . import exchange as ex
from .config import Config, to_dict
from .ops import TopKLogits
from .outdir import atomic_write

FILENAME = "checkpoint.pt"
VERSION = 3
# Options that may change between a run and its resumption: they do not change the numbers
# (device, backend, conv and client_chunk agree up to rounding, though random layers draw
# other masks after a change; eval_every picks the rounds measured, and measuring draws
# nothing from training). ``rounds`` may not: it sets the lr schedule.
RESUMABLE_CHANGES = ("progress", "checkpoint", "device", "backend", "conv", "client_chunk",
                     "dist_timeout", "tensorboard", "eval_every")


# ---- this process's part -------------------------------------------------------------------

def _group_ids(sim) -> list[int]:
    """The index in sim.layout (the run's groups) of each of this process's groups."""
    ids = []
    for g in sim.groups:
        first = sim.model_rows.start + g.start
        ids.append(next(i for i, (_, a, b) in enumerate(sim.layout) if a <= first < b))
    return ids


def _cpu(x):
    return x.detach().cpu() if isinstance(x, Tensor) else x


def _own_rows(x: Tensor | TopKLogits | None, rows: slice):
    if x is None:
        return None
    if isinstance(x, TopKLogits):
        return {"values": x.values[rows].cpu(), "indices": x.indices[rows].cpu(),
                "lse": x.lse[rows].cpu()}
    return x[rows].cpu()


def _piece(sim, totals: dict) -> dict:
    """This process's rows of the run state, on the CPU."""
    groups = []
    for gi, g in zip(_group_ids(sim), sim.groups):
        groups.append({"group": gi,
                       "params": {k: p.detach().cpu() for k, p in g.params.items()},
                       "buffers": {k: b.cpu() for k, b in g.buffers.items()},
                       "optimizer": {k: {key: _cpu(v) for key, v in sim.optimizer.state[p].items()}
                                     for k, p in g.params.items() if p in sim.optimizer.state}})
    got = sim.received
    received = None if got is None else {"teacher": _own_rows(got.teacher, got.rows),
                                         "emb": _own_rows(got.emb, got.rows)}
    return {"groups": groups, "received": received, "edge_bytes": totals["edge_bytes"],
            "bytes_cross_rank": sim.bytes_cross_rank}


def _join(parts: list):
    """The same entry of every process, in rank order -> the whole entry: per-client tensors
    are concatenated, a 0-d tensor (Adam's step count, equal everywhere) is taken once."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: _join([p[k] for p in parts]) for k in first}
    if isinstance(first, Tensor) and first.dim() > 0:
        return torch.cat(parts)
    return first


# ---- save ----------------------------------------------------------------------------------

def save(path: str, sim, rounds_done: int, history: list[dict], totals: dict) -> None:
    """Write the state after ``rounds_done`` rounds to ``path`` atomically. Every process
    calls it; rank 0 gathers the rows and writes."""
    pieces = D.gather_objects(_piece(sim, totals), sim.shard, "gathering the checkpoint")
    if pieces is None:
        return
    groups = [_join([{"params": g["params"], "buffers": g["buffers"], "optimizer": g["optimizer"]}
                     for p in pieces for g in p["groups"] if g["group"] == gi])
              for gi in range(len(sim.layout))]
    received = None
    if sim.received is not None:
        received = _join([p["received"] for p in pieces])
        received["graph"] = sim.received.graph.cpu()
    state = {
        "version": VERSION,
        "config": to_dict(sim.cfg),
        "rounds_done": rounds_done,
        "step": sim.step,
        "params": [g["params"] for g in groups],        # per group {name: [N_g, ...]}
        "buffers": [g["buffers"] for g in groups],      # per group {name: [N_g, ...]} (may be {})
        "optimizer": [g["optimizer"] for g in groups],  # per group {name: {state: [N_g, ...]}}
        "generator": sim.gen.get_state(),
        "received": received,
        "public_batch": _cpu(sim.public_batch),
        "teacher_ema": (None if sim.ema is None  # one process only: the whole buffer
                        else {"p": sim.ema.cpu(), "seen": sim.ema_seen.cpu()}),
        "history": history,
        "totals": {"edge_bytes": torch.cat([p["edge_bytes"] for p in pieces]),
                   "bytes_dense": totals["bytes_dense"],
                   "bytes_cross_rank": sum(p["bytes_cross_rank"] for p in pieces)},
    }
    atomic_write(path, lambda f: torch.save(state, f))


# ---- restore -------------------------------------------------------------------------------

def check_compatible(saved: dict, cfg: Config) -> None:
    """ValueError naming the first option whose value differs from the checkpoint's."""
    now = to_dict(cfg)
    for key, value in now.items():
        if key in RESUMABLE_CHANGES:
            continue
        if key not in saved or saved[key] != value:
            raise ValueError(f"--resume: the checkpoint was made with {key} = {saved.get(key)!r}, "
                             f"this run has {key} = {value!r}; use the same options or another --out")


def _load(path: str, cfg: Config) -> dict:
    if not os.path.exists(path):
        raise ValueError(f"--resume: no checkpoint at {path!r} (run without --resume to start)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: torch raises many kinds
        reason = ("the file is empty" if os.path.getsize(path) == 0
                  else str(e).strip().split("\n")[0] or type(e).__name__)
        raise ValueError(f"--resume: cannot read the checkpoint {path!r}: {reason}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise ValueError(f"--resume: {path!r} is not a version-{VERSION} mhd_fast checkpoint")
    check_compatible(state["config"], cfg)
    return state


def _rows(x, rows: range):
    """Rows of a per-client entry, copied (a view would carry its whole storage along)."""
    if isinstance(x, dict):
        return {k: _rows(v, rows) for k, v in x.items()}
    if isinstance(x, Tensor) and x.dim() > 0:
        return x[rows.start:rows.stop].clone()
    return x


def _piece_of(state: dict, sim, rank: int) -> dict:
    """What process ``rank`` of this run's sharding restores."""
    clients = sim.shard.clients_of(rank)
    model_rows = clients if sim.num_model == sim.num_clients else range(sim.num_model)
    groups = []
    for (_, a, b), params, buffers, opt in zip(sim.layout, state["params"], state["buffers"],
                                               state["optimizer"]):
        mine = D.overlap(range(a, b), model_rows)
        if mine:
            groups.append(_rows({"params": params, "buffers": buffers, "optimizer": opt},
                                range(mine.start - a, mine.stop - a)))
    received = state["received"]
    if received is not None:
        received = {"teacher": _rows(received["teacher"], clients),
                    "emb": _rows(received["emb"], clients), "graph": received["graph"]}
    totals = state["totals"]
    return {"rounds_done": state["rounds_done"], "step": state["step"], "groups": groups,
            "generator": state["generator"], "received": received,
            "public_batch": state["public_batch"],
            "teacher_ema": state.get("teacher_ema"),
            "history": state["history"] if rank == 0 else [],
            "totals": {"edge_bytes": _rows(totals["edge_bytes"], clients),
                       "bytes_dense": totals["bytes_dense"]},
            "bytes_cross_rank": totals["bytes_cross_rank"] if rank == 0 else 0}


def restore(path: str, sim) -> tuple[int, list[dict], dict]:
    """Load ``path`` into ``sim`` (weights, optimizer, generator, stale buffers, step) and
    return (rounds done, metrics history, byte totals). Every process calls it; rank 0 reads
    the file and sends each process its rows (its history is [] off rank 0)."""
    shard = sim.shard
    pieces = None
    if shard.lead:
        try:
            state = _load(path, sim.cfg)
            pieces = [_piece_of(state, sim, r) for r in range(shard.world)]
        except ValueError as e:  # every process stops with rank 0's message
            pieces = [str(e)] * shard.world
    piece = D.scatter_objects(pieces, shard, "scattering the checkpoint")
    if isinstance(piece, str):
        raise ValueError(piece)

    saved_state = [saved["optimizer"].get(name) for g, saved in zip(sim.groups, piece["groups"])
                   for name in g.params]
    with torch.no_grad():
        for g, saved in zip(sim.groups, piece["groups"]):
            for name, p in g.params.items():
                p.copy_(saved["params"][name])
            for name, b in g.buffers.items():
                b.copy_(saved["buffers"][name])
    opt = sim.optimizer.state_dict()
    opt["state"] = {i: s for i, s in enumerate(saved_state) if s is not None}
    sim.optimizer.load_state_dict(opt)
    sim.gen.set_state(piece["generator"])
    sim.step = piece["step"]
    sim.public_batch = (piece["public_batch"].to(sim.device)
                        if piece["public_batch"] is not None else None)
    sim.bytes_cross_rank = piece["bytes_cross_rank"]
    if piece["teacher_ema"] is not None:
        sim.ema = piece["teacher_ema"]["p"].to(sim.device)
        sim.ema_seen = piece["teacher_ema"]["seen"].to(sim.device)
    got = piece["received"]
    if got is not None:
        teacher = got["teacher"]
        teacher = (TopKLogits(*(teacher[k].to(sim.device) for k in ("values", "indices", "lse")))
                   if isinstance(teacher, dict) else teacher.to(sim.device))
        emb = got["emb"].to(sim.device) if got["emb"] is not None else None
        graph = got["graph"].to(sim.device)
        sim.received = ex.deliver(teacher, emb, ex.route(graph, shard), sim.heads_sent)
    return piece["rounds_done"], piece["history"], piece["totals"]
