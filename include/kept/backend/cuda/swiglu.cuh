// kept/backend/cuda/swiglu.cuh: the SwiGLU gate, elementwise, on CUDA.
//
// As kept/backend/cpu/swiglu.hpp: out = silu(gate) up, with s = sigmoid(gate):
//   d_gate = d_out up s (1 + gate (1 - s)),  d_up = d_out silu(gate)   (both overwrite)
// silu and sigmoid are kept/core/element_math.hpp's, shared with the CPU.
#pragma once

#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"
#include "kept/core/element_math.hpp"

namespace kept::cuda::detail {

template <class T>
__global__ void swiglu_forward_kernel(const T* gate, const T* up, T* out, std::int64_t count) {
  grid_stride(count, [&](std::int64_t i) {
    out[i] = from_f32<T>(::kept::silu(to_f32(gate[i])) * to_f32(up[i]));
  });
}
template <class T>
__global__ void swiglu_backward_kernel(const T* d_out, const T* gate, const T* up, T* d_gate,
                                       T* d_up, std::int64_t count) {
  grid_stride(count, [&](std::int64_t i) {
    const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(d_out[i]);
    const float s = ::kept::sigmoid(g);
    d_gate[i] = from_f32<T>(d * u * (s * (1.0f + g * (1.0f - s))));
    d_up[i] = from_f32<T>(d * (g * s));
  });
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

template <class T>
cudaError_t launch_swiglu_forward(const T* gate, const T* up, T* out, std::int64_t count,
                                  cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  using namespace detail;
  return launch("swiglu_forward", swiglu_forward_kernel<T>, dim3(blocks_for(count)),
                dim3(kElementwiseThreads), 0, stream, gate, up, out, count);
}
template <class T>
cudaError_t launch_swiglu_backward(const T* d_out, const T* gate, const T* up, T* d_gate, T* d_up,
                                   std::int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  using namespace detail;
  return launch("swiglu_backward", swiglu_backward_kernel<T>, dim3(blocks_for(count)),
                dim3(kElementwiseThreads), 0, stream, d_out, gate, up, d_gate, d_up, count);
}

}  // namespace kept::cuda
