"""The C++ CPU backend: launchers of the fused kernels in ``csrc/`` (the kernel contracts of
``select.py``, ``distill.py`` and ``topk.py``).

Each launcher checks that its tensors live on the CPU, allocates the outputs with torch and
hands ``mhd_fast._C`` raw pointers, sizes, element strides and dtype codes. The extension
checks what memory safety needs, releases the GIL and runs one OpenMP launch over the flat
row space of all N clients × G groups × B rows with ``torch.get_num_threads()`` threads.

* Logits are read in place through their strides (a view like ``Z[:, 1:]`` costs no copy).
  The per-row metadata ([N, G, B], a few bytes a row) is passed in the accumulation dtype,
  converted here only when the caller holds another one.
* Arithmetic in fp32 for fp32 / fp16 / bf16 inputs (fp64 when an input is fp64), with a
  polynomial exp / log vectorized for AVX-512 or AVX2 + FMA (chosen at run time) or the baseline ISA.
  Results are bit-identical run to run and for any thread count.
* NaN and inf: a row whose logits hold NaN or +inf gives NaN for that row (loss, lse, log
  confidence, gradient); −inf marks a masked class (probability 0, 0·log 0 = 0); a row of all
  −inf has lse = −inf and a NaN loss. A teacher row with NaN has a NaN confidence, which wins
  the teacher choice (as torch.argmax), so that the NaN reaches the loss. A client with no
  candidate teacher gets loss 0 and gradient 0 whatever its logits.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _C
from .pool import POOL
from .reference import AGGREGATES, acc_dtype

_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
          torch.int32: 4, torch.int64: 5, torch.bool: 6, torch.int16: 7}


def _arg(name: str, t: Tensor) -> tuple:
    """(data pointer, dtype code, sizes, element strides) of a CPU tensor for ``_C``."""
    if not t.is_cpu:
        raise ValueError(f"{name} must be a CPU tensor for backend='cpp', got a tensor on {t.device}")
    code = _CODES.get(t.dtype)
    if code is None:
        raise ValueError(f"{name} has dtype {t.dtype}, which backend='cpp' does not read")
    return t.data_ptr(), code, t.shape, t.stride()  # (sizes and strides as tuples: _C reads any sequence)


def _aggregate_code(aggregate: str) -> int:
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    return AGGREGATES.index(aggregate)


def _threads() -> int:
    return torch.get_num_threads()


def teacher_stats(teacher: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """T [N, G, B, V] -> (lse [N, G, B], logconf [N, G, B]) of T/τ, accumulation dtype."""
    dt = acc_dtype(teacher)
    lse = torch.empty(teacher.shape[:-1], dtype=dt)
    logconf = torch.empty(teacher.shape[:-1], dtype=dt)
    _C.teacher_stats(_arg("teacher", teacher), float(tau), _CODES[dt], lse.data_ptr(), logconf.data_ptr(),
                     _threads())
    return lse, logconf


def select(logconf: Tensor, adj: Tensor, include_self: bool) -> tuple[Tensor, Tensor]:
    """logconf [N, G, B] -> (idx [N, G, B] int64, −1 without candidate; has [N] bool)."""
    logconf = logconf.to(acc_dtype(logconf))
    idx = torch.empty(logconf.shape, dtype=torch.int64)
    has = torch.empty(logconf.shape[:1], dtype=torch.bool)
    _C.select(_arg("logconf", logconf), _arg("adj", adj), bool(include_self), idx.data_ptr(), has.data_ptr(),
              _threads())
    return idx, has


def _distill(kernel, student: Tensor, dt: torch.dtype, outputs: dict, *, values, indices, idx, adj, tau,
             include_self, aggregate, **rows: Tensor) -> None:
    """Runs _C.distill_bwd (or _C.distill_fwd, which takes the same arguments) against packet
    teachers. Per-row metadata ([N, G, B]: lse_t, logconf_t and, backward, grad and lse_z) and
    packet values go to the accumulation dtype dt, indices to int32 (no copy when they already
    are); the converted tensors stay referenced here until the kernel returns, since _C only
    gets their pointers."""
    rows = {name: t.to(dt) for name, t in rows.items()}
    values, indices = values.to(dt), indices.to(torch.int32)
    kernel(student=_arg("student", student), teacher=None, values=_arg("values", values),
           indices=_arg("indices", indices), idx=_arg("idx", idx), adj=_arg("adj", adj), tau=float(tau),
           include_self=bool(include_self), aggregate=_aggregate_code(aggregate), acc=_CODES[dt], threads=_threads(),
           **{name: _arg(name, t) for name, t in rows.items()}, **outputs)


def _backward(student, dt, out, **args) -> Tensor:
    """Writes dZ into out directly when its rows are contiguous (any strides over n, g, b, as
    for the aux heads of a full gradient), else through a contiguous buffer and a copy."""
    direct = out.stride(-1) == 1 or out.shape[-1] == 1
    d_student = out if direct else torch.empty(student.shape, dtype=student.dtype)
    _distill(_C.distill_bwd, student, dt, dict(dz=d_student.data_ptr(), dz_strides=list(d_student.stride()[:3])),
             **args)
    if d_student is not out:
        out.copy_(d_student)
    return out


def distill_topk_packets(student: Tensor, values: Tensor, indices: Tensor, lse: Tensor, adj: Tensor, tau: float,
                         include_self: bool, aggregate: str, head_offset: int = 0) -> tuple:
    """The forward of a packet teacher in one call, from the packet as it arrives: student
    [N, H, B, V] of which heads head_offset.. learn (read through a pointer, no slice) against
    the first G = H − head_offset heads of values / indices [N, ≥ G, B, K] and lse [N, ≥ G, B]
    (indices and lse read through pointers; values as a slice in the accumulation dtype,
    converted only when they come in another), values in any float dtype, indices int16 /
    int32 / int64. -> (loss, rows, indices, idx): the loss rows (a tensor of their own: the
    caller may edit it in place); rows [3, N, G, B], one buffer holding lse_t, logconf_t and
    lse_z; the indices as int32; the teacher choice."""
    dt = acc_dtype(student, values, lse)
    g = student.shape[1] - head_offset
    if g < 1 or values.dim() != 4 or values.shape[1] < g:
        raise ValueError(f"student heads {head_offset}.. must have a teacher head each, got student shape "
                         f"{tuple(student.shape)} and teacher.values shape {tuple(values.shape)}")
    values = values[:, :g].to(dt)
    rows = (student.shape[0], g, student.shape[2])
    ind32 = torch.empty((*rows, values.shape[-1]), dtype=torch.int32)
    stats = torch.empty((3, *rows), dtype=dt)
    lse_t, logconf_t, lse_z = stats.unbind(0)
    loss = torch.empty(rows, dtype=dt)
    idx = torch.empty(rows, dtype=torch.int64)
    _C.distill_topk_packets(_heads("student", student, head_offset, g), _arg("teacher.values", values),
                            _heads("teacher.indices", indices, 0, g), _heads("teacher.lse", lse, 0, g),
                            _arg("adj", adj), float(tau), bool(include_self), _aggregate_code(aggregate), _CODES[dt],
                            ind32.data_ptr(), lse_t.data_ptr(), logconf_t.data_ptr(), idx.data_ptr(), loss.data_ptr(),
                            lse_z.data_ptr(), _threads())
    return loss, stats, ind32, idx


def distill_topk_bwd(grad, student, values, indices, lse_t, logconf_t, idx, adj, lse_z, tau, include_self,
                     aggregate, out):
    """Top-k packet teacher: dZ by the bucket formula (reference.distill_topk; mean / confidence_weighted:
    grad·τ·(q − p̄) against the expanded packets)."""
    return _backward(student, acc_dtype(student, values), out, values=values, indices=indices,
                     lse_t=lse_t, logconf_t=logconf_t, idx=idx, adj=adj, tau=tau, include_self=include_self,
                     aggregate=aggregate, grad=grad, lse_z=lse_z)


def _heads(name: str, x: Tensor, first: int, count: int) -> tuple:
    """_arg of the view x[:, first : first + count] without making it (one op less a call)."""
    ptr, code, shape, stride = _arg(name, x)
    return ptr + first * stride[1] * x.element_size(), code, (shape[0], count, *shape[2:]), stride


def _dense_heads(student: Tensor, teacher: Tensor, head_offset: int, g: int) -> None:
    """distill_dense reads teacher heads 0..g−1 and student heads head_offset..head_offset+g−1
    through pointers: they must exist."""
    if student.dim() != 4 or teacher.dim() != 4 or not (0 <= g <= teacher.shape[1]
                                                        and 0 <= head_offset <= student.shape[1] - g):
        raise ValueError(f"teacher groups 0..{g - 1} must lie within the teacher's heads and student heads "
                         f"{head_offset}..{head_offset + g - 1} within the student's, got teacher shape "
                         f"{tuple(teacher.shape)} and student shape {tuple(student.shape)}")


def distill_dense(student: Tensor, teacher: Tensor, adj: Tensor, head_offset: int, tau: float,
                  include_self: bool, aggregate: str, need_grad: bool, groups: int | None = None,
                  reduction: str = "none"):
    """Dense teacher, one launch: statistics, teacher choice, loss and (need_grad) the unit
    gradient τ(q − p̄) of the full student, zeros outside heads head_offset .. head_offset + G.
    groups: the teacher is read as teacher[:, :groups] (G = groups), else whole
    (G = teacher.shape[1]). reduction "sum" / "mean": the first output is the loss rows' sum
    (/ their number) instead of the rows, summed by _C in a fixed order in fp64.

    student [N, H, B, V], teacher [N, G, B, V] -> (loss, lse_z, unit [N, H, B, V] or empty,
    lse_t, logconf_t, idx int64), all [N, G, B] in the accumulation dtype but unit and idx,
    each a tensor of its own (the custom op's outputs); unit from ``pool.POOL``."""
    g = teacher.shape[1] if groups is None else groups
    _dense_heads(student, teacher, head_offset, g)
    dt = acc_dtype(student, teacher)
    rows = (student.shape[0], g, student.shape[2])
    lse_t, logconf_t, loss, lse_z = (torch.empty(rows, dtype=dt) for _ in range(4))
    idx = torch.empty(rows, dtype=torch.int64)
    unit = POOL.empty(student.shape, dt) if need_grad else torch.empty((0,), dtype=dt)
    total = torch.empty((), dtype=dt) if reduction != "none" else None
    _C.distill_dense(_heads("student", student, head_offset, g), _heads("teacher", teacher, 0, g), _arg("adj", adj),
                     float(tau), bool(include_self), _aggregate_code(aggregate), _CODES[dt], lse_t.data_ptr(),
                     logconf_t.data_ptr(), idx.data_ptr(), loss.data_ptr(), lse_z.data_ptr(),
                     unit.data_ptr() if need_grad else 0, unit.stride()[:3] if need_grad else (),
                     student.shape[1], int(head_offset), _threads(), 0 if total is None else total.data_ptr(),
                     loss.numel() if reduction == "mean" else 1)
    return loss if total is None else total, lse_z, unit, lse_t, logconf_t, idx


def zero_(x: Tensor) -> Tensor:
    """x [N, H, B, V] (class dim contiguous) <- 0 in place, on the threads; fp32 tensors larger
    than the caches by non-temporal stores (half the memory traffic of torch's zero_)."""
    if x.numel() > 0:
        _C.zero_rows(_arg("x", x), _threads())
    return x


def check_packets(values: Tensor, indices: Tensor, lse: Tensor) -> tuple[int, int, bool, int, float, float]:
    """The contents of packets values / indices [..., K], lse [...] (CPU, non-empty) in one pass:
    (the smallest index, the largest, whether a row sends a class twice, the first flat row whose
    sent probabilities sum past 1 beyond the rounding of a wire dtype or −1, its lse, its sum)."""
    dims = lse.dim()
    if dims < 3:  # the kernel reads [R0, R1, R2, K]
        lead = (None,) * (3 - dims)
        values, indices, lse = values[lead], indices[lead], lse[lead]
    elif dims > 3:
        values, indices, lse = values.flatten(0, dims - 3), indices.flatten(0, dims - 3), lse.flatten(0, dims - 3)
    return _C.check_packets(_arg("teacher.values", values), _arg("teacher.indices", indices),
                            _arg("teacher.lse", lse), _threads())


def topk_compress(logits: Tensor, k: int, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """X [R, V] -> (values [R, k] of X/τ descending, accumulation dtype; indices [R, k] int32;
    lse [R] of X/τ). Ties -> lower index first; NaN ranks above every number."""
    dt = acc_dtype(logits)
    r = logits.shape[0]
    values = torch.empty((r, k), dtype=dt)
    indices = torch.empty((r, k), dtype=torch.int32)
    lse = torch.empty((r,), dtype=dt)
    _C.topk_compress(_arg("logits", logits), int(k), float(tau), _CODES[dt], values.data_ptr(), indices.data_ptr(),
                     lse.data_ptr(), _threads())
    return values, indices, lse
