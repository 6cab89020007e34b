"""Measuring a simulation: ``evaluate`` gives every client's private and shared accuracy per
head on the test set and the ensemble's; ``measure_gap`` gives how often the teachers are right
on public rows and how far each head is from the ensemble of the main heads.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import distributed as D
from . import exchange as ex
from . import metrics as M
from . import models
from .simulation import Simulation

# Floats (~128 MB) that one activation of a measurement may hold: evaluate's test rows, and
# measure_gap's clients and rows, go in chunks that keep each tensor under it.
CHUNK_FLOATS = 2**25
# Test rows per call where clients run one at a time (conv loop): one client's activations of
# about a training batch stay in cache. 64 clients on 28x28, 960 rows, one thread: cnn
# 2.9 s at 96 rows a call, 3.7 s at 10, 8.6 s at 1,000; resnet:8 14.2 / 19.4 / 26.5 s.
LOOPED_ROWS = 96


@torch.no_grad()
def evaluate(sim: Simulation, chunk: int | None = None) -> tuple[Tensor | None, Tensor | None, float]:
    """Private [N, H1] and shared [N, H1] accuracy of every client and head on the test set,
    and the shared accuracy of the ensemble of all main heads. Test rows go in chunks so that
    the activations of N clients stay bounded. Each process measures its own clients; the
    accuracies are gathered to rank 0 (None on the other ranks), the ensemble's votes are
    summed over ranks."""
    x_test, y_test = sim.data.x_test, sim.data.y_test
    v = sim.data.num_classes
    per_row = sum(models.forward_floats(g, sim.data.input_shape, sim.num_heads * v)
                  for g in sim.groups)
    if not chunk:
        looped = any(g.loop_conv for g in sim.groups)
        chunk = max(1, min(len(y_test), CHUNK_FLOATS // per_row, LOOPED_ROWS if looped else len(y_test)))
    correct = []
    votes = torch.zeros(len(y_test), v, dtype=torch.float64, device=sim.device)
    for start in range(0, len(y_test), chunk):
        logits, _ = models.forward_groups(sim.groups, x_test[start:start + chunk], shared=True,
                                          num_heads=sim.num_heads, train=False)  # [n, H1, b, V]
        correct.append(logits.argmax(-1) == y_test[start:start + chunk])
        # fp64 sums: the vote does not depend on how the clients are split over ranks
        votes[start:start + chunk] = logits[:, 0].float().softmax(-1).sum(0, dtype=torch.float64)
    D.all_sum(votes, sim.shard, "the ensemble's votes")
    correct = torch.cat(correct, dim=-1)
    if sim.num_model != sim.num_clients:  # centralized: one model, judged on every client's label mix
        correct = correct.expand(sim.num_clients, *correct.shape[1:])
    private, shared = M.private_shared(correct, y_test, sim.label_dist)
    ensemble = float((votes.argmax(-1) == y_test).double().mean())  # sync: one scalar
    parts = D.gather_objects((private, shared), sim.shard, "gathering the accuracies")
    if parts is None:
        return None, None, ensemble
    return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts]), ensemble


# Public rows the gap to the ensemble is measured on each round: a fixed sample (the public
# rows are in random order), large enough for a stable mean, small next to a round's steps.
GAP_ROWS = 512


@torch.no_grad()
def measure_gap(sim: Simulation, r: int) -> dict:
    """``metrics.gap_record`` of round r: the predictions of every client on the first GAP_ROWS
    public rows, their exchange over the round's graph (dense fp32, fresh: the teachers a
    refresh would give now, or their EMA with --teacher-ema) and the targets the aux heads
    would get from it, against the rows' labels, and each head against the ensemble of all main heads. Counts are summed over
    ranks; every rank returns the record."""
    rows = sim.public_rows[:GAP_ROWS]
    y = sim.data.y_train[rows]
    # clients in chunks, as evaluate's test rows
    widest = max(models.activation_floats(g.arch, sim.data.input_shape,
                                          sim.num_heads * sim.data.num_classes) for g in sim.groups)
    # eval mode, as evaluate: a measurement updates no BatchNorm statistics, draws no dropout
    logits, _ = models.forward_groups(sim.groups, sim.data.x_train[rows], shared=True,
                                      num_heads=sim.num_heads, train=False,
                                      chunk=max(1, CHUNK_FLOATS // (len(rows) * widest)))  # [n, H1, B, V]
    votes = logits[:, 0].float().softmax(-1).sum(0, dtype=torch.float64)
    D.all_sum(votes, sim.shard, "the ensemble's votes on public rows")
    ens = votes.argmax(-1)
    pred = logits.argmax(-1)
    g = sim.num_heads - 1
    hits = torch.zeros(g, dtype=torch.int64, device=sim.device)
    teachers = torch.zeros((), dtype=torch.int64, device=sim.device)
    if g > 0 and sim.num_model == sim.num_clients:
        adj = sim.schedule(r).to(sim.device)
        got = ex.exchange(logits, None, ex.route(adj, sim.shard), heads=list(range(g)),
                          tau=sim.cfg.tau, backend=sim.cfg.backend)
        if sim.ema is not None:  # the smoothed teachers of the rows drawn so far
            seen = sim.ema_seen[:len(rows)][:, None]
            got.teacher = torch.where(seen, sim.cfg.tau * sim.ema[:, :, :len(rows)].log(),
                                      got.teacher)
        # rows in chunks: the reference holds [M, M, G, rows] tensors
        step = max(1, CHUNK_FLOATS // (got.adj.shape[0] ** 2 * g))
        parts = [M.teacher_hits(got.teacher[:, :-1, s:s + step], got.adj, y[s:s + step],
                                tau=sim.cfg.tau, include_self=sim.cfg.include_self,
                                aggregate=sim.cfg.aggregate) for s in range(0, len(y), step)]
        right, has = sum(p[0] for p in parts), parts[0][1]
        hits, teachers = right[got.rows].sum(0), has[got.rows].sum()
    # every rank holds the whole ensemble: rank 0 alone counts its hits
    counts = torch.cat([hits, teachers[None], (pred == y).sum((0, 2)), (pred == ens).sum((0, 2)),
                        (ens == y).sum()[None] * int(sim.shard.lead)])
    D.all_sum(counts, sim.shard, "the gap counts")
    counts = counts.cpu()  # sync: one small vector a round
    h1 = sim.num_heads
    return M.gap_record(counts[:g], int(counts[g]), counts[g + 1:g + 1 + h1],
                        counts[g + 1 + h1:g + 1 + 2 * h1], int(counts[-1]), len(rows),
                        sim.num_model)
