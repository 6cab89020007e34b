// The teacher choice of max_confidence for every row (the kernel select).
#pragma once

#include "aggregate.h"

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

inline void select_entry(const View& logconf, const View& adj, bool include_self, int64_t* idx, bool* has,
                         int threads) {
  if (logconf.dtype == F64) select<double>(logconf, adj, include_self, idx, has, threads);
  else select<float>(logconf, adj, include_self, idx, has, threads);
}
