"""What the ops take: the top-k packet type, and the checks of their arguments.

Each public op checks its arguments here, once, before any backend runs: a ValueError that
names the argument, what was given and what was expected. The backends' launchers trust them.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .backends import backend_available, in_func_transform, launchers

LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
LOGIT_DTYPE_SET = frozenset(LOGIT_DTYPES)  # one hash lookup a check: the loss checks run on every call

# The largest temperature the ops take. The loss is τ²·KL with KL of order 1/τ², found in fp32
# as a difference of logs of order log V: its relative error grows as τ² (a few 1e-3 at τ = 100
# for logits of spread 3, 1 % at 300, 10 % at 1000, and τ² overflows fp32 past 1.8e19).
MAX_TAU = 100.0

class TopKLogits(NamedTuple):
    """A compressed prediction row as it crosses an edge.

    values  [..., K]  the K largest of logits/τ, descending; fp32 (default), fp16 or bf16.
    indices [..., K]  their classes, K distinct ones; int16 when V ≤ 32767, else int32; ties ->
                      lower index first.
    lse     [...]     logsumexp over all V of logits/τ, fp32: at least the logsumexp of values.
    """

    values: Tensor
    indices: Tensor
    lse: Tensor

    def map(self, fn: Callable[[Tensor], Tensor]) -> TopKLogits:
        """The packet of fn(values), fn(indices), fn(lse): what picks rows or heads, or moves a
        packet, does the same to its three fields (fn must keep their leading dims aligned)."""
        return TopKLogits(fn(self.values), fn(self.indices), fn(self.lse))


def map_teacher(fn: Callable[[Tensor], Tensor], teacher: Tensor | TopKLogits) -> Tensor | TopKLogits:
    """fn applied to a teacher in either wire form: dense logits [N, H1, B, V] -> fn(logits), a
    packet -> ``packet.map(fn)``. For row and head picks that read alike on both forms."""
    return teacher.map(fn) if isinstance(teacher, TopKLogits) else fn(teacher)


def teacher_fields(teacher: Tensor | TopKLogits) -> tuple[Tensor, ...]:
    """The tensors of a teacher: (logits,) or (values, indices, lse), the order ``map`` takes."""
    return tuple(teacher) if isinstance(teacher, TopKLogits) else (teacher,)


_TRUSTED_PACKETS = contextvars.ContextVar("mhd_fast_trusted_packets", default=False)


@contextlib.contextmanager
def trusted_packets():
    """Within this block the ops take packets as topk_compress made them and skip the check of
    their contents (classes in range and distinct, sent mass at most 1): that check reads a
    result back to the host, a sync on a GPU. For callers that made the packets themselves,
    as the simulator's exchange does; the shapes, dtypes and devices are still checked."""
    token = _TRUSTED_PACKETS.set(True)
    try:
        yield
    finally:
        _TRUSTED_PACKETS.reset(token)


def check_tau(tau) -> float:
    """τ as a float: any real number in (0, MAX_TAU], a Python or a numpy scalar. Tensors are
    refused rather than read: that would be a host sync, and a graph break under torch.compile."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 < float(tau) <= MAX_TAU:
        hint = " (a tensor: pass float(tau))" if isinstance(tau, Tensor) else ""
        raise ValueError(f"tau must be a real number in (0, {MAX_TAU:g}], got {tau!r}{hint}")
    return float(tau)


def check_logits(name: str, x, ndim: int | None = 4) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in LOGIT_DTYPE_SET:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    shape = x.shape
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name} must be 4-D [N, H1, B, V], got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"{name} must have no empty dimension, got shape {tuple(shape)}")


def check_adj(adj, n: int, device: torch.device) -> None:
    if not isinstance(adj, Tensor):
        raise ValueError(f"adj must be a torch.Tensor, got {type(adj).__name__}")
    if adj.dtype != torch.bool:
        raise ValueError(f"adj must be a bool tensor, got {adj.dtype}")
    if tuple(adj.shape) != (n, n):
        raise ValueError(f"adj must have shape [N, N] = [{n}, {n}] (N from the logits), "
                         f"got {tuple(adj.shape)}")
    if adj.device != device:
        raise ValueError(f"adj must be on the logits' device {device}, got {adj.device}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_teacher(teacher, student_shape: tuple | None, device: torch.device, heads: int | None = None) -> None:
    """A dense teacher of the student's shape, or a packet whose leading dims are the student's
    rows (student_shape None: a 4-D packet of any rows, as select_teachers takes it). ``heads``:
    the op reads the packet's first heads only (mhd_loss: H1 − 1), and only those are read for
    the checks of its contents (heads nobody reads may be left zero, as the exchange leaves
    those it does not send)."""
    if isinstance(teacher, TopKLogits):
        rows = student_shape[:-1] if student_shape is not None else teacher.values.shape[:-1]
        if student_shape is None and teacher.values.dim() != 4:
            raise ValueError(f"teacher.values must be 4-D [N, H1, B, K], got shape {tuple(teacher.values.shape)}")
        _check_packet(teacher, rows, student_shape[-1] if student_shape is not None else None, device, heads)
        return
    check_logits("teacher", teacher)
    if student_shape is not None and tuple(teacher.shape) != tuple(student_shape):
        raise ValueError(f"teacher must have the shape of student_logits {tuple(student_shape)}, "
                         f"got {tuple(teacher.shape)}")
    if teacher.device != device:
        raise ValueError(f"teacher must be on the student's device {device}, got {teacher.device}")


def _check_packet(teacher: TopKLogits, rows: tuple, v: int | None, device: torch.device, heads: int | None) -> None:
    values, indices, lse = teacher
    for name, x in (("teacher.values", values), ("teacher.indices", indices), ("teacher.lse", lse)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != device:
            raise ValueError(f"{name} must be on the logits' device {device}, got {x.device}")
    if values.dtype not in VALUE_DTYPES:
        raise ValueError(f"teacher.values must be float32, float16 or bfloat16, got {values.dtype}")
    if indices.dtype not in INDEX_DTYPES:
        raise ValueError(f"teacher.indices must be int16 or int32 (int64 accepted), got {indices.dtype}")
    if lse.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"teacher.lse must be float32, got {lse.dtype}")
    if values.dim() < 1 or values.shape[-1] < 1:
        raise ValueError(f"teacher.values must be [..., K] with K >= 1, got shape {tuple(values.shape)}")
    if tuple(values.shape[:-1]) != tuple(rows):
        raise ValueError(f"teacher.values must have leading dims {tuple(rows)} (those of the logits), "
                         f"got shape {tuple(values.shape)}")
    if indices.shape != values.shape:
        raise ValueError(f"teacher.indices must have the shape of teacher.values {tuple(values.shape)}, "
                         f"got {tuple(indices.shape)}")
    if tuple(lse.shape) != tuple(rows):
        raise ValueError(f"teacher.lse must have shape {tuple(rows)}, got {tuple(lse.shape)}")
    k = values.shape[-1]
    if v is not None and k > v:
        raise ValueError(f"teacher packets must have K <= V = {v}, got K = {k}")
    if heads is not None:
        values, indices, lse = values[:, :heads], indices[:, :heads], lse[:, :heads]
    if indices.numel() and not _capturing(values) and not _TRUSTED_PACKETS.get():
        _check_packet_contents(values, indices, lse, v)


def _capturing(x: Tensor) -> bool:
    """Under torch.compile or a CUDA graph capture, where the contents of a packet cannot be
    read back to the host: their checks are skipped."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_packet_contents(values: Tensor, indices: Tensor, lse: Tensor, v: int | None) -> None:
    """Indices in [0, V), K distinct classes a row, and sent probabilities exp(values − lse)
    that sum to at most 1 up to the rounding of values to a wire dtype: a packet that breaks
    these has no distribution behind it, and each backend would read it differently. CPU
    tensors in one pass of the C++ extension, others by a few torch ops."""
    if values.is_cpu and backend_available("cpp") is None and not in_func_transform():
        lo, hi, repeated, row, row_lse, mass = launchers("cpp").check_packets(values, indices, lse)
    else:
        lo, hi, repeated, row, row_lse, mass = _packet_faults(values, indices, lse)
    if v is not None and (lo < 0 or hi >= v):
        raise ValueError(f"teacher.indices must lie in [0, {v}), got values in [{lo}, {hi}]")
    if repeated:
        raise ValueError("teacher.indices must hold K distinct classes in every row, got a class sent twice "
                         "in some row")
    if row >= 0:
        raise ValueError(f"teacher.lse must be at least the logsumexp of teacher.values in every row (the sent "
                         f"probabilities sum to at most 1), got lse {row_lse:.6g} and sent "
                         f"probabilities exp(values − lse) summing to {mass:.6g} (flat row {row})")


def _packet_faults(values: Tensor, indices: Tensor, lse: Tensor) -> tuple[int, int, bool, int, float, float]:
    """What the C++ extension's check_packets finds, by a few torch ops on the [..., K] packet and
    one host read (two more for a bad row): (the smallest index, the largest, whether a row
    sends a class twice, the first flat row whose sent probabilities sum past 1 beyond rounding
    or −1, its lse, its sum)."""
    k = values.shape[-1]
    lo, hi = torch.aminmax(indices)
    if k == 1:
        repeated = lo != lo
    elif k == 2:
        repeated = (indices[..., 0] == indices[..., 1]).any()
    else:
        ordered = indices.sort(dim=-1).values
        repeated = (ordered[..., 1:] == ordered[..., :-1]).any()
    p = (values - lse.unsqueeze(-1)).exp_()  # the sent probabilities; NaN rows compare False below
    mass = p[..., 0] + p[..., 1] if k == 2 else p.sum(dim=-1)  # (a sum over a last dim of 2 is slow)
    # Values rounded to a wire dtype (unit roundoff u; bf16's, the coarsest, since they may have
    # been cast back up since) move log(mass) up by at most u·(|lse| + log K) (convexity of
    # logsumexp); lse carries fp32 rounding.
    u = 2.0 ** -8
    too_much = mass > lse.abs().mul_(u + 2.0 ** -17).add_(u * (math.log(k) + 1) + 2.0 ** -17).exp_()
    lo, hi, repeated, bad = torch.stack([lo, hi, repeated, too_much.any()]).tolist()
    if not bad:
        return lo, hi, bool(repeated), -1, 0.0, 0.0
    row = int(too_much.flatten().nonzero()[0])
    return lo, hi, bool(repeated), row, float(lse.flatten()[row]), float(mass.flatten()[row])
