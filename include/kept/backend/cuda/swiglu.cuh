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

template <int N, class T>
__global__ void swiglu_forward_kernel(const T* gate, const T* up, T* out, std::int64_t packs) {
  grid_stride(packs, [&](std::int64_t p) {
    const Pack<T, N> g = load_pack<N>(gate, p), u = load_pack<N>(up, p);
    Pack<T, N> r;
    for (int k = 0; k < N; ++k)
      r.v[k] = from_f32<T>(::kept::silu(to_f32(g.v[k])) * to_f32(u.v[k]));
    store_pack<N>(out, p, r);
  });
}
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
  if (count == 0) return cudaSuccess;
  using namespace detail;
  constexpr int N = kPackOf<T>;
  if (packable(count, N, {gate, up, out}))
    return launch("swiglu_forward", swiglu_forward_kernel<N, T>, dim3(blocks_for(count / N)),
                  dim3(kElementwiseThreads), 0, stream, gate, up, out, count / N);
  return launch("swiglu_forward", swiglu_forward_kernel<1, T>, dim3(blocks_for(count)),
                dim3(kElementwiseThreads), 0, stream, gate, up, out, count);
}
template <class T>
cudaError_t launch_swiglu_backward(const T* d_out, const T* gate, const T* up, T* d_gate, T* d_up,
                                   std::int64_t count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  using namespace detail;
  constexpr int N = kPackOf<T>;
  if (packable(count, N, {d_out, gate, up, d_gate, d_up}))
    return launch("swiglu_backward", swiglu_backward_kernel<N, T>, dim3(blocks_for(count / N)),
                  dim3(kElementwiseThreads), 0, stream, d_out, gate, up, d_gate, d_up, count / N);
  return launch("swiglu_backward", swiglu_backward_kernel<1, T>, dim3(blocks_for(count)),
                dim3(kElementwiseThreads), 0, stream, d_out, gate, up, d_gate, d_up, count);
}

}  // namespace kept::cuda
