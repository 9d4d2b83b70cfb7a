// megamod._C: checks torch tensors and hands raw pointers to the kernels of permute.h, on CPU or (in a build with
// MEGAMOD_WITH_CUDA) on the current CUDA stream. Errors name the argument and what was expected.
#include <torch/extension.h>

#ifdef MEGAMOD_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <optional>
#include <tuple>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "permute.h"

namespace megamod {
namespace {

#ifdef MEGAMOD_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType to_dtype(const Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, float64, bfloat16 or float16, got ", x.scalar_type());
  }
}

void check(const Tensor& x, const char* name, int64_t dim, const Tensor& like) {
  TORCH_CHECK_VALUE(x.dim() == dim, name, " must be ", dim, "-D, got shape ", x.sizes());
  TORCH_CHECK(x.device() == like.device(), name, " is on ", x.device(), " but the other tensors are on ",
              like.device());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
}

// Checks the index map and the probs ([T, E], if any) against it.
RowMap row_map(const Tensor& row_id_map_TE, const OptTensor& probs_TE, const char* probs_name, int64_t num_rows) {
  TORCH_CHECK_TYPE(row_id_map_TE.scalar_type() == at::kInt, "row_id_map must be int32 (as returned by permute), got ",
                   row_id_map_TE.scalar_type());
  check(row_id_map_TE, "row_id_map", 2, row_id_map_TE);
  if (probs_TE) {
    check(*probs_TE, probs_name, 2, row_id_map_TE);
    to_dtype(*probs_TE, probs_name);
    TORCH_CHECK_VALUE(probs_TE->sizes() == row_id_map_TE.sizes(), probs_name, " must be [tokens, experts] = ",
                      row_id_map_TE.sizes(), ", got ", probs_TE->sizes());
  }
  return {row_id_map_TE.data_ptr<int32_t>(), row_id_map_TE.size(0), row_id_map_TE.size(1), num_rows};
}

void check_rows(const Tensor& x_RH, const char* name, int64_t rows, const Tensor& like) {
  check(x_RH, name, 2, like);
  to_dtype(x_RH, name);
  TORCH_CHECK_VALUE(x_RH.size(0) == rows, name, " must have ", rows, " rows, got shape ", x_RH.sizes());
}

// Unpermute multiplies rows by probs: the kernels pair rows with probs of the same dtype or float32.
void check_probs_dtype(const OptTensor& probs_TE, const Tensor& rows) {
  TORCH_CHECK_TYPE(!probs_TE || probs_TE->scalar_type() == rows.scalar_type() || probs_TE->scalar_type() == at::kFloat,
                   "probs must have the tokens' dtype (", rows.scalar_type(), ") or float32, got ",
                   probs_TE->scalar_type());
}

Probs probs_arg(const OptTensor& probs, DType absent_dtype) {
  if (!probs) return {nullptr, absent_dtype};
  return {probs->data_ptr(), to_dtype(*probs, "probs")};
}

void* data_or_null(const OptTensor& x) { return x ? x->data_ptr() : nullptr; }

// A fresh CPU output of many MiB is page-faulted in by the kernel's first write, 4 KiB at a time, and on Linux that
// costs more than the kernel's own copy; asking for transparent huge pages first cuts the faults 512x. This is what
// torch's THP_MEM_ALLOC_ENABLE=1 does for every allocation; the advice is dropped with the memory.
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor out = at::empty(sizes, options);
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1), last = (begin + out.nbytes()) & ~(kHugePage - 1);
  if (out.is_cpu() && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return out;
}

// Runs cpu() for CPU tensors and cuda(stream) for CUDA tensors. cuda is a generic lambda, so its body (the calls to
// the CUDA launchers) is only instantiated in builds with MEGAMOD_WITH_CUDA.
template <typename Cpu, typename Cuda>
void launch(const Tensor& like, Cpu&& cpu, [[maybe_unused]] Cuda&& cuda) {
  if (like.is_cpu()) return cpu();
#ifdef MEGAMOD_WITH_CUDA
  if (like.is_cuda()) {
    const c10::cuda::CUDAGuard guard(like.device());
    cuda(c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
#endif
  TORCH_CHECK(false, "megamod._C: tensors on ", like.device(), " are not supported by this build (with CUDA: ",
              kWithCuda, ")");
}

// Returns (row_id_map [T, E] int32, P). num_out_tokens, when given, must equal routing_map.sum(): on CPU it is
// checked against the count; on CUDA it sizes the output without a device-to-host sync.
std::tuple<Tensor, int64_t> build_row_id_map(const Tensor& routing_map_TE, std::optional<int64_t> num_out_tokens) {
  TORCH_CHECK_TYPE(routing_map_TE.scalar_type() == at::kBool, "routing_map must be bool [tokens, experts], got ",
                   routing_map_TE.scalar_type());
  check(routing_map_TE, "routing_map", 2, routing_map_TE);
  const int64_t T = routing_map_TE.size(0), E = routing_map_TE.size(1);
  TORCH_CHECK_VALUE(T * E < (int64_t(1) << 31), "routing_map has ", T * E, " entries; int32 row ids need < 2^31");
  Tensor row_id_map_TE = at::empty({T, E}, routing_map_TE.options().dtype(at::kInt));
  int64_t num_rows = 0;
  launch(
      routing_map_TE,
      [&] {
        num_rows = build_row_id_map_cpu(routing_map_TE.data_ptr<bool>(), T, E, row_id_map_TE.data_ptr<int32_t>());
        TORCH_CHECK_VALUE(!num_out_tokens || *num_out_tokens == num_rows, "num_out_tokens=", *num_out_tokens,
                          " but routing_map routes ", num_rows,
                          " (token, expert) pairs; permute is dropless and needs them equal");
      },
      [&](auto stream) {
        Tensor offsets_E1 = at::empty({E + 1}, routing_map_TE.options().dtype(at::kLong));
        build_row_id_map_cuda(routing_map_TE.data_ptr<bool>(), T, E, row_id_map_TE.data_ptr<int32_t>(),
                              offsets_E1.data_ptr<int64_t>(), stream);
        num_rows = num_out_tokens ? *num_out_tokens : offsets_E1[E].item<int64_t>();
      });
  return {row_id_map_TE, num_rows};
}

std::tuple<Tensor, OptTensor> permute_fwd(const Tensor& tokens_TH, const Tensor& row_id_map_TE,
                                          const OptTensor& probs_TE, int64_t num_rows) {
  const RowMap map = row_map(row_id_map_TE, probs_TE, "probs", num_rows);
  check_rows(tokens_TH, "tokens", map.num_tokens, row_id_map_TE);
  const int64_t H = tokens_TH.size(1);
  const DType dtype = to_dtype(tokens_TH, "tokens");
  Tensor permuted_PH = empty_output({num_rows, H}, tokens_TH.options());
  OptTensor permuted_probs_P;
  if (probs_TE) permuted_probs_P = at::empty({num_rows}, probs_TE->options());
  const Probs probs = probs_arg(probs_TE, dtype);
  launch(
      tokens_TH,
      [&] { permute_fwd_cpu(tokens_TH.data_ptr(), dtype, probs, map, H, permuted_PH.data_ptr(),
                            data_or_null(permuted_probs_P)); },
      [&](auto stream) {
        permute_fwd_cuda(tokens_TH.data_ptr(), dtype, probs, map, H, permuted_PH.data_ptr(),
                         data_or_null(permuted_probs_P), stream);
      });
  return {permuted_PH, permuted_probs_P};
}

std::tuple<Tensor, OptTensor> permute_bwd(const Tensor& grad_permuted_PH, const OptTensor& grad_permuted_probs_P,
                                          const Tensor& row_id_map_TE) {
  const RowMap map = row_map(row_id_map_TE, std::nullopt, "", grad_permuted_PH.size(0));
  check_rows(grad_permuted_PH, "grad_permuted", map.num_rows, row_id_map_TE);
  const int64_t H = grad_permuted_PH.size(1);
  const DType dtype = to_dtype(grad_permuted_PH, "grad_permuted");
  OptTensor grad_probs_TE;
  if (grad_permuted_probs_P) {
    check(*grad_permuted_probs_P, "grad_permuted_probs", 1, row_id_map_TE);
    TORCH_CHECK_VALUE(grad_permuted_probs_P->size(0) == map.num_rows, "grad_permuted_probs must have ", map.num_rows,
                      " rows, got ", grad_permuted_probs_P->size(0));
    grad_probs_TE = at::empty({map.num_tokens, map.num_experts}, grad_permuted_probs_P->options());
  }
  Tensor grad_tokens_TH = empty_output({map.num_tokens, H}, grad_permuted_PH.options());
  const Probs grad_probs = probs_arg(grad_permuted_probs_P, dtype);
  launch(
      grad_permuted_PH,
      [&] { permute_bwd_cpu(grad_permuted_PH.data_ptr(), dtype, grad_probs, map, H, grad_tokens_TH.data_ptr(),
                            data_or_null(grad_probs_TE)); },
      [&](auto stream) {
        permute_bwd_cuda(grad_permuted_PH.data_ptr(), dtype, grad_probs, map, H, grad_tokens_TH.data_ptr(),
                         data_or_null(grad_probs_TE), stream);
      });
  return {grad_tokens_TH, grad_probs_TE};
}

Tensor unpermute_fwd(const Tensor& permuted_PH, const Tensor& row_id_map_TE, const OptTensor& probs_TE) {
  const RowMap map = row_map(row_id_map_TE, probs_TE, "probs", permuted_PH.size(0));
  check_rows(permuted_PH, "permuted_tokens", map.num_rows, row_id_map_TE);
  check_probs_dtype(probs_TE, permuted_PH);
  // One row per routed pair. Checked on CPU, where it is a cheap pass over [T, E]; on CUDA it would cost a sync, and
  // the kernels only skip rows past P.
  if (permuted_PH.is_cpu()) {
    const int64_t routed = row_id_map_TE.ge(0).sum().item<int64_t>();
    TORCH_CHECK_VALUE(routed == map.num_rows, "permuted_tokens must have ", routed,
                      " rows (one per routed (token, expert) pair), got ", map.num_rows);
  }
  const int64_t H = permuted_PH.size(1);
  const DType dtype = to_dtype(permuted_PH, "permuted_tokens");
  Tensor out_TH = empty_output({map.num_tokens, H}, permuted_PH.options());
  const Probs probs = probs_arg(probs_TE, dtype);
  launch(
      permuted_PH, [&] { unpermute_fwd_cpu(permuted_PH.data_ptr(), dtype, probs, map, H, out_TH.data_ptr()); },
      [&](auto stream) {
        unpermute_fwd_cuda(permuted_PH.data_ptr(), dtype, probs, map, H, out_TH.data_ptr(), stream);
      });
  return out_TH;
}

// Only for unpermute with probs: without them, unpermute's gradient is permute_fwd of grad_out.
std::tuple<Tensor, Tensor> unpermute_bwd(const Tensor& grad_out_TH, const Tensor& permuted_PH,
                                         const Tensor& row_id_map_TE, const Tensor& probs_TE) {
  const RowMap map = row_map(row_id_map_TE, probs_TE, "probs", permuted_PH.size(0));
  check_rows(permuted_PH, "permuted_tokens", map.num_rows, row_id_map_TE);
  check_rows(grad_out_TH, "grad_out", map.num_tokens, row_id_map_TE);
  check_probs_dtype(probs_TE, permuted_PH);
  TORCH_CHECK_VALUE(grad_out_TH.size(1) == permuted_PH.size(1) && grad_out_TH.dtype() == permuted_PH.dtype(),
                    "grad_out must be [tokens, hidden] in the dtype of permuted_tokens, got ", grad_out_TH.sizes(),
                    " ", grad_out_TH.scalar_type());
  const int64_t H = permuted_PH.size(1);
  const DType dtype = to_dtype(permuted_PH, "permuted_tokens");
  Tensor grad_permuted_PH = empty_output(permuted_PH.sizes(), permuted_PH.options());
  Tensor grad_probs_TE = at::empty_like(probs_TE);
  const Probs probs = probs_arg(probs_TE, dtype);
  launch(
      permuted_PH,
      [&] { unpermute_bwd_cpu(grad_out_TH.data_ptr(), permuted_PH.data_ptr(), dtype, probs, map, H,
                              grad_permuted_PH.data_ptr(), grad_probs_TE.data_ptr()); },
      [&](auto stream) {
        unpermute_bwd_cuda(grad_out_TH.data_ptr(), permuted_PH.data_ptr(), dtype, probs, map, H,
                           grad_permuted_PH.data_ptr(), grad_probs_TE.data_ptr(), stream);
      });
  return {grad_permuted_PH, grad_probs_TE};
}

}  // namespace
}  // namespace megamod

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace megamod;
  m.doc() = "MoE token permute / unpermute kernels (see csrc/permute.h); use megamod.ops, which adds autograd.";
  m.attr("with_cuda") = kWithCuda;
  m.def("build_row_id_map", &build_row_id_map, py::arg("routing_map"), py::arg("num_out_tokens") = py::none());
  m.def("permute_fwd", &permute_fwd, py::arg("tokens"), py::arg("row_id_map"), py::arg("probs"), py::arg("num_rows"));
  m.def("permute_bwd", &permute_bwd, py::arg("grad_permuted"), py::arg("grad_permuted_probs"), py::arg("row_id_map"));
  m.def("unpermute_fwd", &unpermute_fwd, py::arg("permuted_tokens"), py::arg("row_id_map"), py::arg("probs"));
  m.def("unpermute_bwd", &unpermute_bwd, py::arg("grad_out"), py::arg("permuted_tokens"), py::arg("row_id_map"),
        py::arg("probs"));
}
