// kept/backend/cuda/optimizer.cuh: the optimizer's range kernels over the parameter arena.
//
//   sum_squares   sum g^2 of a gradient range in double: kSumParts blocks each reduce a fixed
//                 strided share (per-thread double sums, then a block_sum butterfly); the host
//                 adds the kSumParts partials in order. Fixed shape, so the same bits every run
//                 and on every device. grad_finite is "sum_squares is finite": an fp32 square
//                 cannot overflow a double, so only an inf or NaN element makes it non-finite.
//   adamw         one torch-exact AdamW update per element (kept::adamw_element in
//                 kept/core/element_math.hpp, the CPU's own function): fp32 master weights,
//                 moments and gradients, the bf16 value = round(master).
#pragma once

#include <cstdint>

#include "kept/backend/backend.hpp"
#include "kept/backend/cuda/kernel_common.cuh"
#include "kept/core/element_math.hpp"

namespace kept::cuda::detail {

inline constexpr int kSumParts = 64;
inline constexpr int kSumThreads = 256;

template <class T>
__global__ void sum_squares_kernel(const T* values, std::int64_t count, double* parts) {
  double sum = 0.0;
  const std::int64_t stride = static_cast<std::int64_t>(kSumParts) * kSumThreads;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
       i < count; i += stride) {
    const double v = values[i];
    sum += v * v;
  }
  sum = block_sum<kSumThreads>(sum);
  if (threadIdx.x == 0) parts[blockIdx.x] = sum;
}

template <class T>
__global__ void adamw_kernel(T* value, float* master, const float* grad, float* exp_avg,
                             float* exp_avg_sq, std::int64_t count, AdamWScalars scalars) {
  grid_stride(count, [&](std::int64_t i) {
    float m = exp_avg[i], v = exp_avg_sq[i];
    const float updated =
        ::kept::adamw_element<float>(master ? master[i] : to_f32(value[i]), grad[i], m, v, scalars);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (master) master[i] = updated;
    value[i] = from_f32<T>(updated);
  });
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

// Writes kSumParts partial sums into `parts` (device, kSumParts doubles).
inline cudaError_t launch_sum_squares(const float* values, std::int64_t count, double* parts,
                                      cudaStream_t stream) {
  using namespace detail;
  return launch("grad_sum_squares", sum_squares_kernel<float>, dim3(kSumParts), dim3(kSumThreads),
                0, stream, values, count, parts);
}

template <class T>
cudaError_t launch_adamw(T* value, float* master, const float* grad, float* exp_avg,
                         float* exp_avg_sq, std::int64_t count, const AdamWScalars& scalars,
                         cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  using namespace detail;
  return launch("adamw_update", adamw_kernel<T>, dim3(blocks_for(count)), dim3(kElementwiseThreads),
                0, stream, value, master, grad, exp_avg, exp_avg_sq, count, scalars);
}

}  // namespace kept::cuda
