// kept/backend/cuda/rope.cuh: rotary position embedding (rotate-half), in place, on CUDA.
//
// As kept/backend/cpu/rope.hpp: for x [batch * seq, heads * D], half = D / 2, token t at
// position t % seq, i < half, with the fp32 table cos/sin [positions, half]
// (kept/core/rope_table.hpp) and s = direction * sin:
//   x_i <- x_i cos - x_{i+half} s,   x_{i+half} <- x_{i+half} cos + x_i s
// direction -1 applies the transpose (the backward). One thread per rotated pair, fp32 math.
#pragma once

#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"

namespace kept::cuda::detail {

template <class T>
__global__ void rope_kernel(T* x, std::int64_t tokens, std::int64_t seq, std::int64_t heads,
                            std::int64_t half, const float* cos, const float* sin, float sign) {
  grid_stride(tokens * heads * half, [&](std::int64_t index) {
    const std::int64_t i = index % half, head = (index / half) % heads,
                       token = index / (half * heads);
    const std::int64_t position = token % seq;
    T* first = x + (token * heads + head) * 2 * half + i;
    T* second = first + half;
    const float c = cos[position * half + i], s = sign * sin[position * half + i];
    const float a = to_f32(*first), b = to_f32(*second);
    *first = from_f32<T>(a * c - b * s);
    *second = from_f32<T>(b * c + a * s);
  });
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

template <class T>
cudaError_t launch_rope(T* x, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                        std::int64_t head_dim, const float* cos, const float* sin, int direction,
                        cudaStream_t stream) {
  const std::int64_t half = head_dim / 2, pairs = batch * seq * heads * half;
  if (pairs == 0) return cudaSuccess;
  using namespace detail;
  return launch("rope", rope_kernel<T>, dim3(blocks_for(pairs)), dim3(kElementwiseThreads), 0,
                stream, x, batch * seq, seq, heads, half, cos, sin, direction >= 0 ? 1.0f : -1.0f);
}

}  // namespace kept::cuda
