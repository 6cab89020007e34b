// The checks of hand-built top-k packets (the kernel check_packets), in one pass over values and
// indices [R0, R1, R2, K] and lse [R0, R1, R2]: the range of the indices, whether a row sends a
// class twice, and the first row (flat, row-major) whose sent probabilities exp(value − lse) sum
// past 1 by more than the rounding of values to a wire dtype allows:
//   mass > exp(|lse|·(u + 2^−17) + u·(log K + 1) + 2^−17),  u = 2^−8 (bf16's unit roundoff).
// The arithmetic is that of the torch check in mhd_fast/ops/inputs.py: fp64 when values or lse
// is fp64, else fp32, the bound in lse's dtype; a row with NaN passes (its comparison is false).
#pragma once

#include "runtime.h"

constexpr int64_t kCheckElements = 4096;  // packet elements per work item

// Element off of a float View, as P.
template <class P>
MHD_INLINE P float_at(const View& v, int64_t off) {
  switch (v.dtype) {
    case F16: return to_acc<P>(static_cast<const f16*>(v.data)[off]);
    case BF16: return to_acc<P>(static_cast<const bf16*>(v.data)[off]);
    case F64: return (P) static_cast<const double*>(v.data)[off];
    default: return to_acc<P>(static_cast<const float*>(v.data)[off]);
  }
}

// x ← e^x for x[0, n), overflowing to +inf as libm's exp does (the polynomial stops at 2^127).
template <class P>
MHD_INLINE void exp_in_place(P* x, int64_t n) {
  using L = Lanes<P>;
  for_vectors<L::W>(0, n, [&](int64_t i, auto w) MHD_INLINE_BODY {
    const typename L::V y = L::load(x + i, w, 0);
    if constexpr (IsF32<P>::value) L::store(x + i, y > L::splat(88.72283f) ? L::splat(kInf) : L::exp(y), w);
    else L::store(x + i, L::exp(y), w);
  });
}

// Sorts x[0, n) ascending in place (heapsort: this file takes no std templates).
MHD_INLINE void sort_indices(int64_t* x, int64_t n) {
  const auto sift = [&](int64_t root, int64_t end) {
    for (int64_t c; (c = 2 * root + 1) < end; root = c) {
      if (c + 1 < end && x[c + 1] > x[c]) ++c;
      if (x[root] >= x[c]) return;
      const int64_t s = x[root];
      x[root] = x[c], x[c] = s;
    }
  };
  for (int64_t i = n / 2 - 1; i >= 0; --i) sift(i, n);
  for (int64_t end = n - 1; end > 0; --end) {
    const int64_t s = x[0];
    x[0] = x[end], x[end] = s;
    sift(0, end);
  }
}

// Whether the K indices at ind (element stride s) hold a class twice; buf: K elements.
template <class I>
MHD_INLINE bool repeats(const I* ind, int64_t s, int64_t K, int64_t* buf) {
  if (K <= 16) {
    for (int64_t i = 1; i < K; ++i)
      for (int64_t j = 0; j < i; ++j)
        if (ind[i * s] == ind[j * s]) return true;
    return false;
  }
  for (int64_t k = 0; k < K; ++k) buf[k] = ind[k * s];
  sort_indices(buf, K);
  for (int64_t k = 1; k < K; ++k)
    if (buf[k] == buf[k - 1]) return true;
  return false;
}

// The checks of flat rows [r0, r1) into part (its bad_row the first bad one), with P the
// arithmetic's type and I the indices' stored type. buf: (r1 − r0)·K elements (the sent
// probabilities), bound: r1 − r0 (the rows' bounds), keys: K.
template <class P, class I>
void check_rows(const View& values, const View& indices, const View& lse, int64_t r0, int64_t r1, P* buf,
                P* bound, int64_t* keys, PacketCheck& part) {
  const int64_t G = values.size[1], B = values.size[2], K = values.size[3];
  const double u = 1.0 / 256, c1 = u + 1.0 / 131072, c2 = u * (__builtin_log((double)K) + 1) + 1.0 / 131072;
  // The bound in lse's dtype: in P's vectors when that is P, else (fp32 lse, fp64 values) by libm.
  const bool bound_in_p = (lse.dtype == F64) == !IsF32<P>::value;
  int64_t lo_index = part.lo, hi_index = part.hi;  // in registers: part sits beside other threads' parts
  bool repeated = part.repeated;
  int64_t b = r0 % B, g = (r0 / B) % G, n = r0 / (B * G);
  for (int64_t r = r0; r < r1; ++r) {
    const I* ind = static_cast<const I*>(indices.data) + offset(indices, n, g, b);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t x = ind[k * indices.stride[3]];
      lo_index = x < lo_index ? x : lo_index;
      hi_index = x > hi_index ? x : hi_index;
    }
    if (!repeated && K > 1) repeated = repeats(ind, indices.stride[3], K, keys);
    const int64_t lo = offset(lse, n, g, b), vo = offset(values, n, g, b);
    const P l = float_at<P>(lse, lo);
    P* p = buf + (r - r0) * K;
    for (int64_t k = 0; k < K; ++k) p[k] = float_at<P>(values, vo + k * values.stride[3]) - l;
    if (bound_in_p) {
      bound[r - r0] = (l < 0 ? -l : l) * (P)c1 + (P)c2;
    } else {
      const float lf = float_at<float>(lse, lo);
      bound[r - r0] = (P)sexp((lf < 0 ? -lf : lf) * (float)c1 + (float)c2);
    }
    if (++b == B) {
      b = 0;
      if (++g == G) g = 0, ++n;
    }
  }
  part.lo = lo_index, part.hi = hi_index, part.repeated = repeated;
  exp_in_place(buf, (r1 - r0) * K);
  if (bound_in_p) exp_in_place(bound, r1 - r0);
  for (int64_t r = r0; r < r1; ++r) {
    const P* p = buf + (r - r0) * K;
    P mass = p[0];
    for (int64_t k = 1; k < K; ++k) mass += p[k];
    if (mass > bound[r - r0] && (part.bad_row < 0 || r < part.bad_row)) {
      part.bad_row = r;
      part.bad_lse = float_at<double>(lse, offset(lse, r / (B * G), (r / B) % G, r % B));
      part.bad_mass = (double)mass;
      return;  // the rows after it cannot be the first
    }
  }
}

template <class P, class I>
void check_packets(const View& values, const View& indices, const View& lse, PacketCheck* out, int threads) {
  const int64_t R = values.size[0] * values.size[1] * values.size[2], K = values.size[3];
  const int64_t per = min64(R, kCheckElements / K + 1);  // rows per work item
  constexpr int kMaxThreads = 64;  // the partial results' array
  const int nt = (int)min64(team(threads, R * K), kMaxThreads);
  const int64_t share = per_thread<P>(per * K + per), key_share = per_thread<int64_t>(K);
  Scratch<P> scratch(nt * share);
  Scratch<int64_t> keys(nt * key_share);
  const int64_t first = indices.dtype == I16 ? static_cast<const int16_t*>(indices.data)[0]
                        : indices.dtype == I32 ? static_cast<const int32_t*>(indices.data)[0]
                                               : static_cast<const int64_t*>(indices.data)[0];
  PacketCheck parts[kMaxThreads];
  for (int t = 0; t < nt; ++t) parts[t].lo = parts[t].hi = first;
  const int64_t tiles = (R + per - 1) / per;
  for_tiles(tiles, nt, [&](int64_t tile, int tid) {
    P* buf = scratch.data() + tid * share;
    check_rows<P, I>(values, indices, lse, tile * per, min64(R, tile * per + per), buf, buf + per * K,
                     keys.data() + tid * key_share, parts[tid]);
  });
  *out = parts[0];
  for (int t = 1; t < nt; ++t) {
    const PacketCheck& p = parts[t];
    out->lo = p.lo < out->lo ? p.lo : out->lo;
    out->hi = p.hi > out->hi ? p.hi : out->hi;
    out->repeated = out->repeated || p.repeated;
    if (p.bad_row >= 0 && (out->bad_row < 0 || p.bad_row < out->bad_row))
      out->bad_row = p.bad_row, out->bad_lse = p.bad_lse, out->bad_mass = p.bad_mass;
  }
}

inline void check_packets_entry(const View& values, const View& indices, const View& lse, PacketCheck* out,
                                int threads) {
  const bool fp64 = values.dtype == F64 || lse.dtype == F64;
  const auto by_index = [&](auto p_tag) {
    using P = decltype(p_tag);
    switch (indices.dtype) {
      case I16: return check_packets<P, int16_t>(values, indices, lse, out, threads);
      case I32: return check_packets<P, int32_t>(values, indices, lse, out, threads);
      default: return check_packets<P, int64_t>(values, indices, lse, out, threads);
    }
  };
  if (fp64) by_index(double{});
  else by_index(float{});
}
