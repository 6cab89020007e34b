// The distillation loss, forward and backward, one student row at a time (dense teachers and
// packets, every aggregate): the kernels distill_fwd and distill_bwd.
#pragma once

#include "aggregate.h"
#include "distill_packets.h"

// Per student row (i, g, b), teacher rows (j, g, b):
//   max_confidence, dense:   one sweep (kl_row / grad_row) over the student row and the row of
//                            the selected teacher j = idx[i, g, b].
//   max_confidence, packets: KL over K + 1 buckets (docs/method.md §3): the K sent buckets and the rest
//                            bucket p_rest = max(0, 1 − Σ p_k), q_rest = 1 − Σ q_k (none when
//                            K = V). q_rest is summed over the unsent classes in the student
//                            sweep (row_lse with weights), which is the same number without the
//                            cancellation of 1 − Σ q_k when the student's mass sits in the sent
//                            classes. Backward: g·τ·(q_v − p_v) for sent v, g·τ·q_v·(1 −
//                            p_rest/q_rest) for the others (the ratio is 0 when p_rest = 0),
//                            from one exp sweep that keeps q in a row buffer.
//   mean / confidence_weighted: p̄ into a per-thread buffer (aggregate_logits /
//                            aggregate_packets), then the dense sweep against p̄.
// loss = τ²·KL; backward dz = g·τ·(q − p). Clients with no candidate: loss 0, dz 0.
template <class A, class ZIn, class TIn>
void distill(const DistillArgs& a, const DistillOut& out, bool gather, bool backward) {
  using L = Lanes<A>;
  const int64_t N = a.z.size[0], G = a.z.size[1], B = a.z.size[2], V = a.z.size[3];
  const Scale<A> sc(a.tau);
  const A tau = (A)a.tau;
  const bool aggregated = a.aggregate != MAX_CONFIDENCE;
  Candidates cand;
  if (aggregated) cand.build(a.adj, a.include_self);
  const int64_t vpad = round_up(V, L::W);
  // Per thread: the student row, a teacher row, p̄ (or the student's q); with packets, the
  // sent classes per block and the bitmap of sent classes (SentRow).
  const int64_t kpad = a.packets ? round_up(a.values.size[3], L::W) : 0;
  const int64_t share = per_thread<A>(3 * vpad + 3 * kpad);
  const int nt = team(a.threads, N * G * B * V);
  Scratch<A> scratch(nt * share);
  const int64_t count_share = per_thread<int32_t>(V / kBlock + 1);
  const int64_t bit_share = per_thread<uint8_t>(V / 8 + 2);
  Scratch<int32_t> counts(a.packets ? nt * count_share : 0);
  Scratch<uint8_t> sent_bitmap(a.packets ? nt * bit_share : 0);
  if (a.packets) {
    std::memset(counts.data(), 0, nt * count_share * sizeof(int32_t));
    std::memset(sent_bitmap.data(), 0, nt * bit_share);
  }
  A* loss = static_cast<A*>(out.loss);
  A* lse_out = static_cast<A*>(out.lse_z);
  char* dz = static_cast<char*>(out.dz);
  const int64_t row_bytes = V * dtype_size(a.z.dtype);
  // A gradient of A larger than the caches goes past them (as in distill_dense): no line is
  // read for ownership first, which at V = 32000 had cost a second pass over memory.
  const bool stream = backward && a.z.dtype == (sizeof(A) == 4 ? F32 : F64) &&
                      streamable(dz, out.dz_stride, sizeof(A), N * G * B * row_bytes);

  const auto row_body = [&](int64_t r, int64_t n, int64_t g, int64_t b, int tid) {
    A* zbuf = scratch.data() + tid * share;
    A* tbuf = zbuf + vpad;
    A* pbuf = tbuf + vpad;
    int32_t* in_block = a.packets ? counts.data() + tid * count_share : nullptr;
    uint8_t* bits = a.packets ? sent_bitmap.data() + tid * bit_share : nullptr;
    const ZIn* z = row<ZIn>(a.z, n, g, b, V, gather, zbuf);
    const int64_t j = at<int64_t>(a.idx, n, g, b);
    void* dz_row = backward
        ? dz + (n * out.dz_stride[0] + g * out.dz_stride[1] + b * out.dz_stride[2]) * dtype_size(a.z.dtype)
        : nullptr;
    const auto finish = [&](const auto& teacher) {
      if (backward) {
        grad_row(z, V, sc, teacher, at<A>(a.lse_z, n, g, b), at<A>(a.grad, n, g, b) * tau, dz_row, a.z.dtype,
                 stream);
      } else {
        A kl, lse;
        kl_row(z, V, sc, teacher, kl, lse);
        loss[r] = tau * tau * kl;
        lse_out[r] = lse;
      }
    };

    if (aggregated ? cand.count(n) == 0 : j < 0) {
      if (backward) {
        std::memset(dz_row, 0, row_bytes);
      } else {
        A m, lse;
        row_lse(z, V, sc, m, lse);
        loss[r] = 0;
        lse_out[r] = lse;
      }
    } else if (aggregated) {
      if (a.packets) aggregate_packets(a, cand, n, g, b, V, pbuf, pbuf + vpad);
      else aggregate_logits<A, TIn>(a, cand, n, g, b, V, sc, gather, tbuf, pbuf);
      finish(ProbTeacher<A>{pbuf});
    } else if (!a.packets) {
      const TIn* t = row<TIn>(a.t, j, g, b, V, gather, tbuf);
      finish(LogitTeacher<A, TIn>{t, sc, at<A>(a.lse_t, j, g, b)});
    } else {
      PacketRow<A, ZIn> packet{a, sc, z, n, g, b, j, bits, in_block, pbuf, vpad, kpad};
      if (backward) packet.backward(at<A>(a.grad, n, g, b) * tau, dz_row, stream);
      else packet.forward(tau, loss[r], lse_out[r]);
    }
  };
  if constexpr (IsF32<A>::value && IsF32<ZIn>::value) {
    if (a.packets && !gather && V <= L::W + kLaneExtra && B >= L::W && a.z.stride[3] == 1 &&
        a.z.stride[2] == V && a.values.dtype == F32 && a.indices.dtype == I32 &&
        (!backward || out.dz_stride[2] == V) && gather_reach(a.values) && gather_reach(a.indices) &&
        gather_reach(a.lse_t))
      return distill_packet_lanes(a, out, backward, nt, stream, cand, row_body);
  }
  for_rows(N, G, B, nt, row_body);
}

inline void distill_entry(const DistillArgs& a, int acc, const DistillOut& out, bool backward) {
  if (acc == F64) return distill<double, double, double>(a, out, true, backward);
  if (a.z.stride[3] != 1 || (!a.packets && a.t.stride[3] != 1))
    return distill<float, float, float>(a, out, true, backward);
  with_stored_type(a.z.dtype, [&](auto z_tag) {
    using ZIn = decltype(z_tag);
    if (a.packets) return distill<float, ZIn, float>(a, out, false, backward);
    with_stored_type(a.t.dtype, [&](auto t_tag) { distill<float, ZIn, decltype(t_tag)>(a, out, false, backward); });
  });
}

inline void distill_fwd_entry(const DistillArgs& a, int acc, const DistillOut& out) { distill_entry(a, acc, out, false); }
inline void distill_bwd_entry(const DistillArgs& a, int acc, const DistillOut& out) { distill_entry(a, acc, out, true); }
