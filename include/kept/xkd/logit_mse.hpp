// kept/xkd/logit_mse.hpp: option xkd-logit-mse, squared error on the raw logits.
//
// With teacher logits t and student logits s over a vocabulary of V:
//   loss = (1 / N) sum_i w_i (1 / V) sum_v (s_{i,v} - t_{i,v})^2
//   dloss / ds_{i,v} = (w_i / N) (2 / V) (s_{i,v} - t_{i,v})
// Normalisation: the per-token term is the mean over the vocabulary (1 / V), so the value is
// comparable across vocabulary sizes and to torch's F.mse_loss(s, t) (mean over tokens and
// vocabulary) for unit weights. N = sum_i w_i unless LogitMseOptions::normalizer sets it.
// No temperature: raw logits carry the teacher's scale, which is what this option matches.
//
// A single pass: the gradient of each vocabulary slice needs only that slice, so the driver
// (chunked_logits.hpp) backpropagates every slice as soon as it is computed and never
// recomputes logits. Top-1 agreement comes from the running max, without exponentials.
#pragma once

#include <cstdint>
#include <span>

#include "kept/layers/linear.hpp"
#include "kept/xkd/chunked_logits.hpp"
#include "kept/xkd/logit_kl.hpp"

namespace kept::xkd {

struct LogitMseOptions {
  Chunking chunking{};    // tokens per chunk and vocabulary slice (chunked_logits.hpp)
  double normalizer = 0;  // the mean's denominator; 0 = sum of the token weights
};

namespace detail {

template <class Backend>
struct MseChunkMath {
  using Stat = typename Backend::Stat;
  using Kernels = LossKernels<Backend>;
  using RowBuffers = typename Kernels::RowBuffers;
  static constexpr bool kUsesTeacher = true, kTwoPass = false;

  std::span<const float> weights;
  Stat gradient_scale;  // 1 / (V N); the kernel applies the 2
  ChunkSums sums;

  void observe(Backend& backend, RowBuffers& rows, std::int64_t r0, std::int64_t v0,
               MatrixView<const Stat> teacher, MatrixView<Stat> student, bool write_gradient) {
    // The argmax first: squared_error overwrites the student slice with its gradient.
    Kernels::update(backend, rows, teacher, student, v0, Stat(1), nullptr, false);
    Kernels::squared_error(backend, rows, teacher, student, offset_or_null(weights, r0),
                           gradient_scale, write_gradient);
  }
  void finish(Backend& backend, RowBuffers& rows, std::int64_t r0) {
    sums.add(Kernels::reduce(backend, rows, true, false, offset_or_null(weights, r0), nullptr,
                             nullptr, nullptr));
  }
  void gradient(Backend&, RowBuffers&, std::int64_t, std::int64_t, MatrixView<const Stat>,
                MatrixView<Stat>) {}
};

}  // namespace detail

// Mean over tokens of (1/V) ||s - t||^2 on raw logits; arguments as for logit_kl.
template <class Backend>
LogitLossResult logit_mse(Backend& backend, const Linear<Backend>& teacher_head,
                          MatrixView<const typename Backend::Activation> teacher_hidden,
                          Linear<Backend>& student_head,
                          MatrixView<const typename Backend::Activation> student_hidden,
                          MatrixView<typename Backend::Activation>* d_student_hidden,
                          const LogitMseOptions& options = {},
                          std::span<const float> token_weights = {},
                          LogitWorkspace<Backend>* workspace = nullptr) {
  using Stat = typename Backend::Stat;
  const double weight_sum = detail::check_weights(token_weights, student_hidden.rows);
  const double n = detail::denominator(options.normalizer, weight_sum);
  const double vocab = static_cast<double>(student_head.out_features());
  detail::MseChunkMath<Backend> math{
      token_weights, static_cast<Stat>(n > 0 && vocab > 0 ? 1.0 / (vocab * n) : 0.0), {}};
  LogitWorkspace<Backend> local;
  walk_logit_chunks(backend, &teacher_head, teacher_hidden, student_head, student_hidden,
                    student_gradients(student_head, d_student_hidden), options.chunking,
                    workspace ? *workspace : local, math);
  return {n > 0 && vocab > 0 ? math.sums.squared_error / (vocab * n) : 0.0, math.sums.weight,
          math.sums.rows, math.sums.agree};
}

}  // namespace kept::xkd
