// The candidate teachers of every client (from adj), the choice of one teacher per row, and the
// aggregated teacher distribution p̄ of mean / confidence_weighted.
#pragma once

#include "rows.h"

// The candidate teachers of every client as lists (CSR), built once per call from adj:
// j with adj[i, j] (j ≠ i), plus i itself when include_self; ascending j.
class Candidates {
 public:
  void build(const View& adj, bool include_self) {
    // Rows of adj counted, then listed, without a branch per entry: the count loop vectorizes
    // where adj's rows are contiguous.
    const int64_t N = adj.size[0], s0 = adj.stride[0], s1 = adj.stride[1];
    const uint8_t* a = static_cast<const uint8_t*>(adj.data);
    start_.reset(N + 1);
    int64_t nnz = 0;
    for (int64_t i = 0; i < N; ++i) {
      start_[i] = nnz;
      const uint8_t* row = a + i * s0;
      int64_t c = 0;
      if (s1 == 1) {
        for (int64_t j = 0; j < N; ++j) c += row[j] != 0;
      } else {
        for (int64_t j = 0; j < N; ++j) c += row[j * s1] != 0;
      }
      nnz += c - (row[i * s1] != 0) + include_self;  // self-loops count only with include_self
    }
    start_[N] = nnz;
    list_.reset(nnz + 1);  // + 1: the listing writes one past the last candidate
    for (int64_t i = 0, k = 0; i < N; ++i) {
      const uint8_t* row = a + i * s0;
      for (int64_t j = 0; j < N; ++j) {
        list_[k] = j;
        k += j == i ? include_self : row[j * s1] != 0;
      }
    }
  }
  const int64_t* begin(int64_t i) const { return list_.data() + start_[i]; }
  const int64_t* end(int64_t i) const { return list_.data() + start_[i + 1]; }
  int64_t count(int64_t i) const { return start_[i + 1] - start_[i]; }

 private:
  Scratch<int64_t> start_, list_;
};

// Client i's teacher for rows [b0, b1) of one group: the candidate j with the largest logconf
// (candidate j's row b at row_of(j)[b·sb]); ties -> lowest j; the first NaN wins (as
// torch.argmax), so that a NaN teacher shows in the loss; −1 with no candidate. The candidates
// are visited in ascending order, each updating the running best of all the rows (a
// branch-free loop over the rows). out is indexed by b, best (scratch) by b − b0.
template <class A, class RowOf>
MHD_INLINE void choose(const Candidates& cand, int64_t i, RowOf row_of, int64_t sb, int64_t b0, int64_t b1,
                       A* best, int64_t* out) {
  const int64_t* c = cand.begin(i);
  if (c == cand.end(i)) {
    for (int64_t b = b0; b < b1; ++b) out[b] = -1;
    return;
  }
  if constexpr (sizeof(A) == 4 && Lanes<A>::W > 1) {
    if (sb == 1) {  // W rows at a time, the running best in registers: the same comparisons in the same order
      using L = Lanes<A>;
      using Vec = typename L::V;
      constexpr int W = L::W;
      for (int64_t b = b0; b < b1; b += W) {
        const int n = (int)min64(W, b1 - b);
        const int64_t* j = c;
        Vec bv = L::load(row_of(*j) + b, n, 0);
        vi who = splat_i((int32_t)*j);
        for (++j; j != cand.end(i); ++j) {
          const Vec v = L::load(row_of(*j) + b, n, 0);
          const vi take = (v > bv) | ((v != v) & (bv == bv));
          bv = take ? v : bv;
          who = take ? splat_i((int32_t)*j) : who;
        }
        for (int l = 0; l < n; ++l) out[b + l] = who[l];
      }
      return;
    }
  }
  const A* x = row_of(*c);
  for (int64_t b = b0; b < b1; ++b) {
    best[b - b0] = x[b * sb];
    out[b] = *c;
  }
  for (++c; c != cand.end(i); ++c) {
    x = row_of(*c);
    for (int64_t b = b0; b < b1; ++b) {
      const A v = x[b * sb];
      const bool take = v > best[b - b0] || (is_nan(v) && !is_nan(best[b - b0]));
      best[b - b0] = take ? v : best[b - b0];
      out[b] = take ? *c : out[b];
    }
  }
}

// Weight of candidate j in client i's teacher for row (g, b): mean 1/|C|, confidence-weighted
// c_j / Σ_C c with c = e^logconf.
template <class A>
struct Weights {
  const View& logconf;
  int aggregate;
  int64_t g, b;
  A total;
  Weights(const View& lc, int agg, const Candidates& cand, int64_t i, int64_t g_, int64_t b_)
      : logconf(lc), aggregate(agg), g(g_), b(b_), total(0) {
    if (aggregate == MEAN) {
      total = (A)cand.count(i);
    } else {
      for (const int64_t* j = cand.begin(i); j != cand.end(i); ++j) total += sexp(at<A>(lc, *j, g, b));
    }
  }
  MHD_INLINE A operator()(int64_t j) const {
    return (aggregate == MEAN ? A(1) : sexp(at<A>(logconf, j, g, b))) / total;
  }
};

// p̄ = Σ_j w_j softmax(T_j/τ) over the candidates of client i (dense teachers), into pbuf.
template <class A, class TIn>
MHD_INLINE void aggregate_logits(const DistillArgs& a, const Candidates& cand, int64_t i, int64_t g,
                                 int64_t b, int64_t V, const Scale<A>& sc, bool gather, A* tbuf, A* pbuf) {
  using L = Lanes<A>;
  constexpr int W = L::W;
  const Weights<A> weight(a.logconf_t, a.aggregate, cand, i, g, b);
  for (int64_t v = 0; v < V; v += W) L::store(pbuf + v, L::splat(0), W);
  for (const int64_t* j = cand.begin(i); j != cand.end(i); ++j) {
    const LogitTeacher<A, TIn> teacher{row<TIn>(a.t, *j, g, b, V, gather, tbuf), sc, at<A>(a.lse_t, *j, g, b)};
    const A w = weight(*j);
    for_vectors<W>(0, V, [&](int64_t v, auto n) MHD_INLINE_BODY { L::store(pbuf + v, L::load(pbuf + v, W, 0) + w * teacher.prob(v, n), W); });
  }
}

// p̄ from packets: each candidate's packet expanded to V classes (sent class k gets p_k, the
// rest mass max(0, 1 − Σ p_k) spread evenly over the V − K unsent ones), then averaged. Written
// as p̄_v = C + Σ_j w_j (p_jk − rest_j)[v = sent k of j] with C = Σ_j w_j rest_j: O(V + |C|·K)
// per row instead of O(|C|·V). In a top-k packet p_jk ≥ rest_j, so nothing cancels. The p_jk
// are taken once, in vectors (kbuf: round_up(K, W) elements), not as two libm exps a bucket.
template <class A>
MHD_INLINE void aggregate_packets(const DistillArgs& a, const Candidates& cand, int64_t i, int64_t g,
                                  int64_t b, int64_t V, A* pbuf, A* kbuf) {
  using L = Lanes<A>;
  constexpr int W = L::W;
  const int64_t K = a.values.size[3], vs = a.values.stride[3], is = a.indices.stride[3];
  const Weights<A> weight(a.logconf_t, a.aggregate, cand, i, g, b);
  for (int64_t v = 0; v < V; v += W) L::store(pbuf + v, L::splat(0), W);
  A C = 0;
  for (const int64_t* j = cand.begin(i); j != cand.end(i); ++j) {
    const A* val = static_cast<const A*>(a.values.data) + offset(a.values, *j, g, b);
    const int32_t* ind = static_cast<const int32_t*>(a.indices.data) + offset(a.indices, *j, g, b);
    const A w = weight(*j), lse = at<A>(a.lse_t, *j, g, b);
    for (int64_t k = 0; k < K; ++k) kbuf[k] = val[k * vs] - lse;
    for_vectors<W>(0, K, [&](int64_t k, auto n) MHD_INLINE_BODY { L::store(kbuf + k, L::exp(L::load(kbuf + k, n, -kInf)), W); });
    A P = 0;
    for (int64_t k = 0; k < K; ++k) P += kbuf[k];
    const A rest = K < V ? clamp0(A(1) - P) / A(V - K) : A(0);
    C += w * rest;
    for (int64_t k = 0; k < K; ++k) pbuf[ind[k * is]] += w * (kbuf[k] - rest);
  }
  for (int64_t v = 0; v < V; v += W) L::store(pbuf + v, L::load(pbuf + v, W, 0) + C, W);
}
