// Portable SIMD layer of the kernels: GCC/Clang vector extensions, one vector = MHD_LANES fp32.
//
// Included, with kernels.h, inside the namespace of one ISA build (kernels_generic.cpp,
// kernels_avx2.cpp): the same source becomes SSE2/NEON code (4 lanes) and AVX2+FMA code
// (8 lanes). Everything here is always_inline so that it takes the ISA of the kernel it is
// inlined into. Needs MHD_LANES, and MHD_AVX2 in the AVX2 + FMA build (intrinsics for fma,
// max, masked loads and movemask).
//
// Lanes<A> gives the kernels one vocabulary for both accumulation types: Lanes<float> works on
// vectors with polynomial exp/log, Lanes<double> (the fp64 path, used by gradcheck) on plain
// scalars with libm, so each kernel is written once.
//
// The AVX-512 build (kernels_avx512.cpp: MHD_LANES 16, MHD_AVX512) takes the same code on
// 16 lanes; where an intrinsic is needed it has its own branch, with lane masks (__mmask16)
// for partial loads and stores.

#define MHD_INLINE inline __attribute__((always_inline))
// On every lambda handed to for_vectors: its body is inlined into the loop, the partial-vector
// tail's too (else GCC may leave the tail an out-of-line call per row).
#define MHD_INLINE_BODY __attribute__((always_inline))

constexpr int kLanes = MHD_LANES;
typedef float vf __attribute__((vector_size(4 * MHD_LANES)));
typedef int32_t vi __attribute__((vector_size(4 * MHD_LANES)));
typedef uint32_t vu __attribute__((vector_size(4 * MHD_LANES)));
typedef uint16_t vh __attribute__((vector_size(2 * MHD_LANES)));

constexpr float kInf = __builtin_inff();
constexpr double kLog2e = 1.44269504088896340736;  // log2 e

MHD_INLINE vf splat(float x) { return vf{} + x; }
MHD_INLINE vi splat_i(int32_t x) { return vi{} + x; }

// Bit casts that read the same for scalars and vectors, so that the fp16 / bf16 conversions
// below are written once for both.
MHD_INLINE float as_float(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }
MHD_INLINE uint32_t as_bits(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
MHD_INLINE vf as_float(vu u) { return (vf)u; }
MHD_INLINE vu as_bits(vf f) { return (vu)f; }
MHD_INLINE uint32_t pick(bool c, uint32_t a, uint32_t b) { return c ? a : b; }
MHD_INLINE vu pick(vi c, vu a, vu b) { return c ? a : b; }
MHD_INLINE uint32_t widen(uint16_t h) { return h; }
MHD_INLINE vu widen(vh h) { return __builtin_convertvector(h, vu); }
MHD_INLINE uint16_t narrow(uint32_t u) { return (uint16_t)u; }
MHD_INLINE vh narrow(vu u) { return __builtin_convertvector(u, vh); }

// IEEE half -> float, exact, branch-free (M. Dukhan's FP16 library): normal numbers are
// rebiased by one multiply, subnormals come out of a magic-number subtraction.
template <class H>
MHD_INLINE auto half_to_float(H h) {
  const auto w = widen(h) << 16;
  const auto sign = w & 0x80000000u;
  const auto two_w = w + w;
  const auto normalized = as_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const auto denormalized = as_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return as_float(sign | pick(two_w < (1u << 27), as_bits(denormalized), as_bits(normalized)));
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN kept (same source). Relies
// on fp32 round-to-nearest and no contraction of the two scalings (built with
// -ffp-contract=off).
template <class F>
MHD_INLINE auto float_to_half(F f) {
  const auto w = as_bits(f);
  auto base = (as_float(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const auto shl1_w = w + w;
  const auto sign = w & 0x80000000u;
  auto bias = shl1_w & 0xFF000000u;
  bias = pick(bias < 0x71000000u, bias - bias + 0x71000000u, bias);
  base = as_float((bias >> 1) + 0x07800000u) + base;
  const auto bits = as_bits(base);
  const auto nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return narrow((sign >> 16) | pick(shl1_w > 0xFF000000u, bias - bias + 0x7E00u, nonsign));
}

template <class H>
MHD_INLINE auto bf16_to_float(H h) { return as_float(widen(h) << 16); }

// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
template <class F>
MHD_INLINE auto float_to_bf16(F f) {
  const auto u = as_bits(f);
  const auto rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return narrow(pick(f != f, (u >> 16) | 0x40u, rounded));
}

// Scalar conversions of one stored element to the accumulation type.
template <class A> MHD_INLINE A to_acc(float x) { return (A)x; }
template <class A> MHD_INLINE A to_acc(double x) { return (A)x; }
template <class A> MHD_INLINE A to_acc(f16 x) { return (A)half_to_float(x.bits); }
template <class A> MHD_INLINE A to_acc(bf16 x) { return (A)bf16_to_float(x.bits); }

MHD_INLINE vf fmadd(vf a, vf b, vf c) {
#if defined(MHD_AVX512)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(MHD_AVX2)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

// Lane-wise max that keeps a NaN of x (maxps returns its second operand when one is NaN).
MHD_INLINE vf max_keep_nan(vf c, vf x) {
#if defined(MHD_AVX512)
  return _mm512_maskz_max_ps(0xFFFF, c, x);  // not _mm512_max_ps: GCC 12 warns on its undefined source
#elif defined(MHD_AVX2)
  return _mm256_max_ps(c, x);
#else
  return c > x ? c : x;
#endif
}

MHD_INLINE vf min_keep_nan(vf c, vf x) {
#if defined(MHD_AVX512)
  return _mm512_maskz_min_ps(0xFFFF, c, x);
#elif defined(MHD_AVX2)
  return _mm256_min_ps(c, x);
#else
  return c < x ? c : x;
#endif
}

// 2^y = 2^n · (1 + poly(r)), n = round(y), r = y − n ∈ [−1/2, 1/2] (exact); poly is the
// degree-5 minimax polynomial of 2^r − 1 of ARM's optimized-routines (max error ≈ 2 ulp).
// Adding 1.5·2^23 rounds y to n and leaves n in the low mantissa bits, from which 2^n is built
// with one shift and one add. Branch-free, 6 multiply-adds. y is clamped to [−127, 127]:
// 2^(−inf) = 0 exactly (a masked class), results below 2^−126 flush to 0, NaN stays NaN. With
// nonpos (the caller knows y ≤ 0 or NaN) the clamp from above is left out; a y above 127 would
// then give a wrong number instead of 2^127.
// The kernels call it with y ≤ 0 (a log2-probability) or NaN; e^x = 2^(x·log2 e) costs one
// multiply more and still three fewer multiply-adds than a direct e^x polynomial, whose range
// reduction needs ln 2 in two parts.
//
// AVX-512 rounds with vrndscaleps and scales with vscalefps instead (three instructions fewer,
// a shorter dependency chain): 2^y = scalef(1 + r·poly(r), n). The clamp is then at −150, where
// scalef gives exactly 0 (2^−150 rounds to 0), so that results between 2^−149 and 2^−126 are
// the subnormals torch.exp2 gives rather than 0; everything else is the same numbers to within
// the polynomial's rounding (the last bit may differ from the AVX2 build).
MHD_INLINE vf vexp2(vf y, bool nonpos = false) {
#if defined(MHD_AVX512)
  y = max_keep_nan(splat(-150.0f), y);
  if (!nonpos) y = min_keep_nan(splat(127.0f), y);
  const vf n = _mm512_maskz_roundscale_ps(0xFFFF, y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf r = y - n;
  vf p = fmadd(splat(0x1.59977ap-10f), r, splat(0x1.3ce9e4p-7f));
  p = fmadd(p, r, splat(0x1.c6bd32p-5f));
  p = fmadd(p, r, splat(0x1.ebf9bcp-3f));
  p = fmadd(p, r, splat(0x1.62e422p-1f));
  return _mm512_maskz_scalef_ps(0xFFFF, fmadd(p, r, splat(1.0f)), n);  // maskz: see max_keep_nan
#else
  y = max_keep_nan(splat(-127.0f), y);
  if (!nonpos) y = min_keep_nan(splat(127.0f), y);
  const vf shift = splat(0x1.8p23f);
  const vf t = y + shift;
  const vf r = y - (t - shift);
  const vf scale = (vf)(((vu)t << 23) + 0x3F800000u);  // 2^n; 0 for n = −127
  vf p = fmadd(splat(0x1.59977ap-10f), r, splat(0x1.3ce9e4p-7f));
  p = fmadd(p, r, splat(0x1.c6bd32p-5f));
  p = fmadd(p, r, splat(0x1.ebf9bcp-3f));
  p = fmadd(p, r, splat(0x1.62e422p-1f));
  return fmadd(p * r, scale, scale);
#endif
}

// log(x) = e·ln 2 + log(m), x = m·2^e with m ∈ [√½, √2); log(1 + f) by the Cephes logf
// polynomial. Subnormal x is rescaled by 2^23 first; log 0 = −inf, log(<0) = NaN,
// log(inf) = inf, NaN stays NaN.
MHD_INLINE vf vlog(vf x) {
  const vi sub = x < splat(1.17549435e-38f);
  const vf xs = sub ? x * splat(8388608.0f) : x;
  vi e = (((vi)xs >> 23) & 0xFF) - 126 - (sub & 23);
  vf m = (vf)(((vi)xs & 0x007FFFFF) | 0x3F000000);  // [0.5, 1)
  const vi small = m < splat(0.707106781186547524f);
  e = e + small;  // masks are −1 where true
  m = (small ? m : vf{}) + m - splat(1.0f);
  const vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = fmadd(y, m, splat(-1.1514610310e-1f));
  y = fmadd(y, m, splat(1.1676998740e-1f));
  y = fmadd(y, m, splat(-1.2420140846e-1f));
  y = fmadd(y, m, splat(1.4249322787e-1f));
  y = fmadd(y, m, splat(-1.6668057665e-1f));
  y = fmadd(y, m, splat(2.0000714765e-1f));
  y = fmadd(y, m, splat(-2.4999993993e-1f));
  y = fmadd(y, m, splat(3.3333331174e-1f));
  y = y * m * z;
  const vf fe = __builtin_convertvector(e, vf);
  y = fmadd(fe, splat(-2.12194440e-4f), y);
  y = fmadd(z, splat(-0.5f), y);
  vf res = fmadd(fe, splat(0.693359375f), m + y);
  res = x == splat(0.0f) ? splat(-kInf) : res;
  res = x == splat(kInf) ? splat(kInf) : res;
  return (x < splat(0.0f)) | (x != x) ? splat(__builtin_nanf("")) : res;
}

// x[l] = p[idx[l]] in every lane (idx in elements).
MHD_INLINE vf gather_lanes(const float* p, vi idx) {
#if defined(MHD_AVX512)
  // the masked forms, not the plain ones (whose undefined source GCC 12 warns on: see max_keep_nan)
  return (vf)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, (__m512i)idx, p, 4);
#elif defined(MHD_AVX2)
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  return (vf)_mm256_mask_i32gather_ps(_mm256_setzero_ps(), p, (__m256i)idx, all, 4);
#else
  vf r;
  for (int l = 0; l < kLanes; ++l) r[l] = p[idx[l]];
  return r;
#endif
}

template <class A> struct Lanes;

template <> struct Lanes<float> {
  using V = vf;
  using M = vi;  // lane mask
  static constexpr int W = kLanes;

  static MHD_INLINE V splat(float x) { return ::mhd::MHD_ISA::splat(x); }
  static MHD_INLINE V exp2(V y) { return vexp2(y); }
  // 2^y for y <= 0 or NaN (the terms of an online softmax): no clamp from above.
  static MHD_INLINE V exp2_nonpos(V y) { return vexp2(y, true); }
  static MHD_INLINE V exp(V x) { return vexp2(x * splat(kLog2e)); }
  static MHD_INLINE V log(V x) { return vlog(x); }
  static MHD_INLINE V max(V a, V b) {
#if defined(MHD_AVX512)
    return _mm512_maskz_max_ps(0xFFFF, a, b);
#elif defined(MHD_AVX2)
    return _mm256_max_ps(a, b);
#else
    return a > b ? a : b;
#endif
  }
  static MHD_INLINE float lane(V v, int l) { return v[l]; }
  // Horizontal reductions as a fixed tree of halvings: a row's sum never depends on the thread
  // that computes it.
  template <class Op>
  static MHD_INLINE float reduce(V v, Op op) {
    typedef float v4 __attribute__((vector_size(16)));
    typedef float v2 __attribute__((vector_size(8)));
    v4 q;
#if MHD_LANES == 16
    typedef float v8 __attribute__((vector_size(32)));
    const v8 o = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
    q = op(__builtin_shufflevector(o, o, 0, 1, 2, 3), __builtin_shufflevector(o, o, 4, 5, 6, 7));
#else
    if constexpr (W == 8) q = op(__builtin_shufflevector(v, v, 0, 1, 2, 3), __builtin_shufflevector(v, v, 4, 5, 6, 7));
    else q = v;
#endif
    const v2 h = op(__builtin_shufflevector(q, q, 0, 1), __builtin_shufflevector(q, q, 2, 3));
    return op(h, __builtin_shufflevector(h, h, 1, 0))[0];
  }
  static MHD_INLINE float sum(V v) {
    return reduce(v, [](auto a, auto b) { return a + b; });
  }
  static MHD_INLINE float max(V v) {
    return reduce(v, [](auto a, auto b) { return a > b ? a : b; });
  }
  // Bit l set when lane l of the mask is set.
  static MHD_INLINE unsigned bits(M m) {
#if defined(MHD_AVX512)
    return (unsigned)_mm512_cmplt_epi32_mask((__m512i)m, _mm512_setzero_si512());
#elif defined(MHD_AVX2)
    return (unsigned)_mm256_movemask_ps((__m256)m);
#else
    unsigned b = 0;
    for (int l = 0; l < W; ++l) b |= (m[l] != 0) << l;
    return b;
#endif
  }
  // The number of lanes with a > b, and with a >= b (unsigned): a popcount of a compare mask.
  static MHD_INLINE int count_gt(vu a, vu b) {
#if defined(MHD_AVX512)
    return __builtin_popcount(_mm512_cmpgt_epu32_mask((__m512i)a, (__m512i)b));
#else
    return __builtin_popcount(bits((M)(a > b)));
#endif
  }
  static MHD_INLINE int count_ge(vu a, vu b) {
#if defined(MHD_AVX512)
    return __builtin_popcount(_mm512_cmpge_epu32_mask((__m512i)a, (__m512i)b));
#else
    return __builtin_popcount(bits((M)(a >= b)));
#endif
  }
  // acc + x in the lanes whose bit l of `sent` is clear (a class of the teacher's packet is
  // left out of the unsent mass); + 0 elsewhere, so acc is unchanged there.
  static MHD_INLINE V add_unsent(V acc, V x, unsigned sent) {
#if defined(MHD_AVX512)
    return _mm512_mask_add_ps(acc, (__mmask16)~sent, acc, x);
#else
    vi bit;
    for (int l = 0; l < W; ++l) bit[l] = 1 << l;
    return acc + (V)((vi)x & (vi)((splat_i((int32_t)sent) & bit) == 0));
#endif
  }
  static MHD_INLINE M lanes_below(int n) {
    M id;
    for (int l = 0; l < W; ++l) id[l] = l;
    return id < splat_i(n);
  }

  static MHD_INLINE V load(const float* p) { V r; __builtin_memcpy(&r, p, sizeof r); return r; }
  static MHD_INLINE V load(const bf16* p) {
    vh h; __builtin_memcpy(&h, p, sizeof h); return bf16_to_float(h);
  }
  static MHD_INLINE V load(const f16* p) {
    vh h; __builtin_memcpy(&h, p, sizeof h); return half_to_float(h);
  }
  // Widen W half-width elements already loaded.
  static MHD_INLINE V load(const bf16*, vh h) { return bf16_to_float(h); }
  static MHD_INLINE V load(const f16*, vh h) { return half_to_float(h); }
  // The first n ≤ W lanes from p, the others = pad (−inf for logits: a masked class). Never
  // reads past p[n − 1].
  template <class In>
  static MHD_INLINE V load(const In* p, int n, float pad) {
    if (n == W) return load(p);
#if defined(MHD_AVX512)
    const __mmask16 k = (__mmask16)((1u << n) - 1);  // masked-off lanes are never read
    if constexpr (sizeof(In) == 4) return _mm512_mask_loadu_ps(splat(pad), k, reinterpret_cast<const float*>(p));
    if constexpr (sizeof(In) == 2) {
      const V r = load(p, (vh)_mm256_maskz_loadu_epi16(k, p));
      return (V)_mm512_mask_blend_ps(k, splat(pad), r);
    }
#elif defined(MHD_AVX2)
    if constexpr (sizeof(In) == 4) {
      const M m = lanes_below(n);
      return m ? (V)_mm256_maskload_ps(reinterpret_cast<const float*>(p), (__m256i)m) : splat(pad);
    }
#endif
    V r = splat(pad);
    for (int l = 0; l < n; ++l) r[l] = to_acc<float>(p[l]);
    return r;
  }

  static MHD_INLINE void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
  // A whole vector to a 16-byte aligned p past the caches (non-temporal: no read for
  // ownership of the line), in one store where p is aligned to the vector, else in 16-byte
  // pieces; the writer calls fence() before the data are read elsewhere.
  static MHD_INLINE void stream(float* p, V v) {
#if defined(MHD_AVX512)
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, (__m512)v);  // a whole line
    _mm_stream_ps(p, (__m128)__builtin_shufflevector(v, v, 0, 1, 2, 3));
    _mm_stream_ps(p + 4, (__m128)__builtin_shufflevector(v, v, 4, 5, 6, 7));
    _mm_stream_ps(p + 8, (__m128)__builtin_shufflevector(v, v, 8, 9, 10, 11));
    _mm_stream_ps(p + 12, (__m128)__builtin_shufflevector(v, v, 12, 13, 14, 15));
#elif defined(MHD_AVX2)
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, (__m256)v);
    _mm_stream_ps(p, _mm256_castps256_ps128((__m256)v));
    _mm_stream_ps(p + 4, _mm256_extractf128_ps((__m256)v, 1));
#elif defined(__SSE__)
    _mm_stream_ps(p, (__m128)v);
#else
    store(p, v);
#endif
  }
  // The first n < W lanes of v to p, past the caches too (16-byte pieces, then single lanes),
  // so that a row's lines are all written one way: a line half streamed, half cached is slow.
  static MHD_INLINE void stream(float* p, V v, int n) {
#if defined(__SSE2__)
    float tmp[W];
    __builtin_memcpy(tmp, &v, sizeof v);
    int l = 0;
    for (; l + 4 <= n; l += 4) _mm_stream_ps(p + l, _mm_loadu_ps(tmp + l));
    for (; l < n; ++l) _mm_stream_si32(reinterpret_cast<int*>(p + l), (int)as_bits(tmp[l]));
#else
    store(p, v, n);
#endif
  }
  static MHD_INLINE void store(bf16* p, V v) { const vh h = float_to_bf16(v); __builtin_memcpy(p, &h, sizeof h); }
  static MHD_INLINE void store(f16* p, V v) { const vh h = float_to_half(v); __builtin_memcpy(p, &h, sizeof h); }
  // The first n ≤ W lanes of v into p; never writes past p[n − 1].
  template <class Out>
  static MHD_INLINE void store(Out* p, V v, int n) {
    if (n == W) return store(p, v);
#if defined(MHD_AVX512)
    if constexpr (sizeof(Out) == 4) return _mm512_mask_storeu_ps(reinterpret_cast<float*>(p), (__mmask16)((1u << n) - 1), v);
#elif defined(MHD_AVX2)
    if constexpr (sizeof(Out) == 4) return _mm256_maskstore_ps(reinterpret_cast<float*>(p), (__m256i)lanes_below(n), v);
#endif
    Out tmp[W];
    store(tmp, v);
    for (int l = 0; l < n; ++l) p[l] = tmp[l];
  }
};

template <> struct Lanes<double> {
  using V = double;
  using M = bool;
  static constexpr int W = 1;

  static MHD_INLINE V splat(double x) { return x; }
  static MHD_INLINE V exp2(V y) { return __builtin_exp2(y); }
  static MHD_INLINE V exp2_nonpos(V y) { return __builtin_exp2(y); }
  static MHD_INLINE V exp(V x) { return __builtin_exp(x); }
  static MHD_INLINE V log(V x) { return __builtin_log(x); }
  static MHD_INLINE V max(V a, V b) { return a > b ? a : b; }
  static MHD_INLINE double lane(V v, int) { return v; }
  static MHD_INLINE double sum(V v) { return v; }
  static MHD_INLINE double max(V v) { return v; }
  static MHD_INLINE unsigned bits(M m) { return m; }
  static MHD_INLINE V add_unsent(V acc, V x, unsigned sent) { return (sent & 1) ? acc : acc + x; }
  template <class In>
  static MHD_INLINE V load(const In* p, int = 1, double = 0) { return to_acc<double>(*p); }
  static MHD_INLINE void store(float* p, V v, int = 1) { *p = (float)v; }
  static MHD_INLINE void store(double* p, V v, int = 1) { *p = v; }
  static MHD_INLINE void stream(double* p, V v, int = 1) { *p = v; }
  static MHD_INLINE void store(f16* p, V v, int = 1) { p->bits = float_to_half((float)v); }
  static MHD_INLINE void store(bf16* p, V v, int = 1) { p->bits = float_to_bf16((float)v); }
};

// Orders the non-temporal stores (stream) of this thread before what follows.
MHD_INLINE void fence() {
#if defined(__SSE__)
  _mm_sfence();
#endif
}

// Scalar exp / log in the accumulation type (per-row and per-block bookkeeping).
MHD_INLINE float sexp(float x) { return __builtin_expf(x); }
MHD_INLINE double sexp(double x) { return __builtin_exp(x); }
MHD_INLINE float sexp2(float x) { return __builtin_exp2f(x); }
MHD_INLINE double sexp2(double x) { return __builtin_exp2(x); }
// fp32 log through the vector log (within 1 ulp of glibc's logf, the same bits in every lane),
// so that the logs of a group of rows taken in one vector (slogs) are bit for bit the ones a row
// gets alone: a row's lse does not depend on the rows it was computed with.
MHD_INLINE float slog(float x) { return vlog(splat(x))[0]; }
MHD_INLINE double slog(double x) { return __builtin_log(x); }

// out[r] = slog(x[r]) for R numbers: fp32 in vectors of kLanes (a row of one block is a short
// chain, and a libm call per row had been a fifth of S2's kernel, whose rows are 10 classes);
// fp64 by libm.
template <int R>
MHD_INLINE void slogs(const float (&x)[R], float (&out)[R]) {
  for (int r0 = 0; r0 < R; r0 += kLanes) {
    vf v = splat(1.0f);
    for (int l = 0; l < kLanes && r0 + l < R; ++l) v[l] = x[r0 + l];
    const vf y = vlog(v);
    for (int l = 0; l < kLanes && r0 + l < R; ++l) out[r0 + l] = y[l];
  }
}
template <int R>
MHD_INLINE void slogs(const double (&x)[R], double (&out)[R]) {
  for (int r = 0; r < R; ++r) out[r] = slog(x[r]);
}
MHD_INLINE bool is_nan(float x) { return x != x; }
MHD_INLINE bool is_nan(double x) { return x != x; }
