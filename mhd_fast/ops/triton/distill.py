"""Distillation from teacher logits over all V classes: τ²·KL(p̄ ‖ q) per student row. The
teacher rows and tiles and the forward's sums over column tiles are the steps of the one-launch
dense loss (``dense.py``) and of the packet forward of mean / confidence_weighted
(``distill_topk.py``); the backward kernel, one launch for all clients, groups and rows, is the
packet backward of mean / confidence_weighted on the expanded packets.

Student row (i, g, b): q = softmax(Z[i, g, b] / τ). Teacher distribution p̄ over V:
  max_confidence       p̄ = p_{j*},   j* = idx[i, g, b]   (chosen by ``select.py``)
  mean                 p̄ = Σ_{j ∈ C(i)} p_j / |C(i)|
  confidence_weighted  p̄ = Σ_{j ∈ C(i)} c_j p_j / Σ c_j,   c_j = exp(logconf[j, g, b])
with p_j = softmax(T[j, g, b] / τ) = exp(T/τ − lse_t[j, g, b]) and C(i) the candidates.

Forward, one pass over V (log2 units u = Z·log2(e)/τ; running max m, s = Σ exp2(u − m)):
    log q_v = ln2 · (u_v − m − log2 s)
    KL = Σ_v p̄_v (log p̄_v − log q_v) = ln2 · (A + P · log2 s),
    A = Σ_v p̄_v (log2 p̄_v − u_v + m),   P = Σ_v p̄_v,
where A is carried in the basis of the current m: when m grows to m', A += P · (m' − m).
Terms with p̄_v = 0 count 0 (0·log 0 = 0; ``p̄ != 0`` so that a NaN teacher stays NaN).
loss = τ² · KL, and 0 for a client with no candidate. lse_z = ln2 · (m + log2 s) is saved.

Backward (p̄ does not depend on Z):   ∂loss/∂Z_v = grad · τ · (P · q_v − p̄_v),
q_v = exp2(u_v − lse_z·log2 e), P = Σ_v p̄_v: one pass, no reduction. P = 1 for softmax
teachers; expanded top-k packets (``distill_topk.py``) bring their own row masses, which
exceed 1 when rounded packet values overshoot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import acc_tl, finite_base, online_lse_step, program_rows, split_scalar, tile_shape
from .select import is_candidate

AGG_CODES = {"max_confidence": 0, "mean": 1, "confidence_weighted": 2}


@triton.jit
def _raw_weight(LOGCONF_T, j, g, b, G, B, cand, AGG: tl.constexpr, ACC: tl.constexpr):
    """Unnormalised weight of candidate j: 1 (mean) or its confidence (confidence_weighted)."""
    if AGG == 1:
        w = tl.where(cand, 1.0, 0.0).to(ACC)
    else:
        lc = tl.load(LOGCONF_T + (j * G + g) * B + b, mask=cand, other=0.0).to(ACC)
        w = tl.where(cand, tl.exp(lc), 0.0)
    return w


@triton.jit
def teacher_rows(IDX, LOGCONF_T, MASS, ADJ, sa0, sa1, r, rmask, n, g, b, N, G, B,
                 AGG: tl.constexpr, INCLUDE_SELF: tl.constexpr, HAS_MASS: tl.constexpr,
                 ACC: tl.constexpr):
    """Per student row: (jsel, has, inv_total, mass). max_confidence: jsel = idx (0 where
    none), has = idx ≥ 0. Otherwise has = C(i) ≠ ∅ and inv_total = 1 / Σ_{j ∈ C(i)} raw weight.
    mass = Σ_v p̄_v: 1 for softmax teachers, else from the teachers' row masses MASS."""
    if AGG == 0:
        jsel = tl.load(IDX + r, mask=rmask, other=-1)
        has = (jsel >= 0) & rmask
        jsel = tl.where(has, jsel, 0)
        inv_total = tl.where(has, 1.0, 0.0).to(ACC)
        mass = tl.full(r.shape, 1.0, ACC)
        if HAS_MASS:
            mass = tl.load(MASS + (jsel * G + g) * B + b, mask=has, other=1.0).to(ACC)
    else:
        jsel = tl.zeros_like(r)
        has = tl.zeros(r.shape, tl.int1)
        total = tl.zeros(r.shape, ACC)
        weighted_mass = tl.zeros(r.shape, ACC)
        for j in range(0, N):
            cand = is_candidate(ADJ, n, j, sa0, sa1, rmask, INCLUDE_SELF)
            w = _raw_weight(LOGCONF_T, j, g, b, G, B, cand, AGG, ACC)
            total += w
            if HAS_MASS:
                mass_j = tl.load(MASS + (j * G + g) * B + b, mask=cand, other=0.0).to(ACC)
                weighted_mass += w * mass_j
            has = has | cand
        inv_total = 1.0 / tl.where(total > 0, total, 1.0)
        mass = tl.full(r.shape, 1.0, ACC)
        if HAS_MASS:
            mass = weighted_mass * inv_total
    return jsel, has, inv_total, mass


@triton.jit
def teacher_tile(T, st0, st1, st2, st3, LSE_T, LOGCONF_T, ADJ, sa0, sa1, N, G, B,
                 n, g, b, jsel, has, inv_total, cols, cmask, scale, log2e,
                 AGG: tl.constexpr, INCLUDE_SELF: tl.constexpr, ACC: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """(p̄, log2 p̄) of the rows' teachers on one column tile [ROWS, BLOCK_V]; 0 (and −inf)
    outside the tile, for rows without teacher and, for max_confidence, where T is −inf."""
    cols64 = cols.to(tl.int64)
    if AGG == 0:
        lt = tl.load(LSE_T + (jsel * G + g) * B + b, mask=has, other=0.0).to(ACC) * log2e
        t = tl.load(T + (jsel * st0 + g * st1 + b * st2)[:, None] + cols64[None, :] * st3,
                    mask=has[:, None] & cmask[None, :], other=float("-inf"))
        log2p = t.to(ACC) * scale - lt[:, None]
        p = tl.exp2(log2p)
    else:
        p = tl.zeros([ROWS, BLOCK_V], ACC)
        for j in range(0, N):
            cand = is_candidate(ADJ, n, j, sa0, sa1, has, INCLUDE_SELF)
            w = _raw_weight(LOGCONF_T, j, g, b, G, B, cand, AGG, ACC) * inv_total
            lt = tl.load(LSE_T + (j * G + g) * B + b, mask=cand, other=0.0).to(ACC) * log2e
            t = tl.load(T + (j * st0 + g * st1 + b * st2)[:, None] + cols64[None, :] * st3,
                        mask=cand[:, None] & cmask[None, :], other=float("-inf"))
            p += w[:, None] * tl.exp2(t.to(ACC) * scale - lt[:, None])
        log2p = tl.log2(p)
    return p, log2p


@triton.jit
def kl_init(ROWS: tl.constexpr, ACC: tl.constexpr):
    """The forward's sums (m, s, A, P) before the first column tile."""
    m = tl.full([ROWS], float("-inf"), ACC)
    return m, tl.zeros([ROWS], ACC), tl.zeros([ROWS], ACC), tl.zeros([ROWS], ACC)


@triton.jit
def student_tile(Z, zrow, sz3, rmask, v0, V, BLOCK_V: tl.constexpr):
    """Columns v0 .. v0 + BLOCK_V of the student rows at zrow -> (z [ROWS, BLOCK_V], with −inf
    past V or a masked row, the columns, their mask)."""
    cols = v0 + tl.arange(0, BLOCK_V)
    cmask = cols < V
    z = tl.load(Z + zrow[:, None] + cols[None, :].to(tl.int64) * sz3,
                mask=rmask[:, None] & cmask[None, :], other=float("-inf"))
    return z, cols, cmask


@triton.jit
def kl_finish(m, s, a, p_sum, tau, ln2):
    """The sums after the last tile -> (loss τ²·KL(p̄ ‖ q), the student's lse) per row."""
    log2s = tl.log2(s)
    return tau * tau * ln2 * (a + p_sum * log2s), (finite_base(m) + log2s) * ln2


@triton.jit
def kl_step(u, p, log2p, m, s, a, p_sum):
    """One column tile of the forward's sums: u [ROWS, BLOCK_V] the student in log2 units, p and
    log2 p the teacher's tile -> the new (m, s, A, P) of the module docstring."""
    m, s, base_old, base = online_lse_step(m, s, u)
    term = tl.where(p != 0, p * (log2p - u + base[:, None]), 0.0)
    a = a + p_sum * (base - base_old) + tl.sum(term, axis=1)
    return m, s, a, p_sum + tl.sum(p, axis=1)


@triton.jit
def _distill_bwd_kernel(
    GRAD, Z, T, LSE_T, LOGCONF_T, MASS, IDX, ADJ, LSE_Z, DZ,  # DZ [N, G, B, V], any strides
    R, N, G, B, V,
    sz0, sz1, sz2, sz3, st0, st1, st2, st3, sa0, sa1, sd0, sd1, sd2, sd3,
    tau_hi, tau_mid, tau_lo,
    AGG: tl.constexpr, INCLUDE_SELF: tl.constexpr, HAS_MASS: tl.constexpr, ACC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r, rmask, n, g, b, ln2, log2e, tau, scale = program_rows(R, N, G, B, tau_hi, tau_mid, tau_lo,
                                                             ACC, ROWS)
    jsel, has, inv_total, mass = teacher_rows(IDX, LOGCONF_T, MASS, ADJ, sa0, sa1, r, rmask, n, g,
                                              b, N, G, B, AGG, INCLUDE_SELF, HAS_MASS, ACC)
    lse_z2 = tl.load(LSE_Z + r, mask=rmask, other=0.0).to(ACC) * log2e
    coef = tl.load(GRAD + r, mask=rmask, other=0.0).to(ACC) * tau
    zrow = n * sz0 + g * sz1 + b * sz2
    drow = n * sd0 + g * sd1 + b * sd2
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        mask = rmask[:, None] & cmask[None, :]
        z = tl.load(Z + zrow[:, None] + cols[None, :].to(tl.int64) * sz3, mask=mask, other=0.0)
        q = tl.exp2(z.to(ACC) * scale - lse_z2[:, None])
        p, _ = teacher_tile(T, st0, st1, st2, st3, LSE_T, LOGCONF_T, ADJ, sa0, sa1, N, G, B,
                            n, g, b, jsel, has, inv_total, cols, cmask, scale, log2e,
                            AGG, INCLUDE_SELF, ACC, ROWS, BLOCK_V)
        dz = tl.where(has[:, None], coef[:, None] * (mass[:, None] * q - p), 0.0)
        tl.store(DZ + drow[:, None] + cols[None, :].to(tl.int64) * sd3, dz.to(DZ.dtype.element_ty),
                 mask=mask)


def launch_config(student: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, ROWS, BLOCK_V, num_warps) of a [N, G, B, V] student."""
    n, g, b, v = student.shape
    rows = n * g * b
    return (rows, *tile_shape(v, rows))


def distill_bwd(grad, student, teacher, lse_t, logconf_t, idx, adj, lse_z, tau, include_self,
                aggregate, acc, mass=None, out=None):
    """-> dZ of the student's shape and dtype: written into ``out`` (any strides) when given,
    else a fresh contiguous tensor."""
    n, g, b, v = student.shape
    rows, n_rows, block_v, num_warps = launch_config(student)
    d_student = out if out is not None else torch.empty(student.shape, dtype=student.dtype,
                                                        device=student.device)
    _distill_bwd_kernel[(triton.cdiv(rows, n_rows),)](
        grad, student, teacher, lse_t, logconf_t, lse_t if mass is None else mass, idx, adj, lse_z,
        d_student, rows, n, g, b, v, *student.stride(), *teacher.stride(), *adj.stride(),
        *d_student.stride(), *split_scalar(tau), AGG=AGG_CODES[aggregate], INCLUDE_SELF=include_self,
        HAS_MASS=mass is not None, ACC=acc_tl(acc), ROWS=n_rows, BLOCK_V=block_v,
        num_warps=num_warps)
    return d_student
