// The distillation loss against top-k packets: one packet's buckets against a student row, the
// bitmap of a packet's sent classes, and short rows W at a time by lanes.
#pragma once

#include "aggregate.h"
#include "lanes.h"

// One packet (the K sent buckets of teacher row j) against a student row with known lse_z:
// P = Σ p_k and S = Σ_{p≠0} p_k (log p_k − log q_k), log p_k = value_k − lse_t and
// log q_k = z_k/τ − lse_z in A (as the torch reference takes them), p_k = e^(log p_k) in
// vectors, the two sums in fp64 in the order of k (K terms a row, so precision is free).
// buf: 3·round_up(K, W) elements. (The exps had been K libm calls a row: 3 % of S3's forward.)
template <class A, class ZIn>
MHD_INLINE void packet_sums(const DistillArgs& a, int64_t j, int64_t g, int64_t b, const ZIn* z,
                            const Scale<A>& sc, A lse_z, A* buf, double& P, double& S) {
  using L = Lanes<A>;
  const int64_t K = a.values.size[3], vs = a.values.stride[3], is = a.indices.stride[3];
  const int64_t kpad = round_up(K, L::W);
  const A* val = static_cast<const A*>(a.values.data) + offset(a.values, j, g, b);
  const int32_t* ind = static_cast<const int32_t*>(a.indices.data) + offset(a.indices, j, g, b);
  const A lse_t = at<A>(a.lse_t, j, g, b);
  A* lp = buf;
  A* lq = buf + kpad;
  A* p = buf + 2 * kpad;
  for (int64_t k = 0; k < K; ++k) {
    lp[k] = val[k * vs] - lse_t;
    lq[k] = sc(to_acc<A>(z[ind[k * is]])) - lse_z;
  }
  for_vectors<L::W>(0, K, [&](int64_t k, auto n) MHD_INLINE_BODY { L::store(p + k, L::exp(L::load(lp + k, n, -kInf)), L::W); });
  P = S = 0;
  for (int64_t k = 0; k < K; ++k) {
    P += p[k];
    if (p[k] != 0) S += (double)p[k] * ((double)lp[k] - (double)lq[k]);
  }
}

// Marks the K sent classes of teacher row j in the bitmap (SentRow) and counts them in
// in_block, or unmarks them (bits and counts back to 0).
MHD_INLINE void mark_sent(const DistillArgs& a, int64_t j, int64_t g, int64_t b, uint8_t* bits, int32_t* in_block,
                          bool on) {
  const int32_t* ind = static_cast<const int32_t*>(a.indices.data) + offset(a.indices, j, g, b);
  for (int64_t k = 0; k < a.values.size[3]; ++k) {
    const int32_t v = ind[k * a.indices.stride[3]];
    const uint8_t bit = uint8_t(1u << (v % 8));
    bits[v / 8] = on ? uint8_t(bits[v / 8] | bit) : uint8_t(bits[v / 8] & ~bit);
    in_block[v / kBlock] = on ? in_block[v / kBlock] + 1 : 0;
  }
}


// W lanes of fp64, for the fp64 sums of W rows at once.
typedef double Vd __attribute__((vector_size(8 * kLanes)));

// log p_rest of a packet's rest bucket, p_rest = max(0, 1 − Σ p_k) in fp64: with fp32 arithmetic
// the fp32 log of p_rest rounded to fp32 (0 or at least 2^−53, a normal number), as precise as
// the student's log q_rest it meets, and the same function a vector of rows takes (vlog)
// instead of a libm call a row; fp64 keeps libm's.
template <class A>
MHD_INLINE double rest_log(double p) {
  if constexpr (IsF32<A>::value) return (double)slog((float)p);
  else return slog(p);
}

// Whether every element of v lies within reach of a gather's int32 element offsets.
MHD_INLINE bool gather_reach(const View& v) {
  int64_t last = 0;
  for (int d = 0; d < 4; ++d) {
    if (v.stride[d] < 0) return false;
    last += (v.size[d] - 1) * v.stride[d];
  }
  return last < (int64_t(1) << 31);
}

// The packet loss (forward) or its gradient (backward) for fp32 student rows of up to
// W + kLaneExtra classes in place (every 10-class dataset with top-k packets): W consecutive
// rows b of a student (n, g) in the lanes of a vector, one vector per class (as in
// distill_dense_rows). max_confidence: each lane against its own teacher j = idx[n, g, b + l],
// whose packet (values, indices, lse_t) is gathered by lane; mean / confidence_weighted: p̄ of
// the client's candidates built lane-wise as aggregate_packets builds it, then the sweeps of
// kl_row / grad_row. Every number is formed as the row path of distill forms it — row_lse's
// sums in Lanes::reduce's tree (lane_tree), the unsent mass over the classes outside the
// lane's packet, packet_sums's exps lane-wise and its fp64 sums lane by lane in the order of
// k — so the results are bit-identical to one row at a time. A block of W rows costs one
// vector log, and no bitmap is marked and unmarked per row. The rows past the last whole block
// of a (n, g) go to row_body (the row path). The block kPacketAhead blocks ahead is prefetched
// (the next items of a thread's chunk are the next blocks in memory). S2's shape with top-2
// packets (V = 10, 49,152 rows), whole mhd_loss forward + backward warm: 4.35 -> 1.35 ms
// (max_confidence), 8.11 -> 2.33 (mean), 9.85 -> 3.07 (confidence_weighted).
constexpr int64_t kPacketAhead = 2;
template <class RowBody>
void distill_packet_lanes(const DistillArgs& a, const DistillOut& out, bool backward, int nt, bool stream,
                          const Candidates& cand, RowBody&& row_body) {
  using L = Lanes<float>;
  using Vec = L::V;
  constexpr int W = L::W;
  const int64_t N = a.z.size[0], G = a.z.size[1], B = a.z.size[2], V = a.z.size[3], K = a.values.size[3];
  const Scale<float> sc(a.tau);
  const float tau = (float)a.tau;
  const bool rest = K < V;
  const int64_t nblk = B / W, per_ng = nblk + (B % W != 0);
  vi rows_in[W + kLaneExtra], rows_out[W + kLaneExtra], iota;
  lane_rows_index(V, rows_in);
  lane_rows_out_index(V, rows_out);
  for (int l = 0; l < W; ++l) iota[l] = l;
  const bool aggregated = a.aggregate != MAX_CONFIDENCE;
  // Per thread: a class-major [V, W] block (the gradient); aggregated, the candidates' e^logconf
  // by lane [N, W].
  const int64_t share = per_thread<float>(V * W + (aggregated ? N * W : 0));
  Scratch<float> scratch(nt * share);
  const float* values = static_cast<const float*>(a.values.data);
  const float* indices = static_cast<const float*>(a.indices.data);  // int32, moved as bits by the gathers
  const float* lse_t = static_cast<const float*>(a.lse_t.data);
  float* loss = static_cast<float*>(out.loss);
  float* lse_out = static_cast<float*>(out.lse_z);
  const Vec zero = L::splat(0), log2e = L::splat(float(kLog2e));
  // The W rows of block (n, g, b0) of dz from dbuf (by class).
  const auto put_grad = [&](int64_t n, int64_t g, int64_t b0, const float* dbuf) {
    put_lane_rows(static_cast<float*>(out.dz) + n * out.dz_stride[0] + g * out.dz_stride[1] + b0 * out.dz_stride[2],
                  dbuf, rows_out, V, stream);
  };
  for_tiles(N * G * per_ng, nt, [&](int64_t item, int tid) {
    const int64_t n = item / (G * per_ng), g = item / per_ng % G, blk = item % per_ng;
    if (blk == nblk) {  // the partial block
      for (int64_t b = nblk * W; b < B; ++b) row_body((n * G + g) * B + b, n, g, b, tid);
      return;
    }
    const int64_t b0 = blk * W, r0 = (n * G + g) * B + b0;
    float* dbuf = scratch.data() + tid * share;
    const float* zb = static_cast<const float*>(a.z.data) + offset(a.z, n, g, b0);
    prefetch_block(zb + kPacketAhead * W * V, W * V);
    Vec x[W + kLaneExtra];
    for (int64_t v = 0; v < V; ++v) x[v] = gather_lanes(zb, rows_in[v]);
    const vi b_l = splat_i((int32_t)b0) + iota;
    // element offsets of row (j_l, g, b0 + l) of v in lane l
    const auto lane_at = [&](const View& v, vi j) {
      return j * (int32_t)v.stride[0] + (int32_t)(g * v.stride[1]) + b_l * (int32_t)v.stride[2];
    };
    // lse_z: the forward's (with the terms e and their sum s), or the backward's input
    Vec lse = zero, s = zero, e[W + kLaneExtra];
    if (backward) {
      for (int l = 0; l < W; ++l) lse[l] = at<float>(a.lse_z, n, g, b0 + l);
    } else {
      Vec m;
      lanes_lse<float>(x, V, sc, e, m, lse, s);
    }
    const auto grad_scale = [&] {  // the backward's g·τ of each row
      Vec gs;
      for (int l = 0; l < W; ++l) gs[l] = at<float>(a.grad, n, g, b0 + l);
      return gs * tau;
    };
    if (aggregated) {
      // mean / confidence_weighted: p̄ of client n's candidates, the same for every lane's
      // client, as aggregate_packets sums it, then kl_row (forward) or grad_row (backward)
      const int64_t count = cand.count(n);
      Vec pbar[W + kLaneExtra];
      for (int64_t v = 0; v < V; ++v) pbar[v] = zero;
      if (count != 0) {
        float* conf = dbuf + V * W;  // Weights: e^logconf of each candidate, and their sum
        Vec total = zero;
        if (a.aggregate != MEAN)
          for (int64_t c = 0; c < count; ++c) {
            for (int l = 0; l < W; ++l) conf[c * W + l] = sexp(at<float>(a.logconf_t, cand.begin(n)[c], g, b0 + l));
            total = total + L::load(conf + c * W);
          }
        const Vec share_w = L::splat(float(1) / (float)count);
        Vec C = zero;
        for (int64_t c = 0; c < count; ++c) {
          const int64_t j = cand.begin(n)[c];
          const Vec w = a.aggregate == MEAN ? share_w : L::load(conf + c * W) / total;
          const vi at_v = lane_at(a.values, splat_i((int32_t)j)), at_i = lane_at(a.indices, splat_i((int32_t)j));
          const Vec lj = gather_lanes(lse_t, lane_at(a.lse_t, splat_i((int32_t)j)));
          Vec pk[W + kLaneExtra], P = zero, rest_j = zero;
          for (int64_t k = 0; k < K; ++k) {
            pk[k] = L::exp(gather_lanes(values, at_v + (int32_t)(k * a.values.stride[3])) - lj);
            P = P + pk[k];
          }
          if (rest) {
            const Vec left = L::splat(1) - P;
            rest_j = (left < zero ? zero : left) / L::splat((float)(V - K));
          }
          C = C + w * rest_j;
          for (int64_t k = 0; k < K; ++k) {
            const vi ind = (vi)gather_lanes(indices, at_i + (int32_t)(k * a.indices.stride[3]));
            const Vec add = w * (pk[k] - rest_j);
            for (int64_t v = 0; v < V; ++v) pbar[v] = ind == (int32_t)v ? pbar[v] + add : pbar[v];
          }
        }
        for (int64_t v = 0; v < V; ++v) pbar[v] = pbar[v] + C;
      }
      if (!backward) {
        Vec acc[W + kLaneExtra];
        for (int64_t v = 0; v < V; ++v)
          acc[v] = pbar[v] != zero ? pbar[v] * (L::log(pbar[v]) - (sc(x[v]) - lse)) : zero;
        const Vec kl = lane_tree<L>(acc, V, zero, [](auto u, auto w) MHD_INLINE_BODY { return u + w; });
        L::store(loss + r0, count == 0 ? zero : L::splat(tau * tau) * kl);
        L::store(lse_out + r0, lse);
        return;
      }
      const Vec gs = grad_scale();
      for (int64_t v = 0; v < V; ++v)
        L::store(dbuf + v * W, count == 0 ? zero : gs * (L::exp(sc(x[v]) - lse) - pbar[v]));
      put_grad(n, g, b0, dbuf);
      return;
    }
    vi j;
    for (int l = 0; l < W; ++l) j[l] = (int32_t)at<int64_t>(a.idx, n, g, b0 + l);
    const vi none = j < 0;  // no candidate: loss 0, gradient 0
    const vi jj = none ? splat_i(0) : j;
    const vi at_v = lane_at(a.values, jj), at_i = lane_at(a.indices, jj);
    const Vec lt = gather_lanes(lse_t, lane_at(a.lse_t, jj));
    if (backward)  // q = 2^((z/τ − lse_z)·log2 e), as the row path's q sweep
      for (int64_t v = 0; v < V; ++v) e[v] = L::exp2_nonpos((sc(x[v]) - lse) * log2e);
    // the K buckets (packet_sums): lane l's class ind[k], p_k and the log-probabilities
    vi ind[W + kLaneExtra], sent[W + kLaneExtra];
    Vec pk[W + kLaneExtra];
    for (int64_t v = 0; v < V; ++v) sent[v] = splat_i(0);
    const vi row_start = iota * (int32_t)V;
    // packet_sums's fp64 sums in the order of k, W rows at a time: each lane takes the
    // operations of its row's scalar loop (no contraction: -ffp-contract=off)
    Vd P = Vd{}, S = Vd{};
    for (int64_t k = 0; k < K; ++k) {
      const Vec val = gather_lanes(values, at_v + (int32_t)(k * a.values.stride[3]));
      ind[k] = (vi)gather_lanes(indices, at_i + (int32_t)(k * a.indices.stride[3]));
      const Vec lp = val - lt, lq = sc(gather_lanes(zb, row_start + ind[k])) - lse;
      pk[k] = L::exp(lp);
      const Vd p = __builtin_convertvector(pk[k], Vd);
      P = P + p;
      S = p != 0.0 ? S + p * (__builtin_convertvector(lp, Vd) - __builtin_convertvector(lq, Vd)) : S;
      for (int64_t v = 0; v < V; ++v) sent[v] |= ind[k] == (int32_t)v;
    }
    const Vd left = 1.0 - P;
    const Vd p_rest = left < 0.0 ? Vd{} : left;  // clamp0: NaN passes
    // the unsent mass: row_lse's sw (forward) or the q sweep's q_rest (backward)
    Vec unsent[W + kLaneExtra];
    for (int64_t v = 0; v < V; ++v) unsent[v] = rest ? (sent[v] != 0 ? zero : e[v]) : e[v];
    const Vec mass = lane_tree<L>(unsent, V, zero, [](auto u, auto w) MHD_INLINE_BODY { return u + w; });
    if (!backward) {  // the rest bucket's term, with rest_log's logs of W rows in one vector
      if (rest) {
        const Vec log_rest = L::log(zero + mass) - L::log(s);
        const Vec log_p = L::log(__builtin_convertvector(p_rest, Vec));
        const Vd term = p_rest * (__builtin_convertvector(log_p, Vd) - __builtin_convertvector(log_rest, Vd));
        S = p_rest != 0.0 ? S + term : S;
      }
      const Vec l = __builtin_convertvector((double)tau * tau * S, Vec);
      L::store(loss + r0, none ? zero : l);
      L::store(lse_out + r0, lse);
      return;
    }
    const Vec gs = grad_scale();
    Vec factor = L::splat(1);
    if (rest) {
      const Vd ratio = 1.0 - p_rest / __builtin_convertvector(mass, Vd);
      factor = __builtin_convertvector(p_rest != 0.0 ? ratio : Vd{} + 1.0, Vec);
    }
    // dz = gs·factor·q, the sent classes gs·(q − p_k), by class into dbuf; out as W whole rows
    const Vec sv = gs * factor;
    for (int64_t v = 0; v < V; ++v) L::store(dbuf + v * W, none ? zero : sv * e[v]);
    for (int l = 0; l < W; ++l)
      if (!none[l])
        for (int64_t k = 0; k < K; ++k) {
          const int32_t c = ind[k][l];
          dbuf[c * W + l] = gs[l] * (e[c][l] - pk[k][l]);
        }
    put_grad(n, g, b0, dbuf);
  });
}
