// kept/backend/cpu/softmax_losses.hpp: per-row softmax statistics and the gradients of the
// distillation losses on one chunk of logits, the CPU reference for xkd/.
//
// Rows are tokens; columns are one vocabulary slice [offset, offset + cols) of the logits
// (the whole vocabulary when the caller does not slice it). Teacher logits t, student logits s,
// temperature T, scaled logits b = t / T (teacher) and a = s / T (student):
//   p = softmax(b), q = softmax(a), lse_b = log sum_v exp(b_v), lse_a likewise.
//   KL(p || q) = sum_v p_v (log p_v - log q_v) = E_p[b - a] - lse_b + lse_a
//   d (T^2 KL) / d s_v = T (q_v - p_v)
//   CE(target y) = lse_s - s_y  (T = 1),        d CE / d s_v = q_v - [v == y]
//   squared error = sum_v (s_v - t_v)^2,         d / d s_v = 2 (s_v - t_v)
//
// Streaming (why the state below exists): a row's statistics are folded in slice by slice with
// the online log-sum-exp recurrence. With m the running max and Z = sum exp(b - m), a new slice
// with max m' > m rescales Z *= exp(m - m') first; the KL cross term C = sum exp(b - m)(b - a)
// rescales the same way, so E_p[b - a] = C / Z needs no second pass. Hence the loss values
// (KL, both CEs, top-1) of a row are known after one pass over the vocabulary; only the
// gradients, which need the final lse, take a second pass (the caller recomputes the slice's
// logits, or reuses them when the vocabulary is one slice).
//
// The argmax rides along with the max: a slice's first maximal index replaces the running one
// only on a strict increase, so ties resolve to the lowest vocabulary id whatever the slicing.
//
// Precision: logits and gradients are in T (float, or double for the float64 reference); the
// row sums (Z, C, squared error) accumulate in double, as the norm kernels do, since a row
// sums up to ~10^5 terms. OpenMP parallelises over rows; each row is one thread's, so results
// do not depend on the thread count.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "kept/backend/loss_kernels.hpp"

namespace kept::cpu {

using kept::SoftmaxRowState;

template <class T>
inline void softmax_rows_reset(SoftmaxRowState<T>* states, std::int64_t rows) {
  const T lowest = -std::numeric_limits<T>::infinity();
  for (std::int64_t r = 0; r < rows; ++r)
    states[r] =
        SoftmaxRowState<T>{lowest, lowest, 0.0, 0.0, 0.0, 0.0, T(0), T(0), -1, -1, 0.0, 0.0};
}

namespace detail {
// Max of x * inv_temperature over a row slice and its first index (-1 for an empty or all-NaN
// slice).
template <class T>
inline void scaled_row_max(const T* x, std::int64_t cols, T inv_temperature, T& max,
                           std::int64_t& argmax) {
  max = -std::numeric_limits<T>::infinity();
  argmax = -1;
  for (std::int64_t v = 0; v < cols; ++v) {
    const T z = x[v] * inv_temperature;
    // The first non-NaN value starts the max even at -inf; NaN never becomes the max (it still
    // poisons the sums, so a NaN logit shows up in the loss).
    if (z > max || (argmax < 0 && z == z)) {
      max = z;
      argmax = v;
    }
  }
}
// Moves the running max of one model to `slice_max` when it is larger, rescaling its sums.
template <class T>
inline bool raise_max(T& running_max, double& sum, double* cross, T slice_max) {
  if (!(slice_max > running_max)) return false;
  const double rescale =
      running_max == -std::numeric_limits<T>::infinity()
          ? 0.0
          : std::exp(static_cast<double>(running_max) - static_cast<double>(slice_max));
  sum *= rescale;
  if (cross) *cross *= rescale;
  running_max = slice_max;
  return true;
}
}  // namespace detail

// Folds the vocabulary slice [offset, offset + cols) of each row into its state. `teacher` or
// `student` may be null (that model is absent); both are contiguous [rows, cols]. `targets`
// (may be null) holds one target id per row, -1 for none. With `with_sums` false only the max
// and argmax are tracked (enough for top-1 agreement; skips the exponentials).
template <class T>
inline void softmax_rows_update(const T* teacher, const T* student, std::int64_t rows,
                                std::int64_t cols, std::int64_t offset, T inv_temperature,
                                const std::int32_t* targets, bool with_sums,
                                SoftmaxRowState<T>* states) {
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    SoftmaxRowState<T>& state = states[r];
    const T* t = teacher ? teacher + r * cols : nullptr;
    const T* s = student ? student + r * cols : nullptr;
    T slice_max;
    std::int64_t slice_argmax;
    if (t) {
      detail::scaled_row_max(t, cols, inv_temperature, slice_max, slice_argmax);
      if (detail::raise_max(state.teacher_max, state.teacher_sum, &state.cross, slice_max))
        state.teacher_argmax = offset + slice_argmax;
    }
    if (s) {
      detail::scaled_row_max(s, cols, inv_temperature, slice_max, slice_argmax);
      if (detail::raise_max(state.student_max, state.student_sum, nullptr, slice_max))
        state.student_argmax = offset + slice_argmax;
    }
    if (targets) {
      const std::int64_t target = targets[r];
      if (target >= offset && target < offset + cols) {
        if (t) state.teacher_target = t[target - offset] * inv_temperature;
        if (s) state.student_target = s[target - offset] * inv_temperature;
      }
    }
    if (!with_sums) continue;
    double teacher_sum = 0, student_sum = 0, cross = 0;
    for (std::int64_t v = 0; v < cols; ++v) {
      if (t) {
        const T b = t[v] * inv_temperature;
        const T e = std::exp(b - state.teacher_max);
        teacher_sum += e;
        if (s) cross += static_cast<double>(e) * static_cast<double>(b - s[v] * inv_temperature);
      }
      if (s) student_sum += std::exp(s[v] * inv_temperature - state.student_max);
    }
    state.teacher_sum += teacher_sum;
    state.student_sum += student_sum;
    state.cross += cross;
  }
}

// After the last slice: lse = max + log(sum) for each model present.
template <class T>
inline void softmax_rows_finish(SoftmaxRowState<T>* states, std::int64_t rows) {
  for (std::int64_t r = 0; r < rows; ++r) {
    SoftmaxRowState<T>& state = states[r];
    state.teacher_lse = static_cast<double>(state.teacher_max) + std::log(state.teacher_sum);
    state.student_lse = static_cast<double>(state.student_max) + std::log(state.student_sum);
  }
}

using SoftmaxChunkSums = kept::ChunkSums;
using kept::softmax_rows_reduce;

// Overwrites the student slice with d(scale * w_r * T^2 KL_r) / d s = scale w_r T (q - p).
// Needs finished states. `weights` may be null (all 1).
template <class T>
inline void kl_logits_gradient(const T* teacher, T* student, std::int64_t rows, std::int64_t cols,
                               T temperature, const float* weights, T scale,
                               const SoftmaxRowState<T>* states) {
  const T inv_temperature = T(1) / temperature;
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* t = teacher + r * cols;
    T* s = student + r * cols;
    const T w = weights ? static_cast<T>(weights[r]) : T(1);
    if (w == T(0)) {
      for (std::int64_t v = 0; v < cols; ++v)
        s[v] = T(0);
      continue;
    }
    const T factor = scale * w * temperature;
    const T teacher_lse = static_cast<T>(states[r].teacher_lse);
    const T student_lse = static_cast<T>(states[r].student_lse);
    for (std::int64_t v = 0; v < cols; ++v) {
      const T q = std::exp(s[v] * inv_temperature - student_lse);
      const T p = std::exp(t[v] * inv_temperature - teacher_lse);
      s[v] = factor * (q - p);
    }
  }
}

// Overwrites the student slice [offset, offset + cols) with d(scale * CE_r) / d s =
// scale (q - onehot(y_r)); rows whose target is -1 get zeros. Needs finished states (T = 1).
template <class T>
inline void cross_entropy_logits_gradient(T* student, std::int64_t rows, std::int64_t cols,
                                          std::int64_t offset, const std::int32_t* targets, T scale,
                                          const SoftmaxRowState<T>* states) {
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    T* s = student + r * cols;
    const std::int64_t target = targets[r];
    if (target < 0) {
      for (std::int64_t v = 0; v < cols; ++v)
        s[v] = T(0);
      continue;
    }
    const T student_lse = static_cast<T>(states[r].student_lse);
    for (std::int64_t v = 0; v < cols; ++v)
      s[v] = scale * std::exp(s[v] - student_lse);
    if (target >= offset && target < offset + cols) s[target - offset] -= scale;
  }
}

// Adds sum_v (s - t)^2 of the slice to each row's squared_error and, with `write_gradient`,
// overwrites the student slice with scale w_r 2 (s - t) (zeros where w_r = 0).
template <class T>
inline void squared_error_logits(const T* teacher, T* student, std::int64_t rows, std::int64_t cols,
                                 const float* weights, T scale, bool write_gradient,
                                 SoftmaxRowState<T>* states) {
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* t = teacher + r * cols;
    T* s = student + r * cols;
    const T factor = T(2) * scale * (weights ? static_cast<T>(weights[r]) : T(1));
    double sum = 0;
    for (std::int64_t v = 0; v < cols; ++v) {
      const T diff = s[v] - t[v];
      sum += static_cast<double>(diff) * static_cast<double>(diff);
      if (write_gradient) s[v] = factor * diff;
    }
    states[r].squared_error += sum;
  }
}

// Hidden-state squared error of one residual-stream slot: for each row,
//   d = s - t'   with t' = t - mean(t) when `centre_teacher`, else t' = t;
//   row_sums[r] = sum_c d_c^2;  grad[r] = scale w_r 2 d (overwritten; grad may be null).
// Returns sum_r w_r row_sums[r], summed in row order. `row_sums` has `rows` entries.
template <class T>
inline double hidden_squared_error(const T* teacher, const T* student, T* grad, std::int64_t rows,
                                   std::int64_t cols, bool centre_teacher, const float* weights,
                                   T scale, double* row_sums) {
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* t = teacher + r * cols;
    const T* s = student + r * cols;
    double mean = 0;
    if (centre_teacher) {
      for (std::int64_t c = 0; c < cols; ++c)
        mean += t[c];
      mean /= static_cast<double>(cols);
    }
    const T teacher_mean = static_cast<T>(mean);
    const T factor = T(2) * scale * (weights ? static_cast<T>(weights[r]) : T(1));
    double sum = 0;
    for (std::int64_t c = 0; c < cols; ++c) {
      const T diff = s[c] - (t[c] - teacher_mean);
      sum += static_cast<double>(diff) * static_cast<double>(diff);
      if (grad) grad[r * cols + c] = factor * diff;
    }
    row_sums[r] = sum;
  }
  double total = 0;
  for (std::int64_t r = 0; r < rows; ++r)
    total += (weights ? static_cast<double>(weights[r]) : 1.0) * row_sums[r];
  return total;
}

}  // namespace kept::cpu
