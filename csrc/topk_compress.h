// Top-k compression of logit rows into packets (the kernel topk_compress).
#pragma once

#include "lanes.h"

// Sort keys of the top-k: unsigned integers ordered as a packet is — NaN above every number
// (as torch.sort descending), then larger values, and for equal values (or two NaN) the lower
// index first — so that the heap compares one integer. The value's bits, made monotone
// (negative: all bits flipped, positive: the sign bit), go above the complemented index:
// 32 + 32 bits for fp32, 64 + 32 bits (an __int128) for fp64.
template <class A> struct Keys;

template <> struct Keys<float> {
  using Key = uint64_t;
  static MHD_INLINE uint32_t monotone(float t) {
    uint32_t u = as_bits(t + 0.0f);  // −0 → +0: equal values tie
    u = t != t ? 0x7FC00000u : u;    // every NaN alike, above +inf
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
  }
  // monotone of every lane (the keys of the rank path and of top-k by lanes)
  static MHD_INLINE vu monotone(vf t) {
    vu u = as_bits(t + 0.0f);
    u = pick(t != t, vu{} + 0x7FC00000u, u);
    return u ^ ((vu)((vi)u >> 31) | 0x80000000u);
  }
  static MHD_INLINE Key make(float t, int64_t i) { return (Key)monotone(t) << 32 | (uint32_t)~(uint32_t)i; }
  static MHD_INLINE float value(Key k) {
    const uint32_t m = (uint32_t)(k >> 32);
    return as_float(m & 0x80000000u ? m ^ 0x80000000u : ~m);
  }
  static MHD_INLINE int32_t index(Key k) { return (int32_t)~(uint32_t)k; }
};

template <> struct Keys<double> {
  using Key = unsigned __int128;
  static MHD_INLINE uint64_t monotone(double t) {
    uint64_t u;
    const double c = t + 0.0;
    __builtin_memcpy(&u, &c, 8);
    u = t != t ? 0x7FF8000000000000ull : u;
    return u ^ ((uint64_t)((int64_t)u >> 63) | 0x8000000000000000ull);
  }
  static MHD_INLINE Key make(double t, int64_t i) { return (Key)monotone(t) << 32 | (uint32_t)~(uint32_t)i; }
  static MHD_INLINE double value(Key k) {
    const uint64_t m = (uint64_t)(k >> 32);
    const uint64_t u = m & 0x8000000000000000ull ? m ^ 0x8000000000000000ull : ~m;
    double d;
    __builtin_memcpy(&d, &u, 8);
    return d;
  }
  static MHD_INLINE int32_t index(Key k) { return (int32_t)~(uint32_t)k; }
};

// The best k keys seen so far in a binary min-heap (the lowest-ranked at the root), stored as a
// complete tree of 2^D − 1 ≥ k slots whose slots past k hold the maximum key, which never rises.
// The first k keys are pushed (sift-up, O(1) on average); after that an offer costs one compare
// when rejected, and a kept key walks all D − 1 levels down with conditional moves and no
// data-dependent branch (once it has found its slot the walk goes on re-placing keys onto
// themselves). Keys are unique (they hold the index).
template <class Key>
struct Heap {
  Key* h;
  int64_t size, k, levels;  // levels = D

  static int64_t slots(int64_t k) {
    int64_t s = 1;
    while (s - 1 < k) s *= 2;
    return s - 1;
  }
  void reset(int64_t k_) {
    k = k_;
    size = 0;
    const int64_t n = slots(k);
    for (int64_t i = k; i < n; ++i) h[i] = ~Key(0);
    levels = 0;
    for (int64_t m = n + 1; m > 1; m /= 2) ++levels;
  }
  MHD_INLINE bool full() const { return size == k; }
  MHD_INLINE void push(Key e) {
    int64_t c = size++;
    while (c > 0 && e < h[(c - 1) / 2]) {
      h[c] = h[(c - 1) / 2];
      c = (c - 1) / 2;
    }
    h[c] = e;
  }
  MHD_INLINE void sift_down(Key e) {
    int64_t c = 0;
    for (int64_t d = 1; d < levels; ++d) {
      const int64_t l = 2 * c + 1;
      const int64_t m = l + (h[l + 1] < h[l]);
      const Key hm = h[m];
      const bool go = hm < e;
      h[c] = go ? hm : e;
      e = go ? e : hm;
      c = m;
    }
    h[c] = e;
  }
  MHD_INLINE void offer(Key e) {
    if (!full()) push(e);
    else if (h[0] < e) sift_down(e);
  }
  MHD_INLINE Key worst() const { return h[0]; }
  // a > b for unsigned keys; for 64-bit keys as a signed compare of the sign-flipped keys,
  // which vectorizes (AVX2 has no unsigned 64-bit compare).
  static MHD_INLINE bool greater(Key a, Key b) {
    if constexpr (sizeof(Key) == 8) {
      return (int64_t)(a ^ (Key(1) << 63)) > (int64_t)(b ^ (Key(1) << 63));
    } else {
      return a > b;
    }
  }
  // The k keys best first, in the k slots after the heap's (its scratch holds slots(k) + k keys).
  const Key* best() {
    Key* out = h + slots(k);
    sorted(out);
    return out;
  }
  // The k keys best first into out. Small k: by rank counting (each key's rank is the number
  // of larger keys: k² compares without a branch); larger k: by popping the heap.
  void sorted(Key* out) {
    if (k <= 64) {
      for (int64_t i = 0; i < k; ++i) {
        int64_t rank = 0;
        for (int64_t j = 0; j < k; ++j) rank += greater(h[j], h[i]);
        out[rank] = h[i];
      }
      return;
    }
    for (int64_t pos = k - 1; pos >= 0; --pos) {
      out[pos] = h[0];
      sift_down(~Key(0));
    }
  }
};

// The best k keys seen so far as an array kept sorted best first, for small k: an offer that
// beats the k-th key moves the keys below it one slot down (at most k − 1 moves), which at a
// handful of keys is cheaper than the heap's walk and its final sort. Same interface as Heap.
template <class Key>
struct SortedKeys {
  Key* h;
  int64_t size, k;

  static constexpr int64_t kMaxK = 8;  // topk_compress takes this container up to this k
  void reset(int64_t k_) {
    k = k_;
    size = 0;
  }
  MHD_INLINE bool full() const { return size == k; }
  MHD_INLINE Key worst() const { return h[k - 1]; }
  MHD_INLINE void offer(Key e) {
    int64_t c;
    if (!full()) c = size++;
    else if (h[k - 1] < e) c = k - 1;
    else return;
    for (; c > 0 && h[c - 1] < e; --c) h[c] = h[c - 1];
    h[c] = e;
  }
  const Key* best() const { return h; }
};

// One row of X: values = the k largest of t = x/τ (descending), their indices, and
// lse = logsumexp(t), in one sweep: row_lse's, whose block-max pass feeds the heap. Once the
// heap is full a vector test rejects the lanes with x ≤ the k-th largest x so far (division by
// τ > 0 is monotone, so a lane with t above the k-th t passes it; NaN passes too), which skips
// almost every vector of a long row; the lanes that pass are ranked by their exact t.
template <class A, class In, class Best>
MHD_INLINE void topk_row(const In* x, int64_t V, int64_t K, const Scale<A>& sc, Best& heap, A* values,
                         int32_t* indices, A& lse) {
  using L = Lanes<A>;
  using Vec = typename L::V;
  using Kx = Keys<A>;
  heap.reset(K);
  A thr = -kInf;  // x of the k-th best entry, once the heap is full
  const auto feed = [&](int64_t v, int n, const Vec& xv) {
    const bool full = heap.full();
    unsigned pass = (full ? L::bits((xv > L::splat(thr)) | (xv != xv)) : ~0u) & ((1u << n) - 1);
    if (pass == 0) return;
    for (; pass != 0; pass &= pass - 1) {
      const int l = __builtin_ctz(pass);
      heap.offer(Kx::make(sc(L::lane(xv, l)), v + l));
    }
    if (heap.full()) thr = to_acc<A>(x[Kx::index(heap.worst())]);
  };
  A m;
  row_lse(x, V, sc, m, lse, static_cast<const SentRow*>(nullptr), static_cast<A*>(nullptr), feed);
  const typename Kx::Key* best = heap.best();
  for (int64_t pos = 0; pos < K; ++pos) {
    const int32_t i = Kx::index(best[pos]);
    values[pos] = sc(to_acc<A>(x[i]));  // the exact value, −0 and NaN payloads included
    indices[pos] = i;
  }
}

// Short rows (fp32 arithmetic): the top-k by ranks instead of offers. Each class's sort key
// (Keys<float>::monotone of t = x/τ: NaN above every number, −0 = +0) is compared with all
// the row's keys in vector compares, rank_i = #{j : key_j > key_i, or key_j = key_i and
// j < i}, and each class goes to the slot of its rank: no branch on the data and no heap.
// That costs V²/W compares where the offers cost about V + (offers that pass)·log k + a sort
// of the k kept keys. On rows of 20 to 200 classes, with AVX-512 (a compare gives a lane mask
// to count directly) the ranks win from k ≈ V²/2048 on, with AVX2 from k ≈ V²/600. The
// portable build (4 lanes, no unsigned compare in SSE2) keeps the ranks for V <= 16 only.
constexpr int64_t kRankMaxV = 256;

MHD_INLINE bool rank_path(int64_t V, int64_t K, int W) {
  if (V <= 16) return true;
  const int64_t per_k = W >= 16 ? 2048 : W >= 8 ? 512 : 0;  // k·per_k >= V²: the ranks are cheaper
  return V <= kRankMaxV && K * per_k >= V * V;
}

template <class In>
MHD_INLINE void topk_by_rank(const In* x, int64_t V, int64_t K, const Scale<float>& sc, float* values,
                             int32_t* indices, float& lse) {
  using L = Lanes<float>;
  constexpr int W = L::W;
  const int nv = (int)((V + W - 1) / W);
  vu key[kRankMaxV / W];
  alignas(64) uint32_t keys[kRankMaxV];
  for (int c = 0; c < nv; ++c) {
    const int n = (int)min64(W, V - (int64_t)c * W);
    key[c] = Keys<float>::monotone(sc(L::load(x + c * W, n, -kInf)));  // pads: −inf, after every class
    __builtin_memcpy(keys + c * W, &key[c], sizeof key[c]);
  }
  vi lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  // Every class goes to the slot of its rank (ranks are a permutation of 0..V−1), without a
  // branch on whether it made the top k; the first k slots are the answer.
  alignas(64) int32_t slot[kRankMaxV];
  for (int64_t i = 0; i < V; ++i) {
    const vu ki = vu{} + keys[i];
    const int ci = (int)(i / W);
    // vectors wholly before i count ties (j < i), the one holding i by lane, those after do not
    int rank = __builtin_popcount(L::bits((key[ci] > ki) | ((key[ci] == ki) & (lane < (int)(i - ci * W)))));
    for (int c = 0; c < ci; ++c) rank += L::count_ge(key[c], ki);
    for (int c = ci + 1; c < nv; ++c) rank += L::count_gt(key[c], ki);
    slot[rank] = (int32_t)i;
  }
  for (int64_t r = 0; r < K; ++r) {
    const int32_t i = slot[r];
    values[r] = sc(to_acc<float>(x[i]));  // the exact value, −0 and NaN payloads included
    indices[r] = i;
  }
  float m;
  row_lse(x, V, sc, m, lse);
}

// topk_by_rank of W adjacent rows (fp32, V <= W + kLaneExtra classes) by lanes: lane l holds
// row l, vector v class v (gathered from the rows at x, indexed by rows_in). Each of the k
// rounds takes the largest sort key of every lane (the first on ties, so the lower class:
// the rank order), writes its value and class, and sets that key to 0, below every key; lse
// from lanes_lse. The same bits as topk_by_rank row by row.
MHD_INLINE void topk_lanes(const float* x, int64_t V, int64_t K, const Scale<float>& sc, const vi* rows_in,
                           float* values, int32_t* indices, float* lse) {
  using L = Lanes<float>;
  using Vec = L::V;
  constexpr int W = L::W;
  Vec t[W + kLaneExtra], e[W + kLaneExtra], m_out, l, s;
  vu key[W + kLaneExtra];
  vi row_start;
  for (int i = 0; i < W; ++i) row_start[i] = (int32_t)(i * V);
  for (int64_t v = 0; v < V; ++v) {
    t[v] = gather_lanes(x, rows_in[v]);
    key[v] = Keys<float>::monotone(sc(t[v]));
  }
  for (int64_t j = 0; j < K; ++j) {
    vu best = key[0];
    vi who = splat_i(0);
    for (int64_t v = 1; v < V; ++v) {
      const vi take = (vi)(key[v] > best);
      best = take ? key[v] : best;
      who = take ? splat_i((int32_t)v) : who;
    }
    for (int64_t v = 0; v < V; ++v) key[v] = who == (int32_t)v ? vu{} : key[v];
    const vf val = sc(gather_lanes(x, row_start + who));  // the exact value, −0 and NaN payloads included
    for (int i = 0; i < W; ++i) {
      values[i * K + j] = val[i];
      indices[i * K + j] = who[i];
    }
  }
  lanes_lse<float>(t, V, sc, e, m_out, l, s);
  L::store(lse, l);
}

// X is passed as [1, 1, R, V].
template <class A, class In>
void topk_compress(const View& x, int64_t K, double tau, A* values, int32_t* indices, A* lse, int threads,
                   bool gather) {
  using Key = typename Keys<A>::Key;
  const int64_t R = x.size[2], V = x.size[3];
  const Scale<A> sc(tau);
  const int nt = team(threads, R * V);
  const int64_t row_share = per_thread<A>(V);
  Scratch<A> rows(gather ? nt * row_share : 0);
  const bool small = K <= SortedKeys<Key>::kMaxK;
  const int64_t slots = per_thread<Key>(small ? K : Heap<Key>::slots(K) + K);  // the heap, then the sorted keys
  Scratch<Key> heaps(nt * slots);
  if constexpr (IsF32<A>::value && IsF32<In>::value) {
    // rows of up to W + kLaneExtra contiguous classes W at a time by lanes (topk_lanes), in
    // tiles of four blocks of W rows; the rows past the last whole block by rank
    constexpr int W = Lanes<float>::W;
    if (!gather && V <= W + kLaneExtra && R >= W && x.stride[3] == 1 && x.stride[2] == V) {
      vi rows_in[W + kLaneExtra];
      lane_rows_index(V, rows_in);
      const int64_t nblk = R / W, per = 4;
      const float* base = static_cast<const float*>(x.data);
      for_tiles((nblk + per - 1) / per, nt, [&](int64_t tile, int) {
        for (int64_t k = tile * per; k < min64(nblk, tile * per + per); ++k)
          topk_lanes(base + k * W * V, V, K, sc, rows_in, values + k * W * K, indices + k * W * K, lse + k * W);
      });
      for (int64_t r = nblk * W; r < R; ++r)
        topk_by_rank(base + r * V, V, K, sc, values + r * K, indices + r * K, lse[r]);
      return;
    }
  }
  for_rows(1, 1, R, nt, [&](int64_t r, int64_t, int64_t, int64_t, int tid) {
    const In* xr = row<In>(x, 0, 0, r, V, gather, rows.data() + (gather ? tid * row_share : 0));
    if constexpr (sizeof(A) == 4) {
      if (rank_path(V, K, Lanes<float>::W)) return topk_by_rank(xr, V, K, sc, values + r * K, indices + r * K, lse[r]);
    }
    if (small) {
      SortedKeys<Key> best{heaps.data() + tid * slots, 0, 0};
      topk_row(xr, V, K, sc, best, values + r * K, indices + r * K, lse[r]);
    } else {
      Heap<Key> heap{heaps.data() + tid * slots, 0, 0, 0};
      topk_row(xr, V, K, sc, heap, values + r * K, indices + r * K, lse[r]);
    }
  });
}

inline void topk_compress_entry(const View& x, int64_t k, double tau, int acc, void* values, int32_t* indices,
                                void* lse, int threads) {
  if (acc == F64)
    return topk_compress<double, double>(x, k, tau, (double*)values, indices, (double*)lse, threads, true);
  if (x.stride[3] != 1)
    return topk_compress<float, float>(x, k, tau, (float*)values, indices, (float*)lse, threads, true);
  with_stored_type(x.dtype, [&](auto tag) {
    topk_compress<float, decltype(tag)>(x, k, tau, (float*)values, indices, (float*)lse, threads, false);
  });
}
