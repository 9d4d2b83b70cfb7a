// CUDA kernels for permute / unpermute (contracts in permute.h). Plain CUDA: no torch headers, raw pointers, the
// caller's stream; bindings.cpp checks launches.
//
// The row kernels give each token to one block, so each output row has one writer: no atomics, and sums run in the
// same order (experts ascending) with the same roundings as the CPU kernels. Products use __fmul_rn / __dmul_rn, which
// nvcc never contracts into an FMA, so the CUDA results equal the CPU ones bit for bit except the prob gradients
// (a block-wide dot product, summed in another order).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "dispatch.h"
#include "permute.h"

namespace megamod {
namespace {

// Conversions between a storage type and its accumulation type (float, or double for double).
template <typename T>
struct Math;
template <>
struct Math<float> {
  using acc = float;
  static __device__ float widen(float x) { return x; }
  static __device__ float narrow(float x) { return x; }
};
template <>
struct Math<double> {
  using acc = double;
  static __device__ double widen(double x) { return x; }
  static __device__ double narrow(double x) { return x; }
};
template <>
struct Math<__nv_bfloat16> {
  using acc = float;
  static __device__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __nv_bfloat16 narrow(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Math<__half> {
  using acc = float;
  static __device__ float widen(__half x) { return __half2float(x); }
  static __device__ __half narrow(float x) { return __float2half_rn(x); }
};

template <typename A, typename T>
__device__ A widen(T x) {
  return static_cast<A>(Math<T>::widen(x));
}
template <typename T, typename A>
__device__ T narrow(A x) {
  return Math<T>::narrow(static_cast<typename Math<T>::acc>(x));
}
template <typename P, typename A>
__device__ A round_to(A x) {
  return widen<A>(narrow<P>(x));
}
__device__ float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ double mul(double a, double b) { return __dmul_rn(a, b); }

// torch's promotion for the (rows, probs) pairs the kernels take: same dtype, or float32 probs.
template <typename T, typename Q>
struct Promote {
  using type = float;
};
template <typename T>
struct Promote<T, T> {
  using type = T;
};
template <>
struct Promote<double, float> {
  using type = double;
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ bool routed(int32_t r, const RowMap& map) { return r >= 0 && r < map.num_rows; }

// ---- row id map: rank each expert's tokens, scan the counts, add the offsets ----

constexpr int kScanThreads = 1024;

// Block e numbers expert e's tokens in token order; offsets_E1[e] gets the count.
__global__ void rank_tokens_kernel(const bool* routing_TE, int64_t T, int64_t E, int32_t* row_id_TE,
                                   int64_t* offsets_E1) {
  __shared__ int warp_counts[kScanThreads / 32];
  const int64_t e = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int64_t carry = 0;
  for (int64_t base = 0; base < T; base += kScanThreads) {
    const int64_t t = base + threadIdx.x;
    const bool hit = t < T && routing_TE[t * E + e];
    const unsigned ballot = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, tile = 0;
    for (int w = 0; w < kScanThreads / 32; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      tile += warp_counts[w];
    }
    if (t < T) row_id_TE[t * E + e] = hit ? int32_t(carry + before + __popc(ballot & ((1u << lane) - 1))) : -1;
    carry += tile;
    __syncthreads();  // warp_counts is rewritten by the next tile
  }
  if (threadIdx.x == 0) offsets_E1[e] = carry;
}

// Counts -> exclusive offsets, offsets_E1[E] = P. E is small (tens to hundreds): one thread is enough.
__global__ void scan_offsets_kernel(int64_t* offsets_E1, int64_t E) {
  int64_t total = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t count = offsets_E1[e];
    offsets_E1[e] = total;
    total += count;
  }
  offsets_E1[E] = total;
}

__global__ void add_offsets_kernel(int32_t* row_id_TE, int64_t size, int64_t E, const int64_t* offsets_E1) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < size; i += int64_t(gridDim.x) * blockDim.x) {
    if (row_id_TE[i] >= 0) row_id_TE[i] += int32_t(offsets_E1[i % E]);
  }
}

// ---- row kernels: block per token, N elements per thread access ----

template <typename T, typename Q, int N>
__global__ void permute_fwd_kernel(const T* tokens_TH, const Q* probs_TE, RowMap map, int64_t H, T* permuted_PH,
                                   Q* permuted_probs_P) {
  using V = Pack<T, N>;
  const int64_t packs = H / N, E = map.num_experts;
  for (int64_t t = blockIdx.x; t < map.num_tokens; t += gridDim.x) {
    const V* src = reinterpret_cast<const V*>(tokens_TH) + t * packs;
    for (int64_t e = 0; e < E; ++e) {
      const int32_t r = map.row_id_TE[t * E + e];
      if (!routed(r, map)) continue;
      if (probs_TE != nullptr && threadIdx.x == 0) permuted_probs_P[r] = probs_TE[t * E + e];
      V* dst = reinterpret_cast<V*>(permuted_PH) + r * packs;
      for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) dst[c] = src[c];
    }
  }
}

// dst_TH[t] = sum_e scale(t, e) * src_PH[row(t, e)] (scale 1 without probs); dst_probs_TE from src_probs_P if given.
template <typename T, typename Q, int N>
__global__ void combine_kernel(const T* src_PH, const Q* probs_TE, const Q* src_probs_P, Q* dst_probs_TE, RowMap map,
                               int64_t H, T* dst_TH) {
  using P = typename Promote<T, Q>::type;
  using A = typename Math<P>::acc;
  using V = Pack<T, N>;
  const int64_t packs = H / N, E = map.num_experts;
  for (int64_t t = blockIdx.x; t < map.num_tokens; t += gridDim.x) {
    if (dst_probs_TE != nullptr && threadIdx.x == 0) {
      for (int64_t e = 0; e < E; ++e) {
        const int32_t r = map.row_id_TE[t * E + e];
        dst_probs_TE[t * E + e] = routed(r, map) ? src_probs_P[r] : narrow<Q>(0.0f);
      }
    }
    for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
      A acc[N];
      for (int i = 0; i < N; ++i) acc[i] = 0;
      for (int64_t e = 0; e < E; ++e) {
        const int32_t r = map.row_id_TE[t * E + e];
        if (!routed(r, map)) continue;
        const V x = reinterpret_cast<const V*>(src_PH)[r * packs + c];
        if (probs_TE == nullptr) {
          for (int i = 0; i < N; ++i) acc[i] += widen<A>(x.v[i]);
        } else {
          const A p = widen<A>(probs_TE[t * E + e]);
          for (int i = 0; i < N; ++i) acc[i] += round_to<P>(mul(widen<A>(x.v[i]), p));
        }
      }
      V out;
      for (int i = 0; i < N; ++i) out.v[i] = narrow<T>(acc[i]);
      reinterpret_cast<V*>(dst_TH)[t * packs + c] = out;
    }
  }
}

template <typename A>
__device__ A block_sum(A value, A* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

template <typename T, typename Q, int N>
__global__ void unpermute_bwd_kernel(const T* grad_out_TH, const T* permuted_PH, const Q* probs_TE, RowMap map,
                                     int64_t H, T* grad_permuted_PH, Q* grad_probs_TE) {
  using P = typename Promote<T, Q>::type;
  using A = typename Math<P>::acc;
  using V = Pack<T, N>;
  __shared__ A scratch[32];
  const int64_t packs = H / N, E = map.num_experts;
  for (int64_t t = blockIdx.x; t < map.num_tokens; t += gridDim.x) {
    const V* g = reinterpret_cast<const V*>(grad_out_TH) + t * packs;
    for (int64_t e = 0; e < E; ++e) {
      const int32_t r = map.row_id_TE[t * E + e];  // the same for the whole block, so the branch is uniform
      if (!routed(r, map)) {
        if (threadIdx.x == 0) grad_probs_TE[t * E + e] = narrow<Q>(0.0f);
        continue;
      }
      const A p = widen<A>(probs_TE[t * E + e]);
      const V* x = reinterpret_cast<const V*>(permuted_PH) + r * packs;
      V* dx = reinterpret_cast<V*>(grad_permuted_PH) + r * packs;
      A dot = 0;
      for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
        const V gc = g[c], xc = x[c];
        V out;
        for (int i = 0; i < N; ++i) {
          const A gh = widen<A>(gc.v[i]);
          out.v[i] = narrow<T>(round_to<P>(mul(gh, p)));
          dot += round_to<P>(mul(gh, widen<A>(xc.v[i])));
        }
        dx[c] = out;
      }
      dot = block_sum(dot, scratch);
      if (threadIdx.x == 0) grad_probs_TE[t * E + e] = narrow<Q>(round_to<P>(dot));
    }
  }
}

// ---- launch helpers ----

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  dispatch_dtype_as<__nv_bfloat16, __half>(dtype, std::forward<F>(f));
}

template <typename F>
void dispatch_with_probs(DType dtype, Probs probs, F&& f) {
  dispatch_with_probs_as<__nv_bfloat16, __half>(dtype, probs, std::forward<F>(f));
}

struct Launch {
  dim3 grid, block;
};

// One block per token (grid-stride past 2^31 - 1), enough threads to cover a row in 16-byte packs.
Launch row_launch(int64_t T, int64_t packs) {
  const int64_t threads = std::min<int64_t>(256, std::max<int64_t>(32, (packs + 31) / 32 * 32));
  return {dim3(unsigned(std::min<int64_t>(T, 0x7fffffff))), dim3(unsigned(threads))};
}

// Calls f(std::integral_constant<int, N>{}) with N = elements per 16 bytes when every row pointer allows it, else 1.
template <typename T, typename F>
void with_pack(int64_t H, std::initializer_list<const void*> rows, F&& f) {
  constexpr int kWide = 16 / sizeof(T);
  bool wide = H % kWide == 0;
  for (const void* ptr : rows) wide = wide && reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
  if (wide) return f(std::integral_constant<int, kWide>{});
  f(std::integral_constant<int, 1>{});
}

}  // namespace

void build_row_id_map_cuda(const bool* routing_TE, int64_t T, int64_t E, int32_t* row_id_TE, int64_t* offsets_E1,
                           cudaStream_t stream) {
  if (E == 0) {
    cudaMemsetAsync(offsets_E1, 0, sizeof(int64_t), stream);
    return;
  }
  rank_tokens_kernel<<<unsigned(E), kScanThreads, 0, stream>>>(routing_TE, T, E, row_id_TE, offsets_E1);
  scan_offsets_kernel<<<1, 1, 0, stream>>>(offsets_E1, E);
  if (T > 0) {
    const int64_t blocks = std::min<int64_t>((T * E + 255) / 256, 65535);
    add_offsets_kernel<<<unsigned(blocks), 256, 0, stream>>>(row_id_TE, T * E, E, offsets_E1);
  }
}

void permute_fwd_cuda(const void* tokens_TH, DType dtype, Probs probs_TE, const RowMap& map, int64_t H,
                      void* permuted_PH, void* permuted_probs_P, cudaStream_t stream) {
  if (map.num_tokens == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_dtype(probs_TE.data ? probs_TE.dtype : dtype, [&](auto probs_tag) {
      using Q = typename decltype(probs_tag)::type;
      with_pack<T>(H, {tokens_TH, permuted_PH}, [&](auto pack) {
        const Launch l = row_launch(map.num_tokens, H / pack);
        permute_fwd_kernel<T, Q, decltype(pack)::value><<<l.grid, l.block, 0, stream>>>(
            static_cast<const T*>(tokens_TH), static_cast<const Q*>(probs_TE.data), map, H,
            static_cast<T*>(permuted_PH), static_cast<Q*>(permuted_probs_P));
      });
    });
  });
}

void permute_bwd_cuda(const void* grad_permuted_PH, DType dtype, Probs grad_permuted_probs_P, const RowMap& map,
                      int64_t H, void* grad_tokens_TH, void* grad_probs_TE, cudaStream_t stream) {
  if (map.num_tokens == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_dtype(grad_permuted_probs_P.data ? grad_permuted_probs_P.dtype : dtype, [&](auto probs_tag) {
      using Q = typename decltype(probs_tag)::type;
      with_pack<T>(H, {grad_permuted_PH, grad_tokens_TH}, [&](auto pack) {
        const Launch l = row_launch(map.num_tokens, H / pack);
        combine_kernel<T, Q, decltype(pack)::value><<<l.grid, l.block, 0, stream>>>(
            static_cast<const T*>(grad_permuted_PH), nullptr, static_cast<const Q*>(grad_permuted_probs_P.data),
            static_cast<Q*>(grad_probs_TE), map, H, static_cast<T*>(grad_tokens_TH));
      });
    });
  });
}

void unpermute_fwd_cuda(const void* permuted_PH, DType dtype, Probs probs_TE, const RowMap& map, int64_t H,
                        void* out_TH, cudaStream_t stream) {
  if (map.num_tokens == 0) return;
  dispatch_with_probs(dtype, probs_TE, [&](auto tag, auto probs_tag) {
    using T = typename decltype(tag)::type;
    using Q = typename decltype(probs_tag)::type;
    with_pack<T>(H, {permuted_PH, out_TH}, [&](auto pack) {
      const Launch l = row_launch(map.num_tokens, H / pack);
      combine_kernel<T, Q, decltype(pack)::value><<<l.grid, l.block, 0, stream>>>(static_cast<const T*>(permuted_PH),
                                                             static_cast<const Q*>(probs_TE.data), nullptr, nullptr,
                                                             map, H, static_cast<T*>(out_TH));
    });
  });
}

void unpermute_bwd_cuda(const void* grad_out_TH, const void* permuted_PH, DType dtype, Probs probs_TE,
                        const RowMap& map, int64_t H, void* grad_permuted_PH, void* grad_probs_TE,
                        cudaStream_t stream) {
  if (map.num_tokens == 0) return;
  dispatch_with_probs(dtype, probs_TE, [&](auto tag, auto probs_tag) {
    using T = typename decltype(tag)::type;
    using Q = typename decltype(probs_tag)::type;
    with_pack<T>(H, {grad_out_TH, permuted_PH, grad_permuted_PH}, [&](auto pack) {
      const Launch l = row_launch(map.num_tokens, H / pack);
      unpermute_bwd_kernel<T, Q, decltype(pack)::value><<<l.grid, l.block, 0, stream>>>(
          static_cast<const T*>(grad_out_TH), static_cast<const T*>(permuted_PH), static_cast<const Q*>(probs_TE.data),
          map, H, static_cast<T*>(grad_permuted_PH), static_cast<Q*>(grad_probs_TE));
    });
  });
}

}  // namespace megamod
