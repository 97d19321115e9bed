// kept/xkd/loss_kernels.hpp: the per-chunk loss math the XKD objectives call, per backend.
//
// The objectives (logit_kl, logit_mse, cross_entropy, metrics, hidden_mse) are templates over
// the backend and touch memory only through the backend (gemm, ensure, add_bias, ...) and
// through LossKernels<Backend>, a traits class with the per-row softmax / KL / CE / squared-error
// kernels. The backend classes are not extended for this: a backend opts in by specialising
// LossKernels (the CPU one is below and forwards to backend/cpu/softmax_losses.hpp, where the
// math is written out), so a CUDA backend can slot in with its own kernels and no change to the
// objectives.
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
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/backend/cpu/softmax_losses.hpp"
#include "kept/backend/cpu_bf16.hpp"
#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"

namespace kept::xkd {

// Host sums over a chunk's rows; see cpu::SoftmaxChunkSums for each field.
using ChunkSums = cpu::SoftmaxChunkSums;

// Specialised per backend; the primary template is deliberately undefined.
template <class Backend>
struct LossKernels;

template <class T>
struct LossKernels<CpuBackend<T>> {
  using Backend = CpuBackend<T>;

  struct RowBuffers {
    std::vector<cpu::SoftmaxRowState<T>> states;
    std::vector<double> row_values;  // scratch for hidden_squared_error's per-row sums
  };

  static void reset(Backend&, RowBuffers& buffers, std::int64_t rows) {
    buffers.states.resize(static_cast<std::size_t>(rows));
    cpu::softmax_rows_reset(buffers.states.data(), rows);
  }

  static void update(Backend&, RowBuffers& buffers, MatrixView<const T> teacher,
                     MatrixView<const T> student, std::int64_t offset, T inv_temperature,
                     const std::int32_t* targets, bool with_sums) {
    check_contiguous(teacher, "teacher logits");
    check_contiguous(student, "student logits");
    cpu::softmax_rows_update(teacher.data, student.data, student.rows, student.cols, offset,
                             inv_temperature, targets, with_sums, buffers.states.data());
  }

  static void finish(Backend&, RowBuffers& buffers) {
    cpu::softmax_rows_finish(buffers.states.data(),
                             static_cast<std::int64_t>(buffers.states.size()));
  }

  static ChunkSums reduce(Backend&, const RowBuffers& buffers, bool with_teacher, bool with_sums,
                          const float* weights, const std::int32_t* targets,
                          double* student_ce_rows, double* teacher_ce_rows) {
    return cpu::softmax_rows_reduce(buffers.states.data(),
                                    static_cast<std::int64_t>(buffers.states.size()), with_teacher,
                                    with_sums, weights, targets, student_ce_rows, teacher_ce_rows);
  }

  static void kl_gradient(Backend&, const RowBuffers& buffers, MatrixView<const T> teacher,
                          MatrixView<T> student, T temperature, const float* weights, T scale) {
    check_contiguous(teacher, "teacher logits");
    check_contiguous(student, "student logits");
    cpu::kl_logits_gradient(teacher.data, student.data, student.rows, student.cols, temperature,
                            weights, scale, buffers.states.data());
  }

  static void cross_entropy_gradient(Backend&, const RowBuffers& buffers, MatrixView<T> student,
                                     std::int64_t offset, const std::int32_t* targets, T scale) {
    check_contiguous(student, "student logits");
    cpu::cross_entropy_logits_gradient(student.data, student.rows, student.cols, offset, targets,
                                       scale, buffers.states.data());
  }

  static void squared_error(Backend&, RowBuffers& buffers, MatrixView<const T> teacher,
                            MatrixView<T> student, const float* weights, T scale,
                            bool write_gradient) {
    check_contiguous(teacher, "teacher logits");
    check_contiguous(student, "student logits");
    cpu::squared_error_logits(teacher.data, student.data, student.rows, student.cols, weights,
                              scale, write_gradient, buffers.states.data());
  }

  // Returns sum_r w_r ||s_r - t'_r||^2 and overwrites `grad` (when its data is not null).
  static double hidden_squared_error(Backend&, RowBuffers& buffers, MatrixView<const T> teacher,
                                     MatrixView<const T> student, MatrixView<T> grad,
                                     bool centre_teacher, const float* weights, T scale) {
    check_contiguous(teacher, "teacher states");
    check_contiguous(student, "student states");
    if (grad.data) check_contiguous(MatrixView<const T>(grad), "state gradients");
    buffers.row_values.resize(static_cast<std::size_t>(student.rows));
    return cpu::hidden_squared_error(teacher.data, student.data, grad.data, student.rows,
                                     student.cols, centre_teacher, weights, scale,
                                     buffers.row_values.data());
  }

 private:
  static void check_contiguous(MatrixView<const T> view, const char* what) {
    KEPT_CHECK(!view.data || view.contiguous(), "loss kernels need contiguous ", what,
               ", got a view with row stride ", view.stride, " for ", view.cols, " columns");
  }
};

// CpuBf16: logit chunks are fp32 (the Stat type), so the fp32 kernels run on them as they are;
// hidden states are bf16, widened for the squared error, and the gradient is rounded once.
template <>
struct LossKernels<CpuBf16> {
  using Backend = CpuBf16;
  using Fp32 = LossKernels<Cpu>;
  using RowBuffers = Fp32::RowBuffers;

  static void reset(Backend&, RowBuffers& buffers, std::int64_t rows) {
    Cpu cpu;
    Fp32::reset(cpu, buffers, rows);
  }
  static void update(Backend&, RowBuffers& buffers, MatrixView<const float> teacher,
                     MatrixView<const float> student, std::int64_t offset, float inv_temperature,
                     const std::int32_t* targets, bool with_sums) {
    Cpu cpu;
    Fp32::update(cpu, buffers, teacher, student, offset, inv_temperature, targets, with_sums);
  }
  static void finish(Backend&, RowBuffers& buffers) {
    Cpu cpu;
    Fp32::finish(cpu, buffers);
  }
  static ChunkSums reduce(Backend&, const RowBuffers& buffers, bool with_teacher, bool with_sums,
                          const float* weights, const std::int32_t* targets,
                          double* student_ce_rows, double* teacher_ce_rows) {
    Cpu cpu;
    return Fp32::reduce(cpu, buffers, with_teacher, with_sums, weights, targets, student_ce_rows,
                        teacher_ce_rows);
  }
  static void kl_gradient(Backend&, const RowBuffers& buffers, MatrixView<const float> teacher,
                          MatrixView<float> student, float temperature, const float* weights,
                          float scale) {
    Cpu cpu;
    Fp32::kl_gradient(cpu, buffers, teacher, student, temperature, weights, scale);
  }
  static void cross_entropy_gradient(Backend&, const RowBuffers& buffers, MatrixView<float> student,
                                     std::int64_t offset, const std::int32_t* targets,
                                     float scale) {
    Cpu cpu;
    Fp32::cross_entropy_gradient(cpu, buffers, student, offset, targets, scale);
  }
  static void squared_error(Backend&, RowBuffers& buffers, MatrixView<const float> teacher,
                            MatrixView<float> student, const float* weights, float scale,
                            bool write_gradient) {
    Cpu cpu;
    Fp32::squared_error(cpu, buffers, teacher, student, weights, scale, write_gradient);
  }
  static double hidden_squared_error(Backend&, RowBuffers& buffers, MatrixView<const bf16> teacher,
                                     MatrixView<const bf16> student, MatrixView<bf16> grad,
                                     bool centre_teacher, const float* weights, float scale) {
    KEPT_CHECK(teacher.contiguous() && student.contiguous() && (!grad.data || grad.contiguous()),
               "loss kernels need contiguous hidden states");
    const std::int64_t count = student.rows * student.cols;
    auto widen = [&](const bf16* data) {
      std::vector<float> out(static_cast<std::size_t>(count));
      for (std::int64_t i = 0; i < count; ++i)
        out[static_cast<std::size_t>(i)] = to_float(data[i]);
      return out;
    };
    const std::vector<float> wt = widen(teacher.data), ws = widen(student.data);
    std::vector<float> wg(grad.data ? static_cast<std::size_t>(count) : 0);
    Cpu cpu;
    const double sum = Fp32::hidden_squared_error(
        cpu, buffers, MatrixView<const float>(wt.data(), student.rows, student.cols),
        MatrixView<const float>(ws.data(), student.rows, student.cols),
        MatrixView<float>(grad.data ? wg.data() : nullptr, student.rows, student.cols),
        centre_teacher, weights, scale);
    for (std::size_t i = 0; i < wg.size(); ++i)
      grad.data[i] = to_bf16(wg[i]);
    return sum;
  }
};

}  // namespace kept::xkd
