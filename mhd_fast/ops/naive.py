"""The naive per-client loop: how peers compute the MHD loss, one client and head at a time.

Built on ``torch.nn.functional.kl_div``. It is the baseline of the benchmarks and an
independent check of the vectorized reference in the tests; nothing else calls it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import acc_dtype


def _teacher_probs(teacher_rows: list[Tensor], tau: float, aggregate: str) -> Tensor:
    """Candidates' rows [B, V] each -> the teacher distribution [B, V] of one client."""
    probs = torch.stack([torch.softmax(t.to(acc_dtype(t)) / tau, dim=-1) for t in teacher_rows])  # [C, B, V]
    conf = probs.amax(dim=-1)  # [C, B]
    if aggregate == "max_confidence":
        best = conf.argmax(dim=0)  # first max -> lowest candidate on ties
        return probs[best, torch.arange(probs.shape[1])]
    if aggregate == "mean":
        return probs.mean(dim=0)
    w = conf / conf.sum(dim=0, keepdim=True)
    return (w.unsqueeze(-1) * probs).sum(dim=0)


def _candidates(adj: Tensor, i: int, include_self: bool) -> list[int]:
    """The clients that client i hears (itself too with include_self), ascending."""
    return [j for j in range(adj.shape[0]) if (j == i and include_self) or (j != i and bool(adj[i, j]))]


def _no_teacher(rows: Tensor) -> Tensor:
    """Loss 0 for the [B, V] rows of a client with no candidate, still connected to the graph."""
    return torch.zeros(rows.shape[0], dtype=acc_dtype(rows), device=rows.device) + 0 * rows.sum()


def distill_loop(student: Tensor, teacher: Tensor, adj: Tensor, *, tau: float = 1.0,
                 include_self: bool = False, aggregate: str = "max_confidence") -> Tensor:
    """student, teacher [N, G, B, V] -> loss [N, G, B] (fp32; fp64 for fp64 input), one client and group at a time."""
    n, g_count, b, _ = student.shape
    out = []
    for i in range(n):
        cands = _candidates(adj, i, include_self)
        per_group = []
        for g in range(g_count):
            if not cands:
                per_group.append(_no_teacher(student[i, g]))
                continue
            p = _teacher_probs([teacher[j, g] for j in cands], tau, aggregate)
            log_q = F.log_softmax(student[i, g].to(p.dtype) / tau, dim=-1)
            kl = F.kl_div(log_q, p, reduction="none").sum(dim=-1)
            per_group.append((tau * tau * kl).to(acc_dtype(student)))
        out.append(torch.stack(per_group))
    return torch.stack(out)


def distill_topk_loop(student: Tensor, values: Tensor, indices: Tensor, lse: Tensor, adj: Tensor,
                      *, tau: float = 1.0, include_self: bool = False) -> Tensor:
    """max_confidence against top-k packets, one client and group at a time: the teacher is the
    candidate with the largest exp(values[0] − lse); KL over the K sent classes plus one rest
    bucket. student [N, G, B, V], packets [N, G, B, K] -> loss [N, G, B]."""
    n, g_count, b, v = student.shape
    k = values.shape[-1]
    out = []
    for i in range(n):
        cands = _candidates(adj, i, include_self)
        per_group = []
        for g in range(g_count):
            if not cands:
                per_group.append(_no_teacher(student[i, g]))
                continue
            dt = acc_dtype(student, values)
            conf = torch.stack([values[j, g, :, 0].to(dt) - lse[j, g].to(dt) for j in cands])
            best = torch.tensor(cands, device=student.device)[conf.argmax(dim=0)]  # [B]
            rows = torch.arange(b, device=student.device)
            p_sent = (values[best, g, rows].to(dt) - lse[best, g, rows].to(dt)[:, None]).exp()
            q = F.softmax(student[i, g].to(dt) / tau, dim=-1)
            q_sent = q.gather(-1, indices[best, g, rows].long())
            if k < v:
                p = torch.cat([p_sent, (1 - p_sent.sum(-1, keepdim=True)).clamp(min=0)], dim=-1)
                q_b = torch.cat([q_sent, 1 - q_sent.sum(-1, keepdim=True)], dim=-1)
            else:
                p, q_b = p_sent, q_sent
            kl = F.kl_div(q_b.log(), p, reduction="none").sum(dim=-1)
            per_group.append((tau * tau * kl).to(dt))
        out.append(torch.stack(per_group))
    return torch.stack(out)
