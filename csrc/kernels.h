// The fused kernels of mhd_fast, written once and compiled once per ISA.
//
// kernels_generic.cpp, kernels_avx2.cpp and kernels_avx512.cpp include this file inside namespace
// mhd::MHD_ISA, after setting the ISA (MHD_LANES, MHD_AVX2 or MHD_AVX512, and a target pragma), so every
// function here, templates included, gets a distinct symbol per ISA and the linker never mixes
// AVX2 code into the portable build. Standard headers are included by those files before the
// ISA switch; this file instantiates no std templates under it.
//
// Shared conventions (the kernel contract of mhd_fast/ops/registry.py):
//   * One call covers the flat row space r = (n·G + g)·B + b of all N clients × G groups ×
//     B rows; OpenMP threads take blocks of rows (for_rows) or tiles (for_tiles), each its own
//     chunk first, then what is left of the others' (Claims). A row is always summed by one
//     thread in a fixed order, so results are bit-identical whatever the thread count and
//     whichever thread takes it.
//   * Inputs are read in place through their element strides when the class dim is contiguous;
//     otherwise (or on the fp64 path) each row is first gathered into a per-thread buffer.
//   * Arithmetic in the accumulation type A: fp32, or fp64 when an input is fp64.
//   * t = x / τ exactly as torch computes it (a multiply when 1/τ is exact); exponentials
//     go through a base-2 polynomial (simd.h).
//   * NaN or +inf in a row -> NaN outputs for that row; −inf = a masked class (p = 0, and
//     0·log 0 = 0); a row of all −inf has lse = −inf and NaN loss.
//
// Each kernel has a header of its own; they build on the runtime (runtime.h: threads, scratch,
// strided access, stores), the row math (rows.h), short rows by lanes (lanes.h) and the
// candidates and aggregation of teachers (aggregate.h). This file holds the table of entry
// points one ISA build provides.

#include "check_packets.h"
#include "distill.h"
#include "distill_dense.h"
#include "select.h"
#include "teacher_stats.h"
#include "topk_compress.h"
#include "zero_rows.h"

inline const KernelTable& table() {
  static const KernelTable t{MHD_ISA_NAME,        teacher_stats_entry, select_entry,      distill_fwd_entry,
                             distill_bwd_entry,   distill_dense_entry, topk_compress_entry, zero_rows_entry,
                             packet_rows_entry,   check_packets_entry};
  return t;
}
