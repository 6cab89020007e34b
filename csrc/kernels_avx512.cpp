// The AVX-512 build of the kernels (kernels.h): 16 fp32 lanes, fused multiply-add in the
// exp / log polynomials, lane masks for the tails of rows. Compiled with a target pragma
// instead of -mavx512f so that the wheel still runs anywhere; bindings.cpp calls it only when
// the CPU reports avx512f, avx512bw, avx512dq and avx512vl. On a core with full-width 512-bit
// units (AMD Zen 5, Intel server cores) it does the work of the AVX2 build in about half the
// vector instructions.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"

// Everything defined from here on is AVX-512 code; the standard headers above stay baseline.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")
#endif

namespace mhd {
namespace avx512 {
#define MHD_ISA avx512
#define MHD_ISA_NAME "avx512"
#define MHD_LANES 16
#define MHD_AVX512 1
#include "simd.h"
#include "kernels.h"
}  // namespace avx512
}  // namespace mhd

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mhd {
const KernelTable& kernels_avx512() { return avx512::table(); }
}  // namespace mhd

#endif
