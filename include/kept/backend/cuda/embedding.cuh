// kept/backend/cuda/embedding.cuh: token embedding gather and its deterministic scatter-add.
//
// Forward: out[t] = table[token[t]] (a bf16 row copied is exact). Backward:
// d_table[token[t]] += d_out[t] in token order: one thread per column walks the tokens in order,
// so a row hit by many tokens sums in a fixed order and no two threads touch one address (no
// atomics; the same bits every run). Token ids are checked on the host before the launch
// (CudaBackend::embedding_forward), since a kernel cannot report which id was bad.
#pragma once

#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"

namespace kept::cuda::detail {

template <class T>
__global__ void embedding_forward_kernel(const std::int32_t* tokens, std::int64_t count,
                                         const T* table, std::int64_t dim, T* out) {
  grid_stride(count * dim, [&](std::int64_t i) {
    const std::int64_t t = i / dim, c = i % dim;
    out[i] = table[static_cast<std::int64_t>(tokens[t]) * dim + c];
  });
}
template <class T>
__global__ void embedding_backward_kernel(const std::int32_t* tokens, std::int64_t count,
                                          const T* d_out, std::int64_t dim, float* d_table) {
  grid_stride(dim, [&](std::int64_t c) {
    for (std::int64_t t = 0; t < count; ++t)
      d_table[static_cast<std::int64_t>(tokens[t]) * dim + c] += to_f32(d_out[t * dim + c]);
  });
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

template <class T>
cudaError_t launch_embedding_forward(const std::int32_t* tokens, std::int64_t count, const T* table,
                                     std::int64_t dim, T* out, cudaStream_t stream) {
  if (count * dim == 0) return cudaSuccess;
  using namespace detail;
  return launch("embedding_forward", embedding_forward_kernel<T>, dim3(blocks_for(count * dim)),
                dim3(kElementwiseThreads), 0, stream, tokens, count, table, dim, out);
}
template <class T>
cudaError_t launch_embedding_backward(const std::int32_t* tokens, std::int64_t count,
                                      const T* d_out, std::int64_t dim, float* d_table,
                                      cudaStream_t stream) {
  if (count * dim == 0) return cudaSuccess;
  using namespace detail;
  return launch("embedding_backward", embedding_backward_kernel<T>, dim3(blocks_for(dim, 128)),
                dim3(128), 0, stream, tokens, count, d_out, dim, d_table);
}

}  // namespace kept::cuda
