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

// The forward is binary_map_kernel (kernel_common.cuh) with this gate.
struct SiluGateOp {
  __device__ __forceinline__ float operator()(float gate, float up) const {
    return ::kept::silu(gate) * up;
  }
};
template <int N, class T>
__global__ void swiglu_backward_kernel(const T* d_out, const T* gate, const T* up, T* d_gate,
                                       T* d_up, std::int64_t packs) {
  grid_stride(packs, [&](std::int64_t p) {
    const Pack<T, N> gv = load_pack<N>(gate, p), uv = load_pack<N>(up, p),
                     dv = load_pack<N>(d_out, p);
    Pack<T, N> dg, du;
    for (int k = 0; k < N; ++k) {
      const float g = to_f32(gv.v[k]), u = to_f32(uv.v[k]), d = to_f32(dv.v[k]);
      const float s = ::kept::sigmoid(g);
      dg.v[k] = from_f32<T>(d * u * (s * (1.0f + g * (1.0f - s))));
      du.v[k] = from_f32<T>(d * (g * s));
    }
    store_pack<N>(d_gate, p, dg);
    store_pack<N>(d_up, p, du);
  });
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

template <class T>
cudaError_t launch_swiglu_forward(const T* gate, const T* up, T* out, std::int64_t count,
                                  cudaStream_t stream) {
  return detail::launch_binary_map("swiglu_forward", gate, up, out, detail::SiluGateOp{}, count,
                                   stream);
}
template <class T>
cudaError_t launch_swiglu_backward(const T* d_out, const T* gate, const T* up, T* d_gate, T* d_up,
                                   std::int64_t count, cudaStream_t stream) {
  using namespace detail;
  return launch_elementwise<T>("swiglu_backward", swiglu_backward_kernel<kPackOf<T>, T>,
                               swiglu_backward_kernel<1, T>, count, {d_out, gate, up, d_gate, d_up},
                               stream, d_out, gate, up, d_gate, d_up);
}

}  // namespace kept::cuda
