// kept/backend/cuda/sparse_kl.cuh: the sparse-teacher KL's per-row kernels on CUDA (the tail
// statistics and the gradient of xkd/sparse_kl.hpp).
//
// Math and the use of SoftmaxRowState's teacher slots for the tail: kept/backend/loss_kernels.hpp
// and kept/backend/cpu/sparse_kl.hpp (the reference). The chunk's sorted ids, probabilities and
// tail masses are uploaded once per chunk by the backend (sparse_kl_begin).
//
// Design: one block of kLossThreads per row, as the softmax kernels. Thread t visits columns
// t, t + kLossThreads, ... in ascending order, so it walks the row's ascending kept ids with its
// own cursor (a binary search for its first column, then forward steps): membership costs
// O(1) per column. The gradient runs in three barrier-separated phases within the row's block:
// the kept columns' gradients go to a [rows, k] scratch (they read their logits), then every
// column gets the tail formula, then the kept columns are overwritten from the scratch; only the
// row's own block touches the row, so __syncthreads orders the phases.
#pragma once

#include <cmath>
#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"
#include "kept/backend/cuda/softmax_losses.cuh"
#include "kept/backend/loss_kernels.hpp"

namespace kept::cuda::detail {

// The first index i in [0, k) with ids[i] >= value (k when none).
__device__ __forceinline__ std::int64_t lower_bound_id(const std::int32_t* ids, std::int64_t k,
                                                       std::int64_t value) {
  std::int64_t low = 0, high = k;
  while (low < high) {
    const std::int64_t middle = (low + high) / 2;
    if (ids[middle] < value)
      low = middle + 1;
    else
      high = middle;
  }
  return low;
}

// Whether column `id` is kept, advancing the thread's cursor past ids below it.
__device__ __forceinline__ bool kept_id(const std::int32_t* ids, std::int64_t k,
                                        std::int64_t& cursor, std::int64_t id) {
  while (cursor < k && ids[cursor] < id)
    ++cursor;
  return cursor < k && ids[cursor] == id;
}

template <class T>
__global__ void sparse_kl_update_kernel(const float* student, std::int64_t cols,
                                        std::int64_t offset, float inv_t, const std::int32_t* ids,
                                        const float* probs, std::int64_t k, T* states) {
  const std::int64_t r = blockIdx.x;
  RowState& state = states[r];
  const float* s = student + r * cols;
  const std::int32_t* row_ids = ids + r * k;
  const float* row_probs = probs + r * k;
  const std::int64_t start = lower_bound_id(row_ids, k, offset + threadIdx.x);
  // The tail's slice max (NaN never becomes the max).
  float max = -INFINITY;
  bool started = false;
  std::int64_t cursor = start;
  for (std::int64_t v = threadIdx.x; v < cols; v += kLossThreads) {
    if (kept_id(row_ids, k, cursor, offset + v)) continue;
    const float z = s[v] * inv_t;
    if (z > max || (!started && z == z)) {
      max = z;
      started = true;
    }
  }
  max = block_max<kLossThreads>(max);
  if (threadIdx.x == 0) raise_max(state.teacher_max, state.teacher_sum, nullptr, max);
  __syncthreads();  // the raised tail max, for every thread
  const float tail_max = state.teacher_max;
  double sum = 0.0;
  cursor = start;
  for (std::int64_t v = threadIdx.x; v < cols; v += kLossThreads)
    if (!kept_id(row_ids, k, cursor, offset + v)) sum += expf(s[v] * inv_t - tail_max);
  double cross = 0.0;
  for (std::int64_t i = threadIdx.x; i < k; i += kLossThreads) {
    const std::int64_t v = row_ids[i] - offset;
    if (v >= 0 && v < cols)
      cross += static_cast<double>(row_probs[i]) * static_cast<double>(s[v] * inv_t);
  }
  sum = block_sum<kLossThreads>(sum);
  cross = block_sum<kLossThreads>(cross);
  if (threadIdx.x == 0) {
    state.teacher_sum += sum;
    state.cross += cross;
  }
}

template <class T>
__global__ void sparse_kl_gradient_kernel(float* student, std::int64_t cols, std::int64_t offset,
                                          float temperature, const float* weights, float scale,
                                          const std::int32_t* ids, const float* probs,
                                          const float* tails, std::int64_t k, float* scratch,
                                          const T* states) {
  const std::int64_t r = blockIdx.x;
  float* s = student + r * cols;
  const float w = weights ? weights[r] : 1.0f;
  if (w == 0.0f) {  // the whole block leaves together: w is the row's
    for (std::int64_t v = threadIdx.x; v < cols; v += kLossThreads)
      s[v] = 0.0f;
    return;
  }
  const float inv_t = 1.0f / temperature;
  const float factor = scale * w * temperature;
  const float student_lse = static_cast<float>(states[r].student_lse);
  const float tail = tails[r];
  const bool has_tail = tail > 0.0f;  // an empty or massless tail has no target there
  const float tail_lse = has_tail ? static_cast<float>(states[r].teacher_lse) : 0.0f;
  const std::int32_t* row_ids = ids + r * k;
  const float* row_probs = probs + r * k;
  float* row_scratch = scratch + r * k;
  for (std::int64_t i = threadIdx.x; i < k; i += kLossThreads) {
    const std::int64_t v = row_ids[i] - offset;
    if (v >= 0 && v < cols)
      row_scratch[i] = factor * (expf(s[v] * inv_t - student_lse) - row_probs[i]);
  }
  __syncthreads();  // the kept logits are read before any column is overwritten
  for (std::int64_t v = threadIdx.x; v < cols; v += kLossThreads) {
    const float a = s[v] * inv_t;
    const float target = has_tail ? tail * expf(a - tail_lse) : 0.0f;
    s[v] = factor * (expf(a - student_lse) - target);
  }
  __syncthreads();  // the tail formula is everywhere before the kept columns are put back
  for (std::int64_t i = threadIdx.x; i < k; i += kLossThreads) {
    const std::int64_t v = row_ids[i] - offset;
    if (v >= 0 && v < cols) s[v] = row_scratch[i];
  }
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

inline cudaError_t launch_sparse_kl_update(const float* student, std::int64_t rows,
                                           std::int64_t cols, std::int64_t offset, float inv_t,
                                           const std::int32_t* ids, const float* probs,
                                           std::int64_t k, LossRowState* states,
                                           cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  using namespace detail;
  return launch("sparse_kl_rows_update", sparse_kl_update_kernel<LossRowState>,
                dim3(static_cast<unsigned>(rows)), dim3(kLossThreads), 0, stream, student, cols,
                offset, inv_t, ids, probs, k, states);
}

inline cudaError_t launch_sparse_kl_gradient(float* student, std::int64_t rows, std::int64_t cols,
                                             std::int64_t offset, float temperature,
                                             const float* weights, float scale,
                                             const std::int32_t* ids, const float* probs,
                                             const float* tails, std::int64_t k, float* scratch,
                                             const LossRowState* states, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  using namespace detail;
  return launch("sparse_kl_logits_gradient", sparse_kl_gradient_kernel<LossRowState>,
                dim3(static_cast<unsigned>(rows)), dim3(kLossThreads), 0, stream, student, cols,
                offset, temperature, weights, scale, ids, probs, tails, k, scratch, states);
}

}  // namespace kept::cuda
