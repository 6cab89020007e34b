// The distillation loss against top-k packets: one packet's buckets against a student row, the
// bitmap of a packet's sent classes, and short rows W at a time by lanes.
#pragma once

#include "aggregate.h"
#include "lanes.h"

// Element (n, g, b, k) of an integer View (int16, int32 or int64).
MHD_INLINE int64_t index_at(const View& v, int64_t n, int64_t g, int64_t b, int64_t k) {
  const int64_t off = n * v.stride[0] + g * v.stride[1] + b * v.stride[2] + k * v.stride[3];
  switch (v.dtype) {
    case I16: return static_cast<const int16_t*>(v.data)[off];
    case I32: return static_cast<const int32_t*>(v.data)[off];
    default: return static_cast<const int64_t*>(v.data)[off];
  }
}

// The per-row part of a packet teacher as the kernels take it, from the packet as it arrives:
// its indices as int32 [N, G, B, K] (checked to lie in [0, V): false, with *bad the first that
// does not), lse_t in A and the log confidence logconf_t = value_0 − lse_t in A ([N, G, B],
// contiguous), the arithmetic of reference.packet_stats.
template <class A>
bool packet_rows(const View& values, const View& indices, const View& lse, int64_t V, int32_t* ind_out, A* lse_out,
                 A* logconf_out, int64_t* bad) {
  const int64_t N = values.size[0], G = values.size[1], B = values.size[2], K = values.size[3];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t r = (n * G + g) * B + b;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t x = index_at(indices, n, g, b, k);
          if (x < 0 || x >= V) {
            *bad = x;
            return false;
          }
          ind_out[r * K + k] = static_cast<int32_t>(x);
        }
        const int64_t lo = offset(lse, n, g, b);
        const A l = lse.dtype == F64 ? (A) static_cast<const double*>(lse.data)[lo]
                                     : (A) static_cast<const float*>(lse.data)[lo];
        const A v0 = static_cast<const A*>(values.data)[offset(values, n, g, b)];
        lse_out[r] = l;
        logconf_out[r] = v0 - l;
      }
  return true;
}

inline bool packet_rows_entry(const View& values, const View& indices, const View& lse, int64_t V, int acc,
                              int32_t* indices_out, void* lse_t, void* logconf_t, int64_t* bad) {
  if (acc == F64)
    return packet_rows<double>(values, indices, lse, V, indices_out, (double*)lse_t, (double*)logconf_t, bad);
  return packet_rows<float>(values, indices, lse, V, indices_out, (float*)lse_t, (float*)logconf_t, bad);
}

// One packet (the K sent buckets of teacher row j) against a student row with known lse_z:
// P = Σ p_k and S = Σ_{p≠0} p_k (log p_k − log q_k), log p_k = value_k − lse_t and
// log q_k = z_k/τ − lse_z in A (as the torch reference takes them), p_k = e^(log p_k) in
// vectors, the two sums in fp64 in the order of k (K terms a row, so precision is free).
// buf: 3·round_up(K, W) elements.
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


// log p_rest of a packet's rest bucket, p_rest = max(0, 1 − Σ p_k) in fp64: with fp32 arithmetic
// the fp32 log of p_rest rounded to fp32 (0 or at least 2^−53, a normal number), as precise as
// the student's log q_rest it meets, and the same function a vector of rows takes (vlog)
// instead of a libm call a row; fp64 keeps libm's.
template <class A>
MHD_INLINE double rest_log(double p) {
  if constexpr (IsF32<A>::value) return (double)slog((float)p);
  else return slog(p);
}

// One student row z (n, g, b) against the packet of its max_confidence teacher row j, the row
// path of distill: KL over the K sent buckets and the rest bucket (see distill). bits,
// in_block: the thread's SentRow of the packet (all clear between rows); buf: vpad + 3·kpad
// elements.
template <class A, class ZIn>
struct PacketRow {
  using L = Lanes<A>;
  const DistillArgs& a;
  const Scale<A>& sc;
  const ZIn* z;
  int64_t n, g, b, j;
  uint8_t* bits;
  int32_t* in_block;
  A* buf;
  int64_t vpad, kpad;

  MHD_INLINE int64_t V() const { return a.z.size[3]; }
  MHD_INLINE int64_t K() const { return a.values.size[3]; }
  MHD_INLINE bool rest() const { return K() < V(); }
  MHD_INLINE void mark(bool on) const {
    if (rest()) mark_sent(a, j, g, b, bits, in_block, on);
  }

  // loss = τ²·(Σ_k p_k (log p_k − log q_k) + p_rest (log p_rest − log q_rest)) and lse_z.
  void forward(A tau, A& loss, A& lse_out) const {
    A m, lse_z, log_q_rest = 0;
    const SentRow sent{bits, in_block};
    mark(true);
    row_lse(z, V(), sc, m, lse_z, rest() ? &sent : nullptr, &log_q_rest);
    mark(false);
    double P, S;
    packet_sums(a, j, g, b, z, sc, lse_z, buf + vpad, P, S);
    const double p_rest = clamp0(1.0 - P);
    if (rest() && p_rest != 0) S += p_rest * (rest_log<A>(p_rest) - (double)log_q_rest);
    loss = (A)((double)tau * tau * S);
    lse_out = lse_z;
  }

  // q_v into buf, and q_rest summed over the unsent classes in the same sweep; as in row_lse,
  // only blocks that hold a sent class read the bitmap (log q <= 0 up to rounding, so 2^y
  // needs no clamp from above).
  A q_sweep(A lse_z) const {
    const int64_t V = this->V();
    const typename L::V log2e = L::splat(A(kLog2e));
    typename L::V acc = L::splat(0);
    for (int64_t blk = 0; blk < V; blk += kBlock) {
      const int64_t end = min64(V, blk + kBlock);
      const auto sweep = [&](auto weighted) {
        for_vectors<L::W>(blk, end, [&](int64_t v, auto w) MHD_INLINE_BODY {
          const auto q = L::exp2_nonpos((sc(L::load(z + v, w, -kInf)) - lse_z) * log2e);
          L::store(buf + v, q, L::W);
          if constexpr (decltype(weighted)::value) acc = L::add_unsent(acc, q, sent_bits<L::W>(bits, v));
          else acc += q;
        });
      };
      if (rest() && in_block[blk / kBlock] != 0) sweep(Flag<true>{});
      else sweep(Flag<false>{});
    }
    return L::sum(acc);
  }

  // dz = gs·(q_v − p_v) for sent v, gs·q_v·(1 − p_rest/q_rest) for the others, into dz_row.
  void backward(A gs, void* dz_row, bool stream) const {
    const A lse_z = at<A>(a.lse_z, n, g, b);
    mark(true);
    const A q_rest = q_sweep(lse_z);
    mark(false);
    double P, S;
    packet_sums(a, j, g, b, z, sc, lse_z, buf + vpad, P, S);
    const double p_rest = clamp0(1.0 - P);
    const A unsent = gs * (rest() && p_rest != 0 ? A(1 - p_rest / q_rest) : A(1));
    for_vectors<L::W>(0, V(), [&](int64_t v, auto w) MHD_INLINE_BODY {
      store_grad<A>(dz_row, a.z.dtype, v, unsent * L::load(buf + v, w, 0), w, stream);
    });
    if (stream) fence();  // the sent classes below overwrite streamed lines: after them
    const int32_t* ind = static_cast<const int32_t*>(a.indices.data) + offset(a.indices, j, g, b);
    const A* p = buf + vpad + 2 * kpad;  // packet_sums's p_k = e^(value_k − lse_t)
    for (int64_t k = 0; k < K(); ++k) {
      const int64_t v = ind[k * a.indices.stride[3]];
      store_one<A>(dz_row, a.z.dtype, v, gs * (buf[v] - p[k]));
    }
  }
};

// W lanes of fp64, for the fp64 sums of W rows at once.
typedef double Vd __attribute__((vector_size(8 * kLanes)));

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
// (the next items of a thread's chunk are the next blocks in memory).
constexpr int64_t kPacketAhead = 2;

// The launch of distill_packet_lanes: what every block shares; a Block is W rows of one student
// (n, g) held by class, taken through block() in order.
class PacketLanes {
  using L = Lanes<float>;
  using Vec = L::V;
  static constexpr int W = L::W;

 public:
  PacketLanes(const DistillArgs& args, const DistillOut& o, bool bwd, int threads, bool stream_out,
              const Candidates& candidates)
      : a(args), out(o), backward(bwd), nt(threads), stream(stream_out), cand(candidates), sc(a.tau) {
    N = a.z.size[0], G = a.z.size[1], B = a.z.size[2], V = a.z.size[3], K = a.values.size[3];
    tau = (float)a.tau;
    rest = K < V;
    nblk = B / W, per_ng = nblk + (B % W != 0);
    lane_rows_index(V, rows_in);
    lane_rows_out_index(V, rows_out);
    for (int l = 0; l < W; ++l) iota[l] = l;
    aggregated = a.aggregate != MAX_CONFIDENCE;
    // Per thread: a class-major [V, W] block (the gradient); aggregated, the candidates'
    // e^logconf by lane [N, W].
    share = per_thread<float>(V * W + (aggregated ? N * W : 0));
    scratch.reset(nt * share);
    values = static_cast<const float*>(a.values.data);
    indices = static_cast<const float*>(a.indices.data);  // int32, moved as bits by the gathers
    lse_t = static_cast<const float*>(a.lse_t.data);
    loss = static_cast<float*>(out.loss);
    lse_out = static_cast<float*>(out.lse_z);
  }

  // Every block of W rows; the rows past the last whole block of a (n, g) by row_body.
  template <class RowBody>
  void run(RowBody&& row_body) {
    for_tiles(N * G * per_ng, nt, [&](int64_t item, int tid) {
      const int64_t n = item / (G * per_ng), g = item / per_ng % G, blk = item % per_ng;
      if (blk == nblk) {  // the partial block
        for (int64_t b = nblk * W; b < B; ++b) row_body((n * G + g) * B + b, n, g, b, tid);
        return;
      }
      block(n, g, blk * W, scratch.data() + tid * share);
    });
  }

 private:
  // W rows b0.. of student (n, g): the logits by class, lse_z (the forward's, with the terms e
  // and their sum s, or the backward's input), and the thread's gradient buffer by class.
  struct Block {
    int64_t n, g, b0, r0;
    float* dbuf;
    const float* zb;
    vi b_l;
    Vec x[W + kLaneExtra], e[W + kLaneExtra], lse, s;
  };

  void block(int64_t n, int64_t g, int64_t b0, float* dbuf) {
    const Vec zero = L::splat(0);
    Block k;
    k.n = n, k.g = g, k.b0 = b0, k.r0 = (n * G + g) * B + b0, k.dbuf = dbuf;
    k.zb = static_cast<const float*>(a.z.data) + offset(a.z, n, g, b0);
    prefetch_block(k.zb + kPacketAhead * W * V, W * V);
    for (int64_t v = 0; v < V; ++v) k.x[v] = gather_lanes(k.zb, rows_in[v]);
    k.b_l = splat_i((int32_t)b0) + iota;
    k.lse = zero, k.s = zero;
    if (backward) {
      for (int l = 0; l < W; ++l) k.lse[l] = at<float>(a.lse_z, n, g, b0 + l);
    } else {
      Vec m;
      lanes_lse<float>(k.x, V, sc, k.e, m, k.lse, k.s);
    }
    if (aggregated) aggregated_block(k);
    else max_confidence_block(k);
  }

  // Element offsets of row (j_l, g, b0 + l) of v in lane l.
  MHD_INLINE vi lane_at(const Block& k, const View& v, vi j) const {
    return j * (int32_t)v.stride[0] + (int32_t)(k.g * v.stride[1]) + k.b_l * (int32_t)v.stride[2];
  }
  // The backward's g·τ of each row.
  MHD_INLINE Vec grad_scale(const Block& k) const {
    Vec gs;
    for (int l = 0; l < W; ++l) gs[l] = at<float>(a.grad, k.n, k.g, k.b0 + l);
    return gs * tau;
  }
  // The W rows of the block of dz from dbuf (by class).
  MHD_INLINE void put_grad(const Block& k) const {
    put_lane_rows(static_cast<float*>(out.dz) + k.n * out.dz_stride[0] + k.g * out.dz_stride[1] +
                      k.b0 * out.dz_stride[2],
                  k.dbuf, rows_out, V, stream);
  }

  // p̄ of client n's candidates, the same for every lane's client, as aggregate_packets sums it.
  MHD_INLINE void mixture(const Block& k, int64_t count, Vec* pbar) const {
    const Vec zero = L::splat(0);
    for (int64_t v = 0; v < V; ++v) pbar[v] = zero;
    if (count == 0) return;
    float* conf = k.dbuf + V * W;  // Weights: e^logconf of each candidate, and their sum
    Vec total = zero;
    if (a.aggregate != MEAN)
      for (int64_t c = 0; c < count; ++c) {
        for (int l = 0; l < W; ++l) conf[c * W + l] = sexp(at<float>(a.logconf_t, cand.begin(k.n)[c], k.g, k.b0 + l));
        total = total + L::load(conf + c * W);
      }
    const Vec share_w = L::splat(float(1) / (float)count);
    Vec C = zero;
    for (int64_t c = 0; c < count; ++c) {
      const int64_t j = cand.begin(k.n)[c];
      const Vec w = a.aggregate == MEAN ? share_w : L::load(conf + c * W) / total;
      const vi at_v = lane_at(k, a.values, splat_i((int32_t)j)), at_i = lane_at(k, a.indices, splat_i((int32_t)j));
      const Vec lj = gather_lanes(lse_t, lane_at(k, a.lse_t, splat_i((int32_t)j)));
      Vec pk[W + kLaneExtra], P = zero, rest_j = zero;
      for (int64_t q = 0; q < K; ++q) {
        pk[q] = L::exp(gather_lanes(values, at_v + (int32_t)(q * a.values.stride[3])) - lj);
        P = P + pk[q];
      }
      if (rest) {
        const Vec left = L::splat(1) - P;
        rest_j = (left < zero ? zero : left) / L::splat((float)(V - K));
      }
      C = C + w * rest_j;
      for (int64_t q = 0; q < K; ++q) {
        const vi ind = (vi)gather_lanes(indices, at_i + (int32_t)(q * a.indices.stride[3]));
        const Vec add = w * (pk[q] - rest_j);
        for (int64_t v = 0; v < V; ++v) pbar[v] = ind == (int32_t)v ? pbar[v] + add : pbar[v];
      }
    }
    for (int64_t v = 0; v < V; ++v) pbar[v] = pbar[v] + C;
  }

  // mean / confidence_weighted: the sweeps of kl_row (forward) or grad_row (backward) against p̄.
  void aggregated_block(Block& k) {
    const Vec zero = L::splat(0);
    const int64_t count = cand.count(k.n);
    Vec pbar[W + kLaneExtra];
    mixture(k, count, pbar);
    if (!backward) {
      Vec acc[W + kLaneExtra];
      for (int64_t v = 0; v < V; ++v)
        acc[v] = pbar[v] != zero ? pbar[v] * (L::log(pbar[v]) - (sc(k.x[v]) - k.lse)) : zero;
      const Vec kl = lane_tree<L>(acc, V, zero, [](auto u, auto w) MHD_INLINE_BODY { return u + w; });
      L::store(loss + k.r0, count == 0 ? zero : L::splat(tau * tau) * kl);
      L::store(lse_out + k.r0, k.lse);
      return;
    }
    const Vec gs = grad_scale(k);
    for (int64_t v = 0; v < V; ++v)
      L::store(k.dbuf + v * W, count == 0 ? zero : gs * (L::exp(sc(k.x[v]) - k.lse) - pbar[v]));
    put_grad(k);
  }

  // max_confidence: each lane against the packet of its own teacher j = idx[n, g, b0 + l].
  void max_confidence_block(Block& k) {
    const Vec zero = L::splat(0), log2e = L::splat(float(kLog2e));
    vi j;
    for (int l = 0; l < W; ++l) j[l] = (int32_t)at<int64_t>(a.idx, k.n, k.g, k.b0 + l);
    const vi none = j < 0;  // no candidate: loss 0, gradient 0
    const vi jj = none ? splat_i(0) : j;
    const vi at_v = lane_at(k, a.values, jj), at_i = lane_at(k, a.indices, jj);
    const Vec lt = gather_lanes(lse_t, lane_at(k, a.lse_t, jj));
    if (backward)  // q = 2^((z/τ − lse_z)·log2 e), as the row path's q sweep
      for (int64_t v = 0; v < V; ++v) k.e[v] = L::exp2_nonpos((sc(k.x[v]) - k.lse) * log2e);
    // the K buckets (packet_sums): lane l's class ind[q], p_q and the log-probabilities
    vi ind[W + kLaneExtra], sent[W + kLaneExtra];
    Vec pk[W + kLaneExtra];
    for (int64_t v = 0; v < V; ++v) sent[v] = splat_i(0);
    const vi row_start = iota * (int32_t)V;
    // packet_sums's fp64 sums in the order of k, W rows at a time: each lane takes the
    // operations of its row's scalar loop (no contraction: -ffp-contract=off)
    Vd P = Vd{}, S = Vd{};
    for (int64_t q = 0; q < K; ++q) {
      const Vec val = gather_lanes(values, at_v + (int32_t)(q * a.values.stride[3]));
      ind[q] = (vi)gather_lanes(indices, at_i + (int32_t)(q * a.indices.stride[3]));
      const Vec lp = val - lt, lq = sc(gather_lanes(k.zb, row_start + ind[q])) - k.lse;
      pk[q] = L::exp(lp);
      const Vd p = __builtin_convertvector(pk[q], Vd);
      P = P + p;
      S = p != 0.0 ? S + p * (__builtin_convertvector(lp, Vd) - __builtin_convertvector(lq, Vd)) : S;
      for (int64_t v = 0; v < V; ++v) sent[v] |= ind[q] == (int32_t)v;
    }
    const Vd left = 1.0 - P;
    const Vd p_rest = left < 0.0 ? Vd{} : left;  // clamp0: NaN passes
    // the unsent mass: row_lse's sw (forward) or the q sweep's q_rest (backward)
    Vec unsent[W + kLaneExtra];
    for (int64_t v = 0; v < V; ++v) unsent[v] = rest ? (sent[v] != 0 ? zero : k.e[v]) : k.e[v];
    const Vec mass = lane_tree<L>(unsent, V, zero, [](auto u, auto w) MHD_INLINE_BODY { return u + w; });
    if (!backward) {  // the rest bucket's term, with rest_log's logs of W rows in one vector
      if (rest) {
        const Vec log_rest = L::log(zero + mass) - L::log(k.s);
        const Vec log_p = L::log(__builtin_convertvector(p_rest, Vec));
        const Vd term = p_rest * (__builtin_convertvector(log_p, Vd) - __builtin_convertvector(log_rest, Vd));
        S = p_rest != 0.0 ? S + term : S;
      }
      const Vec l = __builtin_convertvector((double)tau * tau * S, Vec);
      L::store(loss + k.r0, none ? zero : l);
      L::store(lse_out + k.r0, k.lse);
      return;
    }
    const Vec gs = grad_scale(k);
    Vec factor = L::splat(1);
    if (rest) {
      const Vd ratio = 1.0 - p_rest / __builtin_convertvector(mass, Vd);
      factor = __builtin_convertvector(p_rest != 0.0 ? ratio : Vd{} + 1.0, Vec);
    }
    // dz = gs·factor·q, the sent classes gs·(q − p_k), by class into dbuf; out as W whole rows
    const Vec sv = gs * factor;
    for (int64_t v = 0; v < V; ++v) L::store(k.dbuf + v * W, none ? zero : sv * k.e[v]);
    for (int l = 0; l < W; ++l)
      if (!none[l])
        for (int64_t q = 0; q < K; ++q) {
          const int32_t c = ind[q][l];
          k.dbuf[c * W + l] = gs[l] * (k.e[c][l] - pk[q][l]);
        }
    put_grad(k);
  }

  const DistillArgs& a;
  const DistillOut& out;
  bool backward;
  int nt;
  bool stream;
  const Candidates& cand;
  Scale<float> sc;
  int64_t N, G, B, V, K;
  float tau;
  bool rest, aggregated;
  int64_t nblk, per_ng;  // whole blocks of W rows, and blocks (whole or not) per (n, g)
  vi rows_in[W + kLaneExtra], rows_out[W + kLaneExtra], iota;
  int64_t share;  // scratch elements per thread
  Scratch<float> scratch;
  const float *values, *indices, *lse_t;
  float *loss, *lse_out;
};

template <class RowBody>
void distill_packet_lanes(const DistillArgs& a, const DistillOut& out, bool backward, int nt, bool stream,
                          const Candidates& cand, RowBody&& row_body) {
  PacketLanes(a, out, backward, nt, stream, cand).run(row_body);
}
