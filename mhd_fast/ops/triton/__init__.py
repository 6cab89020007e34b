"""The Triton backend: the launchers of the kernel contracts of ``select.py``, ``distill.py``
and ``topk.py`` (one level up) on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``
(how the tests run without a GPU).

One kernel per file: ``stats`` (teacher statistics), ``select`` (teacher choice), ``distill``
(dense teachers), ``distill_topk`` (packet teachers), ``topk`` (compression); ``common`` holds
what they share. Every launcher allocates fresh outputs and makes one launch over the flat row
space of all clients × groups × rows (two for packets with mean / confidence_weighted: expand,
then the dense kernel). The arguments were checked by the op that calls it. No launcher syncs
with the host, so the ops run inside CUDA graphs and ``torch.compile``. Importing this package
raises ImportError when Triton is not installed.

Memory-bound on a GPU: the backward recomputes q and p̄ from Z and T (one read each) rather
than the forward writing a unit gradient that the backward reads back.
"""
from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here tells backends.py that the backend is absent)
from torch import Tensor

from ..reference import acc_dtype, packet_stats
from . import distill, distill_topk, select as select_kernel, stats, topk


def _rows(*tensors: Tensor) -> list[Tensor]:
    """Row statistics ([N, G, B], small next to the logits) contiguous; the logits themselves are
    read through their strides."""
    return [x.contiguous() for x in tensors]


def teacher_stats(teacher: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """T [N, G, B, V] -> (lse [N, G, B], logconf [N, G, B]) of T/τ, fp32 (fp64 for fp64 T)."""
    return stats.teacher_stats(teacher, tau, acc_dtype(teacher))


def select(logconf: Tensor, adj: Tensor, include_self: bool) -> tuple[Tensor, Tensor]:
    """logconf [N, G, B] -> (idx [N, G, B] int64, −1 = no candidate; has [N] bool)."""
    return select_kernel.select(logconf, adj, include_self)


def distill_fwd(student, teacher, lse_t, logconf_t, idx, adj, tau, include_self, aggregate):
    """-> (loss [N, G, B], lse_z [N, G, B]) in the accumulation dtype."""
    return distill.distill_fwd(student, teacher, *_rows(lse_t, logconf_t, idx), adj, tau, bool(include_self),
                               aggregate, acc_dtype(student, teacher))


def distill_bwd(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z, tau, include_self, aggregate, out=None):
    """-> dZ of the student's shape and dtype, written into ``out`` (any strides) when given,
    else fresh and contiguous."""
    lse_t, logconf_t, idx, grad, lse_z = _rows(lse_t, logconf_t, idx, grad, lse_z)
    return distill.distill_bwd(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z, tau, bool(include_self),
                               aggregate, acc_dtype(student, teacher), out=out)


def distill_topk_packets(student: Tensor, values: Tensor, indices: Tensor, lse: Tensor, adj: Tensor, tau: float,
                         include_self: bool, aggregate: str, head_offset: int = 0) -> tuple:
    """Student heads head_offset.. of student [N, H, B, V] against the first G heads of the packet
    as it arrives -> (loss, rows [3, N, G, B] = lse_t, logconf_t, row statistic; indices int32;
    idx): the packet's statistics, the teacher choice, then the loss kernel."""
    g = student.shape[1] - head_offset
    dt = acc_dtype(student, values, lse)
    values = values[:, :g].to(dt)
    indices = indices[:, :g].to(torch.int32).contiguous()
    lse_t, logconf_t = packet_stats(values, lse[:, :g])
    idx, _ = select(logconf_t, adj, include_self)
    loss, statistic = distill_topk.distill_topk_fwd(student[:, head_offset:], values, indices, *_rows(lse_t, logconf_t),
                                                    idx, adj, tau, bool(include_self), aggregate, dt)
    return loss, torch.stack([lse_t, logconf_t, statistic]), indices, idx


def distill_topk_bwd(grad, student, values, indices, lse_t, logconf_t, idx, adj, statistic, tau, include_self,
                     aggregate, out=None):
    """-> dZ of the student's shape and dtype, written into ``out`` (any strides) when given,
    else fresh and contiguous. ``statistic`` is the forward's row statistic."""
    lse_t, logconf_t, idx, grad, statistic = _rows(lse_t, logconf_t, idx, grad, statistic)
    return distill_topk.distill_topk_bwd(grad, student, values, indices.to(torch.int32), lse_t, logconf_t, idx, adj,
                                         statistic, tau, bool(include_self), aggregate,
                                         acc_dtype(student, values, lse_t), out=out)


def topk_compress(logits: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """X [R, V] -> (values [R, K] descending, indices [R, K] int32, lse [R]) of X/τ;
    values and lse fp32 (fp64 for fp64 X)."""
    return topk.topk_compress(logits, k, tau, acc_dtype(logits))
