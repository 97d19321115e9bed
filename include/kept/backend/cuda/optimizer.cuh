// kept/backend/cuda/optimizer.cuh: the optimizer's range kernels over the parameter arena.
//
//   sum_squares   sum g^2 of a gradient range in double: kSumParts blocks each reduce a fixed
//                 strided share (per-thread double sums, then a block_sum butterfly); the host
//                 adds the kSumParts partials in order. Fixed shape, so the same bits every run
//                 and on every device. grad_finite is "sum_squares is finite": an fp32 square
//                 cannot overflow a double, so only an inf or NaN element makes it non-finite.
//   adamw         one torch-exact AdamW update per element (kept::adamw_element in
//                 kept/core/element_math.hpp, the CPU's own function): fp32 moments and
//                 gradients; fp32 master weights with the bf16 value = round(master), or no
//                 master and the bf16 value = the update rounded stochastically with the
//                 counter-based bits of kept::rounding_bits (the CPU draws the same bits).
//   adamw_8bit    the same with 8-bit blockwise moments (kept/core/dynamic_code.hpp): one
//                 thread block of kQuantBlock threads per quantisation block; the two code
//                 tables are staged in shared memory, each thread dequantises and updates its
//                 element, block_max gives the new absmax, each thread requantises. The CPU
//                 runs the same element functions block by block, so the bits agree.
#pragma once

#include <cstdint>

#include "kept/backend/backend.hpp"
#include "kept/backend/cuda/kernel_common.cuh"
#include "kept/core/dynamic_code.hpp"
#include "kept/core/element_math.hpp"

namespace kept::cuda {
template <>
struct is_kernel_value<AdamWScalars> : std::true_type {};  // floats, flags and a key
}  // namespace kept::cuda

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

// The updated fp32 value stored: into the master and round-to-nearest, or stochastically.
template <class T>
__device__ __forceinline__ void adamw_store(T* value, float* master, std::int64_t i, float updated,
                                            const AdamWScalars& scalars) {
  if (master) {
    master[i] = updated;
    value[i] = from_f32<T>(updated);
  } else if constexpr (std::is_same_v<T, float>) {
    value[i] = updated;
  } else {
    const auto index = scalars.first_element + static_cast<std::uint64_t>(i);
    const auto bits = bf16_stochastic(updated, rounding_bits(scalars.rounding_key, index));
    value[i] = __ushort_as_bfloat16(bits);
  }
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
    adamw_store(value, master, i, updated, scalars);
  });
}

// bf16 moments, rounded stochastically (kept::moment_rounding_key; the CPU draws the same bits).
template <class T>
__global__ void adamw_bf16_moments_kernel(T* value, float* master, const float* grad,
                                          std::uint16_t* exp_avg, std::uint16_t* exp_avg_sq,
                                          std::int64_t count, AdamWScalars scalars) {
  const std::uint64_t m_key = moment_rounding_key(scalars.rounding_key, 0);
  const std::uint64_t v_key = moment_rounding_key(scalars.rounding_key, 1);
  grid_stride(count, [&](std::int64_t i) {
    float m = float_from_bf16(exp_avg[i]), v = float_from_bf16(exp_avg_sq[i]);
    const float updated =
        ::kept::adamw_element<float>(master ? master[i] : to_f32(value[i]), grad[i], m, v, scalars);
    const auto index = scalars.first_element + static_cast<std::uint64_t>(i);
    exp_avg[i] = bf16_stochastic(m, rounding_bits(m_key, index));
    exp_avg_sq[i] = bf16_stochastic(v, rounding_bits(v_key, index));
    adamw_store(value, master, i, updated, scalars);
  });
}

// codes: the signed then the unsigned table (2 x 256 floats, device memory).
template <class T>
__global__ void __launch_bounds__(kQuantBlock)
    adamw_8bit_kernel(T* value, float* master, const float* grad, std::uint8_t* m_codes,
                      std::uint8_t* v_codes, float* m_absmax, float* v_absmax, const float* codes,
                      std::int64_t count, AdamWScalars scalars) {
  float* table = dynamic_shared<float>();  // [0, 256) signed, [256, 512) unsigned
  for (int k = static_cast<int>(threadIdx.x); k < 2 * 256; k += kQuantBlock)
    table[k] = codes[k];
  __syncthreads();
  const std::int64_t block = blockIdx.x;
  const std::int64_t i = block * kQuantBlock + threadIdx.x;
  const bool active = i < count;
  float m = 0.0f, v = 0.0f;
  if (active) {
    m = mul_rounded(table[m_codes[i]], m_absmax[block]);
    v = mul_rounded(table[256 + v_codes[i]], v_absmax[block]);
    const float updated =
        ::kept::adamw_element<float>(master ? master[i] : to_f32(value[i]), grad[i], m, v, scalars);
    adamw_store(value, master, i, updated, scalars);
  }
  const float m_max = block_max<static_cast<int>(kQuantBlock)>(active ? fabsf(m) : 0.0f);
  const float v_max = block_max<static_cast<int>(kQuantBlock)>(active ? v : 0.0f);
  if (active) {
    m_codes[i] = quantize_nearest(table, quant_normalise(m, m_max));
    v_codes[i] = quantize_second_moment(table + 256, quant_normalise(v, v_max));
  }
  if (threadIdx.x == 0) {
    m_absmax[block] = m_max;
    v_absmax[block] = v_max;
  }
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

// `codes`: kept::dynamic_codes() in device memory (signed table, then unsigned); read only
// when the moments are 8-bit.
template <class T>
cudaError_t launch_adamw(T* value, float* master, const float* grad,
                         const AdamWMoments<float>& moments, const float* codes, std::int64_t count,
                         const AdamWScalars& scalars, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  using namespace detail;
  if (moments.bf16_moments()) {
    return launch("adamw_update_bf16_moments", adamw_bf16_moments_kernel<T>,
                  dim3(blocks_for(count)), dim3(kElementwiseThreads), 0, stream, value, master,
                  grad, reinterpret_cast<std::uint16_t*>(moments.exp_avg_bf16),
                  reinterpret_cast<std::uint16_t*>(moments.exp_avg_sq_bf16), count, scalars);
  }
  if (moments.quantized()) {
    return launch("adamw_update_8bit", adamw_8bit_kernel<T>,
                  dim3(static_cast<unsigned>(quant_blocks(count))), dim3(kQuantBlock),
                  2 * 256 * sizeof(float), stream, value, master, grad, moments.exp_avg_codes,
                  moments.exp_avg_sq_codes, moments.exp_avg_absmax, moments.exp_avg_sq_absmax,
                  codes, count, scalars);
  }
  return launch("adamw_update", adamw_kernel<T>, dim3(blocks_for(count)), dim3(kElementwiseThreads),
                0, stream, value, master, grad, moments.exp_avg, moments.exp_avg_sq, count,
                scalars);
}

}  // namespace kept::cuda
