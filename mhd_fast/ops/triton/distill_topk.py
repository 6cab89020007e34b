"""Distillation from top-k packets: the forward in one launch from the packets as they arrive
(each row's statistics lse_t = lse, logconf_t = values_0 − lse and int32 classes copied out,
the teacher choice among the candidates by values_0 − lse, then the loss), the backward in one
(max_confidence) or two (mean / confidence_weighted).

A packet of teacher row (j, g, b): values_k = the K largest of T/τ, indices_k, lse. Sent mass
p_k = exp(values_k − lse), rest p_rest = max(0, 1 − Σ_k p_k) (no rest bucket when K = V).

max_confidence, student row (i, g, b) against the packet of j* = idx[i, g, b]: KL over K + 1
buckets, q_k = q at the sent classes, q_rest = 1 − Σ_k q_k = the student's unsent mass,
    loss = τ² · [Σ_k p_k (log p_k − log q_k) + p_rest (log p_rest − log q_rest)]   (0·log 0 = 0)
    ∂loss/∂Z_v = grad · τ · (P · q_v − p_v)                 for sent v
               = grad · τ · q_v · (P − p_rest / q_rest)     otherwise (ratio 0 if p_rest = 0)
with P = Σ_k p_k + p_rest, which is 1 (the usual bucket formula) unless rounded packet values make
Σ_k p_k exceed 1: the gradient stays the exact one of the loss as defined.

Precision. When the sent classes hold nearly all of the student's mass, 1 − Σ_k q_k cancels:
an fp32 lse of magnitude 10 is off by 1e-6, which moves a q_rest of 1e-4 by 1%. So nothing
here subtracts from 1. The forward sums the unsent classes directly: in its one online-softmax
pass over Z each column tile learns which of its classes are sent from a bitmask built in
registers (word w, bit l <-> class v0 + w·LANES + l), and it accumulates s = Σ_v exp2(u_v − m)
and s_rest = Σ_unsent exp2(u_v − m) side by side (u = Z·log2 e/τ, m the running max). It saves
L_rest = log Σ_unsent exp(Z_v/τ) per row (in the op's ``lse_z`` slot). The backward rebuilds
lse = log(exp(L_rest) + Σ_k exp(Z_k/τ)) from L_rest and the K gathered sent logits, so
q_rest = exp(L_rest − lse) and every q_k = exp((u_k − m) − log2 s) come out to rounding; then
one pass over V writes the second form of the gradient and the K sent entries are
overwritten.

mean / confidence_weighted: each candidate's packet is expanded to a full distribution over V
(sent classes p_k, the rest mass p_rest / (V − K) on each of the V − K others) and p̄ is the
weighted sum of the expansions. The forward builds p̄ tile by tile in registers and takes the
dense forward's KL (``distill.py``). The backward writes the expansions out as teacher "logits"
τ·log(expanded p) with lse 0, so that exp(T/τ − lse) is the expanded distribution itself, and
runs the dense backward kernel on them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import distill
from .common import (acc_tl, exact_scalar, finite_base, online_lse_step, program_rows,
                     row_coords, split_scalar, tile_shape)
from .distill import AGG_CODES, kl_finish, kl_init, kl_step, student_tile
from .select import choose, is_candidate


@triton.jit
def _packet_rows(j, rmask, g, b, sv0, sv1, sv2, si0, si1, si2, sl0, sl1, sl2):
    """Per student row whose teacher is j (−1: none): (has a teacher, offsets of its packet's
    values / indices row and of its lse)."""
    has = (j >= 0) & rmask
    j = tl.where(has, j, 0)
    return has, j * sv0 + g * sv1 + b * sv2, j * si0 + g * si1 + b * si2, j * sl0 + g * sl1 + b * sl2


@triton.jit
def _sent_chunk(Z, zrow, sz3, VALUES, INDICES, LSE_T, vrow, irow, lrow, sv3, si3, has, k0, K,
                scale, log2e, ACC: tl.constexpr, K_BLOCK: tl.constexpr):
    """Entries [k0, k0 + K_BLOCK) of each row's packet: (sent classes [ROWS, K_BLOCK], mask,
    log2 p_k, u_k = Z[sent]·log2 e/τ); log2 p_k = u_k = −inf outside the packet."""
    kk = k0 + tl.arange(0, K_BLOCK)
    kmask = has[:, None] & (kk < K)[None, :]
    vals = tl.load(VALUES + vrow[:, None] + kk[None, :] * sv3, mask=kmask,
                   other=float("-inf")).to(ACC)
    sent = tl.load(INDICES + irow[:, None] + kk[None, :] * si3, mask=kmask, other=0).to(tl.int64)
    lse_t = tl.load(LSE_T + lrow, mask=has, other=0.0).to(ACC)
    z = tl.load(Z + zrow[:, None] + sent * sz3, mask=kmask, other=float("-inf"))
    return sent, kmask, (vals - lse_t[:, None]) * log2e, z.to(ACC) * scale


@triton.jit
def _sent_words(INDICES, irow, si3, has, K, v0, ROWS: tl.constexpr, NW: tl.constexpr,
                LANES: tl.constexpr, K_BLOCK: tl.constexpr):
    """[ROWS, NW] int32 bitmask of the sent classes in the tile starting at v0: bit l of word w
    is set when class v0 + w·LANES + l is sent (LANES <= 32). Classes of a packet are distinct,
    so summing their bits is an OR (bit 31 included: two's complement adds carry-free)."""
    words = tl.zeros([ROWS, NW], tl.int32)
    w = tl.arange(0, NW)
    for k0 in range(0, K, K_BLOCK):
        kk = k0 + tl.arange(0, K_BLOCK)
        kmask = has[:, None] & (kk < K)[None, :]
        rel = tl.load(INDICES + irow[:, None] + kk[None, :] * si3, mask=kmask,
                      other=-1).to(tl.int64) - v0
        inside = kmask & (rel >= 0) & (rel < NW * LANES)
        rel = tl.where(inside, rel, 0).to(tl.int32)
        hit = inside[:, None, :] & ((rel // LANES)[:, None, :] == w[None, :, None])
        bit = tl.full([], 1, tl.int32) << (rel % LANES)
        words += tl.sum(tl.where(hit, bit[:, None, :], 0), axis=2)
    return words


@triton.jit
def _packet_prologue(VALUES, INDICES, LSE, ADJ, STATS, IND32, IDX, r, rmask, n, g, b, R, N, K,
                     sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0, sl1, sl2, sa0, sa1,
                     INCLUDE_SELF: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
                     K_BLOCK: tl.constexpr, BLOCK_J: tl.constexpr):
    """What the forward writes of its own rows r = (n, g, b) besides the loss: the packet's
    statistics lse_t = lse, logconf_t = values[0] − lse (STATS[0], STATS[1]), its classes as
    int32 (IND32 [R, K]) and the teacher choice (IDX), which it returns."""
    own_l = n * sl0 + g * sl1 + b * sl2
    own_v = n * sv0 + g * sv1 + b * sv2
    own_i = n * si0 + g * si1 + b * si2
    lse = tl.load(LSE + own_l, mask=rmask, other=0.0).to(ACC)
    tl.store(STATS + r, lse, mask=rmask)
    tl.store(STATS + R + r, tl.load(VALUES + own_v, mask=rmask, other=0.0).to(ACC) - lse, mask=rmask)
    for k0 in range(0, K, K_BLOCK):
        kk = k0 + tl.arange(0, K_BLOCK)
        kmask = rmask[:, None] & (kk < K)[None, :]
        cls = tl.load(INDICES + own_i[:, None] + kk[None, :] * si3, mask=kmask, other=0)
        tl.store(IND32 + (r * K)[:, None] + kk[None, :], cls.to(tl.int32), mask=kmask)
    j = choose(VALUES, sv0, sv1, sv2, LSE, sl0, sl1, sl2, ADJ, sa0, sa1, n, g, b, rmask, N, True,
               INCLUDE_SELF, ACC, ROWS, BLOCK_J)
    tl.store(IDX + r, j, mask=rmask)
    return j


@triton.jit
def _bucket_kl(Z, zrow, sz3, VALUES, INDICES, LSE, j, rmask, g, b, V, K,
               sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0, sl1, sl2, ln2, log2e, tau, scale,
               HAS_REST: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, NW: tl.constexpr,
               LANES: tl.constexpr, K_BLOCK: tl.constexpr):
    """max_confidence: (loss, L_rest) of the rows against the packets of their teachers j, the
    KL over the K sent buckets and the rest in one pass over Z (module docstring)."""
    has, vrow, irow, lrow = _packet_rows(j, rmask, g, b, sv0, sv1, sv2, si0, si1, si2, sl0, sl1, sl2)
    lanes = tl.arange(0, LANES)
    m = tl.full([ROWS], float("-inf"), ACC)
    s = tl.zeros([ROWS], ACC)
    s_rest = tl.zeros([ROWS], ACC)
    # Column tiles as [ROWS, NW, LANES]: class v0 + w·LANES + l, so the bitmask lines up.
    for v0 in range(0, V, NW * LANES):
        cols = v0 + tl.arange(0, NW)[:, None] * LANES + lanes[None, :]
        mask = rmask[:, None, None] & (cols < V)[None, :, :]
        z = tl.load(Z + zrow[:, None, None] + cols[None, :, :].to(tl.int64) * sz3, mask=mask,
                    other=float("-inf"))
        u = z.to(ACC) * scale
        m_new = tl.maximum(m, tl.max(tl.max(u, axis=2), axis=1))
        base = finite_base(m_new)
        alpha = tl.exp2(finite_base(m) - base)
        e = tl.exp2(u - base[:, None, None])
        s = s * alpha + tl.sum(tl.sum(e, axis=2), axis=1)
        if HAS_REST:
            words = _sent_words(INDICES, irow, si3, has, K, v0, ROWS, NW, LANES, K_BLOCK)
            sent = ((words[:, :, None] >> lanes[None, None, :]) & 1) != 0
            s_rest = s_rest * alpha + tl.sum(tl.sum(tl.where(sent, 0.0, e), axis=2), axis=1)
        m = m_new
    base = finite_base(m)
    log2s = tl.log2(s)
    kl2 = tl.zeros([ROWS], ACC)
    p_sum = tl.zeros([ROWS], ACC)
    for k0 in range(0, K, K_BLOCK):
        sent, kmask, log2p, u = _sent_chunk(Z, zrow, sz3, VALUES, INDICES, LSE, vrow, irow, lrow,
                                            sv3, si3, has, k0, K, scale, log2e, ACC, K_BLOCK)
        p = tl.exp2(log2p)
        log2q = (u - base[:, None]) - log2s[:, None]
        kl2 += tl.sum(tl.where(p != 0, p * (log2p - log2q), 0.0), axis=1)
        p_sum += tl.sum(p, axis=1)
    l_rest = tl.full([ROWS], float("-inf"), ACC)
    if HAS_REST:
        p_rest = tl.maximum(1.0 - p_sum, 0.0)
        log2q_rest = tl.log2(s_rest) - log2s
        kl2 += tl.where(p_rest != 0, p_rest * (tl.log2(p_rest) - log2q_rest), 0.0)
        l_rest = (base + tl.log2(s_rest)) * ln2
    return tau * tau * ln2 * kl2, l_rest


@triton.jit
def _packet_weight(VALUES, vrow, lse, cand, AGG: tl.constexpr, ACC: tl.constexpr):
    """Unnormalised weight of a candidate packet: 1 (mean) or its confidence exp(values[0] − lse)."""
    if AGG == 1:
        w = tl.where(cand, 1.0, 0.0).to(ACC)
    else:
        w = tl.where(cand, tl.exp(tl.load(VALUES + vrow, mask=cand, other=0.0).to(ACC) - lse), 0.0)
    return w


@triton.jit
def _mixed_packets_tile(VALUES, INDICES, LSE, ADJ, sa0, sa1, n, g, b, has, inv_total, cols, V, K,
                        N, sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0, sl1, sl2,
                        AGG: tl.constexpr, INCLUDE_SELF: tl.constexpr, HAS_REST: tl.constexpr,
                        ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """p̄ of mean / confidence_weighted on one column tile [ROWS, BLOCK_V]: Σ_j w_j · the
    expansion of candidate j's packet (p_k at its sent classes, p_rest / (V − K) elsewhere),
    built in registers; w_j = 1 or c_j, times inv_total."""
    p_bar = tl.zeros([ROWS, BLOCK_V], ACC)
    for j in range(0, N):
        cand = is_candidate(ADJ, n, j, sa0, sa1, has, INCLUDE_SELF)
        vrow = j * sv0 + g * sv1 + b * sv2
        irow = j * si0 + g * si1 + b * si2
        lse = tl.load(LSE + j * sl0 + g * sl1 + b * sl2, mask=cand, other=0.0).to(ACC)
        p_j = tl.zeros([ROWS, BLOCK_V], ACC)
        sent = tl.zeros([ROWS, BLOCK_V], tl.int1)
        p_sent = tl.zeros([ROWS], ACC)
        for k in range(0, K):
            p_k = tl.exp(tl.load(VALUES + vrow + k * sv3, mask=cand, other=float("-inf")).to(ACC) - lse)
            hit = cols[None, :] == tl.load(INDICES + irow + k * si3, mask=cand, other=-1).to(tl.int64)[:, None]
            p_j = tl.where(hit, p_k[:, None], p_j)
            sent = sent | hit
            p_sent += p_k
        if HAS_REST:
            rest = tl.maximum(1.0 - p_sent, 0.0) / tl.cast(V - K, ACC)
            p_j = tl.where(sent, p_j, rest[:, None])
        w = _packet_weight(VALUES, vrow, lse, cand, AGG, ACC) * inv_total
        p_bar += w[:, None] * p_j
    return p_bar


@triton.jit
def _mixed_kl(Z, zrow, sz3, VALUES, INDICES, LSE, ADJ, sa0, sa1, j, rmask, n, g, b, N, V, K,
              sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0, sl1, sl2, ln2, tau, scale,
              AGG: tl.constexpr, INCLUDE_SELF: tl.constexpr, HAS_REST: tl.constexpr,
              ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """mean / confidence_weighted: (loss, lse_z) of the rows, the dense forward's KL against p̄
    built from the candidates' packets tile by tile (module docstring)."""
    has = (j >= 0) & rmask
    total = tl.zeros([ROWS], ACC)
    for jj in range(0, N):
        cand = is_candidate(ADJ, n, jj, sa0, sa1, has, INCLUDE_SELF)
        lse = tl.load(LSE + jj * sl0 + g * sl1 + b * sl2, mask=cand, other=0.0).to(ACC)
        total += _packet_weight(VALUES, jj * sv0 + g * sv1 + b * sv2, lse, cand, AGG, ACC)
    inv_total = 1.0 / tl.where(total > 0, total, 1.0)
    m, s, a, p_sum = kl_init(ROWS, ACC)
    for v0 in range(0, V, BLOCK_V):
        z, cols, cmask = student_tile(Z, zrow, sz3, rmask, v0, V, BLOCK_V)
        p = _mixed_packets_tile(VALUES, INDICES, LSE, ADJ, sa0, sa1, n, g, b, has, inv_total, cols,
                                V, K, N, sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0, sl1, sl2,
                                AGG, INCLUDE_SELF, HAS_REST, ACC, ROWS, BLOCK_V)
        p = tl.where(cmask[None, :], p, 0.0)
        m, s, a, p_sum = kl_step(z.to(ACC) * scale, p, tl.log2(p), m, s, a, p_sum)
    return kl_finish(m, s, a, p_sum, tau, ln2)


@triton.jit
def _distill_topk_fwd_kernel(
    Z, VALUES, INDICES, LSE, ADJ, LOSS, STATS, IND32, IDX,  # the packet as it arrives
    R, N, G, B, V, K,
    sz0, sz1, sz2, sz3, sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0, sl1, sl2, sa0, sa1,
    tau_hi, tau_mid, tau_lo,
    AGG: tl.constexpr, INCLUDE_SELF: tl.constexpr, HAS_REST: tl.constexpr, ACC: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, LANES: tl.constexpr, K_BLOCK: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    # outputs: LOSS [N·G·B]; STATS [3, N·G·B] = lse_t, logconf_t and the backward's statistic
    # (L_rest for max_confidence, lse_z otherwise); IND32 [N·G·B, K]; IDX
    r, rmask, n, g, b, ln2, log2e, tau, scale = program_rows(R, N, G, B, tau_hi, tau_mid, tau_lo,
                                                             ACC, ROWS)
    zrow = n * sz0 + g * sz1 + b * sz2
    j = _packet_prologue(VALUES, INDICES, LSE, ADJ, STATS, IND32, IDX, r, rmask, n, g, b, R, N, K,
                         sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0, sl1, sl2, sa0, sa1,
                         INCLUDE_SELF, ACC, ROWS, K_BLOCK, BLOCK_J)
    if AGG == 0:
        loss, statistic = _bucket_kl(Z, zrow, sz3, VALUES, INDICES, LSE, j, rmask, g, b, V, K,
                                     sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0, sl1, sl2, ln2,
                                     log2e, tau, scale, HAS_REST, ACC, ROWS, BLOCK_V // LANES,
                                     LANES, K_BLOCK)
    else:
        loss, statistic = _mixed_kl(Z, zrow, sz3, VALUES, INDICES, LSE, ADJ, sa0, sa1, j, rmask, n,
                                    g, b, N, V, K, sv0, sv1, sv2, sv3, si0, si1, si2, si3, sl0,
                                    sl1, sl2, ln2, tau, scale, AGG, INCLUDE_SELF, HAS_REST, ACC,
                                    ROWS, BLOCK_V)
    tl.store(LOSS + r, tl.where((j >= 0) & rmask, loss, 0.0), mask=rmask)
    tl.store(STATS + 2 * R + r, statistic, mask=rmask)


@triton.jit
def _distill_topk_bwd_kernel(
    GRAD, Z, VALUES, INDICES, LSE_T, IDX, LSE_REST, DZ,  # DZ [N, G, B, V], any strides
    R, N, G, B, V, K,
    sz0, sz1, sz2, sz3, sv0, sv1, sv2, sv3, si0, si1, si2, si3, sd0, sd1, sd2, sd3,
    tau_hi, tau_mid, tau_lo,
    HAS_REST: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    r, rmask, n, g, b, ln2, log2e, tau, scale = program_rows(R, N, G, B, tau_hi, tau_mid, tau_lo,
                                                             ACC, ROWS)
    zrow = n * sz0 + g * sz1 + b * sz2
    drow = n * sd0 + g * sd1 + b * sd2
    has, vrow, irow, lrow = _packet_rows(tl.load(IDX + r, mask=rmask, other=-1), rmask, g, b, sv0,
                                         sv1, sv2, si0, si1, si2, G * B, B, 1)
    # lse of the row in log2 units = log2(2^L_rest + Σ_k 2^u_k), online over packet chunks.
    l_rest = tl.load(LSE_REST + r, mask=rmask, other=float("-inf")).to(ACC) * log2e
    m = l_rest
    s = tl.exp2(l_rest - finite_base(l_rest))
    p_sum = tl.zeros([ROWS], ACC)
    for k0 in range(0, K, K_BLOCK):
        _, _, log2p, u = _sent_chunk(Z, zrow, sz3, VALUES, INDICES, LSE_T, vrow, irow, lrow,
                                     sv3, si3, has, k0, K, scale, log2e, ACC, K_BLOCK)
        m, s, _, _ = online_lse_step(m, s, u)
        p_sum += tl.sum(tl.exp2(log2p), axis=1)
    base = finite_base(m)
    log2s = tl.log2(s)
    coef = tl.where(has, tl.load(GRAD + r, mask=rmask, other=0.0).to(ACC) * tau, 0.0)
    mass = p_sum  # P = Σ_k p_k + p_rest: 1 unless rounded packet values overshoot
    rest_coef = coef * mass
    if HAS_REST:
        p_rest = tl.maximum(1.0 - p_sum, 0.0)
        mass = p_sum + p_rest
        q_rest = tl.exp2((l_rest - base) - log2s)
        rest_coef = coef * (mass - tl.where(p_rest == 0, 0.0, p_rest / q_rest))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < V)[None, :]
        z = tl.load(Z + zrow[:, None] + cols[None, :].to(tl.int64) * sz3, mask=mask, other=0.0)
        q = tl.exp2((z.to(ACC) * scale - base[:, None]) - log2s[:, None])
        dz = tl.where(has[:, None], rest_coef[:, None] * q, 0.0)
        tl.store(DZ + drow[:, None] + cols[None, :].to(tl.int64) * sd3, dz.to(DZ.dtype.element_ty),
                 mask=mask)
    # The sent classes overwrite what the pass above wrote there: the barrier orders the two
    # stores of this program to the same addresses.
    tl.debug_barrier()
    for k0 in range(0, K, K_BLOCK):
        sent, kmask, log2p, u = _sent_chunk(Z, zrow, sz3, VALUES, INDICES, LSE_T, vrow, irow,
                                            lrow, sv3, si3, has, k0, K, scale, log2e, ACC, K_BLOCK)
        q = tl.exp2((u - base[:, None]) - log2s[:, None])
        dz = coef[:, None] * (mass[:, None] * q - tl.exp2(log2p))
        tl.store(DZ + drow[:, None] + sent * sd3, dz.to(DZ.dtype.element_ty), mask=kmask)


@triton.jit
def _expand_packets_kernel(
    VALUES, INDICES, LSE_T, OUT, MASS,  # OUT [N, G, B, V] contiguous, MASS [N·G·B], ACC dtype
    R, N, G, B, V, K,
    sv0, sv1, sv2, sv3, si0, si1, si2, si3,
    tau_hi, tau_mid, tau_lo,
    HAS_REST: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    """OUT[r] = τ · log(expanded packet r): τ·(values_k − lse) at the sent classes,
    τ · log(p_rest / (V − K)) elsewhere (−inf when there is no rest mass); MASS[r] = its total
    Σ_k p_k + p_rest (above 1 when rounded values overshoot)."""
    r, rmask, n, g, b = row_coords(tl.program_id(0), R, N, G, B, ROWS)
    tau = exact_scalar(tau_hi, tau_mid, tau_lo, ACC)
    vrow = n * sv0 + g * sv1 + b * sv2
    irow = n * si0 + g * si1 + b * si2
    lse = tl.load(LSE_T + r, mask=rmask, other=0.0).to(ACC)
    p_sum = tl.zeros([ROWS], ACC)
    for k0 in range(0, K, K_BLOCK):
        kk = k0 + tl.arange(0, K_BLOCK)
        vals = tl.load(VALUES + vrow[:, None] + kk[None, :] * sv3,
                       mask=rmask[:, None] & (kk < K)[None, :], other=float("-inf")).to(ACC)
        p_sum += tl.sum(tl.exp(vals - lse[:, None]), axis=1)
    fill = tl.full([ROWS], float("-inf"), ACC)
    mass = p_sum
    if HAS_REST:
        p_rest = tl.maximum(1.0 - p_sum, 0.0)
        fill = tau * tl.log(p_rest / tl.cast(V - K, ACC))
        mass = p_sum + p_rest
    tl.store(MASS + r, mass, mask=rmask)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols < V)[None, :]
        tl.store(OUT + (r * V)[:, None] + cols[None, :],
                 tl.zeros([ROWS, BLOCK_V], ACC) + fill[:, None], mask=mask)
    # The sent classes overwrite the fill: the barrier orders the two stores.
    tl.debug_barrier()
    for k0 in range(0, K, K_BLOCK):
        kk = k0 + tl.arange(0, K_BLOCK)
        kmask = rmask[:, None] & (kk < K)[None, :]
        vals = tl.load(VALUES + vrow[:, None] + kk[None, :] * sv3, mask=kmask, other=0.0).to(ACC)
        sent = tl.load(INDICES + irow[:, None] + kk[None, :] * si3, mask=kmask, other=0)
        tl.store(OUT + (r * V)[:, None] + sent.to(tl.int64), tau * (vals - lse[:, None]),
                 mask=kmask)


def _packet_launch(values: torch.Tensor, v: int) -> tuple[int, int, int, int, int, int]:
    """(rows, K, K_BLOCK, ROWS, BLOCK_V, num_warps) for packets [N, G, B, K] over V classes;
    packets are read K_BLOCK entries at a time."""
    n, g, b, k = values.shape
    rows = n * g * b
    return (rows, k, min(32, max(2, triton.next_power_of_2(k))), *tile_shape(v, rows))


def expand_packets(values, indices, lse_t, v, tau, acc):
    """Packets [N, G, B, K] -> (τ·log of their expansion over V [N, G, B, V], the expansions'
    total masses [N, G, B]), in ``acc``."""
    n, g, b, _ = values.shape
    rows, k, k_block, n_rows, block_v, num_warps = _packet_launch(values, v)
    out = torch.empty((n, g, b, v), dtype=acc, device=values.device)
    mass = torch.empty((n, g, b), dtype=acc, device=values.device)
    _expand_packets_kernel[(triton.cdiv(rows, n_rows),)](
        values, indices, lse_t, out, mass, rows, n, g, b, v, k, *values.stride(),
        *indices.stride(), *split_scalar(tau), HAS_REST=k < v, ACC=acc_tl(acc), ROWS=n_rows,
        BLOCK_V=block_v, K_BLOCK=k_block, num_warps=num_warps)
    return out, mass


def distill_topk_packets(student, values, indices, lse, adj, tau, include_self, aggregate, acc):
    """student [N, G, B, V] against the packets as they arrive (values [N, G, B, K] any float
    dtype, indices any int dtype, lse [N, G, B]; any strides) -> (loss [N, G, B], rows
    [3, N, G, B] = lse_t, logconf_t, the backward's statistic; indices int32; idx), in one
    launch. The statistic is L_rest (log-sum-exp of Z/τ over the unsent classes) for
    max_confidence, lse_z for mean / confidence_weighted (see the module docstring)."""
    n, g, b, v = student.shape
    rows, k, k_block, n_rows, block_v, num_warps = _packet_launch(values, v)
    device = student.device
    loss = torch.empty((n, g, b), dtype=acc, device=device)
    stats = torch.empty((3, n, g, b), dtype=acc, device=device)
    ind32 = torch.empty((n, g, b, k), dtype=torch.int32, device=device)
    idx = torch.empty((n, g, b), dtype=torch.int64, device=device)
    block_j = min(triton.next_power_of_2(n), 32, max(1, 4096 // n_rows))
    # LANES: max_confidence reads a column tile as [BLOCK_V / LANES, LANES] (see _bucket_kl)
    _distill_topk_fwd_kernel[(triton.cdiv(rows, n_rows),)](
        student, values, indices, lse, adj, loss, stats, ind32, idx, rows, n, g, b, v, k,
        *student.stride(), *values.stride(), *indices.stride(), *lse.stride(), *adj.stride(),
        *split_scalar(tau), AGG=AGG_CODES[aggregate], INCLUDE_SELF=include_self, HAS_REST=k < v,
        ACC=acc_tl(acc), ROWS=n_rows, BLOCK_V=block_v, LANES=min(32, block_v), K_BLOCK=k_block,
        BLOCK_J=block_j, num_warps=num_warps)
    return loss, stats, ind32, idx


def distill_topk_bwd(grad, student, values, indices, lse_t, logconf_t, idx, adj, row_stat, tau,
                     include_self, aggregate, acc, out=None):
    """-> dZ of the student's shape and dtype: written into ``out`` (any strides) when given,
    else a fresh contiguous tensor. ``row_stat`` is the forward's second output."""
    n, g, b, v = student.shape
    if aggregate != "max_confidence":
        expanded, mass = expand_packets(values, indices, lse_t, v, tau, acc)
        return distill.distill_bwd(grad, student, expanded, torch.zeros_like(lse_t),
                                          logconf_t, idx, adj, row_stat, tau, include_self,
                                          aggregate, acc, mass, out)
    rows, k, k_block, n_rows, block_v, num_warps = _packet_launch(values, v)
    d_student = out if out is not None else torch.empty(student.shape, dtype=student.dtype,
                                                        device=student.device)
    _distill_topk_bwd_kernel[(triton.cdiv(rows, n_rows),)](
        grad, student, values, indices, lse_t, idx, row_stat, d_student, rows, n, g, b, v, k,
        *student.stride(), *values.stride(), *indices.stride(), *d_student.stride(),
        *split_scalar(tau),
        HAS_REST=k < v, ACC=acc_tl(acc), ROWS=n_rows, BLOCK_V=block_v, K_BLOCK=k_block,
        num_warps=num_warps)
    return d_student
