// dtype dispatch shared by the CPU and CUDA kernels; each names its own 16-bit types (c10's or CUDA's), so this
// header needs neither torch nor CUDA.
#pragma once

#include <stdexcept>

#include "permute.h"

namespace megamod {

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with the C++ type of `dtype`.
template <typename BF16, typename F16, typename F>
void dispatch_dtype_as(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
    case DType::kBFloat16: return f(Tag<BF16>{});
    case DType::kFloat16: return f(Tag<F16>{});
  }
  throw std::invalid_argument("megamod._C: unsupported dtype");
}

// Arithmetic with probs pairs rows of dtype T with probs of dtype T or float32 (megatron's fp32 router probs).
template <typename BF16, typename F16, typename F>
void dispatch_with_probs_as(DType dtype, Probs probs, F&& f) {
  dispatch_dtype_as<BF16, F16>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (probs.data == nullptr || probs.dtype == dtype) return f(tag, Tag<T>{});
    if (probs.dtype == DType::kFloat32) return f(tag, Tag<float>{});
    throw std::invalid_argument("megamod._C: probs must have the tokens' dtype or float32");
  });
}

}  // namespace megamod
