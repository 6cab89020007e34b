"""The fused MHD ops, one module each: ``distill`` (mhd_loss, distill_loss), ``select``
(select_teachers), ``topk`` (topk_compress). ``reference`` is the readable torch math that
defines them; ``cpp`` and ``triton`` launch the compiled kernels; ``backends`` picks one;
``inputs`` holds the packet type and the argument checks."""
from .backends import BACKENDS, backend_available, resolve_backend
from .distill import REDUCTIONS, distill_loss, mhd_loss
from .inputs import MAX_TAU, TopKLogits, map_teacher, teacher_fields
from .reference import AGGREGATES
from .select import select_teachers
from .topk import topk_compress

__all__ = ["AGGREGATES", "BACKENDS", "MAX_TAU", "REDUCTIONS", "TopKLogits", "backend_available",
           "distill_loss", "map_teacher", "mhd_loss", "resolve_backend", "select_teachers",
           "teacher_fields", "topk_compress"]
