// Types shared by the bindings and every ISA build of the kernels: dtype codes, strided views
// of the caller's tensors, and the table of kernel entry points one ISA build provides.
//
// The kernels never see a torch tensor: Python passes raw pointers, shapes and element strides
// (see mhd_fast/ops/cpp.py), so the build needs pybind11 alone and never torch's C++ ABI.
#pragma once

#include <cstdint>

namespace mhd {

// The dtype codes of mhd_fast/ops/cpp.py.
enum Dtype : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, I32 = 4, I64 = 5, BOOL = 6, I16 = 7 };

// 16-bit storage types; arithmetic always happens after conversion to fp32.
struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

// A tensor of up to 4 dims as the caller holds it: data pointer, dtype, sizes, element strides.
// Unused leading dims have size 1.
struct View {
  void* data = nullptr;
  int dtype = F32;
  int64_t size[4] = {1, 1, 1, 1};
  int64_t stride[4] = {0, 0, 0, 0};
};

// Arguments of the distillation kernels. Z [N, G, B, V] student logits; the teacher is either
// dense logits T [N, G, B, V] or packets values / indices [N, G, B, K]; per-row metadata
// [N, G, B] in the accumulation dtype; idx int64; adj [N, N] bool.
struct DistillArgs {
  View z, t, values, indices, lse_t, logconf_t, idx, adj, lse_z, grad;
  double tau = 1.0;
  bool include_self = false;
  int aggregate = 0;  // Aggregate below
  bool packets = false;
  int threads = 1;
};

enum Aggregate : int { MAX_CONFIDENCE = 0, MEAN = 1, CONFIDENCE_WEIGHTED = 2 };

// Outputs allocated by the caller: loss and lse_z fresh contiguous buffers; dz rows of V
// contiguous elements at element strides dz_stride (n, g, b), e.g. the aux heads of a full
// [N, H1, B, V] gradient, so that the backward writes into it without a copy.
struct DistillOut {
  void* loss = nullptr;   // [N, G, B] accumulation dtype (forward)
  void* lse_z = nullptr;  // [N, G, B] accumulation dtype (forward)
  void* dz = nullptr;     // [N, G, B, V] Z's dtype (backward)
  int64_t dz_stride[3] = {0, 0, 0};
};

// Outputs of the one-launch dense loss (distill_dense), allocated by the caller: the statistics,
// choice, loss and lse_z of every row ([N, G, B], contiguous; idx int64, the rest in the
// accumulation dtype) and, when grad is set, the unit gradient τ(q − p̄) of the full student
// [N, heads, B, V] (grad_dtype, rows of V contiguous elements at element strides grad_stride);
// student group g is head head_offset + g, the other heads get zeros. When loss_sum is set, also
// the rows' sum / sum_divisor into it (a scalar of the accumulation dtype).
struct FusedOut {
  void* lse_t = nullptr;
  void* logconf_t = nullptr;
  int64_t* idx = nullptr;
  void* loss = nullptr;
  void* lse_z = nullptr;
  void* grad = nullptr;
  int grad_dtype = F32;
  int64_t grad_stride[3] = {0, 0, 0};
  int64_t heads = 0, head_offset = 0;
  void* loss_sum = nullptr;
  int64_t sum_divisor = 1;
};

// What check_packets finds in top-k packets (see check_packets.h).
struct PacketCheck {
  int64_t lo = 0, hi = 0;            // the smallest and the largest index
  bool repeated = false;             // some row sends a class twice
  int64_t bad_row = -1;              // the first row (flat) whose sent probabilities sum past 1, or −1
  double bad_lse = 0, bad_mass = 0;  // that row's lse and the sum of its sent probabilities
};

// One ISA build of the kernels (kernels_generic.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
struct KernelTable {
  const char* isa;
  // T [N, G, B, V] -> lse, logconf [N, G, B] (contiguous, accumulation dtype acc).
  void (*teacher_stats)(const View& t, double tau, int acc, void* lse, void* logconf, int threads);
  // logconf [N, G, B] -> idx [N, G, B] int64, has [N] bool.
  void (*select)(const View& logconf, const View& adj, bool include_self, int64_t* idx,
                 bool* has, int threads);
  void (*distill_fwd)(const DistillArgs& a, int acc, const DistillOut& out);
  void (*distill_bwd)(const DistillArgs& a, int acc, const DistillOut& out);
  // Dense teacher: statistics, choice, loss and unit gradient in one launch (FusedOut).
  void (*distill_dense)(const DistillArgs& a, int acc, const FusedOut& out);
  // X [R, V] -> values [R, K] acc, indices [R, K] int32, lse [R] acc.
  void (*topk_compress)(const View& x, int64_t k, double tau, int acc, void* values,
                        int32_t* indices, void* lse, int threads);
  // X [N, H, B, V] (class dim contiguous) <- 0.
  void (*zero_rows)(const View& x, int threads);
  // Packets as they arrive (values [N, G, B, K] in acc, indices int16 / int32 / int64, lse
  // [N, G, B] float32 / float64) -> the packet rows the distillation kernels take: indices
  // int32 [N, G, B, K], lse_t and logconf_t = value_0 − lse_t [N, G, B] in acc (contiguous).
  // False, with *bad the first index (row-major) outside [0, V), when there is one.
  bool (*packet_rows)(const View& values, const View& indices, const View& lse, int64_t V, int acc,
                      int32_t* indices_out, void* lse_t, void* logconf_t, int64_t* bad);
  // Packets values / indices [R0, R1, R2, K], lse [R0, R1, R2] -> what is wrong with them.
  void (*check_packets)(const View& values, const View& indices, const View& lse, PacketCheck* out,
                        int threads);
};

const KernelTable& kernels_generic();
#if defined(__x86_64__) || defined(_M_X64)
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();
#define MHD_HAVE_AVX2_BUILD 1
#endif

}  // namespace mhd
