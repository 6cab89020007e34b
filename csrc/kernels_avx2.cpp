// The AVX2 + FMA build of the kernels (kernels.h): 8 fp32 lanes, fused multiply-add in the
// exp / log polynomials. Compiled with a target pragma instead of -mavx2 so that the wheel
// still runs anywhere; bindings.cpp calls it only when the CPU reports avx2 and fma.
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

// Everything defined from here on is AVX2 code; the standard headers above stay baseline.
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace mhd {
namespace avx2 {
#define MHD_ISA avx2
#define MHD_ISA_NAME "avx2"
#define MHD_LANES 8
#define MHD_AVX2 1
#include "simd.h"
#include "kernels.h"
}  // namespace avx2
}  // namespace mhd

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mhd {
const KernelTable& kernels_avx2() { return avx2::table(); }
}  // namespace mhd

#endif
