"""torch.library custom ops around the fused kernels, one op set for every compiled backend.

Layering (STYLE habit 2): kernel (C++ / Triton) -> launcher in the backend module ->
custom op here (fake + autograd) -> functional API in ``api.py``. The ``torch`` backend
is the reference and needs no op: autograd and torch.compile see through it.

A backend module (``cpp``, ``triton_backend``) provides these functions, each one launch
over the flat row space of all clients × groups × rows (no Python loop over clients):

  teacher_stats(T[N,G,B,V], tau) -> (lse[N,G,B], logconf[N,G,B])
  select(logconf[N,G,B], adj[N,N] bool, include_self) -> (idx[N,G,B] int64, -1 = none; has[N] bool)
  distill_fwd(Z, T, lse_t, logconf_t, idx, adj, tau, include_self, aggregate) -> (loss, lse_z)
  distill_bwd(grad, Z, T, lse_t, logconf_t, idx, adj, lse_z, tau, include_self, aggregate) -> dZ
  distill_topk_fwd(Z, values, indices, lse_t, logconf_t, idx, adj, tau, include_self,
                   aggregate) -> (loss, lse_z)
  distill_topk_bwd(grad, Z, values, indices, lse_t, logconf_t, idx, adj, lse_z, tau,
                   include_self, aggregate) -> dZ
  topk_compress(X[R,V], k, tau) -> (values[R,K], indices[R,K] int32, lse[R])

Z, T: [N, G, B, V], any strides, fp32/fp16/bf16/fp64, dtypes may differ. values: [N, G, B, K]
in the accumulation dtype, indices int32, lse_t / logconf_t / lse_z / grad / loss: [N, G, B] in
the accumulation dtype (fp64 if Z or T is fp64, else fp32). dZ: a fresh contiguous tensor of
Z's dtype and shape. aggregate: "max_confidence" | "mean" | "confidence_weighted".
Inputs are never written.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from .reference import acc_dtype

_BACKEND_MODULES = {"cpp": "mhd_fast.ops.cpp", "triton": "mhd_fast.ops.triton_backend"}


def kernels(backend: str):
    """The backend module implementing the kernel contract above."""
    return importlib.import_module(_BACKEND_MODULES[backend])


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


# ---- dense teacher -------------------------------------------------------------------------

@torch.library.custom_op("mhd_fast::distill_fwd", mutates_args=())
def distill_fwd(student: Tensor, teacher: Tensor, lse_t: Tensor, logconf_t: Tensor, idx: Tensor,
                adj: Tensor, tau: float, include_self: bool, aggregate: str,
                backend: str) -> tuple[Tensor, Tensor]:
    return kernels(backend).distill_fwd(student, teacher, lse_t, logconf_t, idx, adj, tau,
                                        include_self, aggregate)


@distill_fwd.register_fake
def _(student, teacher, lse_t, logconf_t, idx, adj, tau, include_self, aggregate, backend):
    dt = acc_dtype(student, teacher)
    return (student.new_empty(_rows(student), dtype=dt),
            student.new_empty(_rows(student), dtype=dt))


@torch.library.custom_op("mhd_fast::distill_bwd", mutates_args=())
def distill_bwd(grad: Tensor, student: Tensor, teacher: Tensor, lse_t: Tensor, logconf_t: Tensor,
                idx: Tensor, adj: Tensor, lse_z: Tensor, tau: float, include_self: bool,
                aggregate: str, backend: str) -> Tensor:
    return kernels(backend).distill_bwd(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z,
                                        tau, include_self, aggregate)


@distill_bwd.register_fake
def _(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z, tau, include_self, aggregate,
      backend):
    return student.new_empty(student.shape)


def _setup_dense(ctx, inputs, output):
    student, teacher, lse_t, logconf_t, idx, adj, tau, include_self, aggregate, backend = inputs
    ctx.save_for_backward(student, teacher, lse_t, logconf_t, idx, adj, output[1])
    ctx.options = (tau, include_self, aggregate, backend)


def _backward_dense(ctx, grad_loss, grad_lse_z):
    student, teacher, lse_t, logconf_t, idx, adj, lse_z = ctx.saved_tensors
    tau, include_self, aggregate, backend = ctx.options
    grad = grad_loss.to(lse_z.dtype)
    d_student = distill_bwd(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z, tau,
                            include_self, aggregate, backend)
    return d_student, None, None, None, None, None, None, None, None, None


distill_fwd.register_autograd(_backward_dense, setup_context=_setup_dense)


# ---- top-k packet teacher ------------------------------------------------------------------

@torch.library.custom_op("mhd_fast::distill_topk_fwd", mutates_args=())
def distill_topk_fwd(student: Tensor, values: Tensor, indices: Tensor, lse_t: Tensor,
                     logconf_t: Tensor, idx: Tensor, adj: Tensor, tau: float, include_self: bool,
                     aggregate: str, backend: str) -> tuple[Tensor, Tensor]:
    return kernels(backend).distill_topk_fwd(student, values, indices, lse_t, logconf_t, idx, adj,
                                             tau, include_self, aggregate)


@distill_topk_fwd.register_fake
def _(student, values, indices, lse_t, logconf_t, idx, adj, tau, include_self, aggregate, backend):
    dt = acc_dtype(student, values)
    return (student.new_empty(_rows(student), dtype=dt),
            student.new_empty(_rows(student), dtype=dt))


@torch.library.custom_op("mhd_fast::distill_topk_bwd", mutates_args=())
def distill_topk_bwd(grad: Tensor, student: Tensor, values: Tensor, indices: Tensor, lse_t: Tensor,
                     logconf_t: Tensor, idx: Tensor, adj: Tensor, lse_z: Tensor, tau: float,
                     include_self: bool, aggregate: str, backend: str) -> Tensor:
    return kernels(backend).distill_topk_bwd(grad, student, values, indices, lse_t, logconf_t, idx,
                                             adj, lse_z, tau, include_self, aggregate)


@distill_topk_bwd.register_fake
def _(grad, student, values, indices, lse_t, logconf_t, idx, adj, lse_z, tau, include_self,
      aggregate, backend):
    return student.new_empty(student.shape)


def _setup_topk(ctx, inputs, output):
    (student, values, indices, lse_t, logconf_t, idx, adj, tau, include_self, aggregate,
     backend) = inputs
    ctx.save_for_backward(student, values, indices, lse_t, logconf_t, idx, adj, output[1])
    ctx.options = (tau, include_self, aggregate, backend)


def _backward_topk(ctx, grad_loss, grad_lse_z):
    student, values, indices, lse_t, logconf_t, idx, adj, lse_z = ctx.saved_tensors
    tau, include_self, aggregate, backend = ctx.options
    grad = grad_loss.to(lse_z.dtype)
    d_student = distill_topk_bwd(grad, student, values, indices, lse_t, logconf_t, idx, adj, lse_z,
                                 tau, include_self, aggregate, backend)
    return (d_student,) + (None,) * 10


distill_topk_fwd.register_autograd(_backward_topk, setup_context=_setup_topk)


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
