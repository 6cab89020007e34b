"""topk_compress: prediction rows to the top-k packets that cross the graph's edges.

For a row t = X / τ over V classes the packet holds values = the K largest t_v in descending
order (ties -> lower index first; NaN ranks above every number, as torch's stable descending
sort), their indices, and lse = logsumexp_v t_v, so that a receiver knows the sent
probabilities exp(values − lse) exactly and the rest mass 1 − Σ of them.

Kernel contract of the compiled backends (one launch over all rows):

  topk_compress(X [R, V], k, tau) -> (values [R, k], indices [R, k] int32, lse [R])

values and lse in the accumulation dtype (fp64 for fp64 input, else fp32); the op casts them to
the wire dtypes. No gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .backends import launchers, resolve_backend
from .inputs import TopKLogits, check_logits, check_tau
from .reference import acc_dtype

WIRE_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("mhd_fast::topk_compress", mutates_args=())
def compress_rows(logits: Tensor, k: int, tau: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return launchers(backend).topk_compress(logits, k, tau)


@compress_rows.register_fake
def _(logits, k, tau, backend):
    dt = acc_dtype(logits)
    r = logits.shape[0]
    return (logits.new_empty((r, k), dtype=dt), logits.new_empty((r, k), dtype=torch.int32),
            logits.new_empty((r,), dtype=dt))


def topk_compress(logits: Tensor, k: int, *, tau: float = 1.0, value_dtype: torch.dtype | None = None,
                  backend: str = "auto") -> TopKLogits:
    """Compress prediction rows to top-k packets.

    logits [..., V] (fp32/fp16/bf16/fp64, any strides) -> TopKLogits(values [..., k] of
    value_dtype (default fp32), indices [..., k] int16 if V <= 32767 else int32, lse [...] fp32).
    values are the k largest of logits/τ, descending, ties -> lower index first.
    """
    check_logits("logits", logits, ndim=None)
    if logits.dim() < 1:
        raise ValueError("logits must have at least 1 dimension [..., V]")
    tau = check_tau(tau)
    v = logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v:
        raise ValueError(f"k must be an integer in [1, V = {v}], got {k!r}")
    if value_dtype is None:
        value_dtype = torch.float32
    if value_dtype not in WIRE_VALUE_DTYPES:
        raise ValueError(f"value_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {value_dtype}")
    be = resolve_backend(backend, logits.device)
    rows = logits.reshape(-1, v)
    if be == "torch":
        values, indices, lse = reference.topk_compress(rows, k, tau)
    else:
        values, indices, lse = compress_rows(rows, k, tau, be)
    lead = logits.shape[:-1]
    index_dtype = torch.int16 if v <= 32767 else torch.int32
    return TopKLogits(values.to(value_dtype).reshape(*lead, k),
                      indices.to(index_dtype).reshape(*lead, k),
                      lse.to(torch.float32).reshape(lead))
