"""torch.library custom ops around the fused kernels, one op set for every compiled backend.

Layering (STYLE habit 2): kernel (C++ / Triton) -> launcher in the backend module ->
custom op here (fake + autograd) -> functional API in ``api.py``. The ``torch`` backend
is the reference and needs no op: autograd and torch.compile see through it.

A backend module (``cpp``, ``triton_backend``) provides these functions, each one launch
over the flat row space of all clients × groups × rows (no Python loop over clients):

  teacher_stats(T[N,G,B,V], tau) -> (lse[N,G,B], logconf[N,G,B])
  select(logconf[N,G,B], adj[N,N] bool, include_self) -> (idx[N,G,B] int64, -1 = none; has[N] bool)
  distill_fwd(Z, T, lse_t, logconf_t, idx, adj, tau, include_self, aggregate) -> (loss, lse_z)
  distill_bwd(grad, Z, T, lse_t, logconf_t, idx, adj, lse_z, tau, include_self, aggregate, out)
      -> out
  distill_topk_fwd(Z, values, indices, lse_t, logconf_t, idx, adj, tau, include_self,
                   aggregate) -> (loss, lse_z)
  distill_topk_bwd(grad, Z, values, indices, lse_t, logconf_t, idx, adj, lse_z, tau,
                   include_self, aggregate, out) -> out
  topk_compress(X[R,V], k, tau) -> (values[R,K], indices[R,K] int32, lse[R])

and, for the backends in FUSED_DENSE (cpp), the dense loss in one launch:

  distill_dense(Z[N,H,B,V], T[N,G,B,V], adj, head_offset, tau, include_self, aggregate, need_grad)
      -> (loss, lse_z, unit[N,H,B,V] or empty, lse_t, logconf_t, idx)

  (eager calls add groups=G with T of G or more heads, read as T[:, :G], and
  reduction="none" | "sum" | "mean", which makes loss the reduced scalar), and for the eager twin

  distill_dense_unit(Z[N,H,B,V], T[N,≥G,B,V], adj, head_offset, tau, include_self, aggregate, reduction)
      -> (loss (rows of their own, or reduced), rows[4,N,G,B] = lse_t, logconf_t, -, lse_z;
          unit[N,H,B,V]; idx)

and, optionally (cpp), a packet teacher's forward in one call for the eager twin:

  distill_topk_packets(Z[N,G,B,V], values[N,≥G,B,K], indices (int16/32/64), lse[N,≥G,B], adj, tau,
                       include_self, aggregate)
      -> (loss, lse_z, values[:, :G] in the accumulation dtype, indices int32, lse_t, logconf_t, idx)

Z, T: [N, G, B, V], any strides, fp32/fp16/bf16/fp64, dtypes may differ. values: [N, G, B, K]
in the accumulation dtype, indices int32, lse_t / logconf_t / lse_z / grad / loss: [N, G, B] in
the accumulation dtype (fp64 if Z or T is fp64, else fp32). ``out``: a tensor of Z's shape
and dtype, any strides, that the backward fills with dZ = grad·τ·(q − p̄) (the bucket formula
for max_confidence packets). The second forward output is the backend's own row statistic for
its backward (lse of Z/τ for dense teachers). aggregate: "max_confidence" | "mean" |
"confidence_weighted". Inputs are never written; every element of every output is.
"""
from __future__ import annotations

import importlib
import math

import torch
from torch import Tensor

from . import reference
from .pool import POOL
from .reference import acc_dtype, packet_stats, reduce_loss

_BACKEND_MODULES = {"cpp": "mhd_fast.ops.cpp", "triton": "mhd_fast.ops.triton_backend"}


_KERNELS: dict = {}  # backend -> its module, imported on first use


def kernels(backend: str):
    """The backend module implementing the kernel contract above."""
    module = _KERNELS.get(backend)
    if module is None:
        module = _KERNELS[backend] = importlib.import_module(_BACKEND_MODULES[backend])
    return module


def _rows(x: Tensor) -> torch.Size:
    return x.shape[:-1]


@torch.library.custom_op("mhd_fast::teacher_stats", mutates_args=())
def teacher_stats(teacher: Tensor, tau: float, backend: str) -> tuple[Tensor, Tensor]:
    return kernels(backend).teacher_stats(teacher, tau)


@teacher_stats.register_fake
def _(teacher, tau, backend):
    dt = acc_dtype(teacher)
    return teacher.new_empty(_rows(teacher), dtype=dt), teacher.new_empty(_rows(teacher), dtype=dt)


@torch.library.custom_op("mhd_fast::select", mutates_args=())
def select(logconf: Tensor, adj: Tensor, include_self: bool, backend: str) -> tuple[Tensor, Tensor]:
    return kernels(backend).select(logconf, adj, include_self)


@select.register_fake
def _(logconf, adj, include_self, backend):
    return (logconf.new_empty(logconf.shape, dtype=torch.int64),
            logconf.new_empty(logconf.shape[:1], dtype=torch.bool))


# ---- distillation: dense or top-k packet teacher ---------------------------------------------
#
# The distillation ops take the FULL student logits [N, H, B, V] and a head offset: student group
# g is head ``head_offset + g`` (mhd_loss: offset 1, the aux heads). The backward then writes the
# whole gradient at once, zeros in the other heads, instead of autograd zero-filling a full
# tensor and copying a slice into it.


def _groups(student: Tensor, teacher_rows: Tensor, head_offset: int) -> Tensor:
    """The student heads that learn: student[:, head_offset : head_offset + G] (a view)."""
    return student[:, head_offset:head_offset + teacher_rows.shape[1]]


def _grad_buffer(student: Tensor, head_offset: int, g: int, backend: str) -> Tensor:
    """dZ of the full student, zeros outside the learning heads (the kernel fills those). On
    CPU an idle buffer of the output pool when there is one (the kernel writes every row), the
    zeros by the cpp backend's zero_ (S3: 1.7 ms for torch's zero_ of the main head)."""
    cpu = student.device.type == "cpu" and type(student) is torch.Tensor
    if cpu:
        d = POOL.empty(student.shape, student.dtype)
    else:
        d = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    zero = kernels("cpp").zero_ if cpu and backend == "cpp" else Tensor.zero_
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


def _dense_grad(grad_loss: Tensor, student: Tensor, teacher: Tensor, adj: Tensor, head_offset: int, tau: float,
                include_self: bool, aggregate: str) -> Tensor:
    """_differentiable_grad against a dense teacher (its G heads, the ones the forward read)."""
    return _differentiable_grad(grad_loss, student, head_offset, teacher.shape[1], lambda z: reference.distill_dense(
        z, teacher, adj, tau=tau, include_self=include_self, aggregate=aggregate))


def _fake_fwd(student, teacher_rows, dt):
    rows = (student.shape[0], teacher_rows.shape[1], student.shape[2])
    return student.new_empty(rows, dtype=dt), student.new_empty(rows, dtype=dt)


@torch.library.custom_op("mhd_fast::distill_fwd", mutates_args=())
def distill_fwd(student: Tensor, teacher: Tensor, lse_t: Tensor, logconf_t: Tensor, idx: Tensor,
                adj: Tensor, head_offset: int, tau: float, include_self: bool, aggregate: str,
                backend: str) -> tuple[Tensor, Tensor]:
    return kernels(backend).distill_fwd(_groups(student, teacher, head_offset), teacher, lse_t,
                                        logconf_t, idx, adj, tau, include_self, aggregate)


@distill_fwd.register_fake
def _(student, teacher, lse_t, logconf_t, idx, adj, head_offset, tau, include_self, aggregate,
      backend):
    return _fake_fwd(student, teacher, acc_dtype(student, teacher))


@torch.library.custom_op("mhd_fast::distill_bwd", mutates_args=())
def distill_bwd(grad: Tensor, student: Tensor, teacher: Tensor, lse_t: Tensor, logconf_t: Tensor,
                idx: Tensor, adj: Tensor, lse_z: Tensor, head_offset: int, tau: float,
                include_self: bool, aggregate: str, backend: str) -> Tensor:
    d = _grad_buffer(student, head_offset, teacher.shape[1], backend)
    kernels(backend).distill_bwd(grad, _groups(student, teacher, head_offset), teacher, lse_t,
                                 logconf_t, idx, adj, lse_z, tau, include_self, aggregate,
                                 out=_groups(d, teacher, head_offset))
    return d


@distill_bwd.register_fake
def _(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z, head_offset, tau, include_self,
      aggregate, backend):
    return student.new_empty(student.shape)


def _setup_dense(ctx, inputs, output):
    student, teacher, lse_t, logconf_t, idx, adj, head_offset, tau, include_self, aggregate, backend = inputs
    ctx.save_for_backward(student, teacher, lse_t, logconf_t, idx, adj, output[1])
    ctx.options = (head_offset, tau, include_self, aggregate, backend)


def _backward_dense(ctx, grad_loss, grad_lse_z):
    student, teacher, lse_t, logconf_t, idx, adj, lse_z = ctx.saved_tensors
    head_offset, tau, include_self, aggregate, backend = ctx.options
    if torch.is_grad_enabled():  # create_graph=True
        d = _dense_grad(grad_loss, student, teacher, adj, head_offset, tau, include_self, aggregate)
        return (d,) + (None,) * 10
    d_student = distill_bwd(grad_loss.to(lse_z.dtype), student, teacher, lse_t, logconf_t, idx, adj,
                            lse_z, head_offset, tau, include_self, aggregate, backend)
    return (d_student,) + (None,) * 10


distill_fwd.register_autograd(_backward_dense, setup_context=_setup_dense)


# ---- the dense loss in one launch (backends in FUSED_DENSE) ------------------------------------
#
# distill_dense: statistics, teacher choice, loss and, when the student needs a gradient, the
# unit gradient τ(q − p̄) of the full student, from one kernel launch (kernel contract:
# ``distill_dense(student, teacher, adj, head_offset, tau, include_self, aggregate, need_grad)
# -> (loss, lse_z, unit, lse_t, logconf_t, idx)``). The backward only scales that buffer by the
# upstream gradient: not at all for the scalar 1 of ``loss.sum().backward()``, in place for any
# other finite gradient. The buffer rides on ctx (not saved) and the first backward hands it
# over, so that autograd may accumulate into it; a second backward through a retained graph
# runs the same kernel again.

FUSED_DENSE = frozenset({"cpp"})  # backends whose module has distill_dense (a constant: dynamo reads it)


def fused_dense(backend: str) -> bool:
    """Whether the backend computes the dense loss in one launch (distill_dense)."""
    return backend in FUSED_DENSE


@torch.library.custom_op("mhd_fast::distill_dense", mutates_args=())
def distill_dense(student: Tensor, teacher: Tensor, adj: Tensor, head_offset: int, tau: float,
                  include_self: bool, aggregate: str, need_grad: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(kernels(backend).distill_dense(student, teacher, adj, head_offset, tau, include_self,
                                                aggregate, need_grad))


@distill_dense.register_fake
def _(student, teacher, adj, head_offset, tau, include_self, aggregate, need_grad, backend):
    dt = acc_dtype(student, teacher)
    rows = _rows(teacher)
    unit = student.new_empty(student.shape if need_grad else (0,), dtype=dt)
    loss, lse_z, lse_t, logconf_t = (student.new_empty(rows, dtype=dt) for _ in range(4))
    return loss, lse_z, unit, lse_t, logconf_t, student.new_empty(rows, dtype=torch.int64)


def _keep_dense(ctx, student: Tensor, teacher: Tensor, adj: Tensor, idx: Tensor, lse_z: Tensor,
                unit: Tensor | None, options: tuple) -> None:
    """What the backward of distill_dense and of its eager twin reads: the inputs, the choice
    and lse_z (for its dtype) saved, the unit gradient on ctx (handed over once; see above)."""
    ctx.save_for_backward(student, teacher, adj, idx, lse_z)
    ctx.unit = [unit] if unit is not None else []
    ctx.options = options
    ctx.student_dtype = student.dtype


def _setup_dense_fused(ctx, inputs, output):
    student, teacher, adj, head_offset, tau, include_self, aggregate, need_grad, backend = inputs
    _, lse_z, unit, _, _, idx = output
    _keep_dense(ctx, student, teacher, adj, idx, lse_z, unit if need_grad else None,
                (head_offset, tau, include_self, aggregate, backend))
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the outputs nobody uses


def _unit_times_scalar(unit: Tensor, grad: Tensor) -> Tensor | None:
    """unit · grad in place (the caller owns unit) when grad is one finite number for all rows
    (a reduced loss's, or loss.sum()'s expanded) on eager tensors; None otherwise. The number
    1 of ``loss.backward()`` hands unit over untouched."""
    if type(grad) is not torch.Tensor or type(unit) is not torch.Tensor:  # traced: no host reads
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
    if (type(grad) is torch.Tensor and type(unit) is torch.Tensor and any(s != 0 for s in grad.stride())
            and bool(torch.isfinite(grad).all())):  # a finite number a row; not traced: a host read, in place
        unit[:, head_offset:head_offset + grad.shape[1]].mul_(grad.unsqueeze(-1))
        return unit
    n, h, b, _ = unit.shape
    g_full = unit.new_zeros((n, h, b, 1))
    g_full[:, head_offset:head_offset + grad.shape[1], :, 0] = grad
    has = (idx[:, :1, :1] >= 0).unsqueeze(-1)  # [N, 1, 1, 1]: −1 marks a client without candidate
    return torch.where(has, unit * g_full, 0)


def _backward_dense_fused(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 9
    if torch.is_grad_enabled():  # create_graph=True
        head_offset, tau, include_self, aggregate, backend = ctx.options
        student, teacher, adj, idx, _ = ctx.saved_tensors
        d = _dense_grad(grad_loss, student, teacher[:, :idx.shape[1]], adj, head_offset, tau, include_self, aggregate)
        return (d,) + (None,) * 8
    if ctx.unit:  # the common case, one finite number: without unpacking the saved tensors
        d_student = _unit_times_scalar(ctx.unit[0], grad_loss)
        if d_student is not None:
            ctx.unit.pop()
            if d_student.dtype != ctx.student_dtype:  # (a no-op .to is still a dispatcher call)
                d_student = d_student.to(ctx.student_dtype)
            return (d_student,) + (None,) * 8
    head_offset, tau, include_self, aggregate, backend = ctx.options
    student, teacher, adj, idx, lse_z = ctx.saved_tensors
    unit = ctx.unit.pop() if ctx.unit else None
    if unit is None:  # a second backward through a retained graph: the same kernel again
        unit = distill_dense(student.detach(), teacher[:, :idx.shape[1]].detach(), adj, head_offset, tau,
                             include_self, aggregate, True, backend)[2]
    d_student = _unit_times_grad(unit, grad_loss.to(lse_z.dtype), idx, head_offset)
    return (d_student.to(student.dtype),) + (None,) * 8


distill_dense.register_autograd(_backward_dense_fused, setup_context=_setup_dense_fused)


class _DenseFused(torch.autograd.Function):
    """distill_dense's eager twin: the same kernel call and the same backward, without the round
    trip through the dispatcher and the custom op's autograd wrapper. dense_loss takes it only
    where nothing could tell the two apart: plain tensors, no compile, tracing, tensor mode or
    functorch transform. Per call it also spares what the custom op's contract costs: it reads
    the teacher's first G heads and the student's learning heads through pointers (no slice,
    no detach: the teacher gets no gradient either way) and has the extension reduce the loss
    (the rows summed in a fixed order in fp64: "sum" and "mean" may differ from the custom
    op's torch sum in the last bit), so that a reduced loss costs no op and no autograd node,
    and its backward, given the 1 of ``loss.backward()``, hands the unit gradient over
    untouched. With the pool's cheaper hand-out, the fixed cost of a cold S1 call (kernel
    stubbed, right after torch.compile's run) went from 484 to 370 µs."""

    @staticmethod
    def forward(ctx, student, options):
        # the teacher and the graph ride in options, not as inputs: they get no gradient, and
        # every input costs autograd a check per call
        teacher, adj, head_offset, tau, include_self, aggregate, backend, reduction = options
        loss, rows, unit, idx = kernels(backend).distill_dense_unit(student, teacher, adj, head_offset, tau,
                                                                    include_self, aggregate, reduction)
        # rows, the buffer that holds lse_z, stands for it
        _keep_dense(ctx, student, teacher, adj, idx, rows, unit, (head_offset, tau, include_self, aggregate, backend))
        ctx.mean_of = idx.numel() if reduction == "mean" else 0
        return loss

    @staticmethod
    def backward(ctx, grad):
        if grad is not None and ctx.mean_of:
            grad = grad / ctx.mean_of  # as autograd differentiates loss.sum() / numel
        return _backward_dense_fused(ctx, grad)[0], None


def _c_apply(function: type):
    """function.apply without the Python wrapper of autograd.Function.apply, whose work (default
    arguments of a setup_context, unwrapping functorch's dead wrappers) does not arise for the
    plain tensors of the eager twins (_plain_eager): the C++ apply of torch's _FunctionBase."""
    try:
        return super(torch.autograd.Function, function).apply
    except AttributeError:  # another torch: the public entry
        return function.apply


_apply_dense = _c_apply(_DenseFused)


_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_functorch_level = torch._C._functorch.peek_interpreter_stack


def _plain_eager(*tensors: Tensor) -> bool:
    """Plain tensors, no compile, tracing, tensor mode or functorch transform."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if type(t) is not torch.Tensor:
            return False
    return _dispatch_modes() == 0 and not _function_modes() and _functorch_level() is None


def dense_loss(student: Tensor, teacher: Tensor, adj: Tensor, head_offset: int, tau: float,
               include_self: bool, aggregate: str, need_grad: bool, backend: str,
               reduction: str = "none") -> Tensor:
    """The loss of student heads head_offset.. against the teacher's first H − head_offset heads
    (teacher [N, ≥ G, B, V]), reduced by ``reduction``: through distill_dense, or in plain eager
    mode through its twin (same kernel, same bits)."""
    g = student.shape[1] - head_offset
    if _plain_eager(student, teacher, adj):
        if not need_grad:
            return kernels(backend).distill_dense(student, teacher, adj, head_offset, tau, include_self, aggregate,
                                                  False, groups=g, reduction=reduction)[0]
        return _apply_dense(student, (teacher, adj, head_offset, tau, include_self, aggregate, backend, reduction))
    teacher = teacher[:, :g].detach()
    return reduce_loss(distill_dense(student, teacher, adj, head_offset, tau, include_self, aggregate, need_grad,
                                     backend)[0], reduction)


@torch.library.custom_op("mhd_fast::distill_topk_fwd", mutates_args=())
def distill_topk_fwd(student: Tensor, values: Tensor, indices: Tensor, lse_t: Tensor,
                     logconf_t: Tensor, idx: Tensor, adj: Tensor, head_offset: int, tau: float,
                     include_self: bool, aggregate: str, backend: str) -> tuple[Tensor, Tensor]:
    return kernels(backend).distill_topk_fwd(_groups(student, values, head_offset), values, indices,
                                             lse_t, logconf_t, idx, adj, tau, include_self, aggregate)


@distill_topk_fwd.register_fake
def _(student, values, indices, lse_t, logconf_t, idx, adj, head_offset, tau, include_self,
      aggregate, backend):
    return _fake_fwd(student, values, acc_dtype(student, values))


@torch.library.custom_op("mhd_fast::distill_topk_bwd", mutates_args=())
def distill_topk_bwd(grad: Tensor, student: Tensor, values: Tensor, indices: Tensor, lse_t: Tensor,
                     logconf_t: Tensor, idx: Tensor, adj: Tensor, lse_z: Tensor, head_offset: int,
                     tau: float, include_self: bool, aggregate: str, backend: str) -> Tensor:
    return _topk_grad(grad, student, values, indices, lse_t, logconf_t, idx, adj, lse_z, head_offset, tau,
                      include_self, aggregate, backend)


def _topk_grad(grad, student, values, indices, lse_t, logconf_t, idx, adj, lse_z, head_offset, tau, include_self,
               aggregate, backend) -> Tensor:
    """dZ of the full student for a packet teacher (the bucket backward into a zero-headed
    buffer): the body of distill_topk_bwd, and the backward of its eager twin."""
    d = _grad_buffer(student, head_offset, values.shape[1], backend)
    kernels(backend).distill_topk_bwd(grad, _groups(student, values, head_offset), values, indices,
                                      lse_t, logconf_t, idx, adj, lse_z, tau, include_self,
                                      aggregate, out=_groups(d, values, head_offset))
    return d


@distill_topk_bwd.register_fake
def _(grad, student, values, indices, lse_t, logconf_t, idx, adj, lse_z, head_offset, tau,
      include_self, aggregate, backend):
    return student.new_empty(student.shape)


def _setup_topk(ctx, inputs, output):
    (student, values, indices, lse_t, logconf_t, idx, adj, head_offset, tau, include_self,
     aggregate, backend) = inputs
    ctx.save_for_backward(student, values, indices, lse_t, logconf_t, idx, adj, output[1])
    ctx.options = (head_offset, tau, include_self, aggregate, backend)


def _packet_grad(grad_loss: Tensor, student: Tensor, values: Tensor, indices: Tensor, lse_t: Tensor, adj: Tensor,
                 head_offset: int, tau: float, include_self: bool, aggregate: str) -> Tensor:
    """_differentiable_grad against the packet the forward read (values, indices and lse_t of
    its first G heads)."""
    return _differentiable_grad(grad_loss, student, head_offset, values.shape[1], lambda z: reference.distill_topk(
        z, values, indices, lse_t, adj, tau=tau, include_self=include_self, aggregate=aggregate))


def _backward_topk(ctx, grad_loss, grad_lse_z):
    student, values, indices, lse_t, logconf_t, idx, adj, lse_z = ctx.saved_tensors
    head_offset, tau, include_self, aggregate, backend = ctx.options
    if torch.is_grad_enabled():  # create_graph=True
        d = _packet_grad(grad_loss, student, values, indices, lse_t, adj, head_offset, tau, include_self, aggregate)
        return (d,) + (None,) * 11
    d_student = distill_topk_bwd(grad_loss.to(lse_z.dtype), student, values, indices, lse_t,
                                 logconf_t, idx, adj, lse_z, head_offset, tau, include_self,
                                 aggregate, backend)
    return (d_student,) + (None,) * 11


distill_topk_fwd.register_autograd(_backward_topk, setup_context=_setup_topk)


def _packet_rows(values: Tensor, indices: Tensor, lse: Tensor, g: int, dt: torch.dtype) -> tuple:
    """The first g heads of a packet as the kernel contract takes them: values in dt, indices
    int32, and their lse_t / logconf_t (reference.packet_stats)."""
    values = values[:, :g].detach().to(dt)
    lse_t, logconf_t = packet_stats(values, lse[:, :g].detach())
    return values, indices[:, :g].detach().to(torch.int32), lse_t, logconf_t


def _topk_forward(backend: str, student: Tensor, values: Tensor, indices: Tensor, lse: Tensor, adj: Tensor,
                  head_offset: int, tau: float, include_self: bool, aggregate: str) -> tuple:
    """(loss, lse_z, values, indices, lse_t, logconf_t, idx) of student heads head_offset.. against
    the packet's first G heads, through the backend's launchers: in one call where the backend
    has distill_topk_packets (cpp), else its select and distill_topk_fwd."""
    be = kernels(backend)
    g = student.shape[1] - head_offset
    if hasattr(be, "distill_topk_packets"):  # reads the student's heads and the packet's through pointers
        return be.distill_topk_packets(student, values, indices, lse, adj, tau, include_self, aggregate,
                                       head_offset=head_offset)
    groups = student[:, head_offset:head_offset + g]
    values, indices, lse_t, logconf_t = _packet_rows(values, indices, lse, g, acc_dtype(student, values, lse))
    idx, _ = be.select(logconf_t, adj, include_self)
    loss, lse_z = be.distill_topk_fwd(groups, values, indices, lse_t, logconf_t, idx, adj, tau, include_self,
                                      aggregate)
    return loss, lse_z, values, indices, lse_t, logconf_t, idx


class _TopKFused(torch.autograd.Function):
    """The eager twin of select + distill_topk_fwd: the same kernels (forward, and the bucket
    backward into a pooled full-size buffer) without the dispatcher round trips and the custom
    ops' autograd wrapper, whose backend impls run under dynamo's disable wrapper (S3: select
    86-89 µs through its op against 13-14 µs direct, distill_topk_fwd 40-55 µs more than its
    launcher); on cpp the packet's conversion, statistics, teacher choice and loss are one call
    (_topk_forward). topk_loss takes it only in plain eager mode (_plain_eager)."""

    @staticmethod
    def forward(ctx, student, options):
        # the packet and the graph ride in options, as the dense twin's teacher: no gradient
        values, indices, lse, adj, head_offset, tau, include_self, aggregate, backend = options
        loss, lse_z, *rows = _topk_forward(backend, student, values, indices, lse, adj, head_offset, tau,
                                           include_self, aggregate)
        ctx.save_for_backward(student, *rows, adj, lse_z)
        ctx.options = (head_offset, tau, include_self, aggregate, backend)
        return loss

    @staticmethod
    def backward(ctx, grad):
        student, values, indices, lse_t, logconf_t, idx, adj, lse_z = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _packet_grad(grad, student, values, indices, lse_t, adj, *ctx.options[:4]), None
        d = _topk_grad(grad.to(lse_z.dtype), student, values, indices, lse_t, logconf_t, idx, adj, lse_z,
                       *ctx.options)
        return d, None


_apply_topk = _c_apply(_TopKFused)


def topk_loss(student: Tensor, values: Tensor, indices: Tensor, lse: Tensor, adj: Tensor, head_offset: int,
              tau: float, include_self: bool, aggregate: str, backend: str) -> Tensor:
    """The loss rows [N, G, B] of student heads head_offset.. against the first G = H −
    head_offset heads of a top-k packet (values, indices, lse as they arrive): through the
    custom ops select and distill_topk_fwd, or in plain eager mode through the launchers and
    _TopKFused (same kernels, same bits)."""
    if _plain_eager(student, values, indices, lse, adj):
        if not (torch.is_grad_enabled() and student.requires_grad):
            return _topk_forward(backend, student, values, indices, lse, adj, head_offset, tau, include_self,
                                 aggregate)[0]
        return _apply_topk(student, (values, indices, lse, adj, head_offset, tau, include_self, aggregate, backend))
    g = student.shape[1] - head_offset
    values, indices, lse_t, logconf_t = _packet_rows(values, indices, lse, g, acc_dtype(student, values, lse))
    idx, _ = select(logconf_t, adj, include_self, backend)
    return distill_topk_fwd(student, values, indices, lse_t, logconf_t, idx, adj, head_offset, tau, include_self,
                            aggregate, backend)[0]


# ---- top-k compression ---------------------------------------------------------------------

@torch.library.custom_op("mhd_fast::topk_compress", mutates_args=())
def topk_compress(logits: Tensor, k: int, tau: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return kernels(backend).topk_compress(logits, k, tau)


@topk_compress.register_fake
def _(logits, k, tau, backend):
    dt = acc_dtype(logits)
    r = logits.shape[0]
    return (logits.new_empty((r, k), dtype=dt), logits.new_empty((r, k), dtype=torch.int32),
            logits.new_empty((r,), dtype=dt))
