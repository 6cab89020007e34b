// mhd_fast._C: the Python face of the fused kernels.
//
// Every function takes its tensors as (data pointer, dtype code, sizes, element strides) tuples
// built by mhd_fast/ops/cpp.py, checks what memory safety needs (dtypes, shapes, index ranges;
// ValueError naming the argument), releases the GIL and runs one kernel call over all rows.
// The kernels come in ISA builds (kernels_generic.cpp, kernels_avx2.cpp, kernels_avx512.cpp); the best one the CPU
// supports is chosen at import, and set_isa() switches for tests and benchmarks.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"

namespace py = pybind11;

namespace mhd {
namespace {

using TensorArg = std::tuple<uintptr_t, int, std::vector<int64_t>, std::vector<int64_t>>;

std::vector<const KernelTable*> supported_isas() {
  std::vector<const KernelTable*> isas{&kernels_generic()};
#ifdef MHD_HAVE_AVX2_BUILD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    isas.push_back(&kernels_avx2());
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      isas.push_back(&kernels_avx512());
  }
#endif
  return isas;
}

const std::vector<const KernelTable*>& isas() {
  static const std::vector<const KernelTable*> all = supported_isas();
  return all;
}

std::atomic<const KernelTable*> active{nullptr};

const KernelTable& kernels() {
  const KernelTable* t = active.load();
  if (t == nullptr) {
    t = isas().back();  // the widest the CPU supports
    active.store(t);
  }
  return *t;
}

std::string dims(const View& v, int ndim) {
  std::string s = "[";
  for (int d = 0; d < ndim; ++d) s += (d ? ", " : "") + std::to_string(v.size[d]);
  return s + "]";
}

// A View of the caller's tensor with exactly ndim dims (sizes left-aligned).
View view(const TensorArg& t, const char* name, int ndim) {
  const auto& [ptr, dtype, sizes, strides] = t;
  if ((int)sizes.size() != ndim || strides.size() != sizes.size())
    throw py::value_error(std::string(name) + " must have " + std::to_string(ndim) + " dims, got " +
                          std::to_string(sizes.size()));
  View v;
  v.data = reinterpret_cast<void*>(ptr);
  v.dtype = dtype;
  for (int d = 0; d < ndim; ++d) {
    if (sizes[d] < 0) throw py::value_error(std::string(name) + " has a negative size");
    v.size[d] = sizes[d];
    v.stride[d] = strides[d];
  }
  return v;
}

void expect_dtype(const View& v, const char* name, std::initializer_list<int> allowed, const char* what) {
  for (int d : allowed)
    if (v.dtype == d) return;
  throw py::value_error(std::string(name) + " must be " + what + ", got dtype code " + std::to_string(v.dtype));
}

void expect_float(const View& v, const char* name) {
  expect_dtype(v, name, {F32, F16, BF16, F64}, "float32, float16, bfloat16 or float64");
}

void expect_acc(const View& v, const char* name, int acc) {
  expect_dtype(v, name, {acc}, acc == F64 ? "float64 (the accumulation dtype)" : "float32 (the accumulation dtype)");
}

void expect_acc_code(int acc) {
  if (acc != F32 && acc != F64) throw py::value_error("acc must be the code of float32 or float64");
}

void expect_rows(const View& v, const char* name, const View& like, int ndim) {
  for (int d = 0; d < ndim; ++d)
    if (v.size[d] != like.size[d])
      throw py::value_error(std::string(name) + " must have shape " + dims(like, ndim) + ", got " + dims(v, ndim));
}

// Every element of an integer tensor in [lo, hi): the kernels index memory with them.
template <class T>
void expect_range(const View& v, int ndim, int64_t lo, int64_t hi, const char* name) {
  int64_t total = 1;
  for (int d = 0; d < ndim; ++d) total *= v.size[d];
  const T* p = static_cast<const T*>(v.data);
  int64_t i[4] = {0, 0, 0, 0}, off = 0;
  for (int64_t e = 0; e < total; ++e) {
    const int64_t x = p[off];
    if (x < lo || x >= hi)
      throw py::value_error(std::string(name) + " must lie in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                            "), got " + std::to_string(x));
    for (int d = ndim - 1; d >= 0; --d) {  // step the multi-index like an odometer
      off += v.stride[d];
      if (++i[d] < v.size[d]) break;
      off -= v.stride[d] * v.size[d];
      i[d] = 0;
    }
  }
}

// adj [N, N] bool (N = the student's clients), τ > 0, the aggregate and the thread count, checked, into a.
void graph_args(DistillArgs& a, const TensorArg& adj, double tau, bool include_self, int aggregate, int threads) {
  a.adj = view(adj, "adj", 2);
  expect_dtype(a.adj, "adj", {BOOL}, "bool");
  if (a.adj.size[0] != a.z.size[0] || a.adj.size[1] != a.z.size[0])
    throw py::value_error("adj must have shape [N, N] with N = " + std::to_string(a.z.size[0]) + ", got " +
                          dims(a.adj, 2));
  if (!(tau > 0)) throw py::value_error("tau must be > 0, got " + std::to_string(tau));
  if (aggregate < MAX_CONFIDENCE || aggregate > CONFIDENCE_WEIGHTED)
    throw py::value_error("aggregate must be 0 (max_confidence), 1 (mean) or 2 (confidence_weighted)");
  a.tau = tau;
  a.include_self = include_self;
  a.aggregate = aggregate;
  a.threads = threads;
}

// The student logits [N, G, B, V] (V >= 1) and the accumulation dtype code, checked, into a.
void student_arg(DistillArgs& a, const TensorArg& z, int acc) {
  expect_acc_code(acc);
  a.z = view(z, "student", 4);
  expect_float(a.z, "student");
  if (a.z.size[3] < 1) throw py::value_error("student must have V >= 1 classes");
}

// Dense teacher logits of the student's shape, checked, into a.
void dense_teacher_arg(DistillArgs& a, const TensorArg& t) {
  a.t = view(t, "teacher", 4);
  expect_float(a.t, "teacher");
  expect_rows(a.t, "teacher", a.z, 4);
}

// Packet values [N, G, B, K] in the accumulation dtype, rows of the student's, 1 <= K <= V,
// checked, into a (a.packets set).
void packet_values_arg(DistillArgs& a, const TensorArg& values, const char* name, int acc) {
  a.packets = true;
  a.values = view(values, name, 4);
  expect_acc(a.values, name, acc);
  expect_rows(a.values, name, a.z, 3);
  if (a.values.size[3] < 1 || a.values.size[3] > a.z.size[3])
    throw py::value_error(std::string(name) + " must hold K in [1, V = " + std::to_string(a.z.size[3]) +
                          "] per row, got K = " + std::to_string(a.values.size[3]));
}

// The arguments shared by the forward and backward of the distillation loss, checked.
DistillArgs distill_args(const TensorArg& z, const std::optional<TensorArg>& t,
                         const std::optional<TensorArg>& values, const std::optional<TensorArg>& indices,
                         const TensorArg& lse_t, const TensorArg& logconf_t, const TensorArg& idx,
                         const TensorArg& adj, double tau, bool include_self, int aggregate, int acc, int threads) {
  DistillArgs a;
  student_arg(a, z, acc);
  if (t.has_value() == (values.has_value() || indices.has_value()))
    throw py::value_error("teacher: pass either dense logits or (values, indices) packets");
  a.packets = !t.has_value();
  if (a.packets) {
    if (!indices.has_value() || !values.has_value()) throw py::value_error("teacher packets need values and indices");
    packet_values_arg(a, *values, "values", acc);
    a.indices = view(*indices, "indices", 4);
    expect_dtype(a.indices, "indices", {I32}, "int32");
    expect_rows(a.indices, "indices", a.values, 4);
    expect_range<int32_t>(a.indices, 4, 0, a.z.size[3], "indices");
  } else {
    dense_teacher_arg(a, *t);
  }
  a.lse_t = view(lse_t, "lse_t", 3);
  a.logconf_t = view(logconf_t, "logconf_t", 3);
  a.idx = view(idx, "idx", 3);
  expect_acc(a.lse_t, "lse_t", acc);
  expect_acc(a.logconf_t, "logconf_t", acc);
  expect_dtype(a.idx, "idx", {I64}, "int64");
  expect_rows(a.lse_t, "lse_t", a.z, 3);
  expect_rows(a.logconf_t, "logconf_t", a.z, 3);
  expect_rows(a.idx, "idx", a.z, 3);
  expect_range<int64_t>(a.idx, 3, -1, a.z.size[0], "idx");
  graph_args(a, adj, tau, include_self, aggregate, threads);
  return a;
}

void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// A contiguous View of rows [N, G, B] (or [N, G, B, K]) at data.
View rows_view(void* data, int dtype, const View& like, int ndim, int64_t k = 1) {
  View v;
  v.data = data;
  v.dtype = dtype;
  for (int d = 0; d < 3; ++d) v.size[d] = like.size[d];
  v.size[3] = ndim == 4 ? k : 1;
  v.stride[3] = ndim == 4 ? 1 : 0;
  v.stride[2] = ndim == 4 ? k : 1;
  v.stride[1] = v.stride[2] * v.size[2];
  v.stride[0] = v.stride[1] * v.size[1];
  return v;
}

}  // namespace

// The functions of the module: each checks its arguments, releases the GIL and calls one kernel.
namespace api {

std::string isa() { return kernels().isa; }

std::vector<std::string> isa_names() {
  std::vector<std::string> names;
  for (const KernelTable* t : isas()) names.push_back(t->isa);
  return names;
}

void set_isa(const std::string& name) {
  for (const KernelTable* t : isas())
    if (name == t->isa) return active.store(t);
  throw py::value_error("isa must be one this CPU supports (see isas()), got '" + name + "'");
}

void teacher_stats(const TensorArg& teacher, double tau, int acc, uintptr_t lse, uintptr_t logconf, int threads) {
  expect_acc_code(acc);
  const View t = view(teacher, "teacher", 4);
  expect_float(t, "teacher");
  if (t.size[3] < 1) throw py::value_error("teacher must have V >= 1 classes");
  if (!(tau > 0)) throw py::value_error("tau must be > 0, got " + std::to_string(tau));
  py::gil_scoped_release nogil;
  kernels().teacher_stats(t, tau, acc, ptr(lse), ptr(logconf), threads);
}

void select(const TensorArg& logconf, const TensorArg& adj, bool include_self, uintptr_t idx, uintptr_t has,
            int threads) {
  const View lc = view(logconf, "logconf", 3);
  const View a = view(adj, "adj", 2);
  expect_dtype(lc, "logconf", {F32, F64}, "float32 or float64");
  expect_dtype(a, "adj", {BOOL}, "bool");
  if (a.size[0] != lc.size[0] || a.size[1] != lc.size[0])
    throw py::value_error("adj must have shape [N, N] with N = " + std::to_string(lc.size[0]) + ", got " +
                          dims(a, 2));
  py::gil_scoped_release nogil;
  kernels().select(lc, a, include_self, static_cast<int64_t*>(ptr(idx)), static_cast<bool*>(ptr(has)), threads);
}

void distill_fwd(const TensorArg& z, const std::optional<TensorArg>& t, const std::optional<TensorArg>& values,
                 const std::optional<TensorArg>& indices, const TensorArg& lse_t, const TensorArg& logconf_t,
                 const TensorArg& idx, const TensorArg& adj, double tau, bool include_self, int aggregate, int acc,
                 uintptr_t loss, uintptr_t lse_z, int threads) {
  const DistillArgs a =
      distill_args(z, t, values, indices, lse_t, logconf_t, idx, adj, tau, include_self, aggregate, acc, threads);
  DistillOut out;
  out.loss = ptr(loss);
  out.lse_z = ptr(lse_z);
  py::gil_scoped_release nogil;
  kernels().distill_fwd(a, acc, out);
}

void distill_topk_packets(const TensorArg& z, const TensorArg& values, const TensorArg& indices, const TensorArg& lse,
                          const TensorArg& adj, double tau, bool include_self, int aggregate, int acc,
                          uintptr_t indices_out, uintptr_t lse_t, uintptr_t logconf_t, uintptr_t idx, uintptr_t loss,
                          uintptr_t lse_z, int threads) {
  DistillArgs a;
  student_arg(a, z, acc);
  packet_values_arg(a, values, "teacher.values", acc);
  const int64_t V = a.z.size[3], K = a.values.size[3];
  const View ind = view(indices, "teacher.indices", 4);
  expect_dtype(ind, "teacher.indices", {I16, I32, I64}, "int16, int32 or int64");
  expect_rows(ind, "teacher.indices", a.values, 4);
  const View l = view(lse, "teacher.lse", 3);
  expect_dtype(l, "teacher.lse", {F32, F64}, "float32 or float64");
  expect_rows(l, "teacher.lse", a.z, 3);
  graph_args(a, adj, tau, include_self, aggregate, threads);
  int64_t bad;
  if (!kernels().packet_rows(a.values, ind, l, V, acc, static_cast<int32_t*>(ptr(indices_out)), ptr(lse_t),
                             ptr(logconf_t), &bad))
    throw py::value_error("teacher.indices must lie in [0, " + std::to_string(V) + "), got " + std::to_string(bad));
  a.indices = rows_view(ptr(indices_out), I32, a.z, 4, K);
  a.lse_t = rows_view(ptr(lse_t), acc, a.z, 3);
  a.logconf_t = rows_view(ptr(logconf_t), acc, a.z, 3);
  a.idx = rows_view(ptr(idx), I64, a.z, 3);
  std::unique_ptr<bool[]> has(new bool[a.z.size[0]]);
  DistillOut out;
  out.loss = ptr(loss);
  out.lse_z = ptr(lse_z);
  py::gil_scoped_release nogil;
  kernels().select(a.logconf_t, a.adj, include_self, static_cast<int64_t*>(ptr(idx)), has.get(), threads);
  kernels().distill_fwd(a, acc, out);
}

void distill_bwd(const TensorArg& grad, const TensorArg& z, const std::optional<TensorArg>& t,
                 const std::optional<TensorArg>& values, const std::optional<TensorArg>& indices,
                 const TensorArg& lse_t, const TensorArg& logconf_t, const TensorArg& idx, const TensorArg& adj,
                 const TensorArg& lse_z, double tau, bool include_self, int aggregate, int acc, uintptr_t dz,
                 const std::vector<int64_t>& dz_strides, int threads) {
  DistillArgs a =
      distill_args(z, t, values, indices, lse_t, logconf_t, idx, adj, tau, include_self, aggregate, acc, threads);
  a.grad = view(grad, "grad", 3);
  a.lse_z = view(lse_z, "lse_z", 3);
  expect_acc(a.grad, "grad", acc);
  expect_acc(a.lse_z, "lse_z", acc);
  expect_rows(a.grad, "grad", a.z, 3);
  expect_rows(a.lse_z, "lse_z", a.z, 3);
  DistillOut out;
  out.dz = ptr(dz);
  if (dz_strides.size() != 3) throw py::value_error("dz_strides must hold 3 element strides (n, g, b)");
  for (int d = 0; d < 3; ++d) out.dz_stride[d] = dz_strides[d];
  py::gil_scoped_release nogil;
  kernels().distill_bwd(a, acc, out);
}

void distill_dense(const TensorArg& z, const TensorArg& t, const TensorArg& adj, double tau, bool include_self,
                   int aggregate, int acc, uintptr_t lse_t, uintptr_t logconf_t, uintptr_t idx, uintptr_t loss,
                   uintptr_t lse_z, uintptr_t grad, const std::vector<int64_t>& grad_strides, int64_t heads,
                   int64_t head_offset, int threads, uintptr_t loss_sum, int64_t sum_divisor) {
  DistillArgs a;
  student_arg(a, z, acc);
  dense_teacher_arg(a, t);
  graph_args(a, adj, tau, include_self, aggregate, threads);
  FusedOut out;
  out.lse_t = ptr(lse_t);
  out.logconf_t = ptr(logconf_t);
  out.idx = static_cast<int64_t*>(ptr(idx));
  out.loss = ptr(loss);
  out.lse_z = ptr(lse_z);
  out.grad = ptr(grad);
  out.grad_dtype = acc;
  if (grad != 0) {
    if (grad_strides.size() != 3) throw py::value_error("grad_strides must hold 3 element strides (n, h, b)");
    if (head_offset < 0 || head_offset + a.z.size[1] > heads)
      throw py::value_error("head_offset + G must lie within the gradient's " + std::to_string(heads) + " heads");
    for (int d = 0; d < 3; ++d) out.grad_stride[d] = grad_strides[d];
    out.heads = heads;
    out.head_offset = head_offset;
  }
  if (loss_sum != 0 && sum_divisor < 1) throw py::value_error("sum_divisor must be >= 1");
  out.loss_sum = ptr(loss_sum);
  out.sum_divisor = sum_divisor;
  py::gil_scoped_release nogil;
  kernels().distill_dense(a, acc, out);
}

void topk_compress(const TensorArg& logits, int64_t k, double tau, int acc, uintptr_t values, uintptr_t indices,
                   uintptr_t lse, int threads) {
  expect_acc_code(acc);
  const View x2 = view(logits, "logits", 2);
  expect_float(x2, "logits");
  if (k < 1 || k > x2.size[1])
    throw py::value_error("k must lie in [1, V = " + std::to_string(x2.size[1]) + "], got " + std::to_string(k));
  if (x2.size[1] > INT32_MAX) throw py::value_error("logits must have V < 2^31 (int32 indices)");
  if (!(tau > 0)) throw py::value_error("tau must be > 0, got " + std::to_string(tau));
  View x;  // [R, V] seen as [1, 1, R, V]: the kernels' row space
  x.data = x2.data;
  x.dtype = x2.dtype;
  x.size[2] = x2.size[0];
  x.size[3] = x2.size[1];
  x.stride[2] = x2.stride[0];
  x.stride[3] = x2.stride[1];
  py::gil_scoped_release nogil;
  kernels().topk_compress(x, k, tau, acc, ptr(values), static_cast<int32_t*>(ptr(indices)), ptr(lse), threads);
}

py::tuple check_packets(const TensorArg& values, const TensorArg& indices, const TensorArg& lse, int threads) {
  const View v = view(values, "teacher.values", 4);
  const View i = view(indices, "teacher.indices", 4);
  const View l = view(lse, "teacher.lse", 3);
  expect_float(v, "teacher.values");
  expect_dtype(i, "teacher.indices", {I16, I32, I64}, "int16, int32 or int64");
  expect_dtype(l, "teacher.lse", {F32, F64}, "float32 or float64");
  expect_rows(i, "teacher.indices", v, 4);
  expect_rows(l, "teacher.lse", v, 3);
  if (v.size[0] * v.size[1] * v.size[2] * v.size[3] == 0)
    throw py::value_error("teacher.values must hold at least one row of K >= 1 values");
  PacketCheck c;
  {
    py::gil_scoped_release nogil;
    kernels().check_packets(v, i, l, &c, threads);
  }
  return py::make_tuple(c.lo, c.hi, c.repeated, c.bad_row, c.bad_lse, c.bad_mass);
}

void zero_rows(const TensorArg& x, int threads) {
  const View v = view(x, "x", 4);
  if (v.size[3] > 1 && v.stride[3] != 1) throw py::value_error("x must have a contiguous last dim");
  py::gil_scoped_release nogil;
  kernels().zero_rows(v, threads);
}

bool advise_huge_pages(uintptr_t address, int64_t nbytes) {
  if (address % 4096 != 0 || nbytes < 0 || nbytes % 4096 != 0)
    throw py::value_error("advise_huge_pages takes a page-aligned address and a whole number of pages");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  return madvise(reinterpret_cast<void*>(address), static_cast<size_t>(nbytes), MADV_HUGEPAGE) == 0;
#else
  return false;
#endif
}

}  // namespace api
}  // namespace mhd

PYBIND11_MODULE(_C, m) {
  namespace api = mhd::api;
  using py::arg;
  m.doc() = "Fused C++ kernels of mhd_fast (raw buffers in, raw buffers out; see mhd_fast/ops/cpp.py).";
  m.def("isa", &api::isa, "The ISA build the kernels run on now.");
  m.def("isas", &api::isa_names, "The ISA builds this CPU can run, the widest last.");
  m.def("set_isa", &api::set_isa, arg("name"), "Run the kernels on another ISA build (tests and benchmarks of the fallback).");
  m.def("teacher_stats", &api::teacher_stats, arg("teacher"), arg("tau"), arg("acc"), arg("lse"), arg("logconf"),
        arg("threads"));
  m.def("select", &api::select, arg("logconf"), arg("adj"), arg("include_self"), arg("idx"), arg("has"),
        arg("threads"));
  m.def("distill_fwd", &api::distill_fwd, arg("student"), arg("teacher"), arg("values"), arg("indices"),
        arg("lse_t"), arg("logconf_t"), arg("idx"), arg("adj"), arg("tau"), arg("include_self"), arg("aggregate"),
        arg("acc"), arg("loss"), arg("lse_z"), arg("threads"));
  m.def("distill_topk_packets", &api::distill_topk_packets, arg("student"), arg("values"), arg("indices"), arg("lse"),
        arg("adj"), arg("tau"), arg("include_self"), arg("aggregate"), arg("acc"), arg("indices_out"), arg("lse_t"),
        arg("logconf_t"), arg("idx"), arg("loss"), arg("lse_z"), arg("threads"),
        "A packet teacher's max_confidence / mean / confidence_weighted loss forward in one call: the packet's rows "
        "(indices as int32, lse_t, logconf_t), the teacher choice (idx) and the loss rows (loss, lse_z).");
  m.def("distill_bwd", &api::distill_bwd, arg("grad"), arg("student"), arg("teacher"), arg("values"), arg("indices"),
        arg("lse_t"), arg("logconf_t"), arg("idx"), arg("adj"), arg("lse_z"), arg("tau"), arg("include_self"),
        arg("aggregate"), arg("acc"), arg("dz"), arg("dz_strides"), arg("threads"));
  m.def("distill_dense", &api::distill_dense, arg("student"), arg("teacher"), arg("adj"), arg("tau"),
        arg("include_self"), arg("aggregate"), arg("acc"), arg("lse_t"), arg("logconf_t"), arg("idx"), arg("loss"),
        arg("lse_z"), arg("grad"), arg("grad_strides"), arg("heads"), arg("head_offset"), arg("threads"),
        arg("loss_sum") = 0, arg("sum_divisor") = 1,
        "The dense loss in one launch; with loss_sum, also the rows' sum / sum_divisor (a scalar of the "
        "accumulation dtype) in a fixed order.");
  m.def("topk_compress", &api::topk_compress, arg("logits"), arg("k"), arg("tau"), arg("acc"), arg("values"),
        arg("indices"), arg("lse"), arg("threads"));
  m.def("check_packets", &api::check_packets, arg("values"), arg("indices"), arg("lse"), arg("threads"),
        "Top-k packets values / indices [R0, R1, R2, K], lse [R0, R1, R2] -> (the smallest index, the largest, "
        "whether a row sends a class twice, the first flat row whose sent probabilities exp(values - lse) sum past "
        "1 beyond rounding or -1, that row's lse, its sum).");
  m.def("zero_rows", &api::zero_rows, arg("x"), arg("threads"),
        "Zeros every row of x [N, H, B, V] in place (the heads of a gradient that do not learn).");
  m.def("advise_huge_pages", &api::advise_huge_pages, arg("address"), arg("nbytes"),
        "Asks the kernel for transparent huge pages on [address, address + nbytes) (memory not yet touched gets "
        "them when first written); whether it agreed. A hint: false where the system has none.");
}
