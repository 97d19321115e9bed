// kept/xkd/logit_kl.hpp: the paper's default XKD objective, per-token KL(teacher || student) on
// the LM-head outputs.
//
// With teacher logits t, student logits s (one token), temperature T, p = softmax(t / T),
// q = softmax(s / T):
//   loss = (1 / N) sum_i w_i T^2 KL(p_i || q_i),   KL(p || q) = sum_v p_v (log p_v - log q_v)
//   dloss / ds_{i,v} = (w_i / N) T (q_{i,v} - p_{i,v})
// w_i are per-token weights (default 1; a 0/1 mask ignores padding), N = sum_i w_i unless
// LogitKlOptions::normalizer sets it (e.g. the token count of the whole accumulated batch when
// micro-batches are summed). The T^2 factor (Hinton et al.) keeps the gradient's scale
// independent of T, so T can be changed without retuning the learning rate.
//
// Computed in the backend's precision (fp32 for Cpu, float64 for Cpu64; row sums in double on
// the CPU) chunk by chunk from the two models' final hidden states and LM heads; see
// chunked_logits.hpp for the chunking and backend/cpu/softmax_losses.hpp for the per-row math.
// The loss is known after one pass over the vocabulary (online log-sum-exp plus the KL cross
// term); the gradient takes a second pass. Top-1 agreement (argmax of teacher == argmax of
// student, ties to the lowest id) comes free with the max.
//
// Gradients: dL/d(student hidden) accumulates into *d_student_hidden (when given; pass it to
// Decoder::backward as d_hidden), dL/d(student head) into the head's parameter grads (when
// allocated). The teacher head is const: nothing of the teacher is written.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

#include "kept/core/error.hpp"
#include "kept/layers/linear.hpp"
#include "kept/xkd/chunked_logits.hpp"

namespace kept::xkd {

struct LogitKlOptions {
  double temperature = 1.0;
  Chunking chunking{};    // tokens per chunk and vocabulary slice (chunked_logits.hpp)
  double normalizer = 0;  // the mean's denominator; 0 = sum of the token weights
};

// The value of a logit objective and what came free with it.
struct LogitLossResult {
  double loss = 0;              // the objective the gradients are of
  double weight_sum = 0;        // sum of the counted tokens' weights
  std::int64_t tokens = 0;      // tokens with a non-zero weight
  std::int64_t top1_agree = 0;  // of those, tokens where argmax teacher == argmax student
};

namespace detail {

template <class Backend>
struct KlChunkMath {
  using Stat = typename Backend::Stat;
  using Kernels = LossKernels<Backend>;
  using RowBuffers = typename Kernels::RowBuffers;
  static constexpr bool kUsesTeacher = true, kTwoPass = true;

  Stat temperature;
  std::span<const float> weights;
  Stat gradient_scale;  // 1 / N
  ChunkSums sums;

  void observe(Backend& backend, RowBuffers& rows, std::int64_t, std::int64_t v0,
               MatrixView<const Stat> teacher, MatrixView<Stat> student, bool) {
    Kernels::update(backend, rows, teacher, student, v0, Stat(1) / temperature, nullptr, true);
  }
  void finish(Backend& backend, RowBuffers& rows, std::int64_t r0) {
    Kernels::finish(backend, rows);
    sums.add(Kernels::reduce(backend, rows, true, true, offset_or_null(weights, r0), nullptr,
                             nullptr, nullptr));
  }
  void gradient(Backend& backend, RowBuffers& rows, std::int64_t r0, std::int64_t,
                MatrixView<const Stat> teacher, MatrixView<Stat> student) {
    Kernels::kl_gradient(backend, rows, teacher, student, temperature, offset_or_null(weights, r0),
                         gradient_scale);
  }
};

}  // namespace detail

// Mean T^2 KL(teacher || student) over the tokens; see the top comment. Hidden states are the
// final-norm outputs [tokens, hidden] (Decoder::Activations::hidden); `token_weights` is empty
// (all 1) or one weight >= 0 per token. Pass a workspace to reuse the logit buffers across calls.
template <class Backend>
LogitLossResult logit_kl(Backend& backend, const Linear<Backend>& teacher_head,
                         MatrixView<const typename Backend::Activation> teacher_hidden,
                         Linear<Backend>& student_head,
                         MatrixView<const typename Backend::Activation> student_hidden,
                         MatrixView<typename Backend::Activation>* d_student_hidden,
                         const LogitKlOptions& options = {},
                         std::span<const float> token_weights = {},
                         LogitWorkspace<Backend>* workspace = nullptr) {
  using Stat = typename Backend::Stat;
  KEPT_CHECK(options.temperature > 0 && std::isfinite(options.temperature),
             "KL temperature must be positive and finite, got ", options.temperature);
  const double weight_sum = detail::check_weights(token_weights, student_hidden.rows);
  const double n = detail::denominator(options.normalizer, weight_sum);
  detail::KlChunkMath<Backend> math{static_cast<Stat>(options.temperature),
                                    token_weights,
                                    static_cast<Stat>(n > 0 ? 1.0 / n : 0.0),
                                    {}};
  LogitWorkspace<Backend> local;
  walk_logit_chunks(backend, &teacher_head, teacher_hidden, student_head, student_hidden,
                    student_gradients(student_head, d_student_hidden), options.chunking,
                    workspace ? *workspace : local, math);
  const double t2 = options.temperature * options.temperature;
  return {n > 0 ? t2 * math.sums.kl / n : 0.0, math.sums.weight, math.sums.rows, math.sums.agree};
}

}  // namespace kept::xkd
