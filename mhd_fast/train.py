"""The simulator: decentralized MHD training of all clients at once, round by round.

Reads top to bottom: ``train_round`` runs the local steps of one round (private CE step,
predictions on the public batch, exchange over the graph, the fused distillation loss, one
optimizer step for all clients); ``run`` loops over rounds with a checkpoint after each and
writes the outputs. ``simulation.setup`` builds what a run holds (data, clients, graph,
models) and ``evaluate`` measures private and shared accuracy. A round whose loss or weights are not finite
stops the run ("diverged"): its state is not saved, so the last checkpoint stays the last
finite state.

One step, for all N clients at once (the loss is the SUM over clients of each client's own
loss, so each client's gradient is its own):
    L_i = CE(head 0 on i's private batch)
        + nu_aux  · Σ_h mean_b mhd_loss[i, h, b]           (aux head h <- teachers' head h−1)
        + nu_main · mean_b distill_loss(head 0 <- neighbours' head 0)[i, b]
        + nu_emb  · mean_{b,e} (emb[i] − mean_{j ∈ C(i)} emb_j)²  (C(i): i's candidates)
Teachers are the predictions received in the latest exchange: this step's own predictions
(detached) when exchange_every = 1, else up to exchange_every − 1 steps stale, on the public
batch of that exchange.

A process holds the clients of its shard (``distributed``): all of them in one process, a
contiguous block of them under torchrun. Every random stream is drawn for all clients and each
process keeps its rows, and the exchange brings each process the rows of the clients its own
clients hear, so the numbers do not depend on the number of processes.

Host-device syncs are marked "# sync:" — a CUDA run pays for each of them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import mhd_fast
from . import checkpoint as ckpt
from . import distributed as D
from . import metrics as M
from . import models
from . import outdir
from . import exchange as ex
from .config import Config, to_dict
from .evaluation import evaluate, measure_gap
from .exchange import WIRE_DTYPES, Received, neighbour_mean, students
from .ops import map_teacher
from .ops.inputs import trusted_packets
from .simulation import Simulation, resolve_device, setup
from .topology import describe


# ---- one round -----------------------------------------------------------------------------

def _sample_private(sim: Simulation) -> Tensor:
    """[n_model, B] training rows: each client draws uniformly (with replacement) from its own.
    The draw covers all N_model clients and keeps this process's rows."""
    u = torch.rand(sim.num_model, sim.cfg.batch_size, generator=sim.gen)
    u = u[sim.model_rows.start:sim.model_rows.stop]
    pos = (u * sim.private_count.unsqueeze(1)).long()
    return sim.private_rows.gather(1, _to_device(pos, sim.device))


def _to_device(x: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the device without a host sync: on CUDA copied from pinned memory,
    asynchronously (a pageable copy waits for the stream)."""
    return x.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else x.to(device)


def _fedavg(sim: Simulation, route: ex.Route) -> Tensor:
    """FedAvg's averaging over the round's route (``exchange.average_weights``). Returns the
    bytes per directed edge into this process's clients [n, N] (all weights over every edge)."""
    edge_bytes, sent = ex.average_weights(models.parameters(sim.groups), route)
    sim.bytes_cross_rank += sent
    return edge_bytes


def learning_rate(cfg: Config, step: int) -> float:
    """Cosine decay from lr to lr / 10 over rounds · steps_per_round steps (or constant).
    A function of the step alone, so a resumed run follows the same schedule."""
    if not cfg.lr_decay:
        return cfg.lr
    progress = min(1.0, step / max(1, cfg.rounds * cfg.steps_per_round - 1))
    return cfg.lr / 10 + 0.5 * (cfg.lr - cfg.lr / 10) * (1 + math.cos(math.pi * progress))


def sample_batches(sim: Simulation) -> tuple[Tensor, bool]:
    """The step's draws from the training generator: private rows [N_model, Bp] and, when the
    exchange is refreshed, a new public batch (stored in sim.public_batch). Between refreshes
    the students keep training on the public rows the stale predictions were made on.
    Returns (private rows, refresh)."""
    rows = _sample_private(sim)
    refresh = sim.distills and (sim.received is None or sim.step % sim.cfg.exchange_every == 0)
    if refresh:
        pick = torch.randint(len(sim.public_rows), (sim.cfg.public_batch_size,), generator=sim.gen)
        sim.public_batch = sim.public_rows[_to_device(pick, sim.device)]
    return rows, refresh


def smooth_teacher(sim: Simulation, got: Received, rows: Tensor) -> Received:
    """--teacher-ema β: the teachers of the public rows ``rows`` [B] (indices into x_train)
    replaced by an EMA of what the exchanges that drew each row sent, per client, head and
    row: p̄ <- β·p̄ + (1 − β)·softmax(T/τ) (the first draw sets p̄), sent on as τ·log p̄, whose
    softmax at τ is p̄. Teachers then change slowly while the clients' predictions jump from
    step to step. One process, dense logits (``validate`` and ``setup`` check both)."""
    cfg = sim.cfg
    p = (got.teacher.float() / cfg.tau).softmax(-1)                      # [N, H1, B, V]
    if sim.ema is None:
        sim.ema = p.new_zeros(*p.shape[:2], len(sim.public_rows), p.shape[-1])
        sim.ema_seen = torch.zeros(len(sim.public_rows), dtype=torch.bool, device=p.device)
    where = torch.full((len(sim.data.y_train),), -1, dtype=torch.int64, device=p.device)
    where[sim.public_rows] = torch.arange(len(sim.public_rows), device=p.device)
    pos = where[rows]  # a row drawn twice in one batch gets the same value twice
    seen = sim.ema_seen[pos][:, None]
    old = sim.ema[:, :, pos]
    sim.ema[:, :, pos] = torch.where(seen, cfg.teacher_ema * old + (1 - cfg.teacher_ema) * p, p)
    sim.ema_seen[pos] = True
    teacher = (cfg.tau * sim.ema[:, :, pos].log()).to(got.teacher.dtype)
    return dataclasses.replace(got, teacher=teacher)


def local_step(sim: Simulation, adj: Tensor, route: ex.Route | None = None) -> Received | None:
    """One step for every client of this process; returns the exchange it refreshed, if any.
    adj: the round's graph [N, N]; route: its ``exchange.route`` (made here if None)."""
    cfg, d = sim.cfg, sim.data
    rows, refresh = sample_batches(sim)                                  # [N, Bp]
    x, y = d.x_train[rows], d.y_train[rows]
    if sim.distills:
        x_pub = d.x_train[sim.public_batch]
        # One forward for private and public rows: every client sees the same public rows.
        x = torch.cat([x, x_pub.unsqueeze(0).expand(x.shape[0], *x_pub.shape)], dim=1)
    if refresh and route is None:
        route = ex.route(adj, sim.shard)
    step_loss = _compiled(_step_loss, sim) if cfg.compile else _step_loss
    with trusted_packets():  # the exchange's packets come from its own topk_compress
        loss, terms, fresh = step_loss(sim, x, y, route, refresh)

    # Summed on the device, read once a round (``nonfinite`` and the round's record): no host
    # sync per step. Per client in fp64, so that the sums do not depend on the sharding (and a
    # copy: a CUDA graph's output is overwritten by its next replay).
    terms = terms.detach().double()
    sim.loss_sum = terms if sim.loss_sum is None else sim.loss_sum + terms
    sim.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in sim.optimizer.param_groups:
        group["lr"] = learning_rate(cfg, sim.step)
    sim.optimizer.step()
    sim.step += 1
    return fresh


_COMPILED: dict = {}


def _compiled(fn, sim: Simulation):
    """fn under torch.compile, made once per function and device kind: on CUDA
    mode="reduce-overhead" (CUDA graphs) when every step refreshes the exchange (a stale one
    would read a graph output that the next replay overwrote), else the default mode."""
    graphs = sim.device.type == "cuda" and sim.cfg.exchange_every == 1
    key = (fn, graphs)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, mode="reduce-overhead" if graphs else None, dynamic=False)
    return _COMPILED[key]


def _step_loss(sim: Simulation, x: Tensor, y: Tensor, route: ex.Route | None,
               refresh: bool) -> tuple[Tensor, Tensor, Received | None]:
    """The step's compute before its backward: forward of all clients on x [N, Bp (+ B), ...],
    the exchange when refreshed, the losses -> (summed loss, the per-client loss terms [n, *]
    before the weights nu (``loss_terms``), the fresh exchange or None)."""
    cfg = sim.cfg
    bp = cfg.batch_size
    logits, emb = models.forward_groups(sim.groups, x, shared=False, num_heads=sim.num_heads,
                                        train=True, seed=models.step_seed(cfg.train_seed, sim.step),
                                        chunk=sim.client_chunk)
    v = logits.shape[-1]
    ce = F.cross_entropy(logits[:, 0, :bp].reshape(-1, v), y.reshape(-1), reduction="none")
    ce = ce.view(-1, bp).mean(dim=1)                                     # [n] each client's mean
    loss = ce.sum()
    terms = [ce.unsqueeze(1)]

    fresh = None
    if sim.distills:
        z = logits[:, :, bp:]                                            # [N, H1, B, V]
        emb_pub = emb[:, bp:] if emb is not None else None
        if refresh:
            sim.received = fresh = ex.exchange(z, emb_pub if cfg.nu_emb > 0 else None, route,
                                               heads=sim.heads_sent, topk=cfg.topk,
                                               wire_dtype=WIRE_DTYPES[cfg.wire_dtype],
                                               tau=cfg.tau, backend=cfg.backend)
            if cfg.teacher_ema > 0:
                sim.received = fresh = smooth_teacher(sim, fresh, sim.public_batch)
        got = sim.received
        # One call covers every student of this process: the loss runs over the M candidates
        # of the exchange (this process's clients at got.rows, the teachers they heard around).
        zc = students(z, got)                                            # [M, H1, B, V]
        opts = dict(tau=cfg.tau, include_self=cfg.include_self, aggregate=cfg.aggregate,
                    backend=cfg.backend)
        if cfg.nu_aux > 0 and sim.num_heads > 1:
            aux = mhd_fast.mhd_loss(zc, got.teacher, got.adj, **opts)[got.rows]  # [n, H, B]
            aux = aux.mean(dim=-1)
            loss = loss + cfg.nu_aux * aux.sum()
            terms.append(aux)
        if cfg.nu_main > 0:
            main = mhd_fast.distill_loss(zc[:, :1], map_teacher(lambda t: t[:, :1], got.teacher),
                                         got.adj, **opts)[got.rows]      # [n, 1, B]
            main = main.mean(dim=-1)
            loss = loss + cfg.nu_main * main.sum()
            terms.append(main)
        if cfg.nu_emb > 0:
            target, has = neighbour_mean(got.emb, got.adj, include_self=cfg.include_self)
            target, has = target[got.rows], has[got.rows]
            mse = (emb_pub - target).square().mean(dim=(1, 2))
            mse = torch.where(has, mse, torch.zeros_like(mse))
            loss = loss + cfg.nu_emb * mse.sum()
            terms.append(mse.unsqueeze(1))
    return loss, torch.cat(terms, dim=1), fresh


def train_round(sim: Simulation, r: int) -> tuple[Tensor, Tensor]:
    """The local steps of round r (0-based), then FedAvg's averaging for that method.
    Returns the bytes of the round per directed edge into this process's clients [n, N]
    int64: (sent, dense fp32); the bytes sent to other processes add to sim.bytes_cross_rank."""
    adj = sim.schedule(r).to(sim.device)  # the graph of this round (time-varying schedules)
    route = ex.route(adj, sim.shard)
    sent = torch.zeros(sim.shard.size, adj.shape[1], dtype=torch.int64, device=sim.device)
    dense = torch.zeros_like(sent)
    for _ in range(sim.cfg.steps_per_round):
        got = local_step(sim, adj, route)
        if got is not None:
            sent += got.edge_bytes
            dense += got.dense_edge_bytes
            sim.bytes_cross_rank += got.cross_rank_bytes
    if sim.cfg.method == "fedavg":
        weights = _fedavg(sim, route)
        sent += weights
        dense += weights
    return sent, dense


def loss_terms(sim: Simulation) -> dict[str, float]:
    """The columns of ``sim.loss_sum`` in order, each with its weight in the loss: "ce" (head
    0 on the private rows), "aux_head1" .. "aux_headH" (the aux heads' distillation), "main"
    (head 0's distillation) and "emb" (the embedding MSE), the ones this run has."""
    cfg, terms = sim.cfg, {"ce": 1.0}
    if sim.distills:
        if cfg.nu_aux > 0 and sim.num_heads > 1:
            terms.update({f"aux_head{h}": cfg.nu_aux for h in range(1, sim.num_heads)})
        if cfg.nu_main > 0:
            terms["main"] = cfg.nu_main
        if cfg.nu_emb > 0:
            terms["emb"] = cfg.nu_emb
    return terms


def nonfinite(sim: Simulation) -> Tensor:
    """[2] int64 on the device: whether the steps' loss since the last call was not finite,
    and how many weight tensors of this process hold a NaN or inf. Starts a new loss sum."""
    loss = sim.loss_sum if sim.loss_sum is not None else torch.zeros((), device=sim.device)
    sim.loss_sum = None
    weights = torch.stack([p.isfinite().all() for p in models.parameters(sim.groups)])
    return torch.stack([~loss.isfinite().all(), (~weights).sum()]).long()


# ---- the run -------------------------------------------------------------------------------

def run(cfg: Config, *, resume: bool = False,
        on_round: Callable[[int, dict], object] | None = None) -> dict | None:
    """Train for cfg.rounds rounds, checkpointing after each; write the outputs to cfg.out.
    Returns the metrics dict (the content of metrics.json): ``status`` "finished", or
    "diverged" when a round's loss or weights were not finite (the run stops there; its
    checkpoint is the last finite state). Under torchrun the run is sharded over the ranks,
    rank 0 writes and returns the metrics, the others return None ({"status": "diverged"} alone
    when the run diverged). While it runs it holds
    cfg.out (``outdir.claim``): another run on the same folder raises ValueError.
    cfg.out None: no file at all (no lock, checkpoint, report or plots).
    on_round(r, record): called on rank 0 after round r with its entry of metrics["rounds"]."""
    if cfg.out is None and resume:
        raise ValueError("--resume needs --out, the folder of the checkpoint to resume from")
    owned = D.init(resolve_device(cfg.device), cfg.dist_timeout)
    clean = False
    try:
        out = _run(cfg, resume, on_round)
        clean = True
        return out
    finally:
        if owned:
            D.shutdown(clean)


def _claim(out: str, shard: D.Shard) -> outdir.Claim | None:
    """Rank 0 (which alone writes) claims the output folder; every rank stops with its error."""
    held, error = None, None
    if shard.lead:
        try:
            held = outdir.claim(out)
        except ValueError as e:
            error = str(e)
    error = D.scatter_objects([error] * shard.world if shard.lead else None, shard,
                              "claiming the output folder")
    if error is not None:
        raise ValueError(error)
    return held


def _run(cfg: Config, resume: bool, on_round) -> dict | None:
    sim = setup(cfg)
    history: list[dict] = []
    totals = {"edge_bytes": torch.zeros(sim.shard.size, cfg.clients, dtype=torch.int64),
              "bytes_dense": 0}
    start = 0
    if resume:
        start, history, totals = ckpt.restore(os.path.join(cfg.out, ckpt.FILENAME), sim)
    held = _claim(cfg.out, sim.shard) if cfg.out is not None else None
    board = None
    try:
        if cfg.tensorboard is not None and sim.shard.lead:
            board = M.tensorboard(cfg.tensorboard, cfg.name, start)
        return _rounds(sim, start, history, totals, on_round, board)
    finally:
        if board is not None:
            board.close()
        if held is not None:
            held.release()


def measures(cfg: Config, r: int) -> bool:
    """Whether round r (0-based) measures the accuracies: every eval_every-th round (1-based
    r + 1 a multiple of it) and the last round."""
    return (r + 1) % cfg.eval_every == 0 or r == cfg.rounds - 1


def _rounds(sim: Simulation, start: int, history: list[dict], totals: dict,
            on_round, board) -> dict | None:
    """Rounds start .. cfg.rounds − 1, then the outputs (rank 0's metrics, None elsewhere).
    board: rank 0's TensorBoard writer, or None."""
    from tqdm import tqdm

    cfg, lead = sim.cfg, sim.shard.lead
    writes = cfg.out is not None
    bar = tqdm(range(start, cfg.rounds), initial=start, total=cfg.rounds, desc=cfg.name,
               unit="round", disable=not (cfg.progress and lead), dynamic_ncols=True)
    evaluated = False
    diverged = None
    for r in bar:
        t0 = time.perf_counter()
        cross_before = sim.bytes_cross_rank
        edge_sent, edge_dense = train_round(sim, r)
        losses = sim.loss_sum.sum(dim=0)  # [T] over this process's clients
        counts = torch.cat([torch.stack([edge_sent.sum(), edge_dense.sum(),
                                         edge_sent.new_tensor(sim.bytes_cross_rank - cross_before)]),
                            nonfinite(sim)])
        # sync: also an honest round time, and the round's divergence check on every rank
        sent, dense, cross, bad_loss, bad_weights = D.all_sum(counts, sim.shard,
                                                              "the byte counts").tolist()
        if bad_loss or bad_weights:
            diverged = {"round": r, "loss": bool(bad_loss), "weights": bool(bad_weights)}
            break
        time_s = time.perf_counter() - t0
        losses = D.all_sum(losses, sim.shard, "the loss sums").tolist()
        totals["edge_bytes"] += edge_sent.cpu()
        totals["bytes_dense"] += dense
        # A function of r alone, so every rank takes the same branch and a resumed run
        # measures the rounds an unbroken one does (the last round always).
        evaluated = measures(cfg, r)
        private = shared = gap = None
        if evaluated:
            private, shared, ensemble = evaluate(sim)
            gap = dict(measure_gap(sim, r), ensemble_shared_acc=ensemble)
        if lead:
            rec = M.round_record(r, time_s, sent, private, shared, dense, bytes_cross_rank=cross,
                                 loss_sum=_loss_record(sim, losses), gap=gap)
            history.append(rec)
            if evaluated:
                bar.set_postfix(_postfix(rec))
            if board is not None:  # before the checkpoint: a resume re-logs, never skips, a round
                M.log_round(board, rec)
        if cfg.checkpoint and writes:
            ckpt.save(os.path.join(cfg.out, ckpt.FILENAME), sim, r + 1, history, totals)
        if lead and on_round is not None:  # after the checkpoint: if it raises, round r is kept
            on_round(r, rec)
    bar.close()
    if diverged is not None:
        if not lead:  # so that every rank's exit status says the run failed
            return {"status": "diverged"}
        metrics = {"status": "diverged", "config": to_dict(cfg), "world_size": sim.shard.world,
                   "rounds": history, "diverged": diverged}
        if writes:
            M.write_outputs(cfg.out, metrics, None, None, describe(sim.schedule))
        return metrics
    if not evaluated:  # resumed a run that had already finished: measure the final state
        private, shared, ensemble = evaluate(sim)

    edge_bytes = totals["edge_bytes"]
    counts = torch.stack([edge_bytes.sum(), (edge_bytes > 0).sum(),
                          torch.tensor(sim.bytes_cross_rank)]).to(sim.device)
    # used: directed edges that carried anything in the run
    total, used, cross = D.all_sum(counts, sim.shard, "the byte totals").tolist()
    if not lead:
        return None
    metrics = {"status": "finished", "config": to_dict(cfg), "world_size": sim.shard.world,
               "rounds": history,
               "final": M.final_record(private, shared, ensemble, total, totals["bytes_dense"],
                                       total / max(1, used), bytes_cross_rank=cross)}
    if writes:
        M.write_outputs(cfg.out, metrics, private, shared, describe(sim.schedule))
    return metrics


def _loss_record(sim: Simulation, sums: list[float]) -> dict[str, float]:
    """A round's loss sums by name: "total" (the objective, each term times its weight nu),
    then each of ``loss_terms``."""
    terms = loss_terms(sim)
    total = sum(nu * x for nu, x in zip(terms.values(), sums))
    return {"total": total, **dict(zip(terms, sums))}


def _postfix(rec: dict) -> dict:
    out = {"priv0": f"{rec['private_acc']['head0']:.3f}", "shared0": f"{rec['shared_acc']['head0']:.3f}"}
    best = M.best_aux(rec["shared_acc"])
    if best is not None:
        out[f"shared_{best[0]}"] = f"{best[1]:.3f}"
    return out
