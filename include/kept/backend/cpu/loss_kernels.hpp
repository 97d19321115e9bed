// kept/backend/cpu/loss_kernels.hpp: LossKernels for the CPU backends (Cpu, Cpu64), forwarding
// to the per-row kernels of backend/cpu/softmax_losses.hpp. The contract is in
// kept/backend/loss_kernels.hpp.
#pragma once

#include <cstdint>
#include <vector>

#include "kept/backend/cpu/softmax_losses.hpp"
#include "kept/backend/cpu/sparse_kl.hpp"
#include "kept/backend/loss_kernels.hpp"
#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"

namespace kept {

template <class T>
struct CpuBackend;

template <class T>
struct LossKernels<CpuBackend<T>> {
  using Backend = CpuBackend<T>;

  struct RowBuffers {
    std::vector<cpu::SoftmaxRowState<T>> states;
    std::vector<double> row_values;  // scratch for hidden_squared_error's per-row sums
    SparseTeacherChunk<T> sparse;    // the chunk given to sparse_kl_begin (host memory)
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

  // The sparse-teacher KL (contract: kept/backend/loss_kernels.hpp; kernels:
  // backend/cpu/sparse_kl.hpp). The chunk stays the caller's until the chunk's last call.
  static void sparse_kl_begin(Backend&, RowBuffers& buffers, const SparseTeacherChunk<T>& chunk) {
    KEPT_CHECK(static_cast<std::int64_t>(buffers.states.size()) == chunk.rows,
               "sparse KL: a teacher chunk of ", chunk.rows, " rows for row states reset for ",
               buffers.states.size());
    buffers.sparse = chunk;
  }
  static void sparse_kl_update(Backend&, RowBuffers& buffers, MatrixView<const T> student,
                               std::int64_t offset, T inv_temperature) {
    check_contiguous(student, "student logits");
    check_sparse_rows(buffers, student.rows);
    cpu::sparse_kl_rows_update(student.data, student.cols, offset, inv_temperature, buffers.sparse,
                               buffers.states.data());
  }
  static void sparse_kl_gradient(Backend&, const RowBuffers& buffers, MatrixView<T> student,
                                 std::int64_t offset, T temperature, const float* weights,
                                 T scale) {
    check_contiguous(MatrixView<const T>(student), "student logits");
    check_sparse_rows(buffers, student.rows);
    cpu::sparse_kl_logits_gradient(student.data, student.cols, offset, temperature, weights, scale,
                                   buffers.sparse, buffers.states.data());
  }
  static ChunkSums sparse_kl_reduce(Backend&, const RowBuffers& buffers, const float* weights) {
    return sparse_kl_rows_reduce(buffers.states.data(), buffers.sparse, weights);
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
  static void check_sparse_rows(const RowBuffers& buffers, std::int64_t rows) {
    KEPT_CHECK(buffers.sparse.ids && buffers.sparse.rows == rows, "sparse KL: a logit chunk of ",
               rows, " rows for a teacher chunk of ", buffers.sparse.rows,
               " rows (sparse_kl_begin first)");
  }
  static void check_contiguous(MatrixView<const T> view, const char* what) {
    KEPT_CHECK(!view.data || view.contiguous(), "loss kernels need contiguous ", what,
               ", got a view with row stride ", view.stride, " for ", view.cols, " columns");
  }
};

}  // namespace kept
