// The whole dense loss in one launch: teacher statistics, teacher choice, loss and unit gradient
// (the kernel distill_dense).
#pragma once

#include "aggregate.h"
#include "lanes.h"

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

inline void distill_dense_entry(const DistillArgs& a, int acc, const FusedOut& out) {
  if (acc == F64) return distill_dense<double, double, double>(a, out, true);
  if (a.z.stride[3] != 1 || a.t.stride[3] != 1) return distill_dense<float, float, float>(a, out, true);
  with_stored_type(a.z.dtype, [&](auto z_tag) {
    with_stored_type(a.t.dtype, [&](auto t_tag) { distill_dense<float, decltype(z_tag), decltype(t_tag)>(a, out, false); });
  });
}
