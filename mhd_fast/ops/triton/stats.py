"""Teacher statistics: log-sum-exp and log-confidence of every teacher row, one pass over V.

For a row t = T/τ:   lse = log Σ_v exp(t_v),   logconf = max_v t_v − lse = log max_v softmax(t)_v.
In log2 units u = T·log2(e)/τ with running max m and s = Σ exp2(u − m):
    lse = ln2 · (m + log2 s),   logconf = ln2 · (max u − m − log2 s) = −ln2 · log2 s.
No gradient: teachers are predictions received from other clients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import acc_tl, finite_base, online_lse_step, program_rows, split_scalar, tile_shape


@triton.jit
def row_stats(T, row, rmask, V, st3, scale, ln2, ACC: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """(lse, logconf) [ROWS] in nats of the rows starting at offsets ``row`` of T."""
    m = tl.full([ROWS], float("-inf"), ACC)
    s = tl.zeros([ROWS], ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < V)[None, :]
        t = tl.load(T + row[:, None] + cols[None, :].to(tl.int64) * st3, mask=mask,
                    other=float("-inf"))
        m, s, _, _ = online_lse_step(m, s, t.to(ACC) * scale)
    base = finite_base(m)
    log2s = tl.log2(s)
    return (base + log2s) * ln2, (m - base - log2s) * ln2


@triton.jit
def _teacher_stats_kernel(
    T, LSE, LOGCONF,  # pointers: T [N, G, B, V] any strides; outputs [R] contiguous
    R, N, G, B, V,
    st0, st1, st2, st3,
    tau_hi, tau_mid, tau_lo,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r, rmask, n, g, b, ln2, _, _, scale = program_rows(R, N, G, B, tau_hi, tau_mid, tau_lo, ACC,
                                                       ROWS)
    lse, logconf = row_stats(T, n * st0 + g * st1 + b * st2, rmask, V, st3, scale, ln2, ACC, ROWS,
                             BLOCK_V)
    tl.store(LSE + r, lse, mask=rmask)
    tl.store(LOGCONF + r, logconf, mask=rmask)


def teacher_stats(teacher: torch.Tensor, tau: float,
                  acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """T [N, G, B, V] -> (lse [N, G, B], logconf [N, G, B]) in ``acc``, one launch for all rows."""
    n, g, b, v = teacher.shape
    rows = n * g * b
    lse = torch.empty((n, g, b), dtype=acc, device=teacher.device)
    logconf = torch.empty_like(lse)
    n_rows, block_v, num_warps = tile_shape(v, rows)
    _teacher_stats_kernel[(triton.cdiv(rows, n_rows),)](
        teacher, lse, logconf, rows, n, g, b, v, *teacher.stride(), *split_scalar(tau),
        ACC=acc_tl(acc), ROWS=n_rows, BLOCK_V=block_v,
        num_warps=num_warps)
    return lse, logconf
