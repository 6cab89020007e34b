"""The Triton backend: the kernel contract of ``registry`` on CUDA tensors (or on CPU tensors
under ``TRITON_INTERPRET=1``, how the tests run without a GPU).

Every function checks its arguments, allocates fresh outputs and makes one launch over the
flat row space of all clients × groups × rows (two for packets with mean /
confidence_weighted: expand, then the dense kernel). Kernels live one op per file:
``triton_stats``, ``triton_select``, ``triton_distill``, ``triton_distill_topk``,
``triton_topk``. No function syncs with the host, so the ops run inside CUDA graphs and
``torch.compile``. Importing this module raises ImportError when Triton is not installed.
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (ImportError here tells the registry that the backend is absent)
from torch import Tensor

from . import triton_distill, triton_distill_topk, triton_select, triton_stats, triton_topk
from .reference import AGGREGATES, acc_dtype

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Memory-bound on a GPU: the backward recomputes q and p̄ from Z and T (one read each) rather
# than the forward writing a unit gradient that the backward reads back.


def _check_device(name: str, x: Tensor) -> None:
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{name} must be a CUDA tensor for the triton backend (or set "
                         f"TRITON_INTERPRET=1 to run the kernels on CPU), got device {x.device}")


def _check_logits(name: str, x: Tensor) -> None:
    _check_device(name, x)
    if x.dim() != 4 or any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must be a non-empty 4-D tensor [N, G, B, V], got shape "
                         f"{tuple(x.shape)}")
    if x.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")


def _check_rows(rows: torch.Size, device: torch.device, **tensors: Tensor) -> None:
    for name, x in tensors.items():
        if tuple(x.shape) != tuple(rows):
            raise ValueError(f"{name} must have shape {tuple(rows)} (one entry per row), got "
                             f"{tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} must be on {device}, got {x.device}")


def _check_adj(adj: Tensor, n: int, device: torch.device) -> None:
    if adj.dtype != torch.bool or tuple(adj.shape) != (n, n) or adj.device != device:
        raise ValueError(f"adj must be a bool tensor [{n}, {n}] on {device}, got {adj.dtype} "
                         f"{tuple(adj.shape)} on {adj.device}")


def _check_options(tau: float, aggregate: str | None = None) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if aggregate is not None and aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")


def _check_idx(idx: Tensor) -> None:
    if idx.dtype != torch.int64:
        raise ValueError(f"idx must be int64 (teacher client per row, -1 = none), got {idx.dtype}")


def _check_packet(values: Tensor, indices: Tensor, rows: torch.Size, v: int) -> None:
    if values.dim() != 4 or tuple(values.shape[:3]) != tuple(rows) or not 1 <= values.shape[3] <= v:
        raise ValueError(f"values must be [N, G, B, K] with [N, G, B] = {tuple(rows)} and "
                         f"1 <= K <= V = {v}, got shape {tuple(values.shape)}")
    if indices.shape != values.shape or indices.dtype != torch.int32:
        raise ValueError(f"indices must be int32 of the shape of values {tuple(values.shape)}, "
                         f"got {indices.dtype} {tuple(indices.shape)}")


def teacher_stats(teacher: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """T [N, G, B, V] -> (lse [N, G, B], logconf [N, G, B]) of T/τ, fp32 (fp64 for fp64 T)."""
    _check_logits("teacher", teacher)
    _check_options(tau)
    return triton_stats.teacher_stats(teacher, tau, acc_dtype(teacher))


def select(logconf: Tensor, adj: Tensor, include_self: bool) -> tuple[Tensor, Tensor]:
    """logconf [N, G, B] -> (idx [N, G, B] int64, −1 = no candidate; has [N] bool)."""
    _check_device("logconf", logconf)
    if logconf.dim() != 3 or logconf.numel() == 0 or not logconf.dtype.is_floating_point:
        raise ValueError(f"logconf must be a non-empty float tensor [N, G, B], got {logconf.dtype} "
                         f"{tuple(logconf.shape)}")
    _check_adj(adj, logconf.shape[0], logconf.device)
    return triton_select.select(logconf, adj, include_self)


def _dense_args(student, teacher, lse_t, logconf_t, idx, adj, tau, aggregate, **more):
    _check_logits("student", student)
    _check_logits("teacher", teacher)
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the student's shape {tuple(student.shape)}, got "
                         f"{tuple(teacher.shape)}")
    _check_rows(student.shape[:3], student.device, lse_t=lse_t, logconf_t=logconf_t, idx=idx, **more)
    _check_adj(adj, student.shape[0], student.device)
    _check_idx(idx)
    _check_options(tau, aggregate)
    # Row statistics ([N, G, B], small next to the logits) are made contiguous; the logits
    # themselves are read through their strides.
    return [x.contiguous() for x in (lse_t, logconf_t, idx)] + [x.contiguous() for x in more.values()]


def distill_fwd(student, teacher, lse_t, logconf_t, idx, adj, tau, include_self, aggregate):
    """-> (loss [N, G, B], lse_z [N, G, B]) in the accumulation dtype."""
    lse_t, logconf_t, idx = _dense_args(student, teacher, lse_t, logconf_t, idx, adj, tau, aggregate)
    return triton_distill.distill_fwd(student, teacher, lse_t, logconf_t, idx, adj, tau,
                                      bool(include_self), aggregate, acc_dtype(student, teacher))


def _check_out(out: Tensor | None, student: Tensor) -> None:
    if out is not None and (out.shape != student.shape or out.dtype != student.dtype
                            or out.device != student.device):
        raise ValueError(f"out must be a {student.dtype} tensor of shape {tuple(student.shape)} "
                         f"on {student.device}, got {out.dtype} {tuple(out.shape)} on {out.device}")


def distill_bwd(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z, tau, include_self,
                aggregate, out=None):
    """-> dZ of the student's shape and dtype, written into ``out`` (any strides) when given,
    else fresh and contiguous."""
    lse_t, logconf_t, idx, grad, lse_z = _dense_args(student, teacher, lse_t, logconf_t, idx, adj,
                                                     tau, aggregate, grad=grad, lse_z=lse_z)
    _check_out(out, student)
    return triton_distill.distill_bwd(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z,
                                      tau, bool(include_self), aggregate,
                                      acc_dtype(student, teacher), out=out)


def _topk_args(student, values, indices, lse_t, logconf_t, idx, adj, tau, aggregate, **more):
    _check_logits("student", student)
    _check_device("values", values)
    _check_packet(values, indices, student.shape[:3], student.shape[3])
    _check_rows(student.shape[:3], student.device, lse_t=lse_t, logconf_t=logconf_t, idx=idx, **more)
    _check_adj(adj, student.shape[0], student.device)
    _check_idx(idx)
    _check_options(tau, aggregate)
    return [x.contiguous() for x in (lse_t, logconf_t, idx)] + [x.contiguous() for x in more.values()]


def distill_topk_fwd(student, values, indices, lse_t, logconf_t, idx, adj, tau, include_self,
                     aggregate):
    """-> (loss [N, G, B], lse_z [N, G, B]) in the accumulation dtype."""
    lse_t, logconf_t, idx = _topk_args(student, values, indices, lse_t, logconf_t, idx, adj, tau,
                                       aggregate)
    return triton_distill_topk.distill_topk_fwd(student, values, indices, lse_t, logconf_t, idx,
                                                adj, tau, bool(include_self), aggregate,
                                                acc_dtype(student, values))


def distill_topk_bwd(grad, student, values, indices, lse_t, logconf_t, idx, adj, lse_z, tau,
                     include_self, aggregate, out=None):
    """-> dZ of the student's shape and dtype, written into ``out`` (any strides) when given,
    else fresh and contiguous."""
    lse_t, logconf_t, idx, grad, lse_z = _topk_args(student, values, indices, lse_t, logconf_t,
                                                    idx, adj, tau, aggregate, grad=grad,
                                                    lse_z=lse_z)
    _check_out(out, student)
    return triton_distill_topk.distill_topk_bwd(grad, student, values, indices, lse_t, logconf_t,
                                                idx, adj, lse_z, tau, bool(include_self),
                                                aggregate, acc_dtype(student, values), out=out)


def topk_compress(logits: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """X [R, V] -> (values [R, K] descending, indices [R, K] int32, lse [R]) of X/τ;
    values and lse fp32 (fp64 for fp64 X)."""
    _check_device("logits", logits)
    if logits.dim() != 2 or logits.numel() == 0 or logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be a non-empty 2-D float tensor [R, V], got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be an integer in [1, V = {logits.shape[1]}], got {k!r}")
    _check_options(tau)
    return triton_topk.topk_compress(logits, k, tau, acc_dtype(logits))
