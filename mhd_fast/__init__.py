"""mhd_fast: decentralized learning with multi-headed distillation, fused for all clients.

The public API (SPEC §7)::

    mhd_fast.select_teachers(teacher_logits, adj, *, tau=1.0, include_self=False)
    mhd_fast.mhd_loss(student_logits, teacher, adj, *, tau=1.0, include_self=False,
                      aggregate="max_confidence", reduction="none", backend="auto")
    mhd_fast.distill_loss(student_logits, teacher, adj, **same_options)
    mhd_fast.topk_compress(logits, k, *, tau=1.0, value_dtype=None)
"""
import os as _os

# OpenMP threads that spin while they wait take the cores from every other process of a small
# shared machine (rounds ~10x slower under load); sleeping waits cost little here. It must be
# set before torch loads the OpenMP runtime; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .ops import (AGGREGATES, BACKENDS, REDUCTIONS, TopKLogits, backend_available, distill_loss,
                  mhd_loss, resolve_backend, select_teachers, topk_compress)  # noqa: E402

__version__ = "0.1.0"

__all__ = ["AGGREGATES", "BACKENDS", "REDUCTIONS", "TopKLogits", "backend_available",
           "distill_loss", "mhd_loss", "resolve_backend", "select_teachers", "topk_compress",
           "__version__"]
