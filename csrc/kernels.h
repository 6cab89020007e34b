// The fused kernels of mhd_fast, written once and compiled once per ISA.
//
// kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp include this file inside namespace
// mhd::MHD_ISA, after setting the ISA (MHD_LANES, MHD_AVX2 or MHD_AVX512, and a target pragma), so every
// function here, templates included, gets a distinct symbol per ISA and the linker never mixes
// AVX2 code into the portable build. Standard headers are included by those files before the
// ISA switch; this file instantiates no std templates under it.
//
// Shared conventions (the kernel contract of mhd_fast/ops/registry.py):
//   * One call covers the flat row space r = (n·G + g)·B + b of all N clients × G groups ×
//     B rows; OpenMP threads take blocks of rows (for_rows) or tiles (for_tiles), each its own
//     chunk first, then what is left of the others' (Claims). A row is always summed by one
//     thread in a fixed order, so results are bit-identical whatever the thread count and
//     whichever thread takes it.
//   * Inputs are read in place through their element strides when the class dim is contiguous;
//     otherwise (or on the fp64 path) each row is first gathered into a per-thread buffer.
//   * Arithmetic in the accumulation type A: fp32, or fp64 when an input is fp64.
//   * t = x / τ exactly as torch computes it (a multiply when 1/τ is exact); exponentials
//     go through a base-2 polynomial (simd.h).
//   * NaN or +inf in a row -> NaN outputs for that row; −inf = a masked class (p = 0, and
//     0·log 0 = 0); a row of all −inf has lse = −inf and NaN loss.

constexpr int64_t kStreamBytes = int64_t(4) << 20;  // outputs from this size on bypass the caches

// Whether an output of `bytes` in all, at data with element strides stride[0..2] (rows of
// esize-byte elements), goes past the caches: large enough, and every row 16-byte aligned.
inline bool streamable(const void* data, const int64_t* stride, int64_t esize, int64_t bytes) {
  return data != nullptr && bytes >= kStreamBytes && reinterpret_cast<uintptr_t>(data) % 16 == 0 &&
         (stride[0] * esize) % 16 == 0 && (stride[1] * esize) % 16 == 0 && (stride[2] * esize) % 16 == 0;
}
constexpr int64_t kBlock = 512;  // logits per block of the online softmax: both sweeps hit L1
// How far ahead of its exp sweep row_lse asks for a long row's logits: four blocks (8 KiB of
// fp32). One block ahead left the row's stream from memory waiting on each block's compute:
// S3's forward (65.5 MB of student logits) 2.19 -> 1.96 ms in the benchmark's rotation, the
// statistics sweep alone 1.36-1.57 -> 1.14-1.27 ms warm.
constexpr int64_t kPrefetch = 4 * kBlock;
// Loops over the rows of a group fully unrolled, so that each row's accumulators stay in registers.
#define MHD_UNROLL _Pragma("GCC unroll 16")

MHD_INLINE int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
MHD_INLINE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
template <class A> MHD_INLINE A clamp0(A x) { return x < 0 ? A(0) : x; }  // NaN passes

// Waking the thread team costs microseconds: small calls run on the calling thread.
MHD_INLINE int team(int threads, int64_t work) { return work < 32768 || threads < 1 ? 1 : threads; }

MHD_INLINE int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

MHD_INLINE int64_t dtype_size(int dtype) {
  return dtype == F64 || dtype == I64 ? 8 : dtype == F16 || dtype == BF16 || dtype == I16 ? 2 : dtype == BOOL ? 1 : 4;
}

// Elements of T that one thread's share of a Scratch takes for n of them: whole 128-byte
// blocks (two cache lines, the unit the adjacent-line prefetcher pulls), so that two threads
// never write the same line — a few keys of top-k state per thread in one line made two
// threads slower than one.
template <class T>
MHD_INLINE int64_t per_thread(int64_t n) {
  constexpr int64_t block = 128 / (int64_t)sizeof(T);
  return round_up(n, block);
}

// A heap buffer freed on scope exit (aligned for whole-vector access).
template <class T>
class Scratch {
 public:
  Scratch() = default;
  explicit Scratch(int64_t n) { reset(n); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(p_); }
  void reset(int64_t n) {
    std::free(p_);
    p_ = nullptr;
    if (n > 0) {
      p_ = static_cast<T*>(std::aligned_alloc(64, round_up(n * (int64_t)sizeof(T), 64)));
      if (p_ == nullptr) throw std::bad_alloc();
    }
  }
  T* data() const { return p_; }
  T& operator[](int64_t i) const { return p_[i]; }

 private:
  T* p_ = nullptr;
};

// Claims of the work of a parallel call: thread c owns chunk c of [0, T) (T·c/nt to
// T·(c + 1)/nt) and takes its items in order; a thread done with its own chunk takes the next
// items of the other chunks (each item claimed once, by an atomic counter per chunk, one per
// 128 bytes), so that a thread slowed by its core (a busy or just-woken vCPU ran a third slower
// than the other) holds the call back by an item at most, not by its whole share. The results
// of an item do not depend on the thread that runs it.
class Claims {
 public:
  Claims(int64_t T, int nt) : T_(T), nt_(nt), next_(nt * kLine) {
    for (int c = 0; c < nt; ++c) next_[c * kLine] = T * c / nt;
  }
  // body(item) for the items thread tid claims, its own chunk first.
  template <class F>
  MHD_INLINE void run(int tid, F&& body) {
    for (int k = 0; k < nt_; ++k) {
      const int c = (tid + k) % nt_;
      for (const int64_t end = T_ * (c + 1) / nt_;;) {
        const int64_t t = __atomic_fetch_add(&next_[c * kLine], 1, __ATOMIC_RELAXED);
        if (t >= end) break;
        body(t);
      }
    }
  }

 private:
  static constexpr int64_t kLine = 128 / sizeof(int64_t);
  int64_t T_;
  int nt_;
  Scratch<int64_t> next_;
};

// body(r, n, g, b, tid) for every row r = (n·G + g)·B + b of an [N, G, B] row space, on nt
// threads. The rows go in blocks (16 per thread's share, or single rows), claimed as Claims
// hands them out; a block steps (n, g, b) along without divisions. Each thread ends with a
// fence, so that rows it wrote by non-temporal stores are in memory when the call returns.
template <class F>
void for_rows(int64_t N, int64_t G, int64_t B, int nt, F&& body) {
  const int64_t R = N * G * B;
  if (R == 0) return;
  const int64_t per = min64(R, 16 * (int64_t)nt);  // blocks
  Claims claims(per, nt);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    claims.run(tid, [&](int64_t blk) {
      const int64_t r0 = R * blk / per, r1 = R * (blk + 1) / per;
      int64_t b = r0 % B, g = (r0 / B) % G, n = r0 / (B * G);
      for (int64_t r = r0; r < r1; ++r) {
        body(r, n, g, b, tid);
        if (++b == B) {
          b = 0;
          if (++g == G) {
            g = 0;
            ++n;
          }
        }
      }
    });
    fence();
  }
}

// body(tile, tid) for tiles [0, T) on nt threads, claimed as Claims hands them out. Each thread
// ends with a fence, as in for_rows.
template <class F>
void for_tiles(int64_t T, int nt, F&& body) {
  if (T == 0) return;
  Claims claims(T, nt);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id();
    claims.run(tid, [&](int64_t t) { body(t, tid); });
    fence();
  }
}

// ---- strided access --------------------------------------------------------------------------

MHD_INLINE int64_t offset(const View& v, int64_t n, int64_t g, int64_t b) {
  return n * v.stride[0] + g * v.stride[1] + b * v.stride[2];
}

template <class T>
MHD_INLINE T at(const View& v, int64_t n, int64_t g, int64_t b) {
  return static_cast<const T*>(v.data)[offset(v, n, g, b)];
}

// Row (n, g, b) of a [.., V] tensor, converted to A, into buf.
template <class A, class In>
MHD_INLINE void gather_typed(const void* data, int64_t off, int64_t stride, int64_t len, A* buf) {
  const In* p = static_cast<const In*>(data) + off;
  for (int64_t i = 0; i < len; ++i) buf[i] = to_acc<A>(p[i * stride]);
}

template <class A>
void gather_row(const View& v, int64_t off, int64_t len, A* buf) {
  switch (v.dtype) {
    case F32: return gather_typed<A, float>(v.data, off, v.stride[3], len, buf);
    case F16: return gather_typed<A, f16>(v.data, off, v.stride[3], len, buf);
    case BF16: return gather_typed<A, bf16>(v.data, off, v.stride[3], len, buf);
    default: return gather_typed<A, double>(v.data, off, v.stride[3], len, buf);
  }
}

// Row (n, g, b) as the kernel reads it: in place (In = the stored type), or gathered into buf
// (In = A) when the class dim is strided or the kernel runs in fp64.
template <class In, class A>
MHD_INLINE const In* row(const View& v, int64_t n, int64_t g, int64_t b, int64_t len, bool gather,
                         A* buf) {
  const int64_t off = offset(v, n, g, b);
  if (!gather) return static_cast<const In*>(v.data) + off;
  gather_row(v, off, len, buf);
  return reinterpret_cast<const In*>(buf);
}

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

template <class A>
MHD_INLINE void store_row(void* out, int dtype, int64_t v, typename Lanes<A>::V x, int n) {
  using L = Lanes<A>;
  switch (dtype) {
    case F32: L::store(static_cast<float*>(out) + v, x, n); break;
    case F16: L::store(static_cast<f16*>(out) + v, x, n); break;
    case BF16: L::store(static_cast<bf16*>(out) + v, x, n); break;
    default:
      if constexpr (Lanes<A>::W == 1) L::store(static_cast<double*>(out) + v, x, n);
      break;
  }
}

// n lanes of a gradient row at class v: by store_row, or with stream (out a row of A, 16-byte
// aligned) past the caches by non-temporal stores.
template <class A, class N>
MHD_INLINE void store_grad(void* out, int dtype, int64_t v, typename Lanes<A>::V x, N n, bool stream) {
  using L = Lanes<A>;
  if (!stream) store_row<A>(out, dtype, v, x, n);
  else if (n == L::W) L::stream(static_cast<A*>(out) + v, x);
  else L::stream(static_cast<A*>(out) + v, x, n);
}

template <class A>
MHD_INLINE void store_one(void* out, int dtype, int64_t v, A x) {
  switch (dtype) {
    case F32: static_cast<float*>(out)[v] = (float)x; break;
    case F16: static_cast<f16*>(out)[v].bits = float_to_half((float)x); break;
    case BF16: static_cast<bf16*>(out)[v].bits = float_to_bf16((float)x); break;
    default: static_cast<double*>(out)[v] = (double)x; break;
  }
}

// A bool known at compile time, for a generic lambda's branches (this file takes no std templates).
template <bool B>
struct Flag {
  static constexpr bool value = B;
};

// A lane count known at compile time: loads and stores of whole vectors then skip the tail test.
template <int N>
struct Whole {
  constexpr operator int() const { return N; }
};

// body(v, n) for the vectors of [begin, end): the whole ones with n = Whole<W>, then the partial
// tail with its lane count n < W.
template <int W, class F>
MHD_INLINE void for_vectors(int64_t begin, int64_t end, F&& body) {
  int64_t v = begin;
  for (; v + W <= end; v += W) body(v, Whole<W>{});
  if (v < end) body(v, (int)(end - v));
}

// ---- online softmax -------------------------------------------------------------------------

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
// mass = its whole mass, so only blocks holding sent classes read the bitmap: about 25 of
// S3's 63 blocks. A bitmap, not a row of 0/1 weights: 4 KB at V = 32000 stays in L1, where
// the weights (128 KB, from L2) had cost S3's forward 0.2-0.4 ms of 1.5-1.9.
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

// ---- rows of one block, R at a time ----------------------------------------------------------

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

// ---- short rows, W rows in the lanes of a vector ------------------------------------------------

// A row of one vector or a little more (V <= W + kLaneExtra) is a short sweep between
// reductions: its max, its sum and its KL are each a horizontal reduction, with a log and a
// division between them, so the row path spends most of such a row in reduction trees and
// scalar tails (S2, V = 10: ~210 cycles a teacher-and-student pair of rows). By lanes, lane l
// of a vector holds row l of W consecutive rows of one client and vector v holds class v
// (gathered), so that a reduction is lane-wise operations for W rows at once and one vector
// log serves W rows. Past W + kLaneExtra classes the gathers cost more than the reductions
// they save: S2's kernel with V classes, warm, row path -> by lanes (ms): AVX-512 V = 10
// 1.04 -> 0.68, 17 1.49 -> 1.18, 20 1.37 -> 1.13, 24 1.46 -> 1.53, 32 1.27 -> 1.91; AVX2
// V = 10 1.28 -> 0.86, 12 1.34 -> 0.97, 16 1.20 -> 1.15; portable (4 lanes) V = 5
// 3.93 -> 1.02, 8 1.68 -> 1.19.
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
// ahead is asked for first (S2, A/B in one process, warm / right after the naive loop:
// 0.836 / 1.411 -> 0.709 / 0.840 ms; two, four and eight ahead alike).
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

// ---- candidates and aggregation ---------------------------------------------------------------

// The candidate teachers of every client as lists (CSR), built once per call from adj:
// j with adj[i, j] (j ≠ i), plus i itself when include_self; ascending j.
class Candidates {
 public:
  void build(const View& adj, bool include_self) {
    // Rows of adj counted, then listed, without a branch per entry: the count loop vectorizes
    // where adj's rows are contiguous (S2, N = 256: three builds instead of one added 0.21 ms
    // to the kernel with a branch per entry, 0.02-0.06 ms this way).
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

// Whether T is float (this file takes no std templates).
template <class T>
struct IsF32 {
  static constexpr bool value = false;
};
template <>
struct IsF32<float> {
  static constexpr bool value = true;
};

// ---- packets against short rows, by lanes ------------------------------------------------------

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

// ---- the distillation loss, forward and backward ----------------------------------------------

// Per student row (i, g, b), teacher rows (j, g, b):
//   max_confidence, dense:   one sweep (kl_row / grad_row) over the student row and the row of
//                            the selected teacher j = idx[i, g, b].
//   max_confidence, packets: KL over K + 1 buckets (SPEC §3): the K sent buckets and the rest
//                            bucket p_rest = max(0, 1 − Σ p_k), q_rest = 1 − Σ q_k (none when
//                            K = V). q_rest is summed over the unsent classes in the student
//                            sweep (row_lse with weights), which is the same number without the
//                            cancellation of 1 − Σ q_k when the student's mass sits in the sent
//                            classes. Backward: g·τ·(q_v − p_v) for sent v, g·τ·q_v·(1 −
//                            p_rest/q_rest) for the others (the ratio is 0 when p_rest = 0),
//                            from one exp sweep that keeps q in a row buffer.
//   mean / confidence_weighted: p̄ into a per-thread buffer (aggregate_logits /
//                            aggregate_packets), then the dense sweep against p̄.
// loss = τ²·KL; backward dz = g·τ·(q − p). Clients with no candidate: loss 0, dz 0.
template <class A, class ZIn, class TIn>
void distill(const DistillArgs& a, const DistillOut& out, bool gather, bool backward) {
  using L = Lanes<A>;
  const int64_t N = a.z.size[0], G = a.z.size[1], B = a.z.size[2], V = a.z.size[3];
  const Scale<A> sc(a.tau);
  const A tau = (A)a.tau;
  const bool aggregated = a.aggregate != MAX_CONFIDENCE;
  Candidates cand;
  if (aggregated) cand.build(a.adj, a.include_self);
  const int64_t vpad = round_up(V, L::W);
  // Per thread: the student row, a teacher row, p̄ (or the student's q); with packets, the
  // sent classes per block and the bitmap of sent classes (SentRow).
  const int64_t kpad = a.packets ? round_up(a.values.size[3], L::W) : 0;
  const int64_t share = per_thread<A>(3 * vpad + 3 * kpad);
  const int nt = team(a.threads, N * G * B * V);
  Scratch<A> scratch(nt * share);
  const int64_t count_share = per_thread<int32_t>(V / kBlock + 1);
  const int64_t bit_share = per_thread<uint8_t>(V / 8 + 2);
  Scratch<int32_t> counts(a.packets ? nt * count_share : 0);
  Scratch<uint8_t> sent_bitmap(a.packets ? nt * bit_share : 0);
  if (a.packets) {
    std::memset(counts.data(), 0, nt * count_share * sizeof(int32_t));
    std::memset(sent_bitmap.data(), 0, nt * bit_share);
  }
  A* loss = static_cast<A*>(out.loss);
  A* lse_out = static_cast<A*>(out.lse_z);
  char* dz = static_cast<char*>(out.dz);
  const int64_t row_bytes = V * dtype_size(a.z.dtype);
  // A gradient of A larger than the caches goes past them (as in distill_dense): no line is
  // read for ownership first, which at V = 32000 had cost a second pass over memory.
  const bool stream = backward && a.z.dtype == (sizeof(A) == 4 ? F32 : F64) &&
                      streamable(dz, out.dz_stride, sizeof(A), N * G * B * row_bytes);

  const auto row_body = [&](int64_t r, int64_t n, int64_t g, int64_t b, int tid) {
    A* zbuf = scratch.data() + tid * share;
    A* tbuf = zbuf + vpad;
    A* pbuf = tbuf + vpad;
    int32_t* in_block = a.packets ? counts.data() + tid * count_share : nullptr;
    uint8_t* bits = a.packets ? sent_bitmap.data() + tid * bit_share : nullptr;
    const ZIn* z = row<ZIn>(a.z, n, g, b, V, gather, zbuf);
    const int64_t j = at<int64_t>(a.idx, n, g, b);
    void* dz_row = backward
        ? dz + (n * out.dz_stride[0] + g * out.dz_stride[1] + b * out.dz_stride[2]) * dtype_size(a.z.dtype)
        : nullptr;
    const auto finish = [&](const auto& teacher) {
      if (backward) {
        grad_row(z, V, sc, teacher, at<A>(a.lse_z, n, g, b), at<A>(a.grad, n, g, b) * tau, dz_row, a.z.dtype,
                 stream);
      } else {
        A kl, lse;
        kl_row(z, V, sc, teacher, kl, lse);
        loss[r] = tau * tau * kl;
        lse_out[r] = lse;
      }
    };

    if (aggregated ? cand.count(n) == 0 : j < 0) {
      if (backward) {
        std::memset(dz_row, 0, row_bytes);
      } else {
        A m, lse;
        row_lse(z, V, sc, m, lse);
        loss[r] = 0;
        lse_out[r] = lse;
      }
    } else if (aggregated) {
      if (a.packets) aggregate_packets(a, cand, n, g, b, V, pbuf, pbuf + vpad);
      else aggregate_logits<A, TIn>(a, cand, n, g, b, V, sc, gather, tbuf, pbuf);
      finish(ProbTeacher<A>{pbuf});
    } else if (!a.packets) {
      const TIn* t = row<TIn>(a.t, j, g, b, V, gather, tbuf);
      finish(LogitTeacher<A, TIn>{t, sc, at<A>(a.lse_t, j, g, b)});
    } else {
      const int64_t K = a.values.size[3];
      const bool rest = K < V;
      if (rest) mark_sent(a, j, g, b, bits, in_block, true);
      A lse_z, log_q_rest = 0, q_rest = 0;
      if (!backward) {
        A m;
        const SentRow sent{bits, in_block};
        row_lse(z, V, sc, m, lse_z, rest ? &sent : nullptr, &log_q_rest);
      } else {
        // q_v into pbuf, and q_rest summed over the unsent classes in the same sweep; as in
        // row_lse, only blocks that hold a sent class read the bitmap (log q <= 0 up to
        // rounding, so 2^y needs no clamp from above).
        lse_z = at<A>(a.lse_z, n, g, b);
        const typename L::V log2e = L::splat(A(kLog2e));
        typename L::V acc = L::splat(0);
        for (int64_t blk = 0; blk < V; blk += kBlock) {
          const int64_t end = min64(V, blk + kBlock);
          const auto sweep = [&](auto weighted) {
            for_vectors<L::W>(blk, end, [&](int64_t v, auto w) MHD_INLINE_BODY {
              const auto q = L::exp2_nonpos((sc(L::load(z + v, w, -kInf)) - lse_z) * log2e);
              L::store(pbuf + v, q, L::W);
              if constexpr (decltype(weighted)::value) acc = L::add_unsent(acc, q, sent_bits<L::W>(bits, v));
              else acc += q;
            });
          };
          if (rest && in_block[blk / kBlock] != 0) sweep(Flag<true>{});
          else sweep(Flag<false>{});
        }
        q_rest = L::sum(acc);
      }
      if (rest) mark_sent(a, j, g, b, bits, in_block, false);
      double P, S;
      packet_sums(a, j, g, b, z, sc, lse_z, pbuf + vpad, P, S);
      const double p_rest = clamp0(1.0 - P);
      if (!backward) {
        if (rest && p_rest != 0) S += p_rest * (rest_log<A>(p_rest) - (double)log_q_rest);
        loss[r] = (A)((double)tau * tau * S);
        lse_out[r] = lse_z;
      } else {
        const A gs = at<A>(a.grad, n, g, b) * tau;
        const A unsent = gs * (rest && p_rest != 0 ? A(1 - p_rest / q_rest) : A(1));
        for_vectors<L::W>(0, V, [&](int64_t v, auto w) MHD_INLINE_BODY {
          store_grad<A>(dz_row, a.z.dtype, v, unsent * L::load(pbuf + v, w, 0), w, stream);
        });
        if (stream) fence();  // the sent classes below overwrite streamed lines: after them
        const int32_t* ind = static_cast<const int32_t*>(a.indices.data) + offset(a.indices, j, g, b);
        const A* p = pbuf + vpad + 2 * kpad;  // packet_sums's p_k = e^(value_k − lse_t)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t v = ind[k * a.indices.stride[3]];
          store_one<A>(dz_row, a.z.dtype, v, gs * (pbuf[v] - p[k]));
        }
      }
    }
  };
  if constexpr (IsF32<A>::value && IsF32<ZIn>::value) {
    if (a.packets && !gather && V <= L::W + kLaneExtra && B >= L::W && a.z.stride[3] == 1 &&
        a.z.stride[2] == V && a.values.dtype == F32 && a.indices.dtype == I32 &&
        (!backward || out.dz_stride[2] == V) && gather_reach(a.values) && gather_reach(a.indices) &&
        gather_reach(a.lse_t))
      return distill_packet_lanes(a, out, backward, nt, stream, cand, row_body);
  }
  for_rows(N, G, B, nt, row_body);
}

// ---- the whole dense loss in one launch ---------------------------------------------------------

// Rows b per tile of distill_dense: the tile's N·bb teacher rows in about 128 KiB (with their
// softmax terms, a share of the L2 cache) so that the loss finds them there after the
// statistics, and at least 4 tiles
// per thread when the rows allow it.
MHD_INLINE int64_t tile_rows(int64_t N, int64_t G, int64_t B, int64_t row_bytes, int nt) {
  const int64_t per_b = N * row_bytes;
  int64_t bb = per_b > 0 ? (int64_t(128) << 10) / per_b : B;
  bb = bb < 1 ? 1 : bb > B ? B : bb;
  while (bb > 1 && G * ((B + bb - 1) / bb) < 4 * (int64_t)nt) bb = (bb + 1) / 2;
  return bb;
}

// Teacher statistics, teacher choice, loss and (when out.grad is set) the unit gradient
// τ(q − p̄) of every student row for a dense teacher, any aggregate, in one launch. The row
// space is cut into tiles of one group g and a block of rows b across all N clients; a tile
// computes the statistics of its N·bb teacher rows, chooses the teachers of its rows, then runs
// its N·bb student rows against teacher rows it has just read (from cache), so T crosses memory
// once instead of twice, and the gradient comes from the loss's own sweep instead of a second
// pass over Z and T. Every row goes through the same row functions as teacher_stats, select and
// distill, so all outputs are bit-identical to theirs (the gradient to distill's backward at
// grad = 1). Heads of out.grad outside [head_offset, head_offset + G) are zero-filled. Rows of
// one block run kRows at a time (rows_lse_kept, kl_sweep_rows).
template <int kRows, bool kByLanes, class A, class ZIn, class TIn>
void distill_dense_rows(DistillArgs a, const FusedOut& out, bool gather) {
  using L = Lanes<A>;
  const int64_t N = a.z.size[0], G = a.z.size[1], B = a.z.size[2], V = a.z.size[3];
  const Scale<A> sc(a.tau);
  const A tau = (A)a.tau;
  const bool aggregated = a.aggregate != MAX_CONFIDENCE;
  A* lse_t = static_cast<A*>(out.lse_t);
  A* logconf = static_cast<A*>(out.logconf_t);
  A* loss = static_cast<A*>(out.loss);
  A* lse_z = static_cast<A*>(out.lse_z);
  int64_t* idx = out.idx;
  // The statistics this kernel writes are what the aggregation reads.
  a.lse_t.data = lse_t;
  a.logconf_t.data = logconf;
  const auto rows_view = [&](View& v) {
    v.size[0] = N, v.size[1] = G, v.size[2] = B, v.size[3] = 1;
    v.stride[0] = G * B, v.stride[1] = B, v.stride[2] = 1, v.stride[3] = 0;
  };
  rows_view(a.lse_t);
  rows_view(a.logconf_t);
  Candidates cand;
  cand.build(a.adj, a.include_self);
  const int nt = team(a.threads, N * G * B * V);
  char* grad = static_cast<char*>(out.grad);
  const int64_t vpad = round_up(V, L::W);
  // W rows at a time in the lanes of a vector (lanes_lse): fp32 rows of up to W + kLaneExtra
  // classes in place, W consecutive rows b of a client adjacent in Z, T and the gradient; tiles
  // of whole blocks of W rows.
  bool by_lanes = kByLanes && !gather && V <= L::W + kLaneExtra && B >= L::W &&
                  a.z.stride[3] == 1 && a.z.stride[2] == V && a.t.stride[3] == 1 && a.t.stride[2] == V &&
                  (grad == nullptr || (out.grad_dtype == F32 && out.grad_stride[2] == V));
  int64_t bb = tile_rows(N, G, B, V * dtype_size(a.t.dtype), nt);
  if (by_lanes) bb = bb < L::W ? L::W : bb / L::W * L::W;
  by_lanes = by_lanes && N * bb * vpad < (int64_t(1) << 31);  // the gathers' indices are int32
  const int64_t nb = B == 0 ? 0 : (B + bb - 1) / bb;
  // Rows of one block keep their softmax terms: the teachers' for the whole tile (a teacher row
  // serves every client that chose it: with max_confidence on a dense graph most of them), the
  // student's for its own row.
  const bool keep = V <= kBlock;
  const int64_t kept = keep ? N * bb : 0;
  // Per thread: the student row, a teacher row, p̄, the student's terms, the running best
  // logconf of the tile's rows, then the teachers' terms and 1/s of the tile's N·bb rows.
  // Rows of one block in place run kRows at a time (rows_lse_kept, kl_sweep_rows).
  const bool grouped = keep && !gather && L::W > 1;
  // By lanes, the terms' space holds the teachers' p and a second one their log p, then the
  // gradient of W rows by class.
  const int64_t share =
      per_thread<A>((2 + 2 * kRows) * vpad + bb + kept * (vpad + 1) + (by_lanes ? kept * vpad + vpad * L::W : 0));
  Scratch<A> scratch(nt * share);
  // rows_in: lane_rows_index; lane i of rows_out[k] the class-major [V, W] element that goes to
  // element k·W + i of the W rows.
  vi rows_in[L::W + kLaneExtra], rows_out[L::W + kLaneExtra];
  if (by_lanes) {
    lane_rows_index(V, rows_in);
    lane_rows_out_index(V, rows_out);
  }
  const int64_t gsize = dtype_size(out.grad_dtype);
  const auto grad_row_ptr = [&](int64_t n, int64_t h, int64_t b) -> void* {
    return grad + (n * out.grad_stride[0] + h * out.grad_stride[1] + b * out.grad_stride[2]) * gsize;
  };

  // A gradient larger than the caches (MHD_STREAM_BYTES) is written past them, row by row where
  // each row starts 16-byte aligned: no line is read for ownership first, a quarter of the
  // launch's memory traffic at small V.
  const bool stream = streamable(grad, out.grad_stride, gsize, N * out.heads * B * V * gsize);
  for_tiles(G * nb, nt, [&](int64_t tile, int tid) {
    const int64_t g = tile / nb, b0 = (tile % nb) * bb, b1 = min64(B, b0 + bb), nbb = b1 - b0;
    A* zbuf = scratch.data() + tid * share;
    A* tbuf = zbuf + vpad;
    A* pbuf = tbuf + vpad;               // kRows rows
    A* qbuf = pbuf + kRows * vpad;       // kRows rows
    A* best = qbuf + kRows * vpad;
    A* terms = best + bb;                // [N, bb, vpad]
    A* inv_s = terms + kept * vpad;      // [N, bb]
    const auto slot = [&](int64_t n, int64_t b) { return n * bb + (b - b0); };
    const auto row_t = [&](int64_t n, int64_t b) { return row<TIn>(a.t, n, g, b, V, gather, tbuf); };
    const auto row_z = [&](int64_t n, int64_t b) { return row<ZIn>(a.z, n, g, b, V, gather, zbuf); };
    const auto dz_of = [&](int64_t n, int64_t b) -> void* {
      return grad != nullptr ? grad_row_ptr(n, out.head_offset + g, b) : nullptr;
    };
    const auto put_stats = [&](int64_t n, int64_t b, A m, A l, A sum) {
      const int64_t r = (n * G + g) * B + b;
      lse_t[r] = l;
      logconf[r] = m - l;
      if (keep) inv_s[slot(n, b)] = A(1) / sum;
    };
    // By lanes (a tile of whole blocks of W rows): the statistics of W teacher rows at a time,
    // and for each teacher row its p = e·(1/s) and log p = t/τ − lse by class, [N, nblk, V, W],
    // for the students' gathers; aggregated, its terms e by class and 1/s [N, nblk, W] instead,
    // for the mixtures (kept_mixture).
    constexpr int W = L::W;
    const bool lanes = by_lanes && nbb % W == 0;
    const int64_t nblk = nbb / W;
    A* lane_p = terms;
    A* lane_lp = terms + kept * vpad;
    A* lane_g = lane_lp + kept * vpad;  // [V, W]: the gradient of a block's W rows by class
    // Block (n, b) of W rows of x by class into xv, and its statistics (lanes_lse); the block
    // kAhead clients ahead asked for first.
    const auto lanes_block = [&](const View& x, int64_t n, int64_t b, auto* xv, auto* e, auto& m_out, auto& lse,
                                 auto& s) {
      const float* data = static_cast<const float*>(x.data);
      if (n + kAhead < N) prefetch_block(data + offset(x, n + kAhead, g, b), W * V);
      for (int64_t v = 0; v < V; ++v) xv[v] = gather_lanes(data + offset(x, n, g, b), rows_in[v]);
      lanes_lse<A>(xv, V, sc, e, m_out, lse, s);
    };
    if constexpr (kByLanes) {
      if (lanes) {
        using Vec = typename L::V;
        Vec x[W + kLaneExtra], e[W + kLaneExtra], m_out, lse, s;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < nblk; ++k) {
            const int64_t b = b0 + k * W, r = (n * G + g) * B + b;
            lanes_block(a.t, n, b, x, e, m_out, lse, s);
            L::store(lse_t + r, lse);
            L::store(logconf + r, m_out - lse);
            const Vec inv_s = L::splat(A(1)) / s;
            A* p = lane_p + (n * nblk + k) * V * W;
            if (aggregated) {
              for (int64_t v = 0; v < V; ++v) L::store(p + v * W, e[v]);
              L::store(lane_lp + (n * nblk + k) * W, inv_s);
              continue;
            }
            A* lp = lane_lp + (n * nblk + k) * V * W;
            for (int64_t v = 0; v < V; ++v) {
              L::store(p + v * W, e[v] * inv_s);
              L::store(lp + v * W, sc(x[v]) - lse);
            }
          }
      }
    }
    // statistics (teacher_stats); rows of one block kRows at a time (rows_lse_kept)
    int64_t i = lanes ? N * nbb : 0;
    if (grouped)
      for (; i + kRows <= N * nbb; i += kRows) {
        const TIn* x[kRows];
        A* kp[kRows];
        int64_t ns[kRows], bs[kRows];
        A m[kRows], l[kRows], sum[kRows];
        for (int k = 0; k < kRows; ++k) {
          ns[k] = (i + k) / nbb, bs[k] = b0 + (i + k) % nbb;
          x[k] = row_t(ns[k], bs[k]);
          kp[k] = terms + slot(ns[k], bs[k]) * vpad;
        }
        rows_lse_kept<kRows>(x, V, sc, m, l, kp, sum);
        for (int k = 0; k < kRows; ++k) put_stats(ns[k], bs[k], m[k], l[k], sum[k]);
      }
    for (; i < N * nbb; ++i) {
      const int64_t n = i / nbb, b = b0 + i % nbb;
      A m, l, sum;
      row_lse(row_t(n, b), V, sc, m, l, static_cast<const SentRow*>(nullptr), static_cast<A*>(nullptr), NoFeed{},
              keep ? terms + slot(n, b) * vpad : nullptr, &sum);
      put_stats(n, b, m, l, sum);
    }
    for (int64_t c = 0; c < N; ++c)  // teacher choice (select)
      choose(cand, c, [&](int64_t j) -> const A* { return logconf + (j * G + g) * B; }, 1, b0, b1, best,
             idx + (c * G + g) * B);
    // loss and unit gradient (distill)
    const auto finish = [&](int64_t r, const ZIn* z, void* dz, const auto& teacher) {
      A kl, l;
      if (dz != nullptr) kl_grad_row(z, V, sc, teacher, tau, kl, l, dz, out.grad_dtype, qbuf, stream);
      else kl_row(z, V, sc, teacher, kl, l);
      loss[r] = tau * tau * kl;
      lse_z[r] = l;
    };
    const auto no_teacher = [&](int64_t r, const ZIn* z, void* dz) {
      A m, l;
      row_lse(z, V, sc, m, l);
      loss[r] = 0;
      lse_z[r] = l;
      if (dz != nullptr) std::memset(dz, 0, V * gsize);
    };
    const auto has_teacher = [&](int64_t n, int64_t r) { return aggregated ? cand.count(n) != 0 : idx[r] >= 0; };
    // p̄ = Σ_j w_j p_j from the candidates' kept terms, p_j = e_j·(1/s_j), into p
    const auto kept_mixture = [&](int64_t n, int64_t b, A* p) {
      const Weights<A> weight(a.logconf_t, a.aggregate, cand, n, g, b);
      for (int64_t v = 0; v < vpad; v += L::W) L::store(p + v, L::splat(0), L::W);
      for (const int64_t* c = cand.begin(n); c != cand.end(n); ++c) {
        const typename L::V w = L::splat(weight(*c) * inv_s[slot(*c, b)]);
        const A* e = terms + slot(*c, b) * vpad;
        for (int64_t v = 0; v < vpad; v += L::W)
          L::store(p + v, L::load(p + v, L::W, 0) + w * L::load(e + v, L::W, 0), L::W);
      }
    };
    const auto kept_teacher = [&](int64_t r, int64_t b) {
      const int64_t j = idx[r];
      return KeptTeacher<A, TIn>{row_t(j, b), sc, lse_t[(j * G + g) * B + b], terms + slot(j, b) * vpad,
                                 inv_s[slot(j, b)]};
    };
    if (lanes) {
      // W students at a time against their teachers' p and log p, gathered by lane; aggregated,
      // against p̄ = Σ_j w_j·(1/s_j)·e_j over the client's candidates, as kept_mixture sums it
      if constexpr (kByLanes) {
        using Vec = typename L::V;
        Vec x[W + kLaneExtra], e[W + kLaneExtra], acc[W + kLaneExtra], m_out, lse, s;
        const Vec zero = L::splat(0), tau2 = L::splat(tau * tau), gs = L::splat(tau);
        vi iota;
        for (int l = 0; l < W; ++l) iota[l] = l;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t k = 0; k < nblk; ++k) {
            const int64_t b = b0 + k * W, r = (n * G + g) * B + b;
            lanes_block(a.z, n, b, x, e, m_out, lse, s);
            vi j;
            for (int l = 0; l < W; ++l) j[l] = aggregated ? (cand.count(n) == 0 ? -1 : 0) : (int32_t)idx[r + l];
            const vi none = j < 0;  // no candidate: loss 0, gradient 0
            const Vec inv_s = L::splat(A(1)) / s;
            if (aggregated) {
              Vec total = zero;  // Weights: |C|, or Σ_C e^logconf in the candidates' order
              if (a.aggregate == MEAN) total = L::splat((A)cand.count(n));
              else
                for (const int64_t* c = cand.begin(n); c != cand.end(n); ++c)
                  for (int l = 0; l < W; ++l) total[l] += sexp(logconf[(*c * G + g) * B + b + l]);
              Vec pbar[W + kLaneExtra];
              for (int64_t v = 0; v < V; ++v) pbar[v] = zero;
              for (const int64_t* c = cand.begin(n); c != cand.end(n); ++c) {
                Vec w = L::splat(A(1));
                if (a.aggregate != MEAN)
                  for (int l = 0; l < W; ++l) w[l] = sexp(logconf[(*c * G + g) * B + b + l]);
                w = w / total * L::load(lane_lp + (*c * nblk + k) * W);
                const A* ec = lane_p + (*c * nblk + k) * V * W;
                for (int64_t v = 0; v < V; ++v) pbar[v] = pbar[v] + w * L::load(ec + v * W);
              }
              for (int64_t v = 0; v < V; ++v) {
                const Vec p = none ? zero : pbar[v];
                acc[v] = p != zero ? p * (L::log(p) - (sc(x[v]) - lse)) : zero;
                if (grad != nullptr) L::store(lane_g + v * W, none ? zero : gs * (e[v] * inv_s - p));
              }
            } else {
              const vi at = ((none ? splat_i(0) : j) * (int32_t)nblk + (int32_t)k) * (int32_t)(V * W) + iota;
              for (int64_t v = 0; v < V; ++v) {
                const vi at_v = at + (int32_t)(v * W);
                const Vec p = none ? zero : gather_lanes(lane_p, at_v);
                acc[v] = p != zero ? p * (gather_lanes(lane_lp, at_v) - (sc(x[v]) - lse)) : zero;
                if (grad != nullptr) L::store(lane_g + v * W, none ? zero : gs * (e[v] * inv_s - p));
              }
            }
            const Vec kl = lane_tree<L>(acc, V, zero, [](auto u, auto w) MHD_INLINE_BODY { return u + w; });
            L::store(loss + r, tau2 * kl);
            L::store(lse_z + r, lse);
            if (grad != nullptr) put_lane_rows(static_cast<float*>(dz_of(n, b)), lane_g, rows_out, V, stream);
          }
      }
    } else if (grouped) {
      // The student rows with a teacher kRows at a time (kl_sweep_rows); teacher_of(n, b, r, k)
      // gives row r's teacher, p̄ built in pbuf row k when aggregated.
      const auto by_rows = [&](auto teacher_of) {
        using Teacher = decltype(teacher_of(0, 0, 0, 0));
        const ZIn* zs[kRows];
        void* ds[kRows];
        int64_t rs[kRows];
        Teacher ts[kRows];
        int k = 0;
        const auto flush = [&] {
          if (k == kRows) {
            A kl[kRows], l[kRows];
            if (grad != nullptr) kl_sweep_rows<true>(zs, V, sc, ts, tau, kl, l, ds, out.grad_dtype, qbuf, stream);
            else kl_sweep_rows<false>(zs, V, sc, ts, tau, kl, l, ds, out.grad_dtype, qbuf, stream);
            for (int q = 0; q < kRows; ++q) loss[rs[q]] = tau * tau * kl[q], lse_z[rs[q]] = l[q];
          } else {
            for (int q = 0; q < k; ++q) finish(rs[q], zs[q], ds[q], ts[q]);
          }
          k = 0;
        };
        for (int64_t n = 0; n < N; ++n)
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t r = (n * G + g) * B + b;
            if (!has_teacher(n, r)) {
              no_teacher(r, row_z(n, b), dz_of(n, b));
              continue;
            }
            zs[k] = row_z(n, b), ds[k] = dz_of(n, b), rs[k] = r;
            ts[k] = teacher_of(n, b, r, k);
            if (++k == kRows) flush();
          }
        flush();
      };
      if (aggregated) by_rows([&](int64_t n, int64_t b, int64_t, int k) {
        kept_mixture(n, b, pbuf + k * vpad);
        return ProbTeacher<A>{pbuf + k * vpad};
      });
      else by_rows([&](int64_t, int64_t b, int64_t r, int) { return kept_teacher(r, b); });
    } else {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r = (n * G + g) * B + b;
          const ZIn* z = row_z(n, b);
          void* dz = dz_of(n, b);
          if (!has_teacher(n, r)) {
            no_teacher(r, z, dz);
          } else if (aggregated) {
            if (keep) kept_mixture(n, b, pbuf);
            else aggregate_logits<A, TIn>(a, cand, n, g, b, V, sc, gather, tbuf, pbuf);
            finish(r, z, dz, ProbTeacher<A>{pbuf});
          } else if (keep) {
            finish(r, z, dz, kept_teacher(r, b));
          } else {
            const int64_t j = idx[r];
            finish(r, z, dz, LogitTeacher<A, TIn>{row_t(j, b), sc, lse_t[(j * G + g) * B + b]});
          }
        }
    }
    if (grad != nullptr) {  // the heads that do not learn: zeros, client n's by the tiles of group n mod G
      for (int64_t n = g; n < N; n += G)
        for (int64_t h = 0; h < out.heads; ++h)
          if (h < out.head_offset || h >= out.head_offset + G)
            for (int64_t b = b0; b < b1; ++b) {
              A* d = static_cast<A*>(grad_row_ptr(n, h, b));
              if (stream) for_vectors<L::W>(0, V, [&](int64_t v, auto w) MHD_INLINE_BODY {
                if (w == L::W) L::stream(d + v, L::splat(0));
                else L::stream(d + v, L::splat(0), w);
              });
              else std::memset(d, 0, V * gsize);
            }
    }
  });
}

// distill_dense_rows with fp32 rows of one vector (V <= W) eight at a time, others four: a row of
// one vector is a few operations between its reductions, and with four in flight the core
// waited on their tails (S2, V = 10: the kernel 8-12 % faster with eight, bit for bit the same
// results); a row of several vectors keeps the accumulators of eight rows in too few registers
// (S1, V = 100: eight slower). fp32 rows of up to W + kLaneExtra classes go by lanes where a
// tile allows it. fp16 / bf16 inputs keep the row path four at a time: more instantiations for
// every pair of stored types would double the build's time.
template <class A, class ZIn, class TIn>
void distill_dense(DistillArgs a, const FusedOut& out, bool gather) {
  if constexpr (IsF32<A>::value && IsF32<ZIn>::value && IsF32<TIn>::value) {
    if (a.z.size[3] <= Lanes<A>::W) return distill_dense_rows<8, true, A, ZIn, TIn>(a, out, gather);
    if (a.z.size[3] <= Lanes<A>::W + kLaneExtra) return distill_dense_rows<4, true, A, ZIn, TIn>(a, out, gather);
  }
  distill_dense_rows<4, false, A, ZIn, TIn>(a, out, gather);
}

// ---- teacher statistics and selection ----------------------------------------------------------

// Per teacher row: lse = logsumexp(T/τ), logconf = max(T/τ) − lse (the log of the confidence
// max_v softmax(T/τ)_v), from one online sweep.
template <class A, class TIn>
void teacher_stats(const View& t, double tau, A* lse, A* logconf, int threads, bool gather) {
  const int64_t N = t.size[0], G = t.size[1], B = t.size[2], V = t.size[3];
  const Scale<A> sc(tau);
  const int nt = team(threads, N * G * B * V);
  const int64_t share = per_thread<A>(V);
  Scratch<A> scratch(gather ? nt * share : 0);
  for_rows(N, G, B, nt, [&](int64_t r, int64_t n, int64_t g, int64_t b, int tid) {
    A m, l;
    row_lse(row<TIn>(t, n, g, b, V, gather, scratch.data() + (gather ? tid * share : 0)), V, sc, m, l);
    lse[r] = l;
    logconf[r] = m - l;
  });
}

// Per (i, g, b): the candidate j with the largest logconf[j, g, b] (choose). Work items are
// (i, g), each choosing for all B rows.
template <class A>
void select(const View& logconf, const View& adj, bool include_self, int64_t* idx, bool* has, int threads) {
  const int64_t N = logconf.size[0], G = logconf.size[1], B = logconf.size[2];
  Candidates cand;
  cand.build(adj, include_self);
  for (int64_t i = 0; i < N; ++i) has[i] = cand.count(i) > 0;
  const int nt = team(threads, N * G * B * (cand.count(0) + 1));
  const int64_t share = per_thread<A>(B);
  Scratch<A> scratch(nt * share);
  const A* lc = static_cast<const A*>(logconf.data);
  const int64_t sj = logconf.stride[0], sg = logconf.stride[1], sb = logconf.stride[2];
  for_rows(N, G, 1, nt, [&](int64_t, int64_t i, int64_t g, int64_t, int tid) {
    choose(cand, i, [&](int64_t j) { return lc + j * sj + g * sg; }, sb, 0, B, scratch.data() + tid * share,
           idx + (i * G + g) * B);
  });
}

// ---- top-k compression -------------------------------------------------------------------------

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
// of the k kept keys. Measured on rows of 20 to 200 classes, 20,480 rows: with AVX-512 (a
// compare gives a lane mask to count directly) the ranks win from k ≈ V²/2048 on (V = 100:
// k >= 5; V = 200: k >= 20; V <= 45 always; k = 32 of V = 100: 4.5 ms against 11.4 ms); with
// AVX2 from k ≈ V²/600 (k = 32 of V = 100: 7.6 against 11.9 ms). The portable build (4 lanes,
// no unsigned compare in SSE2) keeps the ranks for V <= 16 only: k = 32 of V = 100 took 89 ms.
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

// ---- zero rows -----------------------------------------------------------------------------------

// Every row of X [N, H, B, V] (class dim contiguous) set to +0, on the threads: fp32 rows that
// start 16-byte aligned, in a tensor larger than the caches, by non-temporal stores (no line is
// read for ownership first: half the memory traffic of a memset, which is what torch's zero_
// costs), the others by memset. The heads of a gradient that do not learn.
inline void zero_rows_entry(const View& x, int threads) {
  using L = Lanes<float>;
  const int64_t N = x.size[0], H = x.size[1], B = x.size[2], V = x.size[3];
  const int64_t es = dtype_size(x.dtype);
  char* base = static_cast<char*>(x.data);
  const bool stream = x.dtype == F32 && streamable(base, x.stride, es, N * H * B * V * es);
  for_rows(N, H, B, team(threads, N * H * B * V), [&](int64_t, int64_t n, int64_t h, int64_t b, int) {
    char* row = base + (n * x.stride[0] + h * x.stride[1] + b * x.stride[2]) * es;
    if (!stream) return (void)std::memset(row, 0, V * es);
    float* d = reinterpret_cast<float*>(row);
    for_vectors<L::W>(0, V, [&](int64_t v, auto w) MHD_INLINE_BODY {
      if (w == L::W) L::stream(d + v, L::splat(0));
      else L::stream(d + v, L::splat(0), w);
    });
  });
}

// ---- dtype dispatch ------------------------------------------------------------------------------

// The fp32 path reads fp32 / fp16 / bf16 logits in place; fp64 (and any strided class dim)
// gathers rows into A first, so those cases share one instantiation.
template <class F>
MHD_INLINE void with_stored_type(int dtype, F&& f) {
  switch (dtype) {
    case F16: f(f16{}); break;
    case BF16: f(bf16{}); break;
    default: f(float{}); break;
  }
}

inline void teacher_stats_entry(const View& t, double tau, int acc, void* lse, void* logconf, int threads) {
  if (acc == F64)
    return teacher_stats<double, double>(t, tau, (double*)lse, (double*)logconf, threads, true);
  if (t.stride[3] != 1)
    return teacher_stats<float, float>(t, tau, (float*)lse, (float*)logconf, threads, true);
  with_stored_type(t.dtype, [&](auto tag) {
    teacher_stats<float, decltype(tag)>(t, tau, (float*)lse, (float*)logconf, threads, false);
  });
}

inline void select_entry(const View& logconf, const View& adj, bool include_self, int64_t* idx, bool* has,
                         int threads) {
  if (logconf.dtype == F64) select<double>(logconf, adj, include_self, idx, has, threads);
  else select<float>(logconf, adj, include_self, idx, has, threads);
}

inline void distill_entry(const DistillArgs& a, int acc, const DistillOut& out, bool backward) {
  if (acc == F64) return distill<double, double, double>(a, out, true, backward);
  if (a.z.stride[3] != 1 || (!a.packets && a.t.stride[3] != 1))
    return distill<float, float, float>(a, out, true, backward);
  with_stored_type(a.z.dtype, [&](auto z_tag) {
    using ZIn = decltype(z_tag);
    if (a.packets) return distill<float, ZIn, float>(a, out, false, backward);
    with_stored_type(a.t.dtype, [&](auto t_tag) { distill<float, ZIn, decltype(t_tag)>(a, out, false, backward); });
  });
}

inline void distill_dense_entry(const DistillArgs& a, int acc, const FusedOut& out) {
  if (acc == F64) return distill_dense<double, double, double>(a, out, true);
  if (a.z.stride[3] != 1 || a.t.stride[3] != 1) return distill_dense<float, float, float>(a, out, true);
  with_stored_type(a.z.dtype, [&](auto z_tag) {
    with_stored_type(a.t.dtype, [&](auto t_tag) { distill_dense<float, decltype(z_tag), decltype(t_tag)>(a, out, false); });
  });
}

inline void distill_fwd_entry(const DistillArgs& a, int acc, const DistillOut& out) { distill_entry(a, acc, out, false); }
inline void distill_bwd_entry(const DistillArgs& a, int acc, const DistillOut& out) { distill_entry(a, acc, out, true); }

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

inline const KernelTable& table() {
  static const KernelTable t{MHD_ISA_NAME,         teacher_stats_entry, select_entry,
                             distill_fwd_entry,    distill_bwd_entry,   distill_dense_entry,
                             topk_compress_entry,  zero_rows_entry};
  return t;
}
