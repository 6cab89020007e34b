// Zeroing the rows of a gradient (the kernel zero_rows).
#pragma once

#include "runtime.h"

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
