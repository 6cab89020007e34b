"""Teacher selection: for every (client i, group g, row b) the most confident candidate.

    C(i) = { j : adj[i, j], j ≠ i } ∪ ({i} if include_self)      (the diagonal of adj is ignored)
    idx[i, g, b] = argmax_{j ∈ C(i)} logconf[j, g, b]            ties -> lowest j, NaN wins
    has[i] = C(i) ≠ ∅,   idx = −1 where it is empty
A program takes one client i and a block of (g, b) columns and scans the candidates BLOCK_J at
a time: within a block the winner is the lowest j holding a NaN, else the lowest j holding the
maximum; a later block replaces the running winner only if strictly better (or NaN over a
number), so ties keep the lowest j. No gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NO_CLIENT = tl.constexpr(2**31 - 1)  # above every client index: "none yet" in a min over j


@triton.jit
def is_candidate(ADJ, i, j, sa0, sa1, mask, INCLUDE_SELF: tl.constexpr):
    """Client j is a candidate teacher of client i (adj[i, j], the diagonal -> include_self),
    elementwise over i, j and mask."""
    a = (tl.load(ADJ + i * sa0 + j * sa1, mask=mask, other=0) != 0) & mask
    if INCLUDE_SELF:
        cand = a | ((i == j) & mask)
    else:
        cand = a & (i != j)
    return cand


@triton.jit
def choose_block(c, cand, j, best, best_nan, idx, AXIS: tl.constexpr):
    """One block of candidates along AXIS of c (logconf, −inf where not a candidate), j their
    client numbers (broadcast against c): the block's winner replaces the running one
    (best, best_nan, idx) when strictly better, or NaN over a number, so ties keep the lowest j."""
    is_nan = cand & (c != c)
    nan_j = tl.min(tl.where(is_nan, j, NO_CLIENT), axis=AXIS)
    c_max = tl.max(tl.where(is_nan, float("-inf"), c), axis=AXIS)
    max_j = tl.min(tl.where(cand & (c == tl.expand_dims(c_max, AXIS)), j, NO_CLIENT), axis=AXIS)
    blk_nan = nan_j < NO_CLIENT
    blk_j = tl.where(blk_nan, nan_j, max_j)
    take = (blk_j < NO_CLIENT) & ~best_nan & ((idx < 0) | blk_nan | (c_max > best))
    return (tl.where(take, c_max, best), best_nan | (take & blk_nan),
            tl.where(take, blk_j.to(tl.int64), idx))


@triton.jit
def choose(C, sc0, sc1, sc2, L, sl0, sl1, sl2, ADJ, sa0, sa1, i, g, b, rmask, N,
           MINUS_L: tl.constexpr, INCLUDE_SELF: tl.constexpr, ACC: tl.constexpr,
           ROWS: tl.constexpr, BLOCK_J: tl.constexpr):
    """idx [ROWS] int64 of student rows (i, g, b) under rmask, inside a kernel that computes the
    loss: the candidate j of highest logconf[j, g, b] = C[j, g, b] (minus L[j, g, b] with
    MINUS_L: a packet's values[..., 0] − lse), BLOCK_J candidates at a time; −1 without one."""
    best = tl.full([ROWS], float("-inf"), ACC)
    best_nan = tl.zeros([ROWS], tl.int1)
    idx = tl.full([ROWS], -1, tl.int64)
    c_row = (g * sc1 + b * sc2)[:, None]
    l_row = (g * sl1 + b * sl2)[:, None]
    for j0 in range(0, N, BLOCK_J):
        j = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)[None, :]
        cand = is_candidate(ADJ, i[:, None], j, sa0, sa1, rmask[:, None] & (j < N), INCLUDE_SELF)
        c = tl.load(C + j * sc0 + c_row, mask=cand, other=float("-inf")).to(ACC)
        if MINUS_L:
            c = c - tl.load(L + j * sl0 + l_row, mask=cand, other=0.0).to(ACC)
        best, best_nan, idx = choose_block(c, cand, j, best, best_nan, idx, 1)
    return idx


@triton.jit
def _select_kernel(
    LOGCONF, ADJ, IDX, HAS,  # LOGCONF [N, G·B] contiguous; IDX [N, G·B] int64; HAS [N] bool
    N, GB,
    sa0, sa1,
    INCLUDE_SELF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_J: tl.constexpr,
):
    i = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < GB
    best = tl.full([BLOCK], float("-inf"), LOGCONF.dtype.element_ty)
    best_nan = tl.zeros([BLOCK], tl.int1)
    idx = tl.full([BLOCK], -1, tl.int64)
    n_cand = tl.zeros([BLOCK_J], tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        cand = is_candidate(ADJ, i, j, sa0, sa1, j < N, INCLUDE_SELF)
        n_cand += cand.to(tl.int32)
        mask = cand[:, None] & cmask[None, :]
        c = tl.load(LOGCONF + j[:, None].to(tl.int64) * GB + cols[None, :], mask=mask,
                    other=float("-inf"))
        best, best_nan, idx = choose_block(c, mask, j[:, None], best, best_nan, idx, 0)
    tl.store(IDX + i * GB + cols, idx, mask=cmask)
    tl.store(HAS + i, tl.sum(n_cand, axis=0) > 0, mask=tl.program_id(0) == 0)


def select(logconf: torch.Tensor, adj: torch.Tensor,
           include_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logconf [N, G, B], adj [N, N] bool -> (idx [N, G, B] int64, has [N] bool), one launch."""
    n = logconf.shape[0]
    logconf = logconf.contiguous()  # [N, G, B] row statistics: tiny next to the logits
    gb = logconf[0].numel()
    idx = torch.empty(logconf.shape, dtype=torch.int64, device=logconf.device)
    has = torch.empty((n,), dtype=torch.bool, device=logconf.device)
    block_j = min(triton.next_power_of_2(n), 32)
    block = min(triton.next_power_of_2(gb), 4096 // block_j)
    _select_kernel[(triton.cdiv(gb, block), n)](
        logconf, adj, idx, has, n, gb, *adj.stride(), INCLUDE_SELF=bool(include_self), BLOCK=block,
        BLOCK_J=block_j, num_warps=4)
    return idx, has
