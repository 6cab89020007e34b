"""The readable torch reference: the definition of correctness for every backend.

Pure torch, unfused, fp32 (fp64 stays fp64 for gradcheck), vectorized over clients with no
Python loop. Every formula of the method is written out; autograd supplies the gradient, which
equals τ(q − p) for dense teachers and the bucket formula for packets.

Dimensions: N clients, G head groups (G = H1 − 1 for ``mhd_loss``), B public rows,
V classes, K top-k. ``adj[i, j]`` is True when client i hears client j.
"""
from __future__ import annotations

import torch
from torch import Tensor

AGGREGATES = ("max_confidence", "mean", "confidence_weighted")


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 stays fp64 (for gradcheck); everything else accumulates in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Loss rows reduced as the public ops do: "none" (as is), "sum", or "mean" (sum / count)."""
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / loss.numel()
    return loss


def candidate_mask(adj: Tensor, include_self: bool) -> Tensor:
    """[N, N] bool: j is a candidate teacher of i. Self-loops count only with include_self."""
    mask = adj.clone()
    mask.fill_diagonal_(include_self)
    return mask


def teacher_stats(teacher: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Per teacher row: lse = logsumexp(T/τ) and log-confidence = max(T/τ) − lse.

    teacher [..., V] -> (lse [...], logconf [...]), both fp32 (fp64 for fp64 input).
    The confidence max_v softmax(T/τ)_v is exp(logconf); choosing by logconf picks the same.
    """
    t = teacher.to(acc_dtype(teacher)) / tau
    lse = torch.logsumexp(t, dim=-1)
    return lse, t.amax(dim=-1) - lse


def packet_stats(values: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """(lse, logconf) of top-k packets: the exact confidence is exp(values[0] − lse)."""
    dt = acc_dtype(values, lse)
    lse = lse.to(dt)
    return lse, values[..., 0].to(dt) - lse


def select(logconf: Tensor, adj: Tensor, include_self: bool) -> tuple[Tensor, Tensor]:
    """Per (client, group, row): the candidate with the highest confidence, ties -> lowest j.

    logconf [N, G, B] -> (idx [N, G, B] int64, -1 where the client has no candidate; has [N] bool).
    NaN confidences win (as in torch.argmax) so that they show up in the loss.
    """
    mask = candidate_mask(adj, include_self)  # [N(i), N(j)]
    n = logconf.shape[0]
    scores = logconf.unsqueeze(0).expand(n, *logconf.shape)  # [N(i), N(j), G, B]
    scores = scores.masked_fill(~mask[:, :, None, None], float("-inf"))
    idx = scores.argmax(dim=1)  # first maximum -> lowest j on ties
    has = mask.any(dim=1)
    idx = torch.where(has[:, None, None], idx, torch.full_like(idx, -1))
    return idx, has


def aggregate_weights(logconf: Tensor, idx: Tensor, adj: Tensor, include_self: bool,
                      aggregate: str) -> Tensor:
    """Weights w [N(i), N(j), G, B] of each candidate j in client i's teacher, rows sum to 1
    (or to 0 for a client with no candidate)."""
    mask = candidate_mask(adj, include_self).to(logconf.dtype)[:, :, None, None]
    n = logconf.shape[0]
    if aggregate == "max_confidence":
        w = torch.nn.functional.one_hot(idx.clamp(min=0), n).to(logconf.dtype)  # [N, G, B, N(j)]
        return w.permute(0, 3, 1, 2) * mask
    if aggregate == "mean":
        w = mask.expand(n, n, *logconf.shape[1:])
    elif aggregate == "confidence_weighted":
        # where, not a product: a non-candidate's NaN confidence must not reach client i
        w = torch.where(mask != 0, logconf.exp().unsqueeze(0), 0)
    else:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    total = w.sum(dim=1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def mix(w: Tensor, adj: Tensor, include_self: bool, p: Tensor) -> Tensor:
    """p̄[i] = Σ_j w[i, j] p[j]: the teachers' distributions p [N(j), G, B, V] weighted by
    w [N(i), N(j), G, B] -> [N(i), G, B, V]. A NaN in p[j] reaches exactly the clients that
    hear j (in a contraction a non-candidate's weight 0 times NaN would reach every client)."""
    nan = torch.isnan(p)
    p_bar = torch.einsum("ijgb,jgbv->igbv", w, p.masked_fill(nan, 0))
    heard = candidate_mask(adj, include_self).to(p.dtype)
    return p_bar.masked_fill(torch.einsum("ij,jgbv->igbv", heard, nan.to(p.dtype)) > 0, float("nan"))


def kl_to_student(p: Tensor, log_p: Tensor, student: Tensor, tau: float) -> Tensor:
    """τ² · KL(p ‖ softmax(Z/τ)) per row over the last dim, 0·log 0 = 0. -> [...]

    ``p != 0`` (not ``p > 0``) keeps a NaN teacher visible as a NaN loss."""
    log_q = torch.log_softmax(student.to(p.dtype) / tau, dim=-1)
    terms = torch.where(p != 0, p * (log_p - log_q), torch.zeros_like(p))
    return tau * tau * terms.sum(dim=-1)


def distill_dense(student: Tensor, teacher: Tensor, adj: Tensor, *, tau: float,
                  include_self: bool, aggregate: str) -> Tensor:
    """Student group g of client i learns from group g of its teachers (dense logits).

    student [N, G, B, V] (requires grad), teacher [N, G, B, V] -> loss [N, G, B] fp32 (fp64 if an
    input is fp64).
    """
    # predictions received from clients carry no gradient; fp64 in either input makes it fp64
    teacher = teacher.detach().to(acc_dtype(student, teacher))
    lse, logconf = teacher_stats(teacher, tau)
    idx, has = select(logconf, adj, include_self)
    student = torch.where(has[:, None, None, None], student, 0)  # no teacher: no gradient, even from NaN
    t = teacher.to(lse.dtype) / tau
    log_p_all = t - lse.unsqueeze(-1)  # [N(j), G, B, V]
    if aggregate == "max_confidence":
        g = torch.arange(t.shape[1], device=t.device)[None, :, None]
        b = torch.arange(t.shape[2], device=t.device)[None, None, :]
        log_p = log_p_all[idx.clamp(min=0), g, b]  # [N(i), G, B, V]
        p = log_p.exp()
    else:
        w = aggregate_weights(logconf, idx, adj, include_self, aggregate)
        p = mix(w, adj, include_self, log_p_all.exp())
        log_p = torch.log(p)
    loss = kl_to_student(p, log_p, student, tau)
    return torch.where(has[:, None, None], loss, torch.zeros_like(loss))


def expand_packet(values: Tensor, indices: Tensor, lse: Tensor, v: int) -> Tensor:
    """A packet as a full distribution over V: sent classes get exp(values − lse), the rest
    mass max(0, 1 − Σ sent) is spread evenly over the V − K unsent classes. -> [..., V]"""
    p_sent = (values.to(lse.dtype) - lse.unsqueeze(-1)).exp()
    k = values.shape[-1]
    if k == v:
        rest_each = torch.zeros_like(lse)
    else:
        rest_each = (1 - p_sent.sum(-1)).clamp(min=0) / (v - k)
    full = rest_each.unsqueeze(-1).expand(*lse.shape, v).clone()
    return full.scatter(-1, indices.long(), p_sent)


def distill_topk(student: Tensor, values: Tensor, indices: Tensor, lse_packet: Tensor,
                 adj: Tensor, *, tau: float, include_self: bool, aggregate: str) -> Tensor:
    """Student group g of client i learns from top-k packets of its teachers.

    student [N, G, B, V]; values [N, G, B, K] (= top-k of T/τ, descending), indices [N, G, B, K],
    lse_packet [N, G, B] -> loss [N, G, B] fp32 (fp64 if an input is fp64).

    max_confidence: KL over K + 1 buckets (the K sent classes and one rest bucket, none when
    K = V); q_rest = 1 − Σ_sent q is taken as the sum over the unsent classes (the same number,
    without cancellation). mean / confidence_weighted: each candidate's packet is expanded to V classes
    (``expand_packet``), averaged, and the dense KL is taken.
    """
    v = student.shape[-1]
    k = values.shape[-1]
    dt = acc_dtype(student, values, lse_packet)
    values, lse_packet = values.detach().to(dt), lse_packet.detach().to(dt)
    lse, logconf = packet_stats(values, lse_packet)
    idx, has = select(logconf, adj, include_self)
    student = torch.where(has[:, None, None, None], student, 0)  # no teacher: no gradient, even from NaN
    if aggregate == "max_confidence":
        g = torch.arange(values.shape[1], device=values.device)[None, :, None]
        b = torch.arange(values.shape[2], device=values.device)[None, None, :]
        j = idx.clamp(min=0)
        log_p = values[j, g, b].to(lse.dtype) - lse[j, g, b].unsqueeze(-1)  # [N, G, B, K]
        p = log_p.exp()
        sent = indices[j, g, b].long()
        log_q_all = torch.log_softmax(student.to(lse.dtype) / tau, dim=-1)
        log_q = log_q_all.gather(-1, sent)
        terms = torch.where(p != 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
        if k < v:
            p_rest = (1 - p.sum(-1)).clamp(min=0)
            # log q_rest = log Σ_{unsent} q_v, summed directly: 1 − Σ_sent q_v cancels to 0 when
            # the student is confident in the sent classes.
            unsent = torch.ones_like(log_q_all, dtype=torch.bool).scatter(-1, sent, False)
            log_q_rest = torch.logsumexp(log_q_all.masked_fill(~unsent, float("-inf")), dim=-1)
            rest = torch.where(p_rest != 0, p_rest * (torch.log(p_rest) - log_q_rest),
                               torch.zeros_like(p_rest))
            terms = terms + rest
        loss = tau * tau * terms
    else:
        full = expand_packet(values, indices, lse, v)  # [N(j), G, B, V]
        w = aggregate_weights(logconf, idx, adj, include_self, aggregate)
        p = mix(w, adj, include_self, full)
        loss = kl_to_student(p, torch.log(p), student, tau)
    return torch.where(has[:, None, None], loss, torch.zeros_like(loss))


def topk_compress(logits: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k packets of rows of logits [..., V]: values = the k largest of logits/τ descending
    (ties -> lower index first, by a stable sort), indices int64, lse = logsumexp(logits/τ).
    Values and lse are fp32 (fp64 for fp64 input); the API casts to the wire dtypes."""
    t = logits.to(acc_dtype(logits)) / tau
    values, indices = torch.sort(t, dim=-1, descending=True, stable=True)
    return values[..., :k].contiguous(), indices[..., :k].contiguous(), torch.logsumexp(t, dim=-1)
