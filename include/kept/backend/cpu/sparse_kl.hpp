// kept/backend/cpu/sparse_kl.hpp: the per-row kernels of the sparse-teacher KL
// (xkd/sparse_kl.hpp) on the CPU, the reference for the CUDA ones.
//
// Per row the teacher is a SparseTeacherChunk row: k ids in ascending order with their
// probabilities p_i, and the tail mass r (kept/backend/loss_kernels.hpp). With a = s / T the
// student's scaled logits over one vocabulary slice [offset, offset + cols):
//   update:   the tail's running max and sum exp(a_v - max) over v not in K (the same online
//             log-sum-exp recurrence as softmax_losses.hpp, in the row state's teacher slots),
//             and cross += sum_{i in K, id in slice} p_i a_i;
//   gradient: d (T^2 KL) / d s_v = T (q_v - target_v), target_v = p_v on K and
//             r q_v / Q = r exp(a_v - lse_tail) outside K.
// The tail sum is formed from the tail's own terms, never as total minus kept, so a tail far
// below the row's mass keeps its relative precision, and its own running max keeps it from
// underflowing when the kept logits dominate. Membership: the slice's ids are walked beside v
// (both ascend), O(cols + k) per row. Row sums in double; OpenMP over rows (one row, one thread,
// so results do not depend on the thread count).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kept/backend/cpu/softmax_losses.hpp"
#include "kept/backend/loss_kernels.hpp"

namespace kept::cpu {

// Folds the slice [offset, offset + cols) of each row into its tail statistics and cross term.
template <class T>
inline void sparse_kl_rows_update(const T* student, std::int64_t cols, std::int64_t offset,
                                  T inv_temperature, const SparseTeacherChunk<T>& teacher,
                                  SoftmaxRowState<T>* states) {
  const std::int64_t k = teacher.k;
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < teacher.rows; ++r) {
    SoftmaxRowState<T>& state = states[r];
    const T* s = student + r * cols;
    const std::int32_t* ids = teacher.ids + r * k;
    const T* probs = teacher.probs + r * k;
    const std::int64_t first = std::lower_bound(ids, ids + k, offset) - ids;
    std::int64_t last = first;  // one past the slice's last kept id
    double cross = 0;
    while (last < k && ids[last] < offset + cols) {
      cross += static_cast<double>(probs[last]) *
               static_cast<double>(s[ids[last] - offset] * inv_temperature);
      ++last;
    }
    // The tail's slice max (NaN never becomes the max, as in scaled_row_max).
    T slice_max = -std::numeric_limits<T>::infinity();
    bool started = false;
    std::int64_t j = first;
    for (std::int64_t v = 0; v < cols; ++v) {
      if (j < last && ids[j] == offset + v) {
        ++j;
        continue;
      }
      const T z = s[v] * inv_temperature;
      if (z > slice_max || (!started && z == z)) {
        slice_max = z;
        started = true;
      }
    }
    detail::raise_max(state.teacher_max, state.teacher_sum, nullptr, slice_max);
    double sum = 0;
    j = first;
    for (std::int64_t v = 0; v < cols; ++v) {
      if (j < last && ids[j] == offset + v) {
        ++j;
        continue;
      }
      sum += std::exp(s[v] * inv_temperature - state.teacher_max);
    }
    state.teacher_sum += sum;
    state.cross += cross;
  }
}

// Overwrites the student slice with scale w_r T (q - target) (zeros where w_r = 0). Needs
// finished states (student_lse over the row, teacher_lse over the tail).
template <class T>
inline void sparse_kl_logits_gradient(T* student, std::int64_t cols, std::int64_t offset,
                                      T temperature, const float* weights, T scale,
                                      const SparseTeacherChunk<T>& teacher,
                                      const SoftmaxRowState<T>* states) {
  const T inv_temperature = T(1) / temperature;
  const std::int64_t k = teacher.k;
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < teacher.rows; ++r) {
    T* s = student + r * cols;
    const T w = weights ? static_cast<T>(weights[r]) : T(1);
    if (w == T(0)) {
      std::fill(s, s + cols, T(0));
      continue;
    }
    const T factor = scale * w * temperature;
    const T student_lse = static_cast<T>(states[r].student_lse);
    const T tail = teacher.tail[r];
    // An empty or massless tail has no target there (and teacher_lse may be -inf).
    const bool has_tail = tail > T(0);
    const T tail_lse = has_tail ? static_cast<T>(states[r].teacher_lse) : T(0);
    const std::int32_t* ids = teacher.ids + r * k;
    const T* probs = teacher.probs + r * k;
    std::int64_t j = std::lower_bound(ids, ids + k, offset) - ids;
    for (std::int64_t v = 0; v < cols; ++v) {
      const T a = s[v] * inv_temperature;
      const T q = std::exp(a - student_lse);
      T target;
      if (j < k && ids[j] == offset + v) {
        target = probs[j];
        ++j;
      } else {
        target = has_tail ? tail * std::exp(a - tail_lse) : T(0);
      }
      s[v] = factor * (q - target);
    }
  }
}

}  // namespace kept::cpu
