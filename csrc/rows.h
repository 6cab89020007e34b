// Row math: the online log-sum-exp of a row (row_lse), the teachers a student row meets, and
// the KL sweep of one student row against one teacher with its gradient; rows of one block R
// at a time.
#pragma once

#include "runtime.h"

constexpr int64_t kBlock = 512;  // logits per block of the online softmax: both sweeps hit L1
// How far ahead of its exp sweep row_lse asks for a long row's logits: four blocks (8 KiB of
// fp32). One block ahead left the row's stream from memory waiting on each block's compute.
constexpr int64_t kPrefetch = 4 * kBlock;

// The temperature: t = x/τ bit for bit as torch divides (a multiply when 1/τ is exact, τ a
// power of two such as the common τ = 1, else a division). Log-probabilities are formed as
// t − lse from the same rounded t that the lse was computed from, so that they are exact where
// they should be (log p = 0 for V = 1); log2e_tau = log2(e)/τ serves the online sums.
template <class A>
struct Scale {
  A tau, inv, log2e_tau;
  bool exact;
  Scale() = default;  // for arrays of teachers; assigned before use
  explicit Scale(double t) : tau((A)t), inv(A(1) / (A)t), log2e_tau((A)(kLog2e / t)) {
    int e;
    exact = __builtin_frexp((double)tau, &e) == 0.5;
  }
  template <class X>
  MHD_INLINE X operator()(X x) const { return exact ? x * inv : x / tau; }
};


struct NoFeed {
  template <class Vec>
  MHD_INLINE void operator()(int64_t, int, const Vec&) const {}
};

// Lane-wise max of x[begin, end) (padded with −inf), each vector handed to feed in order. Four
// running maxima instead of one: a single chain of dependent max operations took a third of a
// long row's time. The max of numbers is the same in any order; a NaN in the row may or may
// not survive here, and the row's sum makes its lse NaN either way.
template <class L, class In, class Feed>
MHD_INLINE typename L::V sweep_max(const In* x, int64_t begin, int64_t end, const Feed& feed) {
  using Vec = typename L::V;
  constexpr int W = L::W;
  Vec m0 = L::splat(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t v = begin;
  for (; v + 4 * W <= end; v += 4 * W) {
    const Vec a = L::load(x + v, Whole<W>{}, -kInf), b = L::load(x + v + W, Whole<W>{}, -kInf),
              c = L::load(x + v + 2 * W, Whole<W>{}, -kInf), d = L::load(x + v + 3 * W, Whole<W>{}, -kInf);
    m0 = L::max(m0, a), m1 = L::max(m1, b), m2 = L::max(m2, c), m3 = L::max(m3, d);
    feed(v, Whole<W>{}, a), feed(v + W, Whole<W>{}, b), feed(v + 2 * W, Whole<W>{}, c), feed(v + 3 * W, Whole<W>{}, d);
  }
  for_vectors<W>(v, end, [&](int64_t u, auto n) MHD_INLINE_BODY {
    const Vec xv = L::load(x + u, n, -kInf);
    m0 = L::max(m0, xv);
    feed(u, n, xv);
  });
  return L::max(L::max(m0, m1), L::max(m2, m3));
}

// The classes of a teacher's packet in a student sweep: bits, a bitmap of V bits (bit v set =
// class v sent; bit v is bit v % 8 of byte v / 8, padded with zero bytes), and in_block, the
// number of sent classes in each block of kBlock classes. A block without one has unsent
// mass = its whole mass, so only blocks holding sent classes read the bitmap. A bitmap, not a
// row of 0/1 weights: 4 KB at V = 32000 stays in L1, where the weights (128 KB) come from L2.
struct SentRow {
  const uint8_t* bits;
  const int32_t* in_block;
};

// The bits of the W classes from v (v a multiple of W) in a bitmap of sent classes.
template <int W>
MHD_INLINE unsigned sent_bits(const uint8_t* bits, int64_t v) {
  if constexpr (W == 16) {
    uint16_t b;
    __builtin_memcpy(&b, bits + v / 8, sizeof b);
    return b;
  } else if constexpr (W == 8) {
    return bits[v / 8];
  } else {
    static_assert(W < 8 && 8 % W == 0, "lanes per vector");
    return (bits[v / 8] >> (v % 8)) & ((1u << W) - 1);
  }
}

// Online log-sum-exp of t = x/τ over one row. Per block of kBlock logits: a first sweep finds
// the block max of x (and hands each vector to feed, top-k's hook), and when it raises the
// running max m the running sums are rescaled once (s ← s·e^((m − m')/τ)); a second sweep adds
// e^((x − m)/τ) = 2^((x − m)·log2e/τ) (x − m is exact near the max, so the max adds exactly 1).
// One exp per logit; the block is re-read from L1.
// With the classes of a teacher's packet (sent) the sweep also sums the unsent mass
// s_w = Σ w·e^((x − m)/τ) directly, not as s minus the sent classes, so
// that q_rest = s_w / s keeps full relative precision when it is tiny.
// Out: m = max t, lse = m + log s, and log(s_w / s) when sent is given. A row with NaN or +inf
// gives lse NaN; a row of all −inf gives lse −inf. For a row of one block (V <= kBlock), keep
// (vpad elements) receives the terms e_v = e^(t_v − m) and sum the total s, so that the
// softmax is keep·(1/s) without another exp.
template <class A, class In, class Feed = NoFeed>
MHD_INLINE void row_lse(const In* x, int64_t V, const Scale<A>& sc, A& m_out, A& lse_out,
                        const SentRow* sent = nullptr, A* log_unsent = nullptr, const Feed& feed = Feed{},
                        A* keep = nullptr, A* sum = nullptr) {
  using L = Lanes<A>;
  using Vec = typename L::V;
  constexpr int W = L::W;
  const Vec k = L::splat(sc.log2e_tau);
  A m = -kInf, s = 0, sw = 0;
  for (int64_t blk = 0; blk < V; blk += kBlock) {
    const int64_t end = min64(V, blk + kBlock);
    const A bm = L::max(sweep_max<L>(x, blk, end, feed));
    if (bm > m) {
      if (m != -kInf) {  // the first finite block has nothing to rescale
        const A rescale = sexp2((m - bm) * sc.log2e_tau);
        s *= rescale;
        sw *= rescale;
      }
      m = bm;
    }
    const Vec c = L::splat(m == -kInf ? A(0) : m);  // all −inf so far: 2^(−inf − 0) = 0, not NaN
    Vec acc = L::splat(0), acc_w = L::splat(0);
    const uint8_t* w = sent != nullptr && sent->in_block[blk / kBlock] != 0 ? sent->bits : nullptr;
    for_vectors<W>(blk, end, [&](int64_t v, auto n) MHD_INLINE_BODY {
      __builtin_prefetch(x + v + kPrefetch);  // blocks ahead (or the next row), for the max sweep
      const Vec e = L::exp2_nonpos((L::load(x + v, n, -kInf) - c) * k);
      acc += e;
      if (w != nullptr) acc_w = L::add_unsent(acc_w, e, sent_bits<W>(w, v));
      if (keep != nullptr) L::store(keep + v, e, W);
    });
    s += L::sum(acc);
    if (sent != nullptr) sw += L::sum(w != nullptr ? acc_w : acc);
  }
  m_out = sc(m);
  lse_out = m_out + slog(s);
  if (sum != nullptr) *sum = s;
  if (log_unsent != nullptr) *log_unsent = slog(sw) - slog(s);
}

// Teachers of the fused student sweep: p and log p for the lanes at class v.
template <class A, class TIn>
struct LogitTeacher {  // one teacher row of logits: log p = t/τ − lse_t
  using L = Lanes<A>;
  using Vec = typename L::V;
  const TIn* t;
  Scale<A> sc;
  A lse;
  MHD_INLINE void get(int64_t v, int n, Vec& p, Vec& lp) const {
    lp = sc(L::load(t + v, n, -kInf)) - lse;
    p = L::exp(lp);
  }
  MHD_INLINE Vec prob(int64_t v, int n) const { return L::exp(sc(L::load(t + v, n, -kInf)) - lse); }
};

template <class A>
struct ProbTeacher {  // an aggregated distribution p̄ [V] in a buffer
  using L = Lanes<A>;
  using Vec = typename L::V;
  const A* p;
  MHD_INLINE void get(int64_t v, int n, Vec& pv, Vec& lp) const {
    pv = L::load(p + v, n, 0);
    lp = L::log(pv);
  }
  MHD_INLINE Vec prob(int64_t v, int n) const { return L::load(p + v, n, 0); }
};

// dL/dz_v = g·τ·(q_v − p_v) with q_v = e^(z_v/τ − lse_z), written in Z's dtype (stream: past
// the caches, out a row of A, 16-byte aligned).
template <class A, class ZIn, class Teacher>
MHD_INLINE void grad_row(const ZIn* z, int64_t V, const Scale<A>& sc, const Teacher& teacher, A lse_z,
                         A gs, void* out, int dtype, bool stream) {
  using L = Lanes<A>;
  using Vec = typename L::V;
  constexpr int W = L::W;
  for_vectors<W>(0, V, [&](int64_t v, auto n) MHD_INLINE_BODY {
    const Vec q = L::exp(sc(L::load(z + v, n, -kInf)) - lse_z);
    store_grad<A>(out, dtype, v, gs * (q - teacher.prob(v, n)), n, stream);
  });
}

// A teacher row whose softmax terms are kept from its statistics sweep (row_lse's keep):
// p = e·(1/s), log p = t/τ − lse.
template <class A, class TIn>
struct KeptTeacher {
  using L = Lanes<A>;
  using Vec = typename L::V;
  const TIn* t;
  Scale<A> sc;
  A lse;
  const A* e;
  A inv_s;
  MHD_INLINE void get(int64_t v, int n, Vec& p, Vec& lp) const {
    lp = sc(L::load(t + v, n, -kInf)) - lse;
    p = L::load(e + v, n, 0) * L::splat(inv_s);
  }
  MHD_INLINE Vec prob(int64_t v, int n) const { return L::load(e + v, n, 0) * L::splat(inv_s); }
};

// One student row z against one teacher distribution p (kl_row), and with it the gradient
// gs·(q − p) of the row (kl_grad_row):
//   lse_z = logsumexp(z/τ) by row_lse (one exp per logit), then
//   KL(p‖q) = Σ_{p≠0} p (log p − log q), log q = z/τ − lse_z, in one sweep over z and the
//   teacher (one exp per logit for p unless the teacher kept its terms; the student row is
//   re-read from cache).
// Each term is a difference of log-probabilities, so a KL near 0 keeps its relative precision.
// The test is p ≠ 0, not p > 0, so that a NaN teacher shows as a NaN loss; a student row of
// NaN, +inf or all −inf has lse_z NaN or −inf and gives NaN. The gradient comes from the same
// sweep; with a row of one block (V <= kBlock, qbuf of vpad elements) q comes from the terms
// row_lse kept, q = e·(1/s), instead of a second exp. stream: out is a row of A, 16-byte
// aligned, that takes its whole vectors by non-temporal stores.
template <bool Grad, class A, class ZIn, class Teacher>
MHD_INLINE void kl_sweep(const ZIn* z, int64_t V, const Scale<A>& sc, const Teacher& teacher, A gs, A& kl,
                         A& lse_z, void* out, int dtype, A* qbuf, bool stream) {
  using L = Lanes<A>;
  using Vec = typename L::V;
  constexpr int W = L::W;
  A m, s;
  const bool kept = Grad && qbuf != nullptr && V <= kBlock;
  row_lse(z, V, sc, m, lse_z, static_cast<const SentRow*>(nullptr), static_cast<A*>(nullptr), NoFeed{},
          kept ? qbuf : nullptr, &s);
  const Vec k = L::splat(gs), inv_s = L::splat(A(1) / s);
  Vec acc = L::splat(0);
  for_vectors<W>(0, V, [&](int64_t v, auto n) MHD_INLINE_BODY {
    const Vec lq = sc(L::load(z + v, n, -kInf)) - lse_z;
    Vec p, lp;
    teacher.get(v, n, p, lp);
    acc += p != Vec{} ? p * (lp - lq) : Vec{};
    if constexpr (Grad) {
      const Vec q = kept ? L::load(qbuf + v, n, 0) * inv_s : L::exp(lq);
      store_grad<A>(out, dtype, v, k * (q - p), n, stream);
    }
  });
  kl = L::sum(acc);
}

template <class A, class ZIn, class Teacher>
MHD_INLINE void kl_grad_row(const ZIn* z, int64_t V, const Scale<A>& sc, const Teacher& teacher, A gs, A& kl,
                            A& lse_z, void* out, int dtype, A* qbuf, bool stream = false) {
  kl_sweep<true>(z, V, sc, teacher, gs, kl, lse_z, out, dtype, qbuf, stream);
}

template <class A, class ZIn, class Teacher>
MHD_INLINE void kl_row(const ZIn* z, int64_t V, const Scale<A>& sc, const Teacher& teacher, A& kl,
                       A& lse_z) {
  kl_sweep<false>(z, V, sc, teacher, A(0), kl, lse_z, nullptr, F32, static_cast<A*>(nullptr), false);
}


// A row of V <= kBlock logits is a chain of short dependent steps (max, then the exps, then the
// reductions and the log, then the KL sweep), too short for the out-of-order window to overlap
// with the next row; the S1 row of 100 classes ran at a third of the vector units' rate.
// rows_lse_kept and kl_sweep_rows run R independent rows in the same loops instead. Each row
// takes the same operations in the same order as row_lse (one block, keep and sum) and
// kl_sweep (kept q), so the results are bit-identical to one row at a time.
template <int R, class A, class In>
MHD_INLINE void rows_lse_kept(const In* const (&x)[R], int64_t V, const Scale<A>& sc, A (&m_out)[R],
                              A (&lse_out)[R], A* const (&keep)[R], A (&sum)[R]) {
  using L = Lanes<A>;
  using Vec = typename L::V;
  constexpr int W = L::W;
  const Vec k = L::splat(sc.log2e_tau);
  Vec vm[R], c[R], acc[R];
  MHD_UNROLL
  for (int r = 0; r < R; ++r) vm[r] = L::splat(-kInf), acc[r] = L::splat(0);
  for_vectors<W>(0, V, [&](int64_t v, auto n) MHD_INLINE_BODY {
    MHD_UNROLL
    for (int r = 0; r < R; ++r) vm[r] = L::max(vm[r], L::load(x[r] + v, n, -kInf));
  });
  A m[R];
  MHD_UNROLL
  for (int r = 0; r < R; ++r) {
    const A bm = L::max(vm[r]);
    m[r] = bm > -kInf ? bm : -kInf;  // row_lse's first block: a NaN max leaves m = −inf
    c[r] = L::splat(m[r] == -kInf ? A(0) : m[r]);
  }
  for_vectors<W>(0, V, [&](int64_t v, auto n) MHD_INLINE_BODY {
    MHD_UNROLL
    for (int r = 0; r < R; ++r) {
      __builtin_prefetch(x[r] + v + kBlock);  // rows ahead, for their max sweep
      const Vec e = L::exp2_nonpos((L::load(x[r] + v, n, -kInf) - c[r]) * k);
      acc[r] += e;
      L::store(keep[r] + v, e, W);
    }
  });
  A logs[R];
  MHD_UNROLL
  for (int r = 0; r < R; ++r) {
    A s = 0;
    s += L::sum(acc[r]);
    m_out[r] = sc(m[r]);
    sum[r] = s;
  }
  slogs<R>(sum, logs);  // the R logs in one vector: row_lse's slog(s), bit for bit
  MHD_UNROLL
  for (int r = 0; r < R; ++r) lse_out[r] = m_out[r] + logs[r];
}

// kl_sweep of R student rows of one block against their teachers; qbuf holds R rows of vpad.
template <bool Grad, int R, class A, class ZIn, class Teacher>
MHD_INLINE void kl_sweep_rows(const ZIn* const (&z)[R], int64_t V, const Scale<A>& sc, const Teacher (&teacher)[R],
                              A gs, A (&kl)[R], A (&lse_z)[R], void* const (&out)[R], int dtype, A* qbuf,
                              bool stream) {
  using L = Lanes<A>;
  using Vec = typename L::V;
  constexpr int W = L::W;
  const int64_t vpad = round_up(V, W);
  A m[R], s[R];
  A* q[R];
  MHD_UNROLL
  for (int r = 0; r < R; ++r) q[r] = qbuf + r * vpad;
  rows_lse_kept<R>(z, V, sc, m, lse_z, q, s);
  const Vec k = L::splat(gs);
  Vec inv_s[R], acc[R];
  MHD_UNROLL
  for (int r = 0; r < R; ++r) inv_s[r] = L::splat(A(1) / s[r]), acc[r] = L::splat(0);
  for_vectors<W>(0, V, [&](int64_t v, auto n) MHD_INLINE_BODY {
    MHD_UNROLL
    for (int r = 0; r < R; ++r) {
      const Vec lq = sc(L::load(z[r] + v, n, -kInf)) - lse_z[r];
      Vec p, lp;
      teacher[r].get(v, n, p, lp);
      acc[r] += p != Vec{} ? p * (lp - lq) : Vec{};
      if constexpr (Grad) {
        store_grad<A>(out[r], dtype, v, k * (L::load(q[r] + v, n, 0) * inv_s[r] - p), n, stream);
      }
    }
  });
  MHD_UNROLL
  for (int r = 0; r < R; ++r) kl[r] = L::sum(acc[r]);
}
