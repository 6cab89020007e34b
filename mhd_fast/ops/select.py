"""select_teachers: the teacher of every aux row is head h−1 of the most confident candidate.

For teacher row t = T[j, g, b] / τ the confidence is max_v softmax(t)_v; the op works with its
log, logconf = max_v t_v − logsumexp(t) (a packet: values[0] − lse). Client i's candidates are
the j with adj[i, j] (j ≠ i), and i itself with include_self; idx[i, g, b] is the candidate of
highest logconf[j, g, b], ties -> lowest j, NaN wins (as torch.argmax) so that a NaN teacher
shows up in the loss; −1 when client i has no candidate.

Kernel contract of the compiled backends (one launch each over all clients × groups × rows):

  teacher_stats(T [N, G, B, V], tau) -> (lse [N, G, B], logconf [N, G, B])
  select(logconf [N, G, B], adj [N, N] bool, include_self) -> (idx [N, G, B] int64, has [N] bool)

in the accumulation dtype (fp64 for fp64 input, else fp32). No gradient: teachers are
predictions received from other clients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .backends import launchers, resolve_backend
from .inputs import TopKLogits, check_adj, check_tau, check_teacher, map_teacher
from .reference import acc_dtype


@torch.library.custom_op("mhd_fast::teacher_stats", mutates_args=())
def teacher_stats(teacher: Tensor, tau: float, backend: str) -> tuple[Tensor, Tensor]:
    return launchers(backend).teacher_stats(teacher, tau)


@teacher_stats.register_fake
def _(teacher, tau, backend):
    dt = acc_dtype(teacher)
    return teacher.new_empty(teacher.shape[:-1], dtype=dt), teacher.new_empty(teacher.shape[:-1], dtype=dt)


@torch.library.custom_op("mhd_fast::select", mutates_args=())
def select(logconf: Tensor, adj: Tensor, include_self: bool, backend: str) -> tuple[Tensor, Tensor]:
    return launchers(backend).select(logconf, adj, include_self)


@select.register_fake
def _(logconf, adj, include_self, backend):
    return (logconf.new_empty(logconf.shape, dtype=torch.int64),
            logconf.new_empty(logconf.shape[:1], dtype=torch.bool))


def shift_teacher(teacher):
    """Heads 0..H1−2 of the teacher: what aux heads 1..H1−1 learn from (views)."""
    return map_teacher(lambda x: x[:, :-1], teacher)


def row_stats(teacher, tau: float, backend: str) -> tuple[Tensor, Tensor]:
    """(lse, logconf) [N, G, B] of a dense teacher or a packet (whose lse comes with it)."""
    if isinstance(teacher, TopKLogits):
        return reference.packet_stats(teacher.values, teacher.lse)
    if backend == "torch":
        return reference.teacher_stats(teacher, tau)
    return teacher_stats(teacher, tau, backend)


def select_teachers(teacher_logits, adj: Tensor, *, tau: float = 1.0, include_self: bool = False,
                    backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The teacher of every aux row: head h of client i distils from head h−1 of the most
    confident candidate, ties -> lowest client index.

    teacher_logits [N, H1, B, V] (fp32/fp16/bf16/fp64) or TopKLogits with leading dims
    [N, H1, B]; adj [N, N] bool, adj[i, j] = client i hears client j
    -> (idx [N, H1−1, B] int64, −1 where the client has no candidate; has [N] bool).
    """
    first = teacher_logits.values if isinstance(teacher_logits, TopKLogits) else teacher_logits
    device = first.device
    check_teacher(teacher_logits, None, device, heads=first.shape[1] - 1 if first.dim() == 4 else None)
    tau = check_tau(tau)
    rows = first.shape
    if rows[1] < 2:
        raise ValueError(f"teacher_logits must have H1 >= 2 heads (main + aux), got H1 = {rows[1]}")
    check_adj(adj, rows[0], device)
    be = resolve_backend(backend, device)
    _, logconf = row_stats(shift_teacher(teacher_logits), tau, be)
    if be == "torch":
        return reference.select(logconf, adj, bool(include_self))
    return select(logconf, adj, bool(include_self), be)
