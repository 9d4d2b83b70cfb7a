// CPU kernels for permute / unpermute (contracts in permute.h).
//
// Each kernel is parallel over tokens: token t reads or writes the rows row_id_TE[t, :], and since the row map is a
// bijection onto [0, P), every output row is written by exactly one thread; the scatter needs no atomics.
#include "dispatch.h"
#include "permute.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <utility>
#include <vector>

// torch multiplies and adds in separate ops, rounding in between; GCC would fuse a * b + c into an FMA in C++ (and the
// AVX clones below can), which changes the last bit. Keep them apart so fp32 results equal megatron's exactly.
#pragma GCC optimize("fp-contract=off")

namespace megamod {
namespace {

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  dispatch_dtype_as<c10::BFloat16, c10::Half>(dtype, std::forward<F>(f));
}

template <typename F>
void dispatch_with_probs(DType dtype, Probs probs, F&& f) {
  dispatch_with_probs_as<c10::BFloat16, c10::Half>(dtype, probs, std::forward<F>(f));
}

// torch's type promotion for the pairs above, and its accumulation type.
template <typename T, typename Q>
using promote_t = std::conditional_t<std::is_same_v<T, Q>, T,
                                     std::conditional_t<std::is_same_v<T, double>, double, float>>;
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Conversions that GCC vectorizes (c10::BFloat16's own rounding branches per element); results equal torch's: round
// to nearest even, NaN to 0x7fc0.
template <typename A, typename T>
inline A widen(T x) {
  return static_cast<A>(x);
}
template <>
inline float widen<float, c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = uint32_t(x.x) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}
template <typename T, typename A>
inline T narrow(A x) {
  return static_cast<T>(x);
}
template <>
inline c10::BFloat16 narrow<c10::BFloat16, float>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}
// x rounded to the precision of P, as torch rounds a product computed in P.
template <typename P, typename A>
inline A round_to(A x) {
  return widen<A>(narrow<P>(x));
}

// The row loops are compiled for AVX-512, AVX2 and baseline x86-64, picked at load time: on 128-bit vectors the bf16
// rounding made unpermute 2.5x slower than its memory traffic (measured at H=1024 on one core).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEGAMOD_ROW_LOOP __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MEGAMOD_ROW_LOOP
#endif

template <typename A, typename T>
MEGAMOD_ROW_LOOP void add_row(A* __restrict acc, const T* __restrict src, int64_t H) {
  for (int64_t h = 0; h < H; ++h) acc[h] += widen<A>(src[h]);
}

// acc += src * p, each product rounded to the promoted dtype P, as torch's multiply rounds it.
template <typename P, typename A, typename T>
MEGAMOD_ROW_LOOP void add_scaled_row(A* __restrict acc, const T* __restrict src, A p, int64_t H) {
  for (int64_t h = 0; h < H; ++h) acc[h] += round_to<P>(widen<A>(src[h]) * p);
}

template <typename T, typename A>
MEGAMOD_ROW_LOOP void store_row(T* __restrict dst, const A* __restrict acc, int64_t H) {
  for (int64_t h = 0; h < H; ++h) dst[h] = narrow<T>(acc[h]);
}

// dx = g * p in T; returns <g, x> with products rounded to P, summed in A.
template <typename P, typename A, typename T>
MEGAMOD_ROW_LOOP A scale_row_and_dot(T* __restrict dx, const T* __restrict g, const T* __restrict x, A p, int64_t H) {
  A dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t h = 0; h < H; ++h) {
    const A gh = widen<A>(g[h]);
    dx[h] = narrow<T>(round_to<P>(gh * p));
    dot += round_to<P>(gh * widen<A>(x[h]));
  }
  return dot;
}

// Enough tokens per task that a task moves tens of KiB: below that, threading costs more than it saves.
int64_t grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(H, 1)); }

// dst_TH[t] = sum_e scale(t, e) * src_PH[row(t, e)], accumulated in acc_t; scale is 1 without probs. When
// src_probs_P is given, also dst_probs_TE[t, e] = src_probs_P[row(t, e)] (0 where unrouted).
template <typename T, typename Q>
void combine(const T* src_PH, const Q* probs_TE, const Q* src_probs_P, Q* dst_probs_TE, const RowMap& map, int64_t H,
             T* dst_TH) {
  using P = promote_t<T, Q>;
  using A = acc_t<P>;
  const int64_t E = map.num_experts;
  at::parallel_for(0, map.num_tokens, grain(H), [&](int64_t begin, int64_t end) {
    // Accumulate straight into the output row when it already has the accumulation type.
    std::vector<A> buffer(std::is_same_v<T, A> ? 0 : H);
    for (int64_t t = begin; t < end; ++t) {
      A* acc = nullptr;
      if constexpr (std::is_same_v<T, A>) {
        acc = dst_TH + t * H;
      } else {
        acc = buffer.data();
      }
      std::fill(acc, acc + H, A(0));
      for (int64_t e = 0; e < E; ++e) {
        const int32_t r = map.row_id_TE[t * E + e];
        const bool routed = r >= 0 && r < map.num_rows;
        if (dst_probs_TE != nullptr) dst_probs_TE[t * E + e] = routed ? src_probs_P[r] : Q(0);
        if (!routed) continue;
        if (probs_TE == nullptr) {
          add_row(acc, src_PH + r * H, H);
        } else {
          add_scaled_row<P>(acc, src_PH + r * H, widen<A>(probs_TE[t * E + e]), H);
        }
      }
      if constexpr (!std::is_same_v<T, A>) store_row(dst_TH + t * H, acc, H);
    }
  });
}

}  // namespace

int64_t build_row_id_map_cpu(const bool* routing_TE, int64_t T, int64_t E, int32_t* row_id_TE) {
  // Two passes over chunks of tokens: count per (chunk, expert), then number the routed entries from each chunk's
  // offset, which is (tokens of earlier experts) + (tokens of this expert in earlier chunks).
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(4096, (T + threads - 1) / threads);
  const int64_t num_chunks = (T + chunk - 1) / chunk;
  std::vector<int64_t> offsets_CE(num_chunks * E, 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t t = c * chunk; t < std::min(T, (c + 1) * chunk); ++t) {
        for (int64_t e = 0; e < E; ++e) offsets_CE[c * E + e] += routing_TE[t * E + e];
      }
    }
  });
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int64_t count = offsets_CE[c * E + e];
      offsets_CE[c * E + e] = total;
      total += count;
    }
  }
  at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* next = offsets_CE.data() + c * E;
      for (int64_t t = c * chunk; t < std::min(T, (c + 1) * chunk); ++t) {
        for (int64_t e = 0; e < E; ++e) {
          row_id_TE[t * E + e] = routing_TE[t * E + e] ? static_cast<int32_t>(next[e]++) : -1;
        }
      }
    }
  });
  return total;
}

void permute_fwd_cpu(const void* tokens_TH, DType dtype, Probs probs_TE, const RowMap& map, int64_t H,
                     void* permuted_PH, void* permuted_probs_P) {
  const int64_t E = map.num_experts;
  const int64_t row_bytes = H * dtype_size(dtype);
  const auto* src = static_cast<const char*>(tokens_TH);
  auto* dst = static_cast<char*>(permuted_PH);
  // Rows are copied as bytes; probs keep their own dtype, as megatron's permuted probs do.
  dispatch_dtype(probs_TE.dtype, [&](auto tag) {
    using Q = typename decltype(tag)::type;
    const auto* probs = static_cast<const Q*>(probs_TE.data);
    auto* permuted_probs = static_cast<Q*>(permuted_probs_P);
    at::parallel_for(0, map.num_tokens, grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t e = 0; e < E; ++e) {
          const int32_t r = map.row_id_TE[t * E + e];
          if (r < 0 || r >= map.num_rows) continue;
          std::memcpy(dst + r * row_bytes, src + t * row_bytes, row_bytes);
          if (probs != nullptr) permuted_probs[r] = probs[t * E + e];
        }
      }
    });
  });
}

void permute_bwd_cpu(const void* grad_permuted_PH, DType dtype, Probs grad_permuted_probs_P, const RowMap& map,
                     int64_t H, void* grad_tokens_TH, void* grad_probs_TE) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_dtype(grad_permuted_probs_P.data ? grad_permuted_probs_P.dtype : dtype, [&](auto probs_tag) {
      using Q = typename decltype(probs_tag)::type;
      combine<T, Q>(static_cast<const T*>(grad_permuted_PH), nullptr,
                    static_cast<const Q*>(grad_permuted_probs_P.data), static_cast<Q*>(grad_probs_TE), map, H,
                    static_cast<T*>(grad_tokens_TH));
    });
  });
}

void unpermute_fwd_cpu(const void* permuted_PH, DType dtype, Probs probs_TE, const RowMap& map, int64_t H,
                       void* out_TH) {
  dispatch_with_probs(dtype, probs_TE, [&](auto tag, auto probs_tag) {
    using T = typename decltype(tag)::type;
    using Q = typename decltype(probs_tag)::type;
    combine<T, Q>(static_cast<const T*>(permuted_PH), static_cast<const Q*>(probs_TE.data), nullptr, nullptr, map, H,
                  static_cast<T*>(out_TH));
  });
}

void unpermute_bwd_cpu(const void* grad_out_TH, const void* permuted_PH, DType dtype, Probs probs_TE,
                       const RowMap& map, int64_t H, void* grad_permuted_PH, void* grad_probs_TE) {
  dispatch_with_probs(dtype, probs_TE, [&](auto tag, auto probs_tag) {
    using T = typename decltype(tag)::type;
    using Q = typename decltype(probs_tag)::type;
    using P = promote_t<T, Q>;
    using A = acc_t<P>;
    const auto* grad_out = static_cast<const T*>(grad_out_TH);
    const auto* permuted = static_cast<const T*>(permuted_PH);
    const auto* probs = static_cast<const Q*>(probs_TE.data);
    auto* grad_permuted = static_cast<T*>(grad_permuted_PH);
    auto* grad_probs = static_cast<Q*>(grad_probs_TE);
    const int64_t E = map.num_experts;
    at::parallel_for(0, map.num_tokens, grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const T* g = grad_out + t * H;
        for (int64_t e = 0; e < E; ++e) {
          const int32_t r = map.row_id_TE[t * E + e];
          if (r < 0 || r >= map.num_rows) {
            grad_probs[t * E + e] = Q(0);
            continue;
          }
          const A dot = scale_row_and_dot<P>(grad_permuted + r * H, g, permuted + r * H,
                                             widen<A>(probs[t * E + e]), H);
          grad_probs[t * E + e] = narrow<Q>(round_to<P>(dot));
        }
      }
    });
  });
}

}  // namespace megamod
