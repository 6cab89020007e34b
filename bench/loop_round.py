"""The per-client loop implementation of the simulator's round: the baseline of bench_round.py.

How a simulator without batched clients computes the same round: every client is its own
set of weights (F.linear / F.conv2d on unstacked tensors) with its own optimizer, and each
step loops over clients — forward on the client's private and public rows, then for every
client the teacher of each public row chosen among the predictions it received from the
clients it hears (F.kl_div), backward and an optimizer step. It draws its batches from the
simulation's generator through the same ``train.sample_batches``, so one round here and one
round of ``train.train_round`` from the same state end with the same weights (tests check it).

Supported: methods mhd / mean_distill / isolated, dense fp32 exchange refreshed every step,
nu_aux and nu_main, every aggregate; not nu_emb, top-k or stale exchange (ValueError).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhd_fast import models, simulation, train


@dataclass
class LoopClients:
    """Client i: its architecture, its own weights and its own optimizer; a module trunk is
    its own nn.Module (params then hold its parameters under 'trunk.NAME')."""

    archs: list[models.Arch | models.ModuleArch]
    params: list[dict[str, Tensor]]
    optimizers: list[torch.optim.Optimizer]
    nets: list[nn.Module | None]


def from_simulation(sim: simulation.Simulation) -> LoopClients:
    """Per-client copies of the simulation's weights, optimizers of the same kind and settings."""
    cfg = sim.cfg
    if cfg.topk or cfg.nu_emb > 0 or cfg.exchange_every != 1 or cfg.method in ("fedavg", "centralized"):
        raise ValueError("the loop baseline runs dense, fresh exchanges of mhd / mean_distill / "
                         "isolated without nu_emb")
    archs, params, optimizers, nets = [], [], [], []
    for g in sim.groups:
        for i in range(g.size):
            p = {k: v[i].detach().clone().requires_grad_() for k, v in g.params.items()}
            net = None
            if isinstance(g.arch, models.ModuleArch):
                net = models.build_trunk(g.arch, sim.data.input_shape).to(sim.device)
                net.load_state_dict({**{k[6:]: v for k, v in p.items() if k.startswith("trunk.")},
                                     **{k: b[i] for k, b in g.buffers.items()}})
                p = {**{f"trunk.{k}": v for k, v in net.named_parameters()},
                     "heads.weight": p["heads.weight"], "heads.bias": p["heads.bias"]}
            archs.append(g.arch)
            params.append(p)
            nets.append(net)
            if cfg.optimizer == "adam":
                optimizers.append(torch.optim.Adam(p.values(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                   fused=True))
            else:
                optimizers.append(torch.optim.SGD(p.values(), lr=cfg.lr, momentum=cfg.momentum,
                                                  weight_decay=cfg.weight_decay, fused=True))
    return LoopClients(archs, params, optimizers, nets)


def forward_client(arch: models.Arch, p: dict[str, Tensor], x: Tensor, num_heads: int,
                   net: nn.Module | None = None):
    """One client: x [B, *in] -> logits [H1, B, V], embedding [B, E]. net: its module trunk
    (train mode), if any."""
    if net is not None:
        h = net.train()(x)
        out = F.linear(h, p["heads.weight"].T, p["heads.bias"])
        return out.unflatten(-1, (num_heads, -1)).transpose(0, 1), h
    h = x
    for l in range(len(arch.channels)):
        h = F.max_pool2d(F.relu(F.conv2d(h, p[f"conv{l}.weight"], p[f"conv{l}.bias"], padding=1)), 2)
    h = h.flatten(1)
    for l in range(len(arch.hidden)):
        h = F.relu(F.linear(h, p[f"fc{l}.weight"].T, p[f"fc{l}.bias"]))
    out = F.linear(h, p["heads.weight"].T, p["heads.bias"])  # [B, H1·V]
    return out.unflatten(-1, (num_heads, -1)).transpose(0, 1), h


def teacher_probs(received: list[Tensor], tau: float, aggregate: str) -> Tensor:
    """The candidates' logits [B, V] each -> client's teacher distribution [B, V]."""
    probs = torch.stack([torch.softmax(t.float() / tau, dim=-1) for t in received])  # [C, B, V]
    conf = probs.amax(dim=-1)
    if aggregate == "max_confidence":
        return probs[conf.argmax(dim=0), torch.arange(probs.shape[1])]  # ties -> first candidate
    if aggregate == "mean":
        return probs.mean(dim=0)
    w = conf / conf.sum(dim=0, keepdim=True)
    return (w.unsqueeze(-1) * probs).sum(dim=0)


def loop_step(sim: simulation.Simulation, clients: LoopClients, adj: Tensor) -> None:
    cfg, d = sim.cfg, sim.data
    rows, _ = train.sample_batches(sim)
    bp, n = cfg.batch_size, len(clients.params)
    outs = []
    for i in range(n):  # forward of each client on its private rows and the public rows
        x = d.x_train[rows[i]]
        if sim.distills:
            x = torch.cat([x, d.x_train[sim.public_batch]])
        outs.append(forward_client(clients.archs[i], clients.params[i], x, sim.num_heads,
                                   clients.nets[i])[0])
    sent = [o[:, bp:].detach() for o in outs]  # what client j sends: its public predictions
    for i in range(n):
        logits = outs[i]
        loss = F.cross_entropy(logits[0, :bp], d.y_train[rows[i]])
        if sim.distills:
            cands = [j for j in range(n) if (j == i and cfg.include_self) or (j != i and bool(adj[i, j]))]
            z = logits[:, bp:]
            terms = []
            if cfg.nu_aux > 0:
                terms += [(cfg.nu_aux, h, h - 1) for h in range(1, sim.num_heads)]
            if cfg.nu_main > 0:
                terms.append((cfg.nu_main, 0, 0))
            for weight, student_head, teacher_head in terms:
                if not cands:
                    continue
                p = teacher_probs([sent[j][teacher_head] for j in cands], cfg.tau, cfg.aggregate)
                log_q = F.log_softmax(z[student_head] / cfg.tau, dim=-1)
                kl = F.kl_div(log_q, p, reduction="none").sum(-1)
                loss = loss + weight * cfg.tau ** 2 * kl.mean()
        clients.optimizers[i].zero_grad(set_to_none=True)
        loss.backward()
        for group in clients.optimizers[i].param_groups:
            group["lr"] = train.learning_rate(cfg, sim.step)
        clients.optimizers[i].step()
    sim.step += 1


def loop_round(sim: simulation.Simulation, clients: LoopClients, r: int) -> None:
    """Round r of the loop baseline (no metrics: the benchmark times training only)."""
    adj = sim.schedule(r).to(sim.device)
    for _ in range(sim.cfg.steps_per_round):
        loop_step(sim, clients, adj)


def stacked(clients: LoopClients, rows: range | None = None) -> dict[str, Tensor]:
    """The weights (and a module trunk's buffers) of clients ``rows`` (default all; one
    architecture) stacked on a client dimension, to compare."""
    rows = range(len(clients.params)) if rows is None else rows
    out = {k: torch.stack([clients.params[i][k].detach() for i in rows]) for k in clients.params[rows[0]]}
    if clients.nets[rows[0]] is not None:
        out.update({k: torch.stack([dict(clients.nets[i].named_buffers())[k] for i in rows])
                    for k, _ in clients.nets[rows[0]].named_buffers()})
    return out
