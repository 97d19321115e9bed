// kept/backend/loss_kernels.hpp: the per-chunk loss math the XKD objectives call, per backend.
//
// The objectives (logit_kl, logit_mse, cross_entropy, metrics, hidden_mse) are templates over
// the backend and touch memory only through the backend (gemm, ensure, add_bias, ...) and
// through LossKernels<Backend>, a traits class with the per-row softmax / KL / CE / squared-error
// kernels, part of the backend contract (kept/backend/backend.hpp). A backend opts in by
// specialising LossKernels beside its own header: backend/cpu/loss_kernels.hpp (Cpu, Cpu64;
// the math is written out in backend/cpu/softmax_losses.hpp), backend/cpu_bf16.hpp (CpuBf16) and
// backend/cuda/backend.cuh (Cuda). The objectives in xkd/ never include a backend.
//
// Contract, for every backend:
//  - Logit views are contiguous [rows, cols] in the backend's memory space; `teacher` may have a
//    null data pointer where the objective has no teacher.
//  - Per-token inputs (weights: float, targets: int32, -1 = none) are host pointers already
//    offset to the chunk's first row; they are small (one value per token), and a device
//    backend uploads them per chunk.
//  - RowBuffers is the per-chunk row state (running max, exponential sums, argmax, lse); it
//    lives wherever the kernels want it and is only ever handed back to them.
//  - reduce() returns host sums (ChunkSums) and writes per-row CE to host arrays when asked.
//  - The sparse-teacher KL (xkd/sparse_kl.hpp) adds sparse_kl_begin / sparse_kl_update /
//    sparse_kl_gradient / sparse_kl_reduce: sparse_kl_begin receives the chunk's teacher rows
//    (SparseTeacherChunk, host memory; a device backend uploads them once per chunk), the other
//    three use what it received. The student's own max / sum / argmax come from update() with
//    no teacher, as for cross-entropy; sparse_kl_update adds the tail statistics.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

namespace kept {

// Weighted sums over a chunk's rows, in double. A row counts when its weight is non-zero and
// (with targets) its target is not -1; every sum is weighted (a 0/1 mask gives plain sums).
struct ChunkSums {
  double weight = 0;         // sum of the counted rows' weights
  std::int64_t rows = 0;     // rows counted
  double kl = 0;             // sum w KL(p || q) at the temperature of the update (unscaled)
  double student_ce = 0;     // sum w (lse_s - s_y): needs targets and T = 1
  double teacher_ce = 0;     // sum w (lse_t - t_y)
  double squared_error = 0;  // sum w sum_v (s_v - t_v)^2
  std::int64_t agree = 0;    // counted rows whose teacher and student argmax are equal
  std::int64_t student_correct = 0, teacher_correct = 0;  // argmax == target

  void add(const ChunkSums& other) {
    weight += other.weight;
    rows += other.rows;
    kl += other.kl;
    student_ce += other.student_ce;
    teacher_ce += other.teacher_ce;
    squared_error += other.squared_error;
    agree += other.agree;
    student_correct += other.student_correct;
    teacher_correct += other.teacher_correct;
  }
};

// Specialised per backend; the primary template is deliberately undefined.
template <class Backend>
struct LossKernels;

// What one row has seen of the vocabulary so far. Teacher fields are unused when there is no
// teacher (cross-entropy alone), target fields when there are no targets.
template <class T>
struct SoftmaxRowState {
  T teacher_max, student_max;        // running max of the scaled logits
  double teacher_sum, student_sum;   // sum exp(scaled - running max)
  double cross;                      // sum exp(b - teacher_max) (b - a): the KL cross term
  double squared_error;              // sum (s - t)^2 over the slices seen (logit MSE)
  T teacher_target, student_target;  // scaled logit at the row's target id
  std::int64_t teacher_argmax, student_argmax;
  double teacher_lse, student_lse;  // set by softmax_rows_finish
};

// Reduces finished row states on the host, in row order (so deterministic); every backend's
// reduce() ends here (a device backend downloads its states first). `with_teacher` says whether
// the states saw teacher logits (the KL, teacher CE and agreement need them), `with_sums`
// whether the updates accumulated the exponential sums (the KL and the CEs need them). `weights`
// and `targets` may be null; `student_ce_rows` / `teacher_ce_rows` (may be null) receive each row's
// CE (0 for rows not counted), for per-position reports.
template <class T>
inline ChunkSums softmax_rows_reduce(const SoftmaxRowState<T>* states, std::int64_t rows,
                                     bool with_teacher, bool with_sums, const float* weights,
                                     const std::int32_t* targets, double* student_ce_rows,
                                     double* teacher_ce_rows) {
  ChunkSums sums;
  for (std::int64_t r = 0; r < rows; ++r) {
    const SoftmaxRowState<T>& state = states[r];
    const double w = weights ? weights[r] : 1.0;
    const bool counted = w != 0 && (!targets || targets[r] >= 0);
    if (student_ce_rows) student_ce_rows[r] = 0;
    if (teacher_ce_rows) teacher_ce_rows[r] = 0;
    if (!counted) continue;
    sums.weight += w;
    ++sums.rows;
    sums.squared_error += w * state.squared_error;
    if (with_teacher && with_sums) {
      sums.kl += w * (state.cross / state.teacher_sum - state.teacher_lse + state.student_lse);
    }
    if (with_teacher && state.teacher_argmax == state.student_argmax) ++sums.agree;
    if (targets && with_sums) {
      const double student_ce = state.student_lse - static_cast<double>(state.student_target);
      sums.student_ce += w * student_ce;
      if (student_ce_rows) student_ce_rows[r] = student_ce;
      if (state.student_argmax == targets[r]) ++sums.student_correct;
      if (with_teacher) {
        const double teacher_ce = state.teacher_lse - static_cast<double>(state.teacher_target);
        sums.teacher_ce += w * teacher_ce;
        if (teacher_ce_rows) teacher_ce_rows[r] = teacher_ce;
        if (state.teacher_argmax == targets[r]) ++sums.teacher_correct;
      }
    }
  }
  return sums;
}

// One token chunk of a sparse teacher as the kernels take it (prepared on the host by
// xkd::sparse_logit_kl): per row the k kept ids in ascending order (distinct, so a kernel walks
// them beside the vocabulary), each one's probability p_i at the temperature, and the tail mass
// r, renormalised so that sum_i p_i + r = 1 in double.
template <class T>
struct SparseTeacherChunk {
  const std::int32_t* ids = nullptr;  // [rows, k], ascending within a row
  const T* probs = nullptr;           // [rows, k]
  const T* tail = nullptr;            // [rows]
  std::int64_t rows = 0, k = 0;
};

// The sparse KL's row statistics share SoftmaxRowState, whose teacher slots are free (there are
// no teacher logits), so reset / finish / download are the softmax ones:
//   student_max, student_sum, student_lse, student_argmax: the whole row, from update();
//   teacher_max, teacher_sum, teacher_lse: the student's scaled logits outside K (the tail),
//     from sparse_kl_update; teacher_lse = log sum_{v not in K} exp(a_v) (-inf for an empty tail);
//   cross: sum_{i in K} p_i a_i.
// Per counted row (a = s / T, lse_a = student_lse, log Q = teacher_lse - lse_a):
//   KL = sum_i p_i log p_i - cross + (sum_i p_i) lse_a + r (log r - log Q)   (0 log 0 = 0)
// The teacher's argmax is the kept id of the largest p (ties to the lowest id: ids ascend).
template <class T>
inline ChunkSums sparse_kl_rows_reduce(const SoftmaxRowState<T>* states,
                                       const SparseTeacherChunk<T>& teacher, const float* weights) {
  ChunkSums sums;
  for (std::int64_t r = 0; r < teacher.rows; ++r) {
    const SoftmaxRowState<T>& state = states[r];
    const double w = weights ? weights[r] : 1.0;
    if (w == 0) continue;
    sums.weight += w;
    ++sums.rows;
    const std::int32_t* ids = teacher.ids + r * teacher.k;
    const T* probs = teacher.probs + r * teacher.k;
    double entropy_term = 0, kept_mass = 0, best = -1;
    std::int64_t teacher_argmax = -1;
    for (std::int64_t i = 0; i < teacher.k; ++i) {
      const double p = static_cast<double>(probs[i]);
      if (p > 0) entropy_term += p * std::log(p);
      kept_mass += p;
      if (p > best) {
        best = p;
        teacher_argmax = ids[i];
      }
    }
    const double tail = static_cast<double>(teacher.tail[r]);
    double kl = entropy_term - state.cross + kept_mass * state.student_lse;
    if (tail > 0) kl += tail * (std::log(tail) - (state.teacher_lse - state.student_lse));
    sums.kl += w * kl;
    if (teacher_argmax == state.student_argmax) ++sums.agree;
  }
  return sums;
}

}  // namespace kept
