"""The public ops of SPEC §7: argument checks, backend choice, head shift and reduction.

Every function here checks its arguments (ValueError naming the argument, what was given and
what was expected), then calls either the torch reference (``backend="torch"``) or the
custom ops of ``registry`` that run a compiled backend.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from . import reference
from .reference import AGGREGATES

BACKENDS = ("auto", "torch", "cpp", "triton")
REDUCTIONS = ("none", "mean", "sum")
LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


class TopKLogits(NamedTuple):
    """A compressed prediction row as it crosses an edge (SPEC §3).

    values  [..., K]  the K largest of logits/τ, descending; fp32 (default), fp16 or bf16.
    indices [..., K]  their classes; int16 when V ≤ 32767, else int32; ties -> lower index first.
    lse     [...]     logsumexp over all V of logits/τ, fp32.
    """

    values: Tensor
    indices: Tensor
    lse: Tensor


# ---- backends ------------------------------------------------------------------------------

_AVAILABLE: dict[str, str | None] = {"torch": None}  # backend -> None or why it cannot run
_WARNED: set[str] = set()


def _probe(name: str) -> str | None:
    if name == "cpp":
        try:
            from .. import _C  # noqa: F401
        except ImportError as e:
            return f"the C++ extension mhd_fast._C is not built ({e}); reinstall with `pip install -e .`"
        return None
    try:
        import triton  # noqa: F401
        from . import triton_backend  # noqa: F401
    except ImportError as e:
        return f"Triton is not usable ({e}); install it with `pip install triton`"
    return None


def backend_available(name: str) -> str | None:
    """None when the backend can run here, else the reason it cannot (probed once)."""
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {name!r}")
    if name not in _AVAILABLE:
        _AVAILABLE[name] = _probe(name)
    return _AVAILABLE[name]


def _warn_fallback(wanted: str, reason: str) -> None:
    if wanted not in _WARNED:  # one warning per process
        _WARNED.add(wanted)
        warnings.warn(f"mhd_fast: backend 'auto' falls back to 'torch': {reason}", RuntimeWarning,
                      stacklevel=4)


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``: 'torch', 'cpp' or 'triton'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        wanted = "triton" if device.type == "cuda" else "cpp" if device.type == "cpu" else "torch"
        if wanted == "torch":
            return "torch"
        reason = backend_available(wanted)
        if reason is not None:
            _warn_fallback(wanted, reason)
            return "torch"
        return wanted
    if backend == "torch":
        return backend
    reason = backend_available(backend)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "triton" and not _triton_runs_on(device):
        raise ValueError(f"backend='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1), "
                         f"got tensors on {device}")
    return backend


_REGISTRY: dict = {}


def _registry():
    """The module of the custom ops, imported on first use (it registers them with torch)."""
    module = _REGISTRY.get("registry")
    if module is None:
        from . import registry as module
        _REGISTRY["registry"] = module
    return module


# ---- checks --------------------------------------------------------------------------------

def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


_functorch_level = torch._C._functorch.peek_interpreter_stack


def _in_func_transform() -> bool:
    """Inside a torch.func transform (grad, vmap, jvp, jacrev, ...): the custom ops' autograd
    (torch.library's) does not compose with them in this torch, the reference's ops do."""
    return not _is_compiling() and _functorch_level() is not None


def check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    return float(tau)


_LOGIT_DTYPE_SET = frozenset(LOGIT_DTYPES)  # one hash lookup a check (these run on every call)


def _check_logits(name: str, x, ndim: int | None = 4) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _LOGIT_DTYPE_SET:
        raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    shape = x.shape
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name} must be 4-D [N, H1, B, V], got shape {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"{name} must have no empty dimension, got shape {tuple(shape)}")


def _check_adj(adj, n: int, device: torch.device) -> None:
    if not isinstance(adj, Tensor):
        raise ValueError(f"adj must be a torch.Tensor, got {type(adj).__name__}")
    if adj.dtype != torch.bool:
        raise ValueError(f"adj must be a bool tensor, got {adj.dtype}")
    if tuple(adj.shape) != (n, n):
        raise ValueError(f"adj must have shape [N, N] = [{n}, {n}] (N from the logits), "
                         f"got {tuple(adj.shape)}")
    if adj.device != device:
        raise ValueError(f"adj must be on the logits' device {device}, got {adj.device}")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_packet(teacher: TopKLogits, rows: tuple, v: int | None, device: torch.device) -> None:
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
    if v is not None:
        if k > v:
            raise ValueError(f"teacher packets must have K <= V = {v}, got K = {k}")
        if not _is_compiling() and indices.numel():  # a host sync: skipped under compile
            lo, hi = (int(x) for x in torch.aminmax(indices))
            if lo < 0 or hi >= v:
                raise ValueError(f"teacher.indices must lie in [0, {v}), got values in [{lo}, {hi}]")


# ---- public ops ----------------------------------------------------------------------------

def topk_compress(logits: Tensor, k: int, *, tau: float = 1.0, value_dtype: torch.dtype | None = None,
                  backend: str = "auto") -> TopKLogits:
    """Compress prediction rows to top-k packets (SPEC §3).

    logits [..., V] (fp32/fp16/bf16/fp64) -> TopKLogits(values [..., k] of value_dtype
    (default fp32), indices [..., k] int16 if V <= 32767 else int32, lse [...] fp32).
    values are the k largest of logits/τ, descending, ties -> lower index first.
    """
    _check_logits("logits", logits, ndim=None)
    if logits.dim() < 1:
        raise ValueError("logits must have at least 1 dimension [..., V]")
    tau = check_tau(tau)
    v = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v:
        raise ValueError(f"k must be an integer in [1, V = {v}], got {k!r}")
    if value_dtype is None:
        value_dtype = torch.float32
    if value_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"value_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {value_dtype}")
    be = resolve_backend(backend, logits.device)
    rows = logits.reshape(-1, v)
    if be == "torch":
        values, indices, lse = reference.topk_compress(rows, k, tau)
    else:
        registry = _registry()
        values, indices, lse = registry.topk_compress(rows, k, tau, be)
    lead = logits.shape[:-1]
    index_dtype = torch.int16 if v <= 32767 else torch.int32
    return TopKLogits(values.to(value_dtype).reshape(*lead, k),
                      indices.to(index_dtype).reshape(*lead, k),
                      lse.to(torch.float32).reshape(lead))


def _teacher_stats(teacher, tau: float, backend: str) -> tuple[Tensor, Tensor]:
    if isinstance(teacher, TopKLogits):
        return reference.packet_stats(teacher.values, teacher.lse)
    if backend == "torch":
        return reference.teacher_stats(teacher, tau)
    registry = _registry()
    return registry.teacher_stats(teacher, tau, backend)


def _check_teacher(teacher, student_shape: tuple | None, device) -> None:
    if isinstance(teacher, TopKLogits):
        rows = student_shape[:-1] if student_shape is not None else teacher.values.shape[:-1]
        if student_shape is None and teacher.values.dim() != 4:
            raise ValueError(f"teacher.values must be 4-D [N, H1, B, K], got shape {tuple(teacher.values.shape)}")
        _check_packet(teacher, rows, student_shape[-1] if student_shape is not None else None, device)
        return
    _check_logits("teacher", teacher)
    if student_shape is not None and tuple(teacher.shape) != tuple(student_shape):
        raise ValueError(f"teacher must have the shape of student_logits {tuple(student_shape)}, "
                         f"got {tuple(teacher.shape)}")
    if teacher.device != device:
        raise ValueError(f"teacher must be on the student's device {device}, got {teacher.device}")


def select_teachers(teacher_logits, adj: Tensor, *, tau: float = 1.0, include_self: bool = False,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The teacher of every aux row: head h of client i distils from head h−1 of the most
    confident candidate (SPEC §2), ties -> lowest client index.

    teacher_logits [N, H1, B, V] or TopKLogits with leading dims [N, H1, B]
    -> (idx [N, H1−1, B] int64, −1 where the client has no candidate; has [N] bool).
    """
    device = (teacher_logits.values if isinstance(teacher_logits, TopKLogits) else teacher_logits).device
    _check_teacher(teacher_logits, None, device)
    tau = check_tau(tau)
    rows = (teacher_logits.values if isinstance(teacher_logits, TopKLogits) else teacher_logits).shape
    if rows[1] < 2:
        raise ValueError(f"teacher_logits must have H1 >= 2 heads (main + aux), got H1 = {rows[1]}")
    _check_adj(adj, rows[0], device)
    be = resolve_backend(backend, device)
    shifted = _shift_teacher(teacher_logits)
    _, logconf = _teacher_stats(shifted, tau, be)
    if be == "torch":
        return reference.select(logconf, adj, bool(include_self))
    registry = _registry()
    return registry.select(logconf, adj, bool(include_self), be)


def _well_formed_dense(student_logits, teacher, adj, tau, aggregate, reduction) -> bool:
    """The common call, accepted by one expression of cheap tests: plain CPU tensors, a dense
    teacher of the student's shape, a bool [N, N] graph, known options and a finite τ > 0 (a
    float or int, not a bool). Whatever it does not accept goes through the checks below, which
    name what is wrong; it accepts nothing that they reject. (Run cold, as a training step runs
    it right after other work, every Python call and line costs about a microsecond: the
    checks' dozen helper calls were a measurable part of an S1 call's 1 ms.)"""
    if type(student_logits) is not Tensor or type(teacher) is not Tensor or type(adj) is not Tensor:
        return False
    shape = student_logits.shape
    return (len(shape) == 4 and 0 not in shape and teacher.shape == shape and adj.shape == (shape[0], shape[0])
            and student_logits.is_cpu and teacher.is_cpu and adj.is_cpu
            and student_logits.dtype in _LOGIT_DTYPE_SET and teacher.dtype in _LOGIT_DTYPE_SET
            and adj.dtype == torch.bool and (type(tau) is float or type(tau) is int) and 0 < tau < math.inf
            and type(aggregate) is str and aggregate in _AGGREGATE_SET
            and type(reduction) is str and reduction in _REDUCTION_SET)


_AGGREGATE_SET = frozenset(AGGREGATES)
_REDUCTION_SET = frozenset(REDUCTIONS)


def _check_loss_args(student_logits, teacher, adj, tau, aggregate, reduction) -> float:
    if _well_formed_dense(student_logits, teacher, adj, tau, aggregate, reduction):
        return float(tau)
    _check_logits("student_logits", student_logits)
    device = student_logits.device
    _check_teacher(teacher, tuple(student_logits.shape), device)
    _check_adj(adj, student_logits.shape[0], device)
    _check_choice("aggregate", aggregate, AGGREGATES)
    _check_choice("reduction", reduction, REDUCTIONS)
    return check_tau(tau)


def _distill(student: Tensor, teacher, adj: Tensor, head_offset: int, tau: float,
             include_self: bool, aggregate: str, reduction: str, backend: str) -> Tensor:
    """The loss of student heads head_offset.. against teacher groups (checked arguments). The
    teacher's groups are its first G = H − head_offset heads (mhd_loss: heads 0..H1−2; the
    shift is a view, or for the fused dense kernel a pointer). ``student`` is the full
    [N, H, B, V] tensor: compiled backends take it whole, so that their backward writes the
    full gradient in one pass."""
    be = resolve_backend(backend, student.device)
    if be != "torch" and _in_func_transform():
        be = "torch"  # correct under every transform, at the reference's speed
    g = student.shape[1] - head_offset
    dense = not isinstance(teacher, TopKLogits)
    if dense and be != "torch":
        registry = _registry()
        if registry.fused_dense(be):
            need_grad = torch.is_grad_enabled() and student.requires_grad
            return registry.dense_loss(student, teacher, adj, head_offset, tau, include_self,
                                       aggregate, need_grad, be, reduction)
    if not dense and be != "torch":
        registry = _registry()
        loss = registry.topk_loss(student, teacher.values, teacher.indices, teacher.lse, adj, head_offset, tau,
                                  include_self, aggregate, be)
        return reference.reduce_loss(loss, reduction)
    if head_offset:
        teacher = _shift_teacher(teacher)
    if be == "torch":
        z = student[:, head_offset:head_offset + g]
        if not dense:
            loss = reference.distill_topk(z, *teacher, adj, tau=tau, include_self=include_self,
                                          aggregate=aggregate)
        else:
            loss = reference.distill_dense(z, teacher, adj, tau=tau, include_self=include_self,
                                           aggregate=aggregate)
    else:  # a dense teacher on a backend without the one-launch dense loss
        registry = _registry()
        teacher = teacher.detach()
        lse_t, logconf_t = registry.teacher_stats(teacher, tau, be)
        idx, _ = registry.select(logconf_t, adj, include_self, be)
        loss, _ = registry.distill_fwd(student, teacher, lse_t, logconf_t, idx, adj, head_offset,
                                       tau, include_self, aggregate, be)
    return reference.reduce_loss(loss, reduction)


def distill_loss(student_logits: Tensor, teacher, adj: Tensor, *, tau: float = 1.0,
                 include_self: bool = False, aggregate: str = "max_confidence",
                 reduction: str = "none", backend: str = "auto") -> Tensor:
    """τ²·KL(teacher ‖ student) for all clients, groups and rows in one call (SPEC §2-§3).

    Student group g of client i learns from group g of its candidate teachers, aggregated by
    ``aggregate``. student_logits [N, G, B, V] (fp32/fp16/bf16/fp64, any strides); teacher
    [N, G, B, V] dense logits or a TopKLogits packet with leading dims [N, G, B]; adj [N, N]
    bool. Returns fp32 (fp64 for fp64 input): "none" -> [N, G, B], "sum" -> scalar,
    "mean" -> sum / (N·G·B). Clients with no candidate get 0 and gradient 0. The teacher gets
    no gradient. Rows whose logits hold NaN or +inf give NaN; −inf logits are masked classes.
    """
    tau = _check_loss_args(student_logits, teacher, adj, tau, aggregate, reduction)
    return _distill(student_logits, teacher, adj, 0, tau, bool(include_self), aggregate,
                    reduction, backend)


def _shift_teacher(teacher):
    """Heads 0..H1−2 of the teacher: what aux heads 1..H1−1 learn from."""
    if isinstance(teacher, TopKLogits):
        return TopKLogits(teacher.values[:, :-1], teacher.indices[:, :-1], teacher.lse[:, :-1])
    return teacher[:, :-1]


def mhd_loss(student_logits: Tensor, teacher, adj: Tensor, *, tau: float = 1.0,
             include_self: bool = False, aggregate: str = "max_confidence",
             reduction: str = "none", backend: str = "auto") -> Tensor:
    """The multi-headed distillation loss (SPEC §2): aux head h of client i distils from head
    h−1 of its teachers. Equals ``distill_loss(Z[:, 1:], T[:, :-1], adj, ...)``.

    student_logits [N, H1, B, V] (H1 >= 2); teacher [N, H1, B, V] or TopKLogits with leading
    dims [N, H1, B]; adj [N, N] bool. "none" -> [N, H1−1, B] fp32; "sum" -> its sum;
    "mean" -> its sum / (N·(H1−1)·B).
    """
    tau = _check_loss_args(student_logits, teacher, adj, tau, aggregate, reduction)
    if student_logits.shape[1] < 2:
        raise ValueError(f"student_logits must have H1 >= 2 heads (main + aux), got shape "
                         f"{tuple(student_logits.shape)}")
    return _distill(student_logits, teacher, adj, 1, tau, bool(include_self),
                    aggregate, reduction, backend)
