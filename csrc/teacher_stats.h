// The statistics of teacher rows: lse and log confidence (the kernel teacher_stats).
#pragma once

#include "rows.h"

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

inline void teacher_stats_entry(const View& t, double tau, int acc, void* lse, void* logconf, int threads) {
  if (acc == F64)
    return teacher_stats<double, double>(t, tau, (double*)lse, (double*)logconf, threads, true);
  if (t.stride[3] != 1)
    return teacher_stats<float, float>(t, tau, (float*)lse, (float*)logconf, threads, true);
  with_stored_type(t.dtype, [&](auto tag) {
    teacher_stats<float, decltype(tag)>(t, tau, (float*)lse, (float*)logconf, threads, false);
  });
}
