// kept/xkd/chunked_logits.hpp: the one driver behind every logit objective. It walks the
// tokens in chunks (and, optionally, the vocabulary in slices), applies the LM heads, hands
// each chunk of logits to the objective's per-chunk math and backpropagates the student's
// chunk through its head. The objectives (logit_kl, logit_mse, cross_entropy, metrics) differ
// only in that per-chunk math.
//
// Memory: logits for 4096 tokens x 84608 vocab are 1.4 GB in fp32 per model, so neither model's
// full logits are ever held. Two buffers of [token_chunk x vocab_slice] (teacher, student) are
// reused for every chunk and every call; the student's buffer becomes dL/d(student logits) in
// place. The vocabulary slice is the whole vocabulary unless Chunking::vocab_chunk is set.
//
// Per token chunk rows [r0, r0 + n):
//   pass 1, for each vocabulary slice [v0, v0 + w):
//     teacher logits = hidden_T[rows] W_T[v0 : v0 + w]^T (+ bias), likewise the student;
//     objective.observe(): fold the slice into the rows' softmax state (online max / sum, see
//     backend/cpu/softmax_losses.hpp); a single-pass objective (MSE) also writes its gradient
//     here, and the driver backpropagates the slice at once.
//   objective.finish(): lse per row, the chunk's loss and metric sums.
//   pass 2 (two-pass objectives, only when a gradient is wanted), for each slice:
//     the slice's logits are recomputed (skipped when the vocabulary is one slice: the
//     buffers still hold them), objective.gradient() overwrites the student slice with
//     dL/d(logits), then the head backward on that slice:
//       d_hidden[rows] += dlogits W_S[v0 : v0 + w]      (a GEMM on a row block of the weight)
//       dW_S[v0 : v0 + w] += dlogits^T hidden_S[rows]  (the same row block of the gradient)
//       db_S[v0 : v0 + w] += column sums of dlogits
// Row blocks of a row-major [vocab, hidden] weight are MatrixView::block()s, so no weight is
// copied. Vocabulary slicing costs one extra head GEMM per model (the recompute) and saves the
// [token_chunk x vocab] buffers for huge vocabularies or small device memory.
//
// The teacher is frozen: its head is taken const and never backpropagated.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <span>
#include <tuple>
#include <utility>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/layers/linear.hpp"
#include "kept/xkd/loss_kernels.hpp"

namespace kept::xkd {

struct Chunking {
  std::int64_t token_chunk = 256;  // tokens per chunk (>= 1)
  std::int64_t vocab_chunk = 0;    // vocabulary slice; 0 (or >= vocab) = the whole vocabulary
};

// Buffers reused across chunks and calls; pass one in to keep them from step to step.
template <class Backend>
struct LogitWorkspace {
  Tensor teacher_logits;  // at least token_chunk x slice width, in the backend's dtype
  Tensor student_logits;  // the same; becomes dL/d(student logits) in place
  typename LossKernels<Backend>::RowBuffers rows;
};

// Where the student's gradients go. Null data pointers mean "not wanted".
template <class Backend>
struct StudentGradients {
  using Act = typename Backend::Activation;
  using Grad = typename Backend::Grad;
  MatrixView<Act> d_hidden;   // [tokens, hidden], accumulated (+=)
  MatrixView<Grad> d_weight;  // [vocab, hidden], accumulated
  Grad* d_bias = nullptr;     // [vocab], accumulated

  bool wanted() const { return d_hidden.data || d_weight.data || d_bias; }
};

// The gradients of `head` that are allocated and trainable (Parameter::has_grad), and
// *d_hidden when given.
template <class Backend>
StudentGradients<Backend> student_gradients(Linear<Backend>& head,
                                            MatrixView<typename Backend::Activation>* d_hidden) {
  using Grad = typename Backend::Grad;
  StudentGradients<Backend> grads;
  if (d_hidden) grads.d_hidden = *d_hidden;
  if (head.weight.has_grad())
    grads.d_weight = MatrixView<Grad>(head.weight.grad.template data<Grad>(), head.out_features(),
                                      head.in_features());
  if (head.has_bias() && head.bias.has_grad()) grads.d_bias = head.bias.grad.template data<Grad>();
  return grads;
}

namespace detail {

// The mean's denominator: `normalizer` when positive, else the sum of the counted tokens'
// weights. Zero (nothing counted) gives a zero loss and zero gradients.
inline double denominator(double normalizer, double counted_weight) {
  KEPT_CHECK(normalizer >= 0, "loss normalizer must be >= 0 (0 = the counted tokens), got ",
             normalizer);
  return normalizer > 0 ? normalizer : counted_weight;
}

// Validates per-token weights (empty = all 1) and returns their sum.
inline double check_weights(std::span<const float> weights, std::int64_t tokens) {
  if (weights.empty()) return static_cast<double>(tokens);
  KEPT_CHECK(static_cast<std::int64_t>(weights.size()) == tokens, "got ", weights.size(),
             " token weights for ", tokens, " tokens");
  double sum = 0;
  for (std::size_t i = 0; i < weights.size(); ++i) {
    KEPT_CHECK(weights[i] >= 0 && weights[i] < std::numeric_limits<float>::infinity(),
               "token weight ", weights[i], " at token ", i, " must be finite and >= 0");
    sum += weights[i];
  }
  return sum;
}

// Validates targets (-1 = ignore) against the vocabulary and returns how many are counted.
inline std::int64_t check_targets(std::span<const std::int32_t> targets, std::int64_t tokens,
                                  std::int64_t vocab) {
  KEPT_CHECK(static_cast<std::int64_t>(targets.size()) == tokens, "got ", targets.size(),
             " targets for ", tokens, " tokens");
  std::int64_t counted = 0;
  for (std::size_t i = 0; i < targets.size(); ++i) {
    KEPT_CHECK(targets[i] >= -1 && targets[i] < vocab, "target id ", targets[i], " at token ", i,
               " is out of range for a vocabulary of ", vocab, " (-1 means ignore)");
    counted += targets[i] >= 0;
  }
  return counted;
}

inline const float* offset_or_null(std::span<const float> values, std::int64_t row0) {
  return values.empty() ? nullptr : values.data() + row0;
}
inline const std::int32_t* offset_or_null(std::span<const std::int32_t> values, std::int64_t row0) {
  return values.empty() ? nullptr : values.data() + row0;
}

template <class Backend>
MatrixView<const typename Backend::Param> weight_view(const Linear<Backend>& head) {
  using Param = typename Backend::Param;
  return MatrixView<const Param>(head.weight.value.template data<Param>(), head.out_features(),
                                 head.in_features());
}

// logits = hidden W[v0 : v0 + logits.cols]^T (+ bias[v0 : ...]).
template <class Backend>
void head_slice_forward(Backend& backend, const Linear<Backend>& head,
                        MatrixView<const typename Backend::Activation> hidden, std::int64_t v0,
                        MatrixView<typename Backend::Stat> logits) {
  using Stat = typename Backend::Stat;
  backend.gemm(hidden, Transpose::No,
               weight_view(head).block(v0, 0, logits.cols, head.in_features()), Transpose::Yes,
               logits, Stat(1), Stat(0));
  if (head.has_bias())
    backend.add_bias(logits, head.bias.value.template data<typename Backend::Param>() + v0);
}

// Backpropagates dL/d(logits) of the slice [v0, v0 + d_logits.cols) for rows [r0, r0 + rows).
template <class Backend>
void head_slice_backward(Backend& backend, const Linear<Backend>& head,
                         MatrixView<const typename Backend::Activation> hidden, std::int64_t r0,
                         std::int64_t v0, MatrixView<const typename Backend::Stat> d_logits,
                         const StudentGradients<Backend>& grads) {
  using Stat = typename Backend::Stat;
  const std::int64_t width = d_logits.cols, in = head.in_features();
  if (grads.d_hidden.data)
    backend.gemm(d_logits, Transpose::No, weight_view(head).block(v0, 0, width, in), Transpose::No,
                 grads.d_hidden.block(r0, 0, d_logits.rows, in), Stat(1), Stat(1));
  if (grads.d_weight.data)
    backend.gemm(d_logits, Transpose::Yes, hidden, Transpose::No,
                 grads.d_weight.block(v0, 0, width, in), Stat(1), Stat(1));
  if (grads.d_bias) backend.bias_backward(d_logits, grads.d_bias + v0);
}

}  // namespace detail

// Checks that the heads and hidden states fit together; `teacher_head` may be null.
template <class Backend>
void check_head_inputs(const Linear<Backend>* teacher_head,
                       MatrixView<const typename Backend::Activation> teacher_hidden,
                       const Linear<Backend>& student_head,
                       MatrixView<const typename Backend::Activation> student_hidden,
                       const StudentGradients<Backend>& grads, const Chunking& chunking) {
  KEPT_CHECK(student_hidden.cols == student_head.in_features(), "student hidden states have ",
             student_hidden.cols, " features but the student LM head takes ",
             student_head.in_features());
  if (teacher_head) {
    KEPT_CHECK(teacher_head->out_features() == student_head.out_features(),
               "vocabulary sizes differ: the teacher LM head has ", teacher_head->out_features(),
               " outputs, the student's has ", student_head.out_features());
    KEPT_CHECK(teacher_hidden.cols == teacher_head->in_features(), "teacher hidden states have ",
               teacher_hidden.cols, " features but the teacher LM head takes ",
               teacher_head->in_features(), " (the student's hidden size is ", student_hidden.cols,
               ")");
    KEPT_CHECK(teacher_hidden.rows == student_hidden.rows, "the teacher has ", teacher_hidden.rows,
               " tokens, the student ", student_hidden.rows);
  }
  if (grads.d_hidden.data)
    KEPT_CHECK(
        grads.d_hidden.rows == student_hidden.rows && grads.d_hidden.cols == student_hidden.cols,
        "d_student_hidden is ", grads.d_hidden.rows, " x ", grads.d_hidden.cols,
        ", the student hidden states are ", student_hidden.rows, " x ", student_hidden.cols);
  KEPT_CHECK(chunking.token_chunk >= 1, "token_chunk must be >= 1, got ", chunking.token_chunk);
  KEPT_CHECK(chunking.vocab_chunk >= 0, "vocab_chunk must be >= 0 (0 = whole vocabulary), got ",
             chunking.vocab_chunk);
}

// The objective's per-chunk math, called by walk_logit_chunks:
//   static constexpr bool kUsesTeacher, kTwoPass;
//   void begin(Backend&, RowBuffers&, r0, rows);  // optional; the row buffers are already reset
//   void observe(Backend&, RowBuffers&, r0, v0, teacher_logits, student_logits,
//                bool write_gradient);  // single-pass objectives write the gradient here
//   void finish(Backend&, RowBuffers&, r0);
//   void gradient(Backend&, RowBuffers&, r0, v0, teacher_logits, student_logits);  // two-pass
template <class Backend, class Objective>
void walk_logit_chunks(Backend& backend, const Linear<Backend>* teacher_head,
                       MatrixView<const typename Backend::Activation> teacher_hidden,
                       const Linear<Backend>& student_head,
                       MatrixView<const typename Backend::Activation> student_hidden,
                       const StudentGradients<Backend>& grads, const Chunking& chunking,
                       LogitWorkspace<Backend>& workspace, Objective& objective) {
  using Act = typename Backend::Activation;
  using Stat = typename Backend::Stat;
  if constexpr (Objective::kUsesTeacher)
    KEPT_CHECK(teacher_head, "this objective needs the teacher's LM head");
  check_head_inputs(teacher_head, teacher_hidden, student_head, student_hidden, grads, chunking);
  const std::int64_t tokens = student_hidden.rows, vocab = student_head.out_features();
  if (tokens == 0 || vocab == 0) return;
  const bool with_teacher = teacher_head != nullptr;
  const std::int64_t width =
      chunking.vocab_chunk == 0 ? vocab : std::min(chunking.vocab_chunk, vocab);
  const std::int64_t chunk_rows = std::min(chunking.token_chunk, tokens);
  const bool one_slice = width == vocab;
  const bool want_gradient = grads.wanted();

  // Grow-only buffers: a smaller call reuses the larger allocation.
  const std::int64_t buffer_size = chunk_rows * width;
  auto reserve = [&](Tensor& buffer) {
    if (!buffer.defined() || buffer.numel() < buffer_size)
      backend.ensure(buffer, Backend::Precision::stat, {buffer_size});
  };
  reserve(workspace.student_logits);
  if (with_teacher) reserve(workspace.teacher_logits);
  Stat* student_buffer = workspace.student_logits.template data<Stat>();
  Stat* teacher_buffer = with_teacher ? workspace.teacher_logits.template data<Stat>() : nullptr;

  for (std::int64_t r0 = 0; r0 < tokens; r0 += chunk_rows) {
    const std::int64_t rows = std::min(chunk_rows, tokens - r0);
    const auto student_rows = student_hidden.block(r0, 0, rows, student_hidden.cols);
    const auto teacher_rows = with_teacher ? teacher_hidden.block(r0, 0, rows, teacher_hidden.cols)
                                           : MatrixView<const Act>();
    // The slice's logits, freshly computed into the two buffers.
    auto slice_logits = [&](std::int64_t v0, std::int64_t w) {
      MatrixView<Stat> student_logits(student_buffer, rows, w);
      MatrixView<Stat> teacher_logits(teacher_buffer, with_teacher ? rows : 0, w);
      detail::head_slice_forward(backend, student_head, student_rows, v0, student_logits);
      if (with_teacher)
        detail::head_slice_forward(backend, *teacher_head, teacher_rows, v0, teacher_logits);
      return std::pair{teacher_logits, student_logits};
    };

    LossKernels<Backend>::reset(backend, workspace.rows, rows);
    if constexpr (requires { objective.begin(backend, workspace.rows, r0, rows); })
      objective.begin(backend, workspace.rows, r0, rows);
    for (std::int64_t v0 = 0; v0 < vocab; v0 += width) {
      const std::int64_t w = std::min(width, vocab - v0);
      auto [teacher_logits, student_logits] = slice_logits(v0, w);
      const bool write_gradient = want_gradient && !Objective::kTwoPass;
      objective.observe(backend, workspace.rows, r0, v0, MatrixView<const Stat>(teacher_logits),
                        student_logits, write_gradient);
      if (write_gradient)
        detail::head_slice_backward(backend, student_head, student_rows, r0, v0,
                                    MatrixView<const Stat>(student_logits), grads);
    }
    objective.finish(backend, workspace.rows, r0);
    if constexpr (Objective::kTwoPass) {  // constexpr: nvcc flags the loop unreachable otherwise
      if (!want_gradient) continue;
      for (std::int64_t v0 = 0; v0 < vocab; v0 += width) {
        const std::int64_t w = std::min(width, vocab - v0);
        MatrixView<Stat> student_logits(student_buffer, rows, w);
        MatrixView<Stat> teacher_logits(teacher_buffer, with_teacher ? rows : 0, w);
        if (!one_slice) std::tie(teacher_logits, student_logits) = slice_logits(v0, w);
        objective.gradient(backend, workspace.rows, r0, v0, MatrixView<const Stat>(teacher_logits),
                           student_logits);
        detail::head_slice_backward(backend, student_head, student_rows, r0, v0,
                                    MatrixView<const Stat>(student_logits), grads);
      }
    }
  }
}

}  // namespace kept::xkd
