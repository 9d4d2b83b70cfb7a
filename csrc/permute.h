// MoE token permute / unpermute: the kernels behind megamod._C.
//
// Plain C++ on raw pointers, so that the CUDA file needs no torch headers; bindings.cpp checks tensors and calls these.
// Shapes: T tokens, H hidden, E experts, P permuted rows (= routed (token, expert) pairs).
//
// The index map is row_id_TE (int32 [T, E]): the permuted row of (t, e), or -1 when t is not routed to e. Rows are
// grouped by expert in expert order and by token order within an expert, as in megatron-core's moe_utils.permute.
// Every kernel walks tokens, so each output row of a scatter is owned by one thread (block on CUDA): no atomics,
// deterministic results.
//
// Numerics follow megatron-core's torch path: a product with a prob is rounded to the promoted dtype of
// (tokens, probs); sums are accumulated in float (double for float64) and rounded once.
#pragma once

#include <cstdint>

#if defined(MEGAMOD_WITH_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>
#endif

namespace megamod {

enum class DType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

inline int64_t dtype_size(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2;
}

// A tensor argument that may be absent (data == nullptr), with its dtype.
struct Probs {
  const void* data;
  DType dtype;
};

struct RowMap {
  const int32_t* row_id_TE;
  int64_t num_tokens;   // T
  int64_t num_experts;  // E
  int64_t num_rows;     // P; kernels skip rows >= P, so a wrong map cannot write out of bounds
};

// Fills row_id_TE from routing_TE (bool [T, E]); returns P.
int64_t build_row_id_map_cpu(const bool* routing_TE, int64_t T, int64_t E, int32_t* row_id_TE);

// permuted_PH[row(t, e)] = tokens_TH[t]; permuted_probs_P[row(t, e)] = probs_TE[t, e] when probs.data.
void permute_fwd_cpu(const void* tokens_TH, DType dtype, Probs probs_TE, const RowMap& map, int64_t H,
                     void* permuted_PH, void* permuted_probs_P);

// grad_tokens_TH[t] = sum_e grad_permuted_PH[row(t, e)]; grad_probs_TE[t, e] = grad_permuted_probs_P[row(t, e)]
// (0 where unrouted) when grad_permuted_probs_P.data.
void permute_bwd_cpu(const void* grad_permuted_PH, DType dtype, Probs grad_permuted_probs_P, const RowMap& map,
                     int64_t H, void* grad_tokens_TH, void* grad_probs_TE);

// out_TH[t] = sum_e probs_TE[t, e] * permuted_PH[row(t, e)] (probs taken as 1 when absent); out has permuted's dtype.
void unpermute_fwd_cpu(const void* permuted_PH, DType dtype, Probs probs_TE, const RowMap& map, int64_t H,
                       void* out_TH);

// With probs (required; without them the gradient is permute_fwd of grad_out):
// grad_permuted_PH[row(t, e)] = probs_TE[t, e] * grad_out_TH[t];
// grad_probs_TE[t, e] = <grad_out_TH[t], permuted_PH[row(t, e)]> (0 where unrouted).
void unpermute_bwd_cpu(const void* grad_out_TH, const void* permuted_PH, DType dtype, Probs probs_TE,
                       const RowMap& map, int64_t H, void* grad_permuted_PH, void* grad_probs_TE);

#if defined(MEGAMOD_WITH_CUDA) || defined(__CUDACC__)

// Same contracts as the CPU functions, launched on `stream`. The row map is built in place: offsets_E1 (int64 [E+1],
// workspace) ends holding the expert offsets, offsets_E1[E] = P, so the caller reads P only if it must size outputs.
void build_row_id_map_cuda(const bool* routing_TE, int64_t T, int64_t E, int32_t* row_id_TE, int64_t* offsets_E1,
                           cudaStream_t stream);
void permute_fwd_cuda(const void* tokens_TH, DType dtype, Probs probs_TE, const RowMap& map, int64_t H,
                      void* permuted_PH, void* permuted_probs_P, cudaStream_t stream);
void permute_bwd_cuda(const void* grad_permuted_PH, DType dtype, Probs grad_permuted_probs_P, const RowMap& map,
                      int64_t H, void* grad_tokens_TH, void* grad_probs_TE, cudaStream_t stream);
void unpermute_fwd_cuda(const void* permuted_PH, DType dtype, Probs probs_TE, const RowMap& map, int64_t H,
                        void* out_TH, cudaStream_t stream);
void unpermute_bwd_cuda(const void* grad_out_TH, const void* permuted_PH, DType dtype, Probs probs_TE,
                        const RowMap& map, int64_t H, void* grad_permuted_PH, void* grad_probs_TE,
                        cudaStream_t stream);
#endif

}  // namespace megamod
