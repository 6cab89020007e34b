// The runtime of the kernels: threads (a team, claims of work, loops over rows and tiles),
// per-thread scratch, strided access to the caller's tensors and the stores of output rows.
//
// Like every header of the kernels it is included, through kernels.h, inside the namespace of
// one ISA build after simd.h (see kernels.h).
#pragma once

constexpr int64_t kStreamBytes = int64_t(4) << 20;  // outputs from this size on bypass the caches

// Whether an output of `bytes` in all, at data with element strides stride[0..2] (rows of
// esize-byte elements), goes past the caches: large enough, and every row 16-byte aligned.
inline bool streamable(const void* data, const int64_t* stride, int64_t esize, int64_t bytes) {
  return data != nullptr && bytes >= kStreamBytes && reinterpret_cast<uintptr_t>(data) % 16 == 0 &&
         (stride[0] * esize) % 16 == 0 && (stride[1] * esize) % 16 == 0 && (stride[2] * esize) % 16 == 0;
}

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

// Whether T is float (this file takes no std templates).
template <class T>
struct IsF32 {
  static constexpr bool value = false;
};
template <>
struct IsF32<float> {
  static constexpr bool value = true;
};

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
