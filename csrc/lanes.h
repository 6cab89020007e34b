// Short rows by lanes: W rows of up to W + kLaneExtra classes in the lanes of a vector (lane l
// holds row l, vector v class v), so that a row's reductions are lane-wise operations.
#pragma once

#include "rows.h"

// A row of one vector or a little more (V <= W + kLaneExtra) is a short sweep between
// reductions: its max, its sum and its KL are each a horizontal reduction, with a log and a
// division between them, so the row path spends most of such a row in reduction trees and
// scalar tails (S2, V = 10: ~210 cycles a teacher-and-student pair of rows). By lanes, lane l
// of a vector holds row l of W consecutive rows of one client and vector v holds class v
// (gathered), so that a reduction is lane-wise operations for W rows at once and one vector
// log serves W rows. Past W + kLaneExtra classes the gathers cost more than the reductions
// they save (on the AVX-512, AVX2 and portable builds alike).
constexpr int kLaneExtra = 4;

// The row path's reduction of one row, for W rows held as class vectors x[0, V): its running
// vector acc (acc = op(acc, vector k) from acc = init, the lanes past V of the last vector
// padded with init too: −inf for the max, 0 for the sums), then Lanes::reduce's tree over acc's
// lanes (lane i with i + W/2, then i + W/4, ...), so that every row gets the bits of the row
// path.
template <class L, class Op>
MHD_INLINE typename L::V lane_tree(const typename L::V* x, int64_t V, typename L::V init, Op op) {
  constexpr int W = L::W;
  typename L::V a[W];
  MHD_UNROLL
  for (int i = 0; i < W; ++i) a[i] = init;
  for (int64_t k = 0; k < V; k += W) {
    MHD_UNROLL
    for (int i = 0; i < W; ++i) a[i] = op(a[i], k + i < V ? x[k + i] : init);
  }
  MHD_UNROLL
  for (int half = W / 2; half >= 1; half /= 2) {
    MHD_UNROLL
    for (int i = 0; i < half; ++i) a[i] = op(a[i], a[i + half]);
  }
  return a[0];
}

// A tile's blocks of W rows lie a client apart (G·B·V floats): no stream for the hardware's
// prefetchers, and the gathers then wait on every line of a block. So the block kAhead clients
// ahead is asked for first (two, four and eight ahead do alike).
constexpr int64_t kAhead = 4;
// Every line of the n floats from p toward the caches.
MHD_INLINE void prefetch_block(const float* p, int64_t n) {
  for (int64_t o = 0; o < n; o += 16) __builtin_prefetch(p + o);
  __builtin_prefetch(p + n - 1);
}

// Lane l of in[v] indexes class v of row l in W adjacent rows of V classes (v < V).
MHD_INLINE void lane_rows_index(int64_t V, vi* in) {
  for (int64_t v = 0; v < V; ++v)
    for (int l = 0; l < kLanes; ++l) in[v][l] = (int32_t)(l * V + v);
}

// The way back: lane l of out[v] indexes the element of a class-major [V, W] block (class c of
// row i at c·W + i) that goes to element v·W + l of the W adjacent rows.
MHD_INLINE void lane_rows_out_index(int64_t V, vi* out) {
  for (int64_t v = 0; v < V; ++v)
    for (int l = 0; l < kLanes; ++l) {
      const int64_t f = v * kLanes + l;
      out[v][l] = (int32_t)((f % V) * kLanes + f / V);
    }
}

// A class-major [V, W] block of fp32 (by_class) out as its W adjacent rows of V at d: V whole
// vectors gathered by lane_rows_out_index's out, past the caches (stream) where d is 16-byte
// aligned.
MHD_INLINE void put_lane_rows(float* d, const float* by_class, const vi* out, int64_t V, bool stream) {
  using L = Lanes<float>;
  const bool nt = stream && (reinterpret_cast<uintptr_t>(d) & 15) == 0;
  for (int64_t v = 0; v < V; ++v) {
    const L::V y = gather_lanes(by_class, out[v]);
    if (nt) L::stream(d + v * L::W, y);
    else L::store(d + v * L::W, y);
  }
}

// rows_lse_kept of W rows held as class vectors x[0, V): m_out = sc(max), lse, the terms
// e[v] = 2^((x_v − m)·log2e/τ) and their sum s, lane by lane.
template <class A>
MHD_INLINE void lanes_lse(const typename Lanes<A>::V* x, int64_t V, const Scale<A>& sc, typename Lanes<A>::V* e,
                          typename Lanes<A>::V& m_out, typename Lanes<A>::V& lse, typename Lanes<A>::V& s) {
  using L = Lanes<A>;
  using Vec = typename L::V;
  const Vec ninf = L::splat(-kInf), zero = L::splat(0), k = L::splat(sc.log2e_tau);
  const Vec bm = lane_tree<L>(x, V, ninf, [](auto a, auto b) MHD_INLINE_BODY { return a > b ? a : b; });
  const Vec m = bm > ninf ? bm : ninf;  // a NaN max leaves m = −inf
  const Vec c = m == ninf ? zero : m;
  for (int64_t v = 0; v < V; ++v) e[v] = L::exp2_nonpos((x[v] - c) * k);
  s = zero + lane_tree<L>(e, V, zero, [](auto a, auto b) MHD_INLINE_BODY { return a + b; });
  m_out = sc(m);
  lse = m_out + L::log(s);
}
