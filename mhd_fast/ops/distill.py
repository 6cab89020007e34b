"""mhd_loss and distill_loss: τ²·KL(p̄ ‖ q) of every student row against its teachers.

Student row (i, g, b) with q = softmax(Z[i, g, b] / τ) learns from group g of client i's
candidate teachers C(i) (select.py), whose distributions p_j = softmax(T[j, g, b] / τ) are
aggregated into p̄:
  max_confidence       p̄ = p_j*, j* the most confident candidate (select.py)
  mean                 p̄ = Σ_{j ∈ C(i)} p_j / |C(i)|
  confidence_weighted  p̄ = Σ_{j ∈ C(i)} c_j p_j / Σ c_j,  c_j = max_v p_j,v
  loss = τ² · Σ_v p̄_v (log p̄_v − log q_v)   (0·log 0 = 0; 0 for a client with no candidate)
  ∂loss/∂Z = τ · (Σ_v p̄_v · q − p̄)             (p̄ does not depend on Z)
A top-k packet teacher sends only K classes: max_confidence takes the KL over the K sent
buckets and one rest bucket, the others expand each packet over V first (reference.py).
``mhd_loss`` is the loss of aux head h against head h−1: distill_loss(Z[:, 1:], T[:, :-1]).

The ``torch`` backend is reference.py under autograd. The compiled backends run custom ops,
one path for eager mode, torch.compile and opcheck alike:
  dense teacher           distill_dense: statistics, choice, loss and the unit gradient
                          in one launch; the backward scales that gradient (cpp: τ(q − p̄) in
                          the accumulation dtype; triton: the gradient of the op's output,
                          mean included, in the student's dtype, scaled on the device)
  packet teacher          distill_topk: the packet's rows, choice and loss in one launch; the
                          backward distill_topk_bwd
The ops take the FULL student logits [N, H, B, V] and a head offset: student group g is head
head_offset + g, so that the backward writes the whole gradient at once (zeros in the other
heads) instead of autograd zero-filling a full tensor and copying a slice into it.

Kernel contract of the compiled backends (Z [N, G, B, V] the learning heads, T [N, G, B, V];
any strides, fp32/fp16/bf16/fp64; row tensors [N, G, B] in the accumulation dtype, fp64 if an
input is fp64, else fp32; packet values [N, G, B, K] in any float dtype, indices int32; inputs
never written):

  distill_topk_packets(Z_full [N, H, B, V], values, indices, lse, adj, tau, include_self,
                       aggregate, head_offset)
      -> (loss, rows [3, N, G, B] = lse_t, logconf_t, row statistic; indices int32; idx): the
      first G = H − head_offset heads of the packet as it arrives (values, indices int16 /
      int32 / int64 [N, ≥ G, B, K], lse [N, ≥ G, B])
  distill_topk_bwd(grad, Z, values, indices, lse_t, logconf_t, idx, adj, statistic, tau,
                   include_self, aggregate, out) -> out, the bucket formula (reference.py)
  distill_dense(Z_full, T [N, ≥ G, B, V], adj, head_offset, tau, include_self, aggregate,
                need_grad, groups, reduction)
      -> (loss, lse_z, unit [N, H, B, V] or empty, lse_t, logconf_t, idx); loss is the rows'
      sum (or mean) for reduction "sum" ("mean"), in a fixed order
  scale_unit(unit, grad, idx, head_offset) -> unit · grad in place (UNIT_OF_OUTPUT only)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import reference
from .backends import in_func_transform, launchers, resolve_backend
from .inputs import (LOGIT_DTYPE_SET, MAX_TAU, TopKLogits, check_adj, check_choice, check_logits, check_tau,
                     check_teacher)
from .pool import POOL
from .reference import AGGREGATES, acc_dtype, reduce_loss

REDUCTIONS = ("none", "mean", "sum")
# Backends whose unit gradient is that of the op's output in the student's dtype, scaled by
# scale_unit on the device: no host read in the backward (the cpp path reads a scalar gradient).
UNIT_OF_OUTPUT = frozenset({"triton"})
_AGGREGATE_SET = frozenset(AGGREGATES)
_REDUCTION_SET = frozenset(REDUCTIONS)


# ---- argument checks -----------------------------------------------------------------------

def _well_formed_dense(student_logits, teacher, adj, tau, aggregate, reduction) -> bool:
    """The common call, accepted by one expression of cheap tests: plain CPU tensors, a dense
    teacher of the student's shape, a bool [N, N] graph, known options and a τ in (0, MAX_TAU] (a
    float or int, not a bool). It accepts nothing that _check_loss_args rejects, and leaves
    everything else to it (whose dozen helper calls cost a training step's cold call
    microseconds each)."""
    if type(student_logits) is not Tensor or type(teacher) is not Tensor or type(adj) is not Tensor:
        return False
    shape = student_logits.shape
    return (len(shape) == 4 and 0 not in shape and teacher.shape == shape and adj.shape == (shape[0], shape[0])
            and student_logits.is_cpu and teacher.is_cpu and adj.is_cpu
            and student_logits.dtype in LOGIT_DTYPE_SET and teacher.dtype in LOGIT_DTYPE_SET
            and adj.dtype == torch.bool and (type(tau) is float or type(tau) is int) and 0 < tau <= MAX_TAU
            and type(aggregate) is str and aggregate in _AGGREGATE_SET
            and type(reduction) is str and reduction in _REDUCTION_SET)


def _check_loss_args(student_logits, teacher, adj, tau, aggregate, reduction, head_offset: int) -> float:
    if _well_formed_dense(student_logits, teacher, adj, tau, aggregate, reduction):
        return float(tau)
    check_logits("student_logits", student_logits)
    device = student_logits.device
    shape = tuple(student_logits.shape)
    check_teacher(teacher, shape, device, heads=shape[1] - head_offset)
    check_adj(adj, student_logits.shape[0], device)
    check_choice("aggregate", aggregate, AGGREGATES)
    check_choice("reduction", reduction, REDUCTIONS)
    return check_tau(tau)


# ---- gradients shared by the custom ops -----------------------------------------------------

def _grad_buffer(student: Tensor, head_offset: int, g: int, backend: str) -> Tensor:
    """dZ of the full student, zeros outside the learning heads (the kernel fills those). On CPU
    an idle buffer of the pool when there is one, the zeros by the cpp backend's zero_."""
    cpu = student.device.type == "cpu" and type(student) is Tensor
    if cpu:
        d = POOL.empty(student.shape, student.dtype)
    else:
        d = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    zero = launchers("cpp").zero_ if cpu and backend == "cpp" else Tensor.zero_
    zero(d[:, :head_offset])
    zero(d[:, head_offset + g:])
    return d


def _differentiable_grad(grad_loss: Tensor, student: Tensor, head_offset: int, g: int, loss_rows) -> Tensor:
    """dL/dZ of the full student for a backward taken with create_graph=True (a double backward,
    a gradient penalty): the kernels' gradient is numbers, not a function of Z that autograd
    could differentiate again, so this one comes from the torch reference, built on the saved
    student itself. loss_rows(student heads head_offset .. head_offset + g) -> the reference's
    loss rows; grad_loss: their upstream gradient, or one number for all of them."""
    with torch.enable_grad():
        rows = loss_rows(student[:, head_offset:head_offset + g])
        (d,) = torch.autograd.grad(rows, student, grad_loss.to(rows.dtype).expand(rows.shape), create_graph=True)
    return d


def _fake_rows(student, g, dt):
    return student.new_empty((student.shape[0], g, student.shape[2]), dtype=dt)


# ---- dense teacher, one launch -------------------------------------------------------------
#
# The forward also writes the unit gradient τ(q − p̄) of the full student when it will be
# needed; the backward scales it by the upstream gradient: not at all for the 1 of
# loss.sum().backward() or a reduced loss's backward(), in place for any other finite gradient.
# The buffer rides on ctx (not saved) and the first backward hands it over, so that autograd
# may accumulate into it; a second backward through a retained graph runs the kernel again.

@torch.library.custom_op("mhd_fast::distill_dense", mutates_args=())
def distill_dense(student: Tensor, teacher: Tensor, adj: Tensor, head_offset: int, tau: float,
                  include_self: bool, aggregate: str, need_grad: bool, reduction: str,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Student heads head_offset.. against the teacher's first G = H − head_offset heads (read
    in place: teacher [N, ≥ G, B, V])."""
    return tuple(launchers(backend).distill_dense(student, teacher, adj, head_offset, tau, include_self, aggregate,
                                                  need_grad, groups=student.shape[1] - head_offset,
                                                  reduction=reduction))


@distill_dense.register_fake
def _(student, teacher, adj, head_offset, tau, include_self, aggregate, need_grad, reduction, backend):
    dt = acc_dtype(student, teacher)
    g = student.shape[1] - head_offset
    loss = student.new_empty((), dtype=dt) if reduction != "none" else _fake_rows(student, g, dt)
    unit = student.new_empty(student.shape if need_grad else (0,),
                             dtype=student.dtype if backend in UNIT_OF_OUTPUT else dt)
    lse_z, lse_t, logconf_t = (_fake_rows(student, g, dt) for _ in range(3))
    return loss, lse_z, unit, lse_t, logconf_t, _fake_rows(student, g, torch.int64)


def _setup_dense(ctx, inputs, output):
    student, teacher, adj, head_offset, tau, include_self, aggregate, need_grad, reduction, backend = inputs
    _, lse_z, unit, _, _, idx = output
    ctx.save_for_backward(student, teacher, adj, idx, lse_z)
    ctx.unit = [unit] if need_grad else []
    ctx.options = (head_offset, tau, include_self, aggregate, backend)
    ctx.mean_of = idx.numel() if reduction == "mean" else 0
    ctx.student_dtype = student.dtype
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody uses


def _unit_times_scalar(unit: Tensor, grad: Tensor) -> Tensor | None:
    """unit · grad in place (the caller owns unit) when grad is one finite number for all rows
    (a reduced loss's, or loss.sum()'s expanded) on eager tensors; None otherwise. The number
    1 of ``loss.backward()`` hands unit over untouched."""
    if type(grad) is not Tensor or type(unit) is not Tensor:  # traced: no host reads
        return None
    if grad.dim() == 0:
        c = float(grad)
    elif all(s == 0 for s in grad.stride()):
        c = float(grad[(0,) * grad.dim()])
    else:
        return None
    return (unit if c == 1 else unit.mul_(c)) if math.isfinite(c) else None


def _unit_times_grad(unit: Tensor, grad: Tensor, idx: Tensor, head_offset: int) -> Tensor:
    """dZ = unit · grad, grad [N, G, B] (or one scalar for all) scaling the rows of heads
    head_offset.. (the others are 0), and exact zeros for clients without a candidate whatever
    the gradient (NaN or inf included). Eager tensors with a finite gradient are scaled in
    place: the caller owns unit."""
    scaled = _unit_times_scalar(unit, grad)
    if scaled is not None:
        return scaled
    g = idx.shape[1]
    if (type(grad) is Tensor and type(unit) is Tensor and any(s != 0 for s in grad.stride())
            and bool(torch.isfinite(grad).all())):  # a finite number a row; not traced: a host read, in place
        unit[:, head_offset:head_offset + g].mul_(grad.unsqueeze(-1))
        return unit
    n, h, b, _ = unit.shape
    g_full = unit.new_zeros((n, h, b, 1), dtype=grad.dtype)
    g_full[:, head_offset:head_offset + g, :, 0] = grad
    has = (idx[:, :1, :1] >= 0).unsqueeze(-1)  # [N, 1, 1, 1]: −1 marks a client without candidate
    return torch.where(has, unit * g_full, 0)


def _backward_dense(ctx, grad_loss, *_):
    none = (None,) * 9
    if grad_loss is None:
        return (None,) + none
    head_offset, tau, include_self, aggregate, backend = ctx.options
    if backend in UNIT_OF_OUTPUT and not torch.is_grad_enabled():
        student, teacher, adj, idx, _ = ctx.saved_tensors
        unit = ctx.unit.pop() if ctx.unit else distill_dense(
            student.detach(), teacher.detach(), adj, head_offset, tau, include_self, aggregate, True,
            "mean" if ctx.mean_of else "none", backend)[2]  # a second backward: the kernel again
        if type(unit) is Tensor and type(grad_loss) is Tensor:  # eager: in place, one launch
            launchers(backend).scale_unit(unit, grad_loss, idx, head_offset)
            return (unit,) + none
        return (_unit_times_grad(unit, grad_loss, idx, head_offset).to(student.dtype),) + none  # traced
    if ctx.mean_of:
        grad_loss = grad_loss / ctx.mean_of  # as autograd differentiates sum / count
    if torch.is_grad_enabled():  # create_graph=True
        student, teacher, adj, idx, _ = ctx.saved_tensors
        teacher = teacher[:, :idx.shape[1]]
        d = _differentiable_grad(grad_loss, student, head_offset, idx.shape[1], lambda z: reference.distill_dense(
            z, teacher, adj, tau=tau, include_self=include_self, aggregate=aggregate))
        return (d,) + none
    if ctx.unit:  # the common case, one finite number: without unpacking the saved tensors
        d_student = _unit_times_scalar(ctx.unit[0], grad_loss)
        if d_student is not None:
            ctx.unit.pop()
            if d_student.dtype != ctx.student_dtype:  # (a no-op .to is still a dispatcher call)
                d_student = d_student.to(ctx.student_dtype)
            return (d_student,) + none
    student, teacher, adj, idx, lse_z = ctx.saved_tensors
    unit = ctx.unit.pop() if ctx.unit else None
    if unit is None:  # a second backward through a retained graph: the same kernel again
        unit = distill_dense(student.detach(), teacher.detach(), adj, head_offset, tau, include_self, aggregate,
                             True, "none", backend)[2]
    d_student = _unit_times_grad(unit, grad_loss.to(lse_z.dtype), idx, head_offset)
    return (d_student.to(student.dtype),) + none


distill_dense.register_autograd(_backward_dense, setup_context=_setup_dense)


# ---- top-k packet teacher ------------------------------------------------------------------

@torch.library.custom_op("mhd_fast::distill_topk", mutates_args=())
def distill_topk(student: Tensor, values: Tensor, indices: Tensor, lse: Tensor, adj: Tensor, head_offset: int,
                 tau: float, include_self: bool, aggregate: str,
                 backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Student heads head_offset.. against the first G = H − head_offset heads of the packet as
    it arrives -> (loss, rows [3, N, G, B] = lse_t, logconf_t, the backward's row statistic;
    indices as int32; idx)."""
    return tuple(launchers(backend).distill_topk_packets(student, values, indices, lse, adj, tau, include_self,
                                                         aggregate, head_offset=head_offset))


@distill_topk.register_fake
def _(student, values, indices, lse, adj, head_offset, tau, include_self, aggregate, backend):
    dt = acc_dtype(student, values, lse)
    n, h, b, _ = student.shape
    g = h - head_offset
    return (_fake_rows(student, g, dt), student.new_empty((3, n, g, b), dtype=dt),
            student.new_empty((n, g, b, values.shape[-1]), dtype=torch.int32), _fake_rows(student, g, torch.int64))


@torch.library.custom_op("mhd_fast::distill_topk_bwd", mutates_args=())
def distill_topk_bwd(grad: Tensor, student: Tensor, values: Tensor, indices: Tensor, lse_t: Tensor,
                     logconf_t: Tensor, idx: Tensor, adj: Tensor, statistic: Tensor, head_offset: int,
                     tau: float, include_self: bool, aggregate: str, backend: str) -> Tensor:
    g = values.shape[1]
    d = _grad_buffer(student, head_offset, g, backend)
    launchers(backend).distill_topk_bwd(grad, student[:, head_offset:head_offset + g], values, indices, lse_t,
                                        logconf_t, idx, adj, statistic, tau, include_self, aggregate,
                                        out=d[:, head_offset:head_offset + g])
    return d


@distill_topk_bwd.register_fake
def _(grad, student, values, indices, lse_t, logconf_t, idx, adj, statistic, head_offset, tau, include_self,
      aggregate, backend):
    return student.new_empty(student.shape)


def _setup_topk(ctx, inputs, output):
    student, values, indices, lse, adj, head_offset, tau, include_self, aggregate, backend = inputs
    _, rows, indices32, idx = output
    g = idx.shape[1]
    ctx.save_for_backward(student, values[:, :g], indices32, lse[:, :g], rows, idx, adj)
    ctx.options = (head_offset, tau, include_self, aggregate, backend)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward_topk(ctx, grad_loss, *_):
    none = (None,) * 9
    if grad_loss is None:
        return (None,) + none
    student, values, indices, lse, rows, idx, adj = ctx.saved_tensors
    head_offset, tau, include_self, aggregate, backend = ctx.options
    if torch.is_grad_enabled():  # create_graph=True
        d = _differentiable_grad(grad_loss, student, head_offset, idx.shape[1], lambda z: reference.distill_topk(
            z, values, indices, lse, adj, tau=tau, include_self=include_self, aggregate=aggregate))
        return (d,) + none
    lse_t, logconf_t, statistic = rows.unbind(0)
    d = distill_topk_bwd(grad_loss.to(rows.dtype), student, values.to(rows.dtype), indices, lse_t, logconf_t, idx,
                         adj, statistic, head_offset, tau, include_self, aggregate, backend)
    return (d,) + none


distill_topk.register_autograd(_backward_topk, setup_context=_setup_topk)


# ---- dispatch and the public ops -----------------------------------------------------------

def _distill(student: Tensor, teacher, adj: Tensor, head_offset: int, tau: float, include_self: bool,
             aggregate: str, reduction: str, backend: str) -> Tensor:
    """The loss of student heads head_offset.. against the teacher's first G = H − head_offset
    heads (mhd_loss: teacher heads 0..H1−2), checked arguments. ``student`` is the full
    [N, H, B, V] tensor: compiled backends take it whole."""
    be = resolve_backend(backend, student.device)
    if be != "torch" and in_func_transform():
        be = "torch"  # correct under every transform, at the reference's speed
    g = student.shape[1] - head_offset
    if isinstance(teacher, TopKLogits):
        if be == "torch":
            values, indices, lse = (x[:, :g] for x in teacher)
            loss = reference.distill_topk(student[:, head_offset:], values, indices, lse, adj, tau=tau,
                                          include_self=include_self, aggregate=aggregate)
        else:
            loss = distill_topk(student, *teacher, adj, head_offset, tau, include_self, aggregate, be)[0]
        return reduce_loss(loss, reduction)
    if be == "torch":
        teacher = teacher[:, :g].detach()  # predictions received from clients carry no gradient
        loss = reference.distill_dense(student[:, head_offset:], teacher, adj, tau=tau, include_self=include_self,
                                       aggregate=aggregate)
        return reduce_loss(loss, reduction)
    need_grad = torch.is_grad_enabled() and student.requires_grad
    return distill_dense(student, teacher, adj, head_offset, tau, include_self, aggregate, need_grad, reduction,
                         be)[0]


def distill_loss(student_logits: Tensor, teacher, adj: Tensor, *, tau: float = 1.0,
                 include_self: bool = False, aggregate: str = "max_confidence",
                 reduction: str = "none", backend: str = "auto") -> Tensor:
    """τ²·KL(teacher ‖ student) for all clients, groups and rows in one call.

    Student group g of client i learns from group g of its candidate teachers, aggregated by
    ``aggregate``. student_logits [N, G, B, V] (fp32/fp16/bf16/fp64, any strides); teacher
    [N, G, B, V] dense logits or a TopKLogits packet with leading dims [N, G, B]; adj [N, N]
    bool; τ in (0, MAX_TAU]. Returns fp32 (fp64 for fp64 input): "none" -> [N, G, B],
    "sum" -> scalar, "mean" -> sum / (N·G·B). Clients with no candidate get 0 and gradient 0.
    The teacher gets no gradient. Rows whose logits hold NaN or +inf give NaN; −inf logits are
    masked classes.
    """
    tau = _check_loss_args(student_logits, teacher, adj, tau, aggregate, reduction, 0)
    return _distill(student_logits, teacher, adj, 0, tau, bool(include_self), aggregate, reduction, backend)


def mhd_loss(student_logits: Tensor, teacher, adj: Tensor, *, tau: float = 1.0,
             include_self: bool = False, aggregate: str = "max_confidence",
             reduction: str = "none", backend: str = "auto") -> Tensor:
    """The multi-headed distillation loss: aux head h of client i distils from head h−1 of its
    teachers. Equals ``distill_loss(Z[:, 1:], T[:, :-1], adj, ...)``.

    student_logits [N, H1, B, V] (H1 >= 2); teacher [N, H1, B, V] or TopKLogits with leading
    dims [N, H1, B]; adj [N, N] bool. "none" -> [N, H1−1, B] fp32; "sum" -> its sum;
    "mean" -> its sum / (N·(H1−1)·B).
    """
    tau = _check_loss_args(student_logits, teacher, adj, tau, aggregate, reduction, 1)
    if student_logits.shape[1] < 2:
        raise ValueError(f"student_logits must have H1 >= 2 heads (main + aux), got shape "
                         f"{tuple(student_logits.shape)}")
    return _distill(student_logits, teacher, adj, 1, tau, bool(include_self), aggregate, reduction, backend)
