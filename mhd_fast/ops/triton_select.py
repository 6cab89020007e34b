"""Teacher selection: for every (client i, group g, row b) the most confident candidate.

    C(i) = { j : adj[i, j], j ≠ i } ∪ ({i} if include_self)      (the diagonal of adj is ignored)
    idx[i, g, b] = argmax_{j ∈ C(i)} logconf[j, g, b]            ties -> lowest j, NaN wins
    has[i] = C(i) ≠ ∅,   idx = −1 where it is empty
The scan over j runs in increasing order with a strict comparison, which keeps the lowest j on
ties; a NaN replaces any number and is never replaced (as torch.argmax). No gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def is_candidate(ADJ, i, j, sa0, sa1, mask, INCLUDE_SELF: tl.constexpr):
    """[ROWS] bool: client j is a candidate teacher of client i (adj[i, j], diagonal ->
    include_self)."""
    a = (tl.load(ADJ + i * sa0 + j * sa1, mask=mask, other=0) != 0) & mask
    if INCLUDE_SELF:
        cand = a | ((i == j) & mask)
    else:
        cand = a & (i != j)
    return cand


@triton.jit
def _select_kernel(
    LOGCONF, ADJ, IDX, HAS,  # LOGCONF [N, G·B] contiguous; IDX [N, G·B] int64; HAS [N] bool
    N, GB,
    sa0, sa1,
    INCLUDE_SELF: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < GB
    best = tl.full([BLOCK], float("-inf"), LOGCONF.dtype.element_ty)
    idx = tl.full([BLOCK], -1, tl.int64)
    any_cand = tl.zeros([], tl.int1)
    for j in range(0, N):
        cand = is_candidate(ADJ, i, j, sa0, sa1, i >= 0, INCLUDE_SELF)
        # tl.where, not `&`: a scalar bool and a block combine into an int32 mask in the
        # Triton interpreter.
        cand_cols = tl.where(cand, cmask, False)
        c = tl.load(LOGCONF + j * GB + cols, mask=cand_cols, other=float("-inf"))
        take = tl.where(cand, (idx < 0) | (c > best) | ((c != c) & (best == best)), False)
        best = tl.where(take, c, best)
        idx = tl.where(take, j, idx)
        any_cand = any_cand | cand
    tl.store(IDX + i * GB + cols, idx, mask=cmask)
    tl.store(HAS + i, any_cand, mask=tl.program_id(0) == 0)


def select(logconf: torch.Tensor, adj: torch.Tensor, include_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logconf [N, G, B], adj [N, N] bool -> (idx [N, G, B] int64, has [N] bool), one launch."""
    n = logconf.shape[0]
    logconf = logconf.contiguous()  # [N, G, B] row statistics: tiny next to the logits
    gb = logconf[0].numel()
    idx = torch.empty(logconf.shape, dtype=torch.int64, device=logconf.device)
    has = torch.empty((n,), dtype=torch.bool, device=logconf.device)
    block = min(triton.next_power_of_2(gb), 1024)
    _select_kernel[(triton.cdiv(gb, block), n)](
        logconf, adj, idx, has, n, gb, *adj.stride(), INCLUDE_SELF=bool(include_self), BLOCK=block,
        num_warps=4)
    return idx, has
