"""The dense loss in one launch: teacher statistics, teacher choice, loss and the unit gradient
of every student row (cpp's distill_dense on a GPU); the backward only scales that gradient.

A program owns one group g and a block of BB rows b, for all N clients, or for every S-th
chunk of clients when G·B/BB programs would leave the GPU idle (S programs of a block each
compute all N statistics, identical bits, and share the students):
  1. the statistics of its N·BB teacher rows (``stats.py``), written out:
        lse_t = log Σ_v exp(T_v/τ),   logconf_t = max_v T_v/τ − lse_t;
  2. the teacher choice of each of its student rows (i, g, b) from those statistics
     (``select.py``'s rule: highest logconf over C(i), ties -> lowest j, NaN wins) -> idx;
  3. the loss τ²·KL(p̄ ‖ q) against p̄ built from those teacher rows (``distill.py``'s forward),
     and, when a gradient will be needed, the unit gradient
        U = c · τ · (P·q − p̄),   P = Σ_v p̄_v,   c = 1, or 1/(N·G·B) for reduction "mean",
     0 for a client without candidate and in the student's other heads.
Step 2 reads what step 1 wrote from other threads of the program, hence the barrier between
them. A teacher row is read for its statistics and then, still in cache, by the students that
chose it: T crosses memory about once, and the statistics never leave the launch.

U is the gradient of the op's output (the rows, or their sum / mean), stored in the student's
dtype so that it is already the answer for an upstream gradient of 1 (``loss.backward()``).
The backward (``scale_unit``) makes dZ = U · grad in place without a host read: rows whose
grad is exactly 1 are skipped (nothing read or written), and so are the rows of clients
without candidate (U is 0 there, whatever grad holds, NaN included).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (acc_tl, exact_scalar, finite_base, log2_consts, row_coords, split_scalar,
                     tile_shape)
from .distill import AGG_CODES, kl_step, teacher_rows, teacher_tile
from .select import choose
from .stats import row_stats


@triton.jit
def _distill_dense_kernel(
    Z, T, ADJ, LSE_T, LOGCONF_T, IDX, LOSS, LSE_Z, UNIT,  # rows [N, G, B] contiguous
    N, G, B, V, H, HEAD_OFFSET, S,
    sz0, sz1, sz2, sz3, st0, st1, st2, st3, sa0, sa1, su0, su1, su2, su3,
    tau_hi, tau_mid, tau_lo, div_hi, div_mid, div_lo,
    AGG: tl.constexpr, INCLUDE_SELF: tl.constexpr, NEED_GRAD: tl.constexpr, ACC: tl.constexpr,
    CN: tl.constexpr, BB: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr,
    ONE_TILE: tl.constexpr,
):
    # Z: the G learning heads, T: the G teacher heads, both [N, G, B, V] any strides; UNIT: the
    # full student's [N, H, B, V], learning heads from HEAD_OFFSET. Rows of a chunk: client
    # c0 + k // BB, row b0 + k % BB; this program's students: chunks s, s + S, s + 2S, ...
    ROWS: tl.constexpr = CN * BB
    n_blocks = tl.cdiv(B, BB)
    g = (tl.program_id(0) // n_blocks).to(tl.int64)
    k = tl.arange(0, ROWS)
    b = (tl.program_id(0) % n_blocks).to(tl.int64) * BB + k % BB
    bmask = b < B
    b = tl.where(bmask, b, 0)
    ln2, log2e = log2_consts(ACC)
    tau = exact_scalar(tau_hi, tau_mid, tau_lo, ACC)
    scale = log2e / tau
    for c0 in range(0, N, CN):  # 1. teacher statistics
        j = c0 + (k // BB).to(tl.int64)
        jmask = bmask & (j < N)
        j = tl.where(jmask, j, 0)
        lse, logconf = row_stats(T, j * st0 + g * st1 + b * st2, jmask, V, st3, scale, ln2, ACC,
                                 ROWS, BLOCK_V)
        tl.store(LSE_T + (j * G + g) * B + b, lse, mask=jmask)
        tl.store(LOGCONF_T + (j * G + g) * B + b, logconf, mask=jmask)
    tl.debug_barrier()
    coef = tau / exact_scalar(div_hi, div_mid, div_lo, ACC)
    first = tl.program_id(1) * CN
    for c0 in range(first, N, S * CN):
        i = c0 + (k // BB).to(tl.int64)
        rmask = bmask & (i < N)
        i = tl.where(rmask, i, 0)
        r = (i * G + g) * B + b
        idx = choose(LOGCONF_T, G * B, B, 1, LOGCONF_T, 0, 0, 0, ADJ, sa0, sa1, i, g, b, rmask, N,
                     False, INCLUDE_SELF, ACC, ROWS, BLOCK_J)  # 2. teacher choice
        tl.store(IDX + r, idx, mask=rmask)
        if AGG == 0:
            has = idx >= 0
            jsel = tl.where(has, idx, 0)
            inv_total = tl.where(has, 1.0, 0.0).to(ACC)
        else:
            jsel, has, inv_total, _ = teacher_rows(IDX, LOGCONF_T, LSE_T, ADJ, sa0, sa1, r, rmask, i,
                                                   g, b, N, G, B, AGG, INCLUDE_SELF, False, ACC)
        zrow = i * sz0 + g * sz1 + b * sz2
        m = tl.full([ROWS], float("-inf"), ACC)
        s = tl.zeros([ROWS], ACC)
        a = tl.zeros([ROWS], ACC)
        p_sum = tl.zeros([ROWS], ACC)
        if ONE_TILE:  # 3. the loss; one tile is kept for the gradient
            cols = tl.arange(0, BLOCK_V)
            cmask = cols < V
            z = tl.load(Z + zrow[:, None] + cols[None, :].to(tl.int64) * sz3,
                        mask=rmask[:, None] & cmask[None, :], other=float("-inf"))
            u = z.to(ACC) * scale
            p, log2p = teacher_tile(T, st0, st1, st2, st3, LSE_T, LOGCONF_T, ADJ, sa0, sa1, N, G, B,
                                    i, g, b, jsel, has, inv_total, cols, cmask, scale, log2e,
                                    AGG, INCLUDE_SELF, ACC, ROWS, BLOCK_V)
            m, s, a, p_sum = kl_step(u, p, log2p, m, s, a, p_sum)
        else:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                cmask = cols < V
                z = tl.load(Z + zrow[:, None] + cols[None, :].to(tl.int64) * sz3,
                            mask=rmask[:, None] & cmask[None, :], other=float("-inf"))
                p, log2p = teacher_tile(T, st0, st1, st2, st3, LSE_T, LOGCONF_T, ADJ, sa0, sa1, N,
                                        G, B, i, g, b, jsel, has, inv_total, cols, cmask, scale,
                                        log2e, AGG, INCLUDE_SELF, ACC, ROWS, BLOCK_V)
                m, s, a, p_sum = kl_step(z.to(ACC) * scale, p, log2p, m, s, a, p_sum)
        log2s = tl.log2(s)
        lse2 = finite_base(m) + log2s
        loss = tau * tau * ln2 * (a + p_sum * log2s)
        tl.store(LOSS + r, tl.where(has, loss, 0.0), mask=rmask)
        tl.store(LSE_Z + r, lse2 * ln2, mask=rmask)
        if NEED_GRAD:
            urow = i * su0 + (HEAD_OFFSET + g) * su1 + b * su2
            if ONE_TILE:
                q = tl.exp2(u - lse2[:, None])
                unit = tl.where(has[:, None], coef * (p_sum[:, None] * q - p), 0.0)
                tl.store(UNIT + urow[:, None] + cols[None, :].to(tl.int64) * su3,
                         unit.to(UNIT.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
            else:  # a second sweep, over rows this program has just read
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + tl.arange(0, BLOCK_V)
                    cmask = cols < V
                    mask = rmask[:, None] & cmask[None, :]
                    z = tl.load(Z + zrow[:, None] + cols[None, :].to(tl.int64) * sz3, mask=mask,
                                other=0.0)
                    q = tl.exp2(z.to(ACC) * scale - lse2[:, None])
                    p, log2p = teacher_tile(T, st0, st1, st2, st3, LSE_T, LOGCONF_T, ADJ, sa0, sa1, N,
                                        G, B, i, g, b, jsel, has, inv_total, cols, cmask, scale,
                                        log2e, AGG, INCLUDE_SELF, ACC, ROWS, BLOCK_V)
                    unit = tl.where(has[:, None], coef * (p_sum[:, None] * q - p), 0.0)
                    tl.store(UNIT + urow[:, None] + cols[None, :].to(tl.int64) * su3,
                             unit.to(UNIT.dtype.element_ty), mask=mask)
    if NEED_GRAD:  # the student's other heads: the first HEAD_OFFSET and those after the G
        for o in range(g, H - G, G):
            head = tl.where(o < HEAD_OFFSET, o, o + G)
            for c0 in range(first, N, S * CN):
                i = c0 + (k // BB).to(tl.int64)
                rmask = bmask & (i < N)
                urow = i * su0 + head * su1 + b * su2
                for v0 in range(0, V, BLOCK_V):
                    cols = v0 + tl.arange(0, BLOCK_V)
                    tl.store(UNIT + urow[:, None] + cols[None, :].to(tl.int64) * su3,
                             tl.zeros([ROWS, BLOCK_V], UNIT.dtype.element_ty),
                             mask=rmask[:, None] & (cols < V)[None, :])


@triton.jit
def _scale_unit_kernel(
    UNIT, GRAD, IDX,  # UNIT [N, H, B, V]; GRAD [N, G, B] any strides (0 for a broadcast number)
    R, N, G, B, V, HEAD_OFFSET,
    su0, su1, su2, su3, sg0, sg1, sg2,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r, rmask, n, g, b = row_coords(tl.program_id(0), R, N, G, B, ROWS)
    has = tl.load(IDX + n * G * B, mask=rmask, other=-1) >= 0  # idx[n, 0, 0]: −1 = no candidate
    grad = tl.load(GRAD + n * sg0 + g * sg1 + b * sg2, mask=rmask, other=1.0).to(ACC)
    live = rmask & has & (grad != 1.0)
    urow = n * su0 + (HEAD_OFFSET + g) * su1 + b * su2
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = live[:, None] & (cols < V)[None, :]
        ptr = UNIT + urow[:, None] + cols[None, :].to(tl.int64) * su3
        unit = tl.load(ptr, mask=mask, other=0.0).to(ACC)
        tl.store(ptr, (unit * grad[:, None]).to(UNIT.dtype.element_ty), mask=mask)


# Programs enough to fill a large GPU several times over; fewer blocks of rows than this split
# their students over S programs each.
TARGET_PROGRAMS = 1024


def _dense_tiles(n: int, g: int, b: int, v: int) -> tuple[int, int, int, int, int]:
    """(CN clients, BB rows b, S programs a block, BLOCK_V, num_warps): a chunk is a full tile,
    clients first (the N students of one (g, b) mostly share their teacher row)."""
    n_rows, block_v, num_warps = tile_shape(v, n * b)
    cn = min(n_rows, triton.next_power_of_2(n))
    bb = n_rows // cn
    blocks = g * triton.cdiv(b, bb)
    return cn, bb, max(1, min(triton.cdiv(n, cn), TARGET_PROGRAMS // blocks)), block_v, num_warps


def distill_dense(student, teacher, adj, head_offset, tau, include_self, aggregate, need_grad, acc,
                  reduction="none"):
    """student [N, H, B, V] (heads head_offset .. head_offset + G learn), teacher [N, G, B, V]
    -> (loss rows [N, G, B], lse_z, unit [N, H, B, V] in the student's dtype or empty, lse_t,
    logconf_t, idx int64), rows in ``acc``; one launch."""
    n, h, b, v = student.shape
    g = teacher.shape[1]
    rows = (n, g, b)
    device = student.device
    lse_t, logconf_t, loss, lse_z = (torch.empty(rows, dtype=acc, device=device) for _ in range(4))
    idx = torch.empty(rows, dtype=torch.int64, device=device)
    unit = torch.empty(student.shape if need_grad else (0,), dtype=student.dtype, device=device)
    cn, bb, splits, block_v, num_warps = _dense_tiles(n, g, b, v)
    divisor = n * g * b if reduction == "mean" else 1
    _distill_dense_kernel[(g * triton.cdiv(b, bb), splits)](
        student[:, head_offset:head_offset + g], teacher, adj, lse_t, logconf_t, idx, loss, lse_z,
        unit, n, g, b, v, h, head_offset, splits,
        *student.stride(), *teacher.stride(), *adj.stride(),
        *(unit.stride() if need_grad else (0, 0, 0, 0)), *split_scalar(tau),
        *split_scalar(float(divisor)),
        AGG=AGG_CODES[aggregate], INCLUDE_SELF=bool(include_self), NEED_GRAD=bool(need_grad),
        ACC=acc_tl(acc), CN=cn, BB=bb, BLOCK_V=block_v,
        BLOCK_J=min(triton.next_power_of_2(n), 32, max(1, 4096 // (cn * bb))), ONE_TILE=v <= block_v,
        num_warps=num_warps)
    return loss, lse_z, unit, lse_t, logconf_t, idx


def scale_unit(unit, grad, idx, head_offset):
    """dZ = unit · grad in place (one launch, no host read): unit [N, H, B, V] from
    distill_dense, grad [N, G, B] or one number for all rows, idx the forward's choice."""
    n, h, b, v = unit.shape
    g = idx.shape[1]
    grad = grad.expand(n, g, b)
    rows = n * g * b
    n_rows, block_v, num_warps = tile_shape(v, rows)
    _scale_unit_kernel[(triton.cdiv(rows, n_rows),)](
        unit, grad, idx, rows, n, g, b, v, head_offset, *unit.stride(), *grad.stride(),
        ACC=acc_tl(torch.float64 if torch.float64 in (unit.dtype, grad.dtype) else torch.float32),
        ROWS=n_rows, BLOCK_V=block_v, num_warps=num_warps)
    return unit
