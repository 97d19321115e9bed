// kept/backend/cuda/softmax_losses.cuh: the chunked LM-head losses on CUDA: per-row softmax
// statistics folded in one vocabulary slice at a time, and the KL / CE / squared-error
// gradients, plus the hidden-state squared error.
//
// Math, streaming recurrence and tie rules: kept/backend/cpu/softmax_losses.hpp (the reference).
// Row states are kept::SoftmaxRowState<float> (kept/backend/loss_kernels.hpp) in device memory;
// reduce() downloads them and sums on the host (kept::softmax_rows_reduce), so the chunk sums
// are formed by the same code on every backend.
//
// Design: one block of kLossThreads per row for the reductions (slice max with the first
// argmax, the exponential sums in double like the CPU, the squared errors); thread 0 alone
// updates the row's state between barriers. The gradients are elementwise over [rows, cols] and
// read each row's lse from its state. Per-token weights and targets arrive from the host
// (kept/backend/loss_kernels.hpp: host pointers) and are uploaded per call by the backend.
#pragma once

#include <cmath>
#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"
#include "kept/backend/loss_kernels.hpp"

namespace kept::cuda::detail {

inline constexpr int kLossThreads = 128;
using RowState = ::kept::SoftmaxRowState<float>;

__device__ __forceinline__ void reset_state(RowState& state) {
  state.teacher_max = -INFINITY;
  state.student_max = -INFINITY;
  state.teacher_sum = state.student_sum = state.cross = state.squared_error = 0.0;
  state.teacher_target = state.student_target = 0.0f;
  state.teacher_argmax = state.student_argmax = -1;
  state.teacher_lse = state.student_lse = 0.0;
}

template <class T>
__global__ void rows_reset_kernel(T* states, std::int64_t rows) {
  grid_stride(rows, [&](std::int64_t r) { reset_state(states[r]); });
}
template <class T>
__global__ void rows_finish_kernel(T* states, std::int64_t rows) {
  grid_stride(rows, [&](std::int64_t r) {
    states[r].teacher_lse = static_cast<double>(states[r].teacher_max) + log(states[r].teacher_sum);
    states[r].student_lse = static_cast<double>(states[r].student_max) + log(states[r].student_sum);
  });
}

// Max of x * inv_t over a row slice and its first index (-1 when empty or all NaN), to thread 0.
__device__ __forceinline__ void slice_max(const float* x, std::int64_t cols, float inv_t,
                                          float& max, std::int64_t& argmax) {
  __shared__ float maxima[kLossThreads];
  __shared__ std::int64_t indices[kLossThreads];
  float m = -INFINITY;
  std::int64_t index = -1;
  for (std::int64_t v = threadIdx.x; v < cols; v += kLossThreads) {
    const float z = x[v] * inv_t;
    if (z > m || (index < 0 && z == z)) {
      m = z;
      index = v;
    }
  }
  maxima[threadIdx.x] = m;
  indices[threadIdx.x] = index;
  __syncthreads();
  if (threadIdx.x == 0) {
    max = -INFINITY;
    argmax = -1;
    for (int t = 0; t < kLossThreads; ++t) {
      const std::int64_t i = indices[t];
      if (i < 0) continue;
      if (argmax < 0 || maxima[t] > max || (maxima[t] == max && i < argmax)) {
        max = maxima[t];
        argmax = i;
      }
    }
  }
  __syncthreads();
}

__device__ __forceinline__ bool raise_max(float& running_max, double& sum, double* cross,
                                          float new_max) {
  if (!(new_max > running_max)) return false;
  const double rescale = running_max == -INFINITY
                             ? 0.0
                             : exp(static_cast<double>(running_max) - static_cast<double>(new_max));
  sum *= rescale;
  if (cross) *cross *= rescale;
  running_max = new_max;
  return true;
}

template <class T>
__global__ void rows_update_kernel(const float* teacher, const float* student, std::int64_t cols,
                                   std::int64_t offset, float inv_t, const std::int32_t* targets,
                                   bool with_sums, T* states) {
  const std::int64_t r = blockIdx.x;
  RowState& state = states[r];
  const float* t = teacher ? teacher + r * cols : nullptr;
  const float* s = student ? student + r * cols : nullptr;
  float max = 0.0f;
  std::int64_t argmax = -1;
  if (t) {
    slice_max(t, cols, inv_t, max, argmax);
    if (threadIdx.x == 0 && raise_max(state.teacher_max, state.teacher_sum, &state.cross, max))
      state.teacher_argmax = offset + argmax;
  }
  if (s) {
    slice_max(s, cols, inv_t, max, argmax);
    if (threadIdx.x == 0 && raise_max(state.student_max, state.student_sum, nullptr, max))
      state.student_argmax = offset + argmax;
  }
  if (threadIdx.x == 0 && targets) {
    const std::int64_t target = targets[r];
    if (target >= offset && target < offset + cols) {
      if (t) state.teacher_target = t[target - offset] * inv_t;
      if (s) state.student_target = s[target - offset] * inv_t;
    }
  }
  __syncthreads();  // the raised maxima, for every thread
  if (!with_sums) return;
  const float teacher_max = state.teacher_max, student_max = state.student_max;
  double teacher_sum = 0.0, student_sum = 0.0, cross = 0.0;
  for (std::int64_t v = threadIdx.x; v < cols; v += kLossThreads) {
    if (t) {
      const float b = t[v] * inv_t;
      const float e = expf(b - teacher_max);
      teacher_sum += e;
      if (s) cross += static_cast<double>(e) * static_cast<double>(b - s[v] * inv_t);
    }
    if (s) student_sum += expf(s[v] * inv_t - student_max);
  }
  teacher_sum = block_sum<kLossThreads>(teacher_sum);
  student_sum = block_sum<kLossThreads>(student_sum);
  cross = block_sum<kLossThreads>(cross);
  if (threadIdx.x == 0) {
    state.teacher_sum += teacher_sum;
    state.student_sum += student_sum;
    state.cross += cross;
  }
}

template <class T>
__global__ void kl_gradient_kernel(const float* teacher, float* student, std::int64_t rows,
                                   std::int64_t cols, float temperature, const float* weights,
                                   float scale, const T* states) {
  const float inv_t = 1.0f / temperature;
  grid_stride(rows * cols, [&](std::int64_t i) {
    const std::int64_t r = i / cols;
    const float w = weights ? weights[r] : 1.0f;
    if (w == 0.0f) {
      student[i] = 0.0f;
      return;
    }
    const float q = expf(student[i] * inv_t - static_cast<float>(states[r].student_lse));
    const float p = expf(teacher[i] * inv_t - static_cast<float>(states[r].teacher_lse));
    student[i] = scale * w * temperature * (q - p);
  });
}

template <class T>
__global__ void cross_entropy_gradient_kernel(float* student, std::int64_t rows, std::int64_t cols,
                                              std::int64_t offset, const std::int32_t* targets,
                                              float scale, const T* states) {
  grid_stride(rows * cols, [&](std::int64_t i) {
    const std::int64_t r = i / cols, v = i % cols;
    const std::int64_t target = targets[r];
    if (target < 0) {
      student[i] = 0.0f;
      return;
    }
    float value = scale * expf(student[i] - static_cast<float>(states[r].student_lse));
    if (target - offset == v) value -= scale;
    student[i] = value;
  });
}

template <class T>
__global__ void squared_error_kernel(const float* teacher, float* student, std::int64_t cols,
                                     const float* weights, float scale, bool write_gradient,
                                     T* states) {
  const std::int64_t r = blockIdx.x;
  const float factor = 2.0f * scale * (weights ? weights[r] : 1.0f);
  double sum = 0.0;
  for (std::int64_t v = threadIdx.x; v < cols; v += kLossThreads) {
    const float diff = student[r * cols + v] - teacher[r * cols + v];
    sum += static_cast<double>(diff) * static_cast<double>(diff);
    if (write_gradient) student[r * cols + v] = factor * diff;
  }
  sum = block_sum<kLossThreads>(sum);
  if (threadIdx.x == 0) states[r].squared_error += sum;
}

// Row r: d = s - (t - mean(t)) (or s - t), row_sums[r] = sum d^2, grad[r] = 2 scale w_r d.
template <class T>
__global__ void hidden_squared_error_kernel(const T* teacher, const T* student, T* grad,
                                            std::int64_t cols, bool centre_teacher,
                                            const float* weights, float scale, double* row_sums) {
  const std::int64_t r = blockIdx.x;
  const T* t = teacher + r * cols;
  const T* s = student + r * cols;
  float teacher_mean = 0.0f;
  if (centre_teacher) {
    double sum = 0.0;
    for (std::int64_t c = threadIdx.x; c < cols; c += kLossThreads)
      sum += to_f32(t[c]);
    teacher_mean = static_cast<float>(block_sum<kLossThreads>(sum) / static_cast<double>(cols));
  }
  const float factor = 2.0f * scale * (weights ? weights[r] : 1.0f);
  double sum = 0.0;
  for (std::int64_t c = threadIdx.x; c < cols; c += kLossThreads) {
    const float diff = to_f32(s[c]) - (to_f32(t[c]) - teacher_mean);
    sum += static_cast<double>(diff) * static_cast<double>(diff);
    if (grad) grad[r * cols + c] = from_f32<T>(factor * diff);
  }
  sum = block_sum<kLossThreads>(sum);
  if (threadIdx.x == 0) row_sums[r] = sum;
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

using LossRowState = ::kept::SoftmaxRowState<float>;

inline cudaError_t launch_rows_reset(LossRowState* states, std::int64_t rows, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  using namespace detail;
  return launch("softmax_rows_reset", rows_reset_kernel<LossRowState>, dim3(blocks_for(rows)),
                dim3(kElementwiseThreads), 0, stream, states, rows);
}
inline cudaError_t launch_rows_finish(LossRowState* states, std::int64_t rows,
                                      cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  using namespace detail;
  return launch("softmax_rows_finish", rows_finish_kernel<LossRowState>, dim3(blocks_for(rows)),
                dim3(kElementwiseThreads), 0, stream, states, rows);
}
inline cudaError_t launch_rows_update(const float* teacher, const float* student, std::int64_t rows,
                                      std::int64_t cols, std::int64_t offset, float inv_t,
                                      const std::int32_t* targets, bool with_sums,
                                      LossRowState* states, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  using namespace detail;
  return launch("softmax_rows_update", rows_update_kernel<LossRowState>,
                dim3(static_cast<unsigned>(rows)), dim3(kLossThreads), 0, stream, teacher, student,
                cols, offset, inv_t, targets, with_sums, states);
}
inline cudaError_t launch_kl_gradient(const float* teacher, float* student, std::int64_t rows,
                                      std::int64_t cols, float temperature, const float* weights,
                                      float scale, const LossRowState* states,
                                      cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  using namespace detail;
  return launch("kl_logits_gradient", kl_gradient_kernel<LossRowState>,
                dim3(blocks_for(rows * cols)), dim3(kElementwiseThreads), 0, stream, teacher,
                student, rows, cols, temperature, weights, scale, states);
}
inline cudaError_t launch_cross_entropy_gradient(float* student, std::int64_t rows,
                                                 std::int64_t cols, std::int64_t offset,
                                                 const std::int32_t* targets, float scale,
                                                 const LossRowState* states, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  using namespace detail;
  return launch("cross_entropy_logits_gradient", cross_entropy_gradient_kernel<LossRowState>,
                dim3(blocks_for(rows * cols)), dim3(kElementwiseThreads), 0, stream, student, rows,
                cols, offset, targets, scale, states);
}
inline cudaError_t launch_squared_error(const float* teacher, float* student, std::int64_t rows,
                                        std::int64_t cols, const float* weights, float scale,
                                        bool write_gradient, LossRowState* states,
                                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  using namespace detail;
  return launch("squared_error_logits", squared_error_kernel<LossRowState>,
                dim3(static_cast<unsigned>(rows)), dim3(kLossThreads), 0, stream, teacher, student,
                cols, weights, scale, write_gradient, states);
}
template <class T>
cudaError_t launch_hidden_squared_error(const T* teacher, const T* student, T* grad,
                                        std::int64_t rows, std::int64_t cols, bool centre_teacher,
                                        const float* weights, float scale, double* row_sums,
                                        cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  using namespace detail;
  return launch("hidden_squared_error", hidden_squared_error_kernel<T>,
                dim3(static_cast<unsigned>(rows)), dim3(kLossThreads), 0, stream, teacher, student,
                grad, cols, centre_teacher, weights, scale, row_sums);
}

}  // namespace kept::cuda
