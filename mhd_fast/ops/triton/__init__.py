"""The Triton backend: the launchers of the kernel contracts of ``select.py``, ``distill.py``
and ``topk.py`` (one level up) on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``
(how the tests run without a GPU).

One kernel per file: ``stats`` (teacher statistics), ``select`` (teacher choice), ``dense``
(the dense loss in one launch and its backward), ``distill_topk`` (packet teachers),
``distill`` (the teacher tiles and KL steps of ``dense`` and ``distill_topk``, and the backward
that packets with mean / confidence_weighted run on their expansion), ``topk`` (compression);
``common`` holds what they share.
Every launcher allocates fresh outputs and makes one launch (two for the backward of packets
with mean / confidence_weighted: expand, then the dense backward kernel). The
arguments were checked by the op that calls it. No launcher syncs with the host, so the ops run
inside CUDA graphs and ``torch.compile``. Importing this package raises ImportError when Triton
is not installed.

What mhd_loss launches per call: a dense teacher, one forward (``distill_dense``: statistics,
choice, loss, unit gradient) and one backward that scales that gradient, or nothing at all for
rows whose upstream gradient is 1; a packet teacher, one forward (the packet's statistics,
choice, loss) and the packet backward.
"""
from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here tells backends.py that the backend is absent)
from torch import Tensor

from ..reference import acc_dtype, reduce_loss
from . import dense, distill_topk, select as select_kernel, stats, topk


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


def distill_dense(student: Tensor, teacher: Tensor, adj: Tensor, head_offset: int, tau: float, include_self: bool,
                  aggregate: str, need_grad: bool, groups: int | None = None, reduction: str = "none"):
    """Dense teacher, one launch: statistics, teacher choice, loss and (need_grad) the unit
    gradient of the op's output: of the rows' sum, or of their mean for reduction "mean"
    (dense.py). student [N, H, B, V], teacher [N, ≥ G, B, V] read as teacher[:, :G]
    (G = groups, else teacher.shape[1]) -> (loss, lse_z, unit [N, H, B, V] in the student's
    dtype or empty, lse_t, logconf_t, idx int64), rows [N, G, B] in the accumulation dtype;
    loss is the rows reduced by ``reduction``."""
    g = teacher.shape[1] if groups is None else groups
    loss, *rest = dense.distill_dense(student, teacher[:, :g], adj, head_offset, tau, bool(include_self),
                                                     aggregate, need_grad, acc_dtype(student, teacher), reduction)
    return (reduce_loss(loss, reduction), *rest)


def scale_unit(unit: Tensor, grad: Tensor, idx: Tensor, head_offset: int) -> Tensor:
    """The backward of distill_dense: unit · grad in place (grad [N, G, B] or one number), exact
    zeros kept for clients without candidate; one launch, no host read."""
    return dense.scale_unit(unit, grad, idx, head_offset)


def distill_topk_packets(student: Tensor, values: Tensor, indices: Tensor, lse: Tensor, adj: Tensor, tau: float,
                         include_self: bool, aggregate: str, head_offset: int = 0) -> tuple:
    """Student heads head_offset.. of student [N, H, B, V] against the first G heads of the packet
    as it arrives -> (loss, rows [3, N, G, B] = lse_t, logconf_t, row statistic; indices int32;
    idx): the packet's statistics, the teacher choice and the loss in one launch."""
    g = student.shape[1] - head_offset
    return distill_topk.distill_topk_packets(student[:, head_offset:], values[:, :g], indices[:, :g], lse[:, :g],
                                             adj, tau, bool(include_self), aggregate,
                                             acc_dtype(student, values, lse))


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
