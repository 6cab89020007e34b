"""Pieces every Triton kernel of mhd_fast shares: row coordinates, exact scalars, the online
log-sum-exp step, and how tiles are shaped.

Conventions of all kernels:
- A *row* is one (client, group, sample) = (n, g, b) of a [N, G, B, V] tensor, numbered
  r = (n·G + g)·B + b; a program owns ROWS rows (see ``row_coords`` for which). Any strides: the
  kernels take all four and form int64 offsets (N·G·B·V passes 2^31 at real sizes).
- Softmax statistics live in log2 units (u = x · log2(e)/τ) so every exponential is one
  exp2; results are converted back to nats once per row.
- ACC is the accumulation dtype (fp32, or fp64 for gradcheck); loads are upcast to it.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

# A tile holds about this many elements per program: enough loads in flight to stream HBM,
# few enough registers that nothing spills. Rows are stacked until a tile is this big.
TILE_ELEMS = 4096
MAX_BLOCK_V = 4096
MAX_ROWS = 64
# With 4096-element tiles 4 warps beat 8 and 16 on an H100 (distillation and statistics, S4).
NUM_WARPS = 4


@functools.lru_cache(maxsize=64)
def split_scalar(x: float) -> tuple[float, float, float]:
    """x as hi + mid + lo, three fp32 numbers: Triton passes Python floats as fp32, so an fp64
    kernel rebuilds x exactly (3 × 24 bits ≥ 53) and an fp32 kernel takes hi = fp32(x).
    Cached: every launch splits its τ."""
    hi = float(np.float32(x))
    mid = float(np.float32(x - hi))
    return hi, mid, float(np.float32(x - hi - mid))


def acc_tl(acc: torch.dtype):
    """The Triton dtype of an accumulation dtype (torch.float32 or torch.float64)."""
    return tl.float64 if acc == torch.float64 else tl.float32


def tile_shape(v: int, rows: int, min_block_v: int = 1) -> tuple[int, int, int]:
    """(ROWS, BLOCK_V, num_warps) for rows of length v: one column tile of up to MAX_BLOCK_V,
    and for small V several rows per program so each program still moves a full tile."""
    block_v = min(max(triton.next_power_of_2(v), min_block_v), max(MAX_BLOCK_V, min_block_v))
    n_rows = max(1, min(TILE_ELEMS // block_v, MAX_ROWS, triton.next_power_of_2(rows)))
    return n_rows, block_v, NUM_WARPS


@triton.jit
def exact_scalar(hi, mid, lo, ACC: tl.constexpr):
    """The ACC value of a scalar passed as split_scalar(x): x rounded to ACC."""
    if ACC == tl.float64:
        x = tl.cast(hi, ACC) + tl.cast(mid, ACC) + tl.cast(lo, ACC)
    else:
        x = tl.cast(hi, ACC)
    return x


@triton.jit
def log2_consts(ACC: tl.constexpr):
    """(ln 2, log2 e) to ACC precision, derived from exact literals (a float literal in a kernel
    is an fp32 constant, too coarse for fp64)."""
    ln2 = tl.log(tl.full([], 2.0, ACC))
    return ln2, 1.0 / ln2


@triton.jit
def row_coords(pid, R, N, G, B, ROWS: tl.constexpr):
    """The ROWS rows of program ``pid``: (r [ROWS] int64 row numbers, clamped into range where
    masked; their mask; n, g, b).

    Programs walk the rows client-fastest: program rows p = pid·ROWS + [0, ROWS) map to
    n = p mod N, (g, b) from p div N. The N students of one (g, b) run side by side and mostly
    distil from the same most confident teacher row, which is then read from HBM once and from
    L2 by the others."""
    p = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = p < R
    p = tl.where(rmask, p, 0)
    n = p % N
    gb = p // N
    g = gb // B
    b = gb % B
    return (n * G + g) * B + b, rmask, n, g, b


@triton.jit
def program_rows(R, N, G, B, tau_hi, tau_mid, tau_lo, ACC: tl.constexpr, ROWS: tl.constexpr):
    """The prologue of a kernel that reads logits at temperature τ: this program's rows as
    ``row_coords`` gives them (r, rmask, n, g, b), then ln 2, log2 e, the exact τ and
    scale = log2(e)/τ, which takes logits to log2 units."""
    r, rmask, n, g, b = row_coords(tl.program_id(0), R, N, G, B, ROWS)
    ln2, log2e = log2_consts(ACC)
    tau = exact_scalar(tau_hi, tau_mid, tau_lo, ACC)
    return r, rmask, n, g, b, ln2, log2e, tau, log2e / tau


@triton.jit
def finite_base(m):
    """The shift used for exp2(u − shift): the running max, or 0 while it is −inf (an empty or
    all-masked prefix), so that −inf − (−inf) never makes a NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_lse_step(m, s, u):
    """One column tile of an online log-sum-exp in log2 units.

    m [ROWS] running max, s [ROWS] = Σ exp2(u − finite_base(m)) so far, u [ROWS, BLOCK_V] with
    −inf in masked places. Returns the new (m, s, old shift, new shift)."""
    m_new = tl.maximum(m, tl.max(u, axis=1))
    base_old = finite_base(m)
    base = finite_base(m_new)
    s = s * tl.exp2(base_old - base) + tl.sum(tl.exp2(u - base[:, None]), axis=1)
    return m_new, s, base_old, base
