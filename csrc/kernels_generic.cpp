// The portable build of the kernels (kernels.h): the baseline ISA of the compiler's target
// (SSE2 on x86-64, NEON on aarch64), 4 fp32 lanes. Always built; the fallback of bindings.cpp.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"

namespace mhd {
namespace generic {
#define MHD_ISA generic
#define MHD_ISA_NAME "generic"
#define MHD_LANES 4
#include "simd.h"
#include "kernels.h"
}  // namespace generic

const KernelTable& kernels_generic() { return generic::table(); }
}  // namespace mhd
