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
#pragma once

#include <cstdint>

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

}  // namespace kept
