"""Top-k compression of logit rows: values = the K largest of t = X/τ in descending
order (ties -> lower index, NaN above every number, as torch's stable descending sort),
indices, and lse = log Σ_v exp(t_v); one pass over V.

Ranking by packed keys. A float t maps to an integer that orders like t:
    bits(t) ^ (sign(t) ? 0x7FFFFFFF : 0)      (−0 is first made +0; every NaN -> 0x7FFFFFFF)
and the 64-bit key (that << 32) | (v ^ (2^32 − 1)) orders by t, then by lower index v. Each
column tile is reduced to its K_PAD largest keys (``tl.topk``, a bitonic network) and merged
into the running K_PAD best of the row; the value and index decode from the key, so no second
pass and no gather. The log-sum-exp runs online in the same pass.

An fp64 key needs all 64 bits, leaving no room for the index, and a K beyond the register
budget does not fit a tile: those rows take K selection passes instead (each pass picks the
largest (t, −v) below the previous pick), exact and meant for fp64 checks and rare huge K.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (MAX_BLOCK_V, acc_tl, exact_scalar, finite_base, log2_consts,
                            online_lse_step, split_scalar, tile_shape)

INT64_MIN = tl.constexpr(-(2**63))  # below every key: masked places
LOW32 = tl.constexpr(2**32 - 1)


@triton.jit
def _scaled(x, tau, ACC: tl.constexpr):
    """t = x / τ rounded as torch rounds it (IEEE division), so ties match the reference."""
    if ACC == tl.float64:
        t = x.to(ACC) / tau
    else:
        t = tl.math.div_rn(x.to(ACC), tau)
    return t


@triton.jit
def _sortable_key(t, ACC: tl.constexpr):
    """An integer that orders like t with NaN on top and −0 == +0 (int32 for fp32, int64 for
    fp64)."""
    t = tl.where(t == 0, 0.0, t)
    if ACC == tl.float64:
        bits = t.to(tl.int64, bitcast=True)
        key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
        key = tl.where(t != t, 0x7FFFFFFFFFFFFFFF, key)
    else:
        bits = t.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        key = tl.where(t != t, 0x7FFFFFFF, key)
    return key


@triton.jit
def _topk_packed_kernel(
    X, VALUES, INDICES, LSE,  # X [R, V] any strides; VALUES, INDICES [R, K]; LSE [R]
    R, V, K,
    sx0, sx1,
    tau_hi, tau_mid, tau_lo,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, K_PAD: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < R
    r = tl.where(rmask, r, 0)
    ln2, log2e = log2_consts(ACC)
    tau = exact_scalar(tau_hi, tau_mid, tau_lo, ACC)
    m = tl.full([ROWS], float("-inf"), ACC)
    s = tl.zeros([ROWS], ACC)
    best = tl.full([ROWS, K_PAD], INT64_MIN, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < V)[None, :]
        x = tl.load(X + (r * sx0)[:, None] + cols[None, :].to(tl.int64) * sx1, mask=mask,
                    other=float("-inf"))
        t = _scaled(x, tau, ACC)
        m, s, _, _ = online_lse_step(m, s, t * log2e)
        packed = (_sortable_key(t, ACC).to(tl.int64) << 32) | (cols.to(tl.int64) ^ LOW32)[None, :]
        packed = tl.where(mask, packed, INT64_MIN)
        merged = tl.join(best, tl.topk(packed, K_PAD))  # [ROWS, K_PAD, 2]
        best = tl.topk(tl.reshape(merged, [ROWS, 2 * K_PAD]), K_PAD)
    key = (best >> 32).to(tl.int32)
    value = (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    index = ((best & LOW32) ^ LOW32).to(tl.int32)
    kk = tl.arange(0, K_PAD)
    out = (r * K)[:, None] + kk[None, :]
    kmask = rmask[:, None] & (kk < K)[None, :]
    tl.store(VALUES + out, value, mask=kmask)
    tl.store(INDICES + out, index, mask=kmask)
    tl.store(LSE + r, (finite_base(m) + tl.log2(s)) * ln2, mask=rmask)


@triton.jit
def _topk_select_kernel(
    X, VALUES, INDICES, LSE,
    R, V, K,
    sx0, sx1,
    tau_hi, tau_mid, tau_lo,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = r < R
    r = tl.where(rmask, r, 0)
    ln2, log2e = log2_consts(ACC)
    tau = exact_scalar(tau_hi, tau_mid, tau_lo, ACC)
    row = r * sx0
    m = tl.full([ROWS], float("-inf"), ACC)
    s = tl.zeros([ROWS], ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < V)[None, :]
        x = tl.load(X + row[:, None] + cols[None, :].to(tl.int64) * sx1, mask=mask,
                    other=float("-inf"))
        m, s, _, _ = online_lse_step(m, s, _scaled(x, tau, ACC) * log2e)
    tl.store(LSE + r, (finite_base(m) + tl.log2(s)) * ln2, mask=rmask)
    # (prev_key, prev_idx): the last pick; the next one is the largest (key, −index) below it.
    prev_key = tl.full([ROWS], 0x7FFFFFFFFFFFFFFF, tl.int64)
    prev_idx = tl.full([ROWS], -1, tl.int64)
    for kk in range(0, K):
        best_key = tl.full([ROWS], INT64_MIN, tl.int64)
        best_idx = tl.full([ROWS], V, tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = rmask[:, None] & (cols < V)[None, :]
            x = tl.load(X + row[:, None] + cols[None, :].to(tl.int64) * sx1, mask=mask, other=0.0)
            key = _sortable_key(_scaled(x, tau, ACC), ACC).to(tl.int64)
            c64 = cols.to(tl.int64)[None, :]
            below = (key < prev_key[:, None]) | ((key == prev_key[:, None]) & (c64 > prev_idx[:, None]))
            key = tl.where(mask & below, key, INT64_MIN)
            tile_key = tl.max(key, axis=1)
            tile_idx = tl.min(tl.where(mask & below & (key == tile_key[:, None]), c64, V), axis=1)
            better = (tile_key > best_key) | ((tile_key == best_key) & (tile_idx < best_idx))
            best_key = tl.where(better, tile_key, best_key)
            best_idx = tl.where(better, tile_idx, best_idx)
        x = tl.load(X + row + best_idx * sx1, mask=rmask, other=0.0)
        tl.store(VALUES + r * K + kk, _scaled(x, tau, ACC), mask=rmask)
        tl.store(INDICES + r * K + kk, best_idx.to(tl.int32), mask=rmask)
        prev_key = best_key
        prev_idx = best_idx


def topk_compress(logits: torch.Tensor, k: int, tau: float, acc: torch.dtype):
    """X [R, V] -> (values [R, K] in ``acc``, indices [R, K] int32, lse [R] in ``acc``)."""
    rows, v = logits.shape
    values = torch.empty((rows, k), dtype=acc, device=logits.device)
    indices = torch.empty((rows, k), dtype=torch.int32, device=logits.device)
    lse = torch.empty((rows,), dtype=acc, device=logits.device)
    k_pad = max(2, triton.next_power_of_2(k))
    common = (logits, values, indices, lse, rows, v, k, *logits.stride(), *split_scalar(tau))
    if acc == torch.float64 or k_pad > MAX_BLOCK_V:
        n_rows, block_v, num_warps = tile_shape(v, rows)
        _topk_select_kernel[(triton.cdiv(rows, n_rows),)](
            *common, ACC=acc_tl(acc), ROWS=n_rows, BLOCK_V=block_v, num_warps=num_warps)
    else:
        n_rows, block_v, num_warps = tile_shape(v, rows, min_block_v=k_pad)
        _topk_packed_kernel[(triton.cdiv(rows, n_rows),)](
            *common, ACC=acc_tl(acc), ROWS=n_rows, BLOCK_V=block_v, K_PAD=k_pad,
            num_warps=num_warps)
    return values, indices, lse
