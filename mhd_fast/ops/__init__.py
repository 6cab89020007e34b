"""Fused MHD ops: the torch reference, the compiled backends and their torch.library ops."""
from .api import (BACKENDS, REDUCTIONS, TopKLogits, backend_available, distill_loss, mhd_loss,
                  resolve_backend, select_teachers, topk_compress)
from .reference import AGGREGATES

__all__ = ["AGGREGATES", "BACKENDS", "REDUCTIONS", "TopKLogits", "backend_available",
           "distill_loss", "mhd_loss", "resolve_backend", "select_teachers", "topk_compress"]
