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
//
// DenseLaunch holds what every tile shares (sizes, the tiling, the candidates, the per-thread
// scratch); a Tile is one tile's rows and its thread's buffers, taken through the steps of
// run_tile in order.
template <int kRows, bool kByLanes, class A, class ZIn, class TIn>
class DenseLaunch {
  using L = Lanes<A>;
  using Vec = typename L::V;
  static constexpr int W = L::W;

 public:
  DenseLaunch(const DistillArgs& args, const FusedOut& o, bool gather_rows) : a(args), out(o), gather(gather_rows) {
    N = a.z.size[0], G = a.z.size[1], B = a.z.size[2], V = a.z.size[3];
    sc = Scale<A>(a.tau);
    tau = (A)a.tau;
    aggregated = a.aggregate != MAX_CONFIDENCE;
    lse_t = static_cast<A*>(out.lse_t);
    logconf = static_cast<A*>(out.logconf_t);
    loss = static_cast<A*>(out.loss);
    lse_z = static_cast<A*>(out.lse_z);
    idx = out.idx;
    // The statistics this kernel writes are what the aggregation reads.
    a.lse_t.data = lse_t;
    a.logconf_t.data = logconf;
    as_rows(a.lse_t);
    as_rows(a.logconf_t);
    cand.build(a.adj, a.include_self);
    nt = team(a.threads, N * G * B * V);
    grad = static_cast<char*>(out.grad);
    vpad = round_up(V, W);
    plan_tiles();
    scratch.reset(nt * share);
    // rows_in: lane_rows_index; lane i of rows_out[k] the class-major [V, W] element that goes to
    // element k·W + i of the W rows.
    if (by_lanes) {
      lane_rows_index(V, rows_in);
      lane_rows_out_index(V, rows_out);
    }
    gsize = dtype_size(out.grad_dtype);
    // A gradient larger than the caches (kStreamBytes) is written past them, row by row where
    // each row starts 16-byte aligned: no line is read for ownership first, a quarter of the
    // launch's memory traffic at small V.
    stream = streamable(grad, out.grad_stride, gsize, N * out.heads * B * V * gsize);
  }

  void run() {
    for_tiles(G * nb, nt, [&](int64_t tile, int tid) { run_tile(tile_at(tile, tid)); });
  }

 private:
  // One tile: group g, rows [b0, b1) of every client, and the buffers of the thread running it.
  struct Tile {
    int64_t g, b0, b1, nbb;
    A* zbuf;   // a student row
    A* tbuf;   // a teacher row
    A* pbuf;   // kRows rows: p̄
    A* qbuf;   // kRows rows: the students' terms
    A* best;   // the running best logconf of the tile's rows
    A* terms;  // [N, bb, vpad]: the teachers' terms
    A* inv_s;  // [N, bb]: their 1/s
    // By lanes (a tile of whole blocks of W rows): for each teacher row its p = e·(1/s) and
    // log p = t/τ − lse by class, [N, nblk, V, W], for the students' gathers; aggregated, its
    // terms e by class and 1/s [N, nblk, W] instead, for the mixtures (kept_mixture).
    bool lanes;
    int64_t nblk;
    A* lane_p;
    A* lane_lp;
    A* lane_g;  // [V, W]: the gradient of a block's W rows by class
  };

  // The tiling (rows b per tile) and the scratch each thread takes.
  void plan_tiles() {
    // W rows at a time in the lanes of a vector (lanes_lse): fp32 rows of up to W + kLaneExtra
    // classes in place, W consecutive rows b of a client adjacent in Z, T and the gradient; tiles
    // of whole blocks of W rows.
    by_lanes = kByLanes && !gather && V <= W + kLaneExtra && B >= W && a.z.stride[3] == 1 && a.z.stride[2] == V &&
               a.t.stride[3] == 1 && a.t.stride[2] == V &&
               (grad == nullptr || (out.grad_dtype == F32 && out.grad_stride[2] == V));
    bb = tile_rows(N, G, B, V * dtype_size(a.t.dtype), nt);
    if (by_lanes) bb = bb < W ? W : bb / W * W;
    by_lanes = by_lanes && N * bb * vpad < (int64_t(1) << 31);  // the gathers' indices are int32
    nb = B == 0 ? 0 : (B + bb - 1) / bb;
    // Rows of one block keep their softmax terms: the teachers' for the whole tile (a teacher row
    // serves every client that chose it: with max_confidence on a dense graph most of them), the
    // student's for its own row.
    keep = V <= kBlock;
    kept = keep ? N * bb : 0;
    // Per thread: the student row, a teacher row, p̄, the student's terms, the running best
    // logconf of the tile's rows, then the teachers' terms and 1/s of the tile's N·bb rows.
    // Rows of one block in place run kRows at a time (rows_lse_kept, kl_sweep_rows).
    grouped = keep && !gather && W > 1;
    // By lanes, the terms' space holds the teachers' p and a second one their log p, then the
    // gradient of W rows by class.
    share = per_thread<A>((2 + 2 * kRows) * vpad + bb + kept * (vpad + 1) + (by_lanes ? kept * vpad + vpad * W : 0));
  }

  // [N, G, B] rows of one element, contiguous.
  void as_rows(View& v) const {
    v.size[0] = N, v.size[1] = G, v.size[2] = B, v.size[3] = 1;
    v.stride[0] = G * B, v.stride[1] = B, v.stride[2] = 1, v.stride[3] = 0;
  }

  Tile tile_at(int64_t tile, int tid) {
    Tile t;
    t.g = tile / nb, t.b0 = (tile % nb) * bb, t.b1 = min64(B, t.b0 + bb), t.nbb = t.b1 - t.b0;
    t.zbuf = scratch.data() + tid * share;
    t.tbuf = t.zbuf + vpad;
    t.pbuf = t.tbuf + vpad;
    t.qbuf = t.pbuf + kRows * vpad;
    t.best = t.qbuf + kRows * vpad;
    t.terms = t.best + bb;
    t.inv_s = t.terms + kept * vpad;
    t.lanes = by_lanes && t.nbb % W == 0;
    t.nblk = t.nbb / W;
    t.lane_p = t.terms;
    t.lane_lp = t.terms + kept * vpad;
    t.lane_g = t.lane_lp + kept * vpad;
    return t;
  }

  // The steps of a tile: the teachers' statistics (teacher_stats), the teacher choice (select),
  // then the loss and unit gradient of the students (distill).
  void run_tile(const Tile& t) {
    if constexpr (kByLanes) {
      if (t.lanes) stats_by_lanes(t);
    }
    stats_by_rows(t);
    choose_teachers(t);
    if (t.lanes) {
      if constexpr (kByLanes) loss_by_lanes(t);
    } else if (grouped) {
      loss_grouped(t);
    } else {
      loss_row_by_row(t);
    }
    if (grad != nullptr) zero_other_heads(t);
  }

  MHD_INLINE int64_t slot(const Tile& t, int64_t n, int64_t b) const { return n * bb + (b - t.b0); }
  MHD_INLINE const TIn* row_t(const Tile& t, int64_t n, int64_t b) const {
    return row<TIn>(a.t, n, t.g, b, V, gather, t.tbuf);
  }
  MHD_INLINE const ZIn* row_z(const Tile& t, int64_t n, int64_t b) const {
    return row<ZIn>(a.z, n, t.g, b, V, gather, t.zbuf);
  }
  MHD_INLINE void* grad_row_ptr(int64_t n, int64_t h, int64_t b) const {
    return grad + (n * out.grad_stride[0] + h * out.grad_stride[1] + b * out.grad_stride[2]) * gsize;
  }
  MHD_INLINE void* dz_of(const Tile& t, int64_t n, int64_t b) const {
    return grad != nullptr ? grad_row_ptr(n, out.head_offset + t.g, b) : nullptr;
  }
  MHD_INLINE void put_stats(const Tile& t, int64_t n, int64_t b, A m, A l, A sum) const {
    const int64_t r = (n * G + t.g) * B + b;
    lse_t[r] = l;
    logconf[r] = m - l;
    if (keep) t.inv_s[slot(t, n, b)] = A(1) / sum;
  }

  // Block (n, b) of W rows of x by class into xv, and its statistics (lanes_lse); the block
  // kAhead clients ahead asked for first.
  MHD_INLINE void lanes_block(const Tile& t, const View& x, int64_t n, int64_t b, Vec* xv, Vec* e, Vec& m_out,
                              Vec& lse, Vec& s) const {
    const float* data = static_cast<const float*>(x.data);
    if (n + kAhead < N) prefetch_block(data + offset(x, n + kAhead, t.g, b), W * V);
    for (int64_t v = 0; v < V; ++v) xv[v] = gather_lanes(data + offset(x, n, t.g, b), rows_in[v]);
    lanes_lse<A>(xv, V, sc, e, m_out, lse, s);
  }

  // The statistics of the tile's teacher rows W at a time, by lanes, with p and log p by class
  // (aggregated: the terms e and 1/s).
  void stats_by_lanes(const Tile& t) {
    Vec x[W + kLaneExtra], e[W + kLaneExtra], m_out, lse, s;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < t.nblk; ++k) {
        const int64_t b = t.b0 + k * W, r = (n * G + t.g) * B + b;
        lanes_block(t, a.t, n, b, x, e, m_out, lse, s);
        L::store(lse_t + r, lse);
        L::store(logconf + r, m_out - lse);
        const Vec inv_s = L::splat(A(1)) / s;
        A* p = t.lane_p + (n * t.nblk + k) * V * W;
        if (aggregated) {
          for (int64_t v = 0; v < V; ++v) L::store(p + v * W, e[v]);
          L::store(t.lane_lp + (n * t.nblk + k) * W, inv_s);
          continue;
        }
        A* lp = t.lane_lp + (n * t.nblk + k) * V * W;
        for (int64_t v = 0; v < V; ++v) {
          L::store(p + v * W, e[v] * inv_s);
          L::store(lp + v * W, sc(x[v]) - lse);
        }
      }
  }

  // The statistics (teacher_stats) of the tile's teacher rows not taken by lanes; rows of one
  // block kRows at a time (rows_lse_kept).
  void stats_by_rows(const Tile& t) {
    const int64_t rows = N * t.nbb;
    int64_t i = t.lanes ? rows : 0;
    if (grouped)
      for (; i + kRows <= rows; i += kRows) {
        const TIn* x[kRows];
        A* kp[kRows];
        int64_t ns[kRows], bs[kRows];
        A m[kRows], l[kRows], sum[kRows];
        for (int k = 0; k < kRows; ++k) {
          ns[k] = (i + k) / t.nbb, bs[k] = t.b0 + (i + k) % t.nbb;
          x[k] = row_t(t, ns[k], bs[k]);
          kp[k] = t.terms + slot(t, ns[k], bs[k]) * vpad;
        }
        rows_lse_kept<kRows>(x, V, sc, m, l, kp, sum);
        for (int k = 0; k < kRows; ++k) put_stats(t, ns[k], bs[k], m[k], l[k], sum[k]);
      }
    for (; i < rows; ++i) {
      const int64_t n = i / t.nbb, b = t.b0 + i % t.nbb;
      A m, l, sum;
      row_lse(row_t(t, n, b), V, sc, m, l, static_cast<const SentRow*>(nullptr), static_cast<A*>(nullptr), NoFeed{},
              keep ? t.terms + slot(t, n, b) * vpad : nullptr, &sum);
      put_stats(t, n, b, m, l, sum);
    }
  }

  // The teacher of every row of the tile (select).
  void choose_teachers(const Tile& t) {
    for (int64_t c = 0; c < N; ++c)
      choose(cand, c, [&](int64_t j) -> const A* { return logconf + (j * G + t.g) * B; }, 1, t.b0, t.b1, t.best,
             idx + (c * G + t.g) * B);
  }

  // Row r's loss and lse_z, and its unit gradient into dz when set (distill).
  template <class Teacher>
  MHD_INLINE void finish(const Tile& t, int64_t r, const ZIn* z, void* dz, const Teacher& teacher) const {
    A kl, l;
    if (dz != nullptr) kl_grad_row(z, V, sc, teacher, tau, kl, l, dz, out.grad_dtype, t.qbuf, stream);
    else kl_row(z, V, sc, teacher, kl, l);
    loss[r] = tau * tau * kl;
    lse_z[r] = l;
  }
  MHD_INLINE void no_teacher(int64_t r, const ZIn* z, void* dz) const {
    A m, l;
    row_lse(z, V, sc, m, l);
    loss[r] = 0;
    lse_z[r] = l;
    if (dz != nullptr) std::memset(dz, 0, V * gsize);
  }
  MHD_INLINE bool has_teacher(int64_t n, int64_t r) const { return aggregated ? cand.count(n) != 0 : idx[r] >= 0; }
  // p̄ = Σ_j w_j p_j from the candidates' kept terms, p_j = e_j·(1/s_j), into p
  MHD_INLINE void kept_mixture(const Tile& t, int64_t n, int64_t b, A* p) const {
    const Weights<A> weight(a.logconf_t, a.aggregate, cand, n, t.g, b);
    for (int64_t v = 0; v < vpad; v += W) L::store(p + v, L::splat(0), W);
    for (const int64_t* c = cand.begin(n); c != cand.end(n); ++c) {
      const Vec w = L::splat(weight(*c) * t.inv_s[slot(t, *c, b)]);
      const A* e = t.terms + slot(t, *c, b) * vpad;
      for (int64_t v = 0; v < vpad; v += W) L::store(p + v, L::load(p + v, W, 0) + w * L::load(e + v, W, 0), W);
    }
  }
  MHD_INLINE KeptTeacher<A, TIn> kept_teacher(const Tile& t, int64_t r, int64_t b) const {
    const int64_t j = idx[r];
    return KeptTeacher<A, TIn>{row_t(t, j, b), sc, lse_t[(j * G + t.g) * B + b], t.terms + slot(t, j, b) * vpad,
                               t.inv_s[slot(t, j, b)]};
  }

  // p̄ of client n's candidates for block k of W rows (at row b), by lanes: Σ_j w_j·(1/s_j)·e_j,
  // as kept_mixture sums it.
  MHD_INLINE void lanes_mixture(const Tile& t, int64_t n, int64_t k, int64_t b, Vec* pbar) const {
    const Vec zero = L::splat(0);
    Vec total = zero;  // Weights: |C|, or Σ_C e^logconf in the candidates' order
    if (a.aggregate == MEAN) total = L::splat((A)cand.count(n));
    else
      for (const int64_t* c = cand.begin(n); c != cand.end(n); ++c)
        for (int l = 0; l < W; ++l) total[l] += sexp(logconf[(*c * G + t.g) * B + b + l]);
    for (int64_t v = 0; v < V; ++v) pbar[v] = zero;
    for (const int64_t* c = cand.begin(n); c != cand.end(n); ++c) {
      Vec w = L::splat(A(1));
      if (a.aggregate != MEAN)
        for (int l = 0; l < W; ++l) w[l] = sexp(logconf[(*c * G + t.g) * B + b + l]);
      w = w / total * L::load(t.lane_lp + (*c * t.nblk + k) * W);
      const A* ec = t.lane_p + (*c * t.nblk + k) * V * W;
      for (int64_t v = 0; v < V; ++v) pbar[v] = pbar[v] + w * L::load(ec + v * W);
    }
  }

  // W students at a time against their teachers' p and log p, gathered by lane; aggregated,
  // against p̄ (lanes_mixture).
  void loss_by_lanes(const Tile& t) {
    Vec x[W + kLaneExtra], e[W + kLaneExtra], acc[W + kLaneExtra], m_out, lse, s;
    const Vec zero = L::splat(0), tau2 = L::splat(tau * tau), gs = L::splat(tau);
    vi iota;
    for (int l = 0; l < W; ++l) iota[l] = l;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < t.nblk; ++k) {
        const int64_t b = t.b0 + k * W, r = (n * G + t.g) * B + b;
        lanes_block(t, a.z, n, b, x, e, m_out, lse, s);
        vi j;
        for (int l = 0; l < W; ++l) j[l] = aggregated ? (cand.count(n) == 0 ? -1 : 0) : (int32_t)idx[r + l];
        const vi none = j < 0;  // no candidate: loss 0, gradient 0
        const Vec inv_s = L::splat(A(1)) / s;
        if (aggregated) {
          Vec pbar[W + kLaneExtra];
          lanes_mixture(t, n, k, b, pbar);
          for (int64_t v = 0; v < V; ++v) {
            const Vec p = none ? zero : pbar[v];
            acc[v] = p != zero ? p * (L::log(p) - (sc(x[v]) - lse)) : zero;
            if (grad != nullptr) L::store(t.lane_g + v * W, none ? zero : gs * (e[v] * inv_s - p));
          }
        } else {
          const vi at = ((none ? splat_i(0) : j) * (int32_t)t.nblk + (int32_t)k) * (int32_t)(V * W) + iota;
          for (int64_t v = 0; v < V; ++v) {
            const vi at_v = at + (int32_t)(v * W);
            const Vec p = none ? zero : gather_lanes(t.lane_p, at_v);
            acc[v] = p != zero ? p * (gather_lanes(t.lane_lp, at_v) - (sc(x[v]) - lse)) : zero;
            if (grad != nullptr) L::store(t.lane_g + v * W, none ? zero : gs * (e[v] * inv_s - p));
          }
        }
        const Vec kl = lane_tree<L>(acc, V, zero, [](auto u, auto w) MHD_INLINE_BODY { return u + w; });
        L::store(loss + r, tau2 * kl);
        L::store(lse_z + r, lse);
        if (grad != nullptr) put_lane_rows(static_cast<float*>(dz_of(t, n, b)), t.lane_g, rows_out, V, stream);
      }
  }

  // The student rows with a teacher kRows at a time (kl_sweep_rows); teacher_of(n, b, r, k)
  // gives row r's teacher, p̄ built in pbuf row k when aggregated.
  template <class TeacherOf>
  MHD_INLINE void by_rows(const Tile& t, TeacherOf teacher_of) {
    using Teacher = decltype(teacher_of(0, 0, 0, 0));
    const ZIn* zs[kRows];
    void* ds[kRows];
    int64_t rs[kRows];
    Teacher ts[kRows];
    int k = 0;
    const auto flush = [&] {
      if (k == kRows) {
        A kl[kRows], l[kRows];
        if (grad != nullptr) kl_sweep_rows<true>(zs, V, sc, ts, tau, kl, l, ds, out.grad_dtype, t.qbuf, stream);
        else kl_sweep_rows<false>(zs, V, sc, ts, tau, kl, l, ds, out.grad_dtype, t.qbuf, stream);
        for (int q = 0; q < kRows; ++q) loss[rs[q]] = tau * tau * kl[q], lse_z[rs[q]] = l[q];
      } else {
        for (int q = 0; q < k; ++q) finish(t, rs[q], zs[q], ds[q], ts[q]);
      }
      k = 0;
    };
    for (int64_t n = 0; n < N; ++n)
      for (int64_t b = t.b0; b < t.b1; ++b) {
        const int64_t r = (n * G + t.g) * B + b;
        if (!has_teacher(n, r)) {
          no_teacher(r, row_z(t, n, b), dz_of(t, n, b));
          continue;
        }
        zs[k] = row_z(t, n, b), ds[k] = dz_of(t, n, b), rs[k] = r;
        ts[k] = teacher_of(n, b, r, k);
        if (++k == kRows) flush();
      }
    flush();
  }

  void loss_grouped(const Tile& t) {
    if (aggregated) by_rows(t, [&](int64_t n, int64_t b, int64_t, int k) {
      kept_mixture(t, n, b, t.pbuf + k * vpad);
      return ProbTeacher<A>{t.pbuf + k * vpad};
    });
    else by_rows(t, [&](int64_t, int64_t b, int64_t r, int) { return kept_teacher(t, r, b); });
  }

  void loss_row_by_row(const Tile& t) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t b = t.b0; b < t.b1; ++b) {
        const int64_t r = (n * G + t.g) * B + b;
        const ZIn* z = row_z(t, n, b);
        void* dz = dz_of(t, n, b);
        if (!has_teacher(n, r)) {
          no_teacher(r, z, dz);
        } else if (aggregated) {
          if (keep) kept_mixture(t, n, b, t.pbuf);
          else aggregate_logits<A, TIn>(a, cand, n, t.g, b, V, sc, gather, t.tbuf, t.pbuf);
          finish(t, r, z, dz, ProbTeacher<A>{t.pbuf});
        } else if (keep) {
          finish(t, r, z, dz, kept_teacher(t, r, b));
        } else {
          const int64_t j = idx[r];
          finish(t, r, z, dz, LogitTeacher<A, TIn>{row_t(t, j, b), sc, lse_t[(j * G + t.g) * B + b]});
        }
      }
  }

  // The heads that do not learn: zeros, client n's by the tiles of group n mod G.
  void zero_other_heads(const Tile& t) {
    for (int64_t n = t.g; n < N; n += G)
      for (int64_t h = 0; h < out.heads; ++h)
        if (h < out.head_offset || h >= out.head_offset + G)
          for (int64_t b = t.b0; b < t.b1; ++b) {
            A* d = static_cast<A*>(grad_row_ptr(n, h, b));
            if (stream) for_vectors<W>(0, V, [&](int64_t v, auto w) MHD_INLINE_BODY {
              if (w == W) L::stream(d + v, L::splat(0));
              else L::stream(d + v, L::splat(0), w);
            });
            else std::memset(d, 0, V * gsize);
          }
  }

  DistillArgs a;
  const FusedOut& out;
  bool gather;
  int64_t N, G, B, V;
  Scale<A> sc;
  A tau;
  bool aggregated;
  A *lse_t, *logconf, *loss, *lse_z;
  int64_t* idx;
  Candidates cand;
  int nt;
  char* grad;
  int64_t vpad;
  bool by_lanes;
  int64_t bb, nb;  // rows b per tile, tiles per group
  bool keep;       // rows of one block keep their softmax terms
  int64_t kept;    // N·bb rows of kept terms, else 0
  bool grouped;    // rows of one block in place kRows at a time
  int64_t share;   // scratch elements per thread
  Scratch<A> scratch;
  vi rows_in[W + kLaneExtra], rows_out[W + kLaneExtra];
  int64_t gsize;
  bool stream;
};

// The launch with fp32 rows of one vector (V <= W) eight at a time, others four: a row of one
// vector is a few operations between its reductions, and with four in flight the core waited
// on their tails; a row of several vectors keeps the accumulators of eight rows in too few
// registers. fp32 rows of up to W + kLaneExtra classes go by lanes where a tile allows it.
// fp16 / bf16 inputs keep the row path four at a time: more instantiations for every pair of
// stored types would double the build's time.
template <class A, class ZIn, class TIn>
void distill_dense(const DistillArgs& a, const FusedOut& out, bool gather) {
  if constexpr (IsF32<A>::value && IsF32<ZIn>::value && IsF32<TIn>::value) {
    if (a.z.size[3] <= Lanes<A>::W) return DenseLaunch<8, true, A, ZIn, TIn>(a, out, gather).run();
    if (a.z.size[3] <= Lanes<A>::W + kLaneExtra) return DenseLaunch<4, true, A, ZIn, TIn>(a, out, gather).run();
  }
  DenseLaunch<4, false, A, ZIn, TIn>(a, out, gather).run();
}

// The reduced loss: the R rows summed in row order into four double accumulators (a fixed
// order: the same bits for any thread count), divided once, rounded once.
template <class A>
void sum_rows(const void* loss, int64_t R, int64_t divisor, void* total) {
  const A* l = static_cast<const A*>(loss);
  double part[4] = {0, 0, 0, 0};
  for (int64_t r = 0; r < R; ++r) part[r & 3] += l[r];
  *static_cast<A*>(total) = (A)(((part[0] + part[1]) + (part[2] + part[3])) / (double)divisor);
}

inline void distill_dense_entry(const DistillArgs& a, int acc, const FusedOut& out) {
  if (acc == F64) {
    distill_dense<double, double, double>(a, out, true);
  } else if (a.z.stride[3] != 1 || a.t.stride[3] != 1) {
    distill_dense<float, float, float>(a, out, true);
  } else {
    with_stored_type(a.z.dtype, [&](auto z_tag) {
      with_stored_type(a.t.dtype, [&](auto t_tag) { distill_dense<float, decltype(z_tag), decltype(t_tag)>(a, out, false); });
    });
  }
  if (out.loss_sum == nullptr) return;
  const int64_t R = a.z.size[0] * a.z.size[1] * a.z.size[2];
  if (acc == F64) sum_rows<double>(out.loss, R, out.sum_divisor, out.loss_sum);
  else sum_rows<float>(out.loss, R, out.sum_divisor, out.loss_sum);
}
