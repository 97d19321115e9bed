// kept/xkd/cross_entropy.hpp: plain next-token cross-entropy, the uptraining baseline (and
// pretraining), on the same chunked driver as the distillation objectives.
//
// With logits s (one token), target y (-1 = ignore) and q = softmax(s):
//   loss = (1 / N) sum_{i : y_i >= 0} (lse(s_i) - s_{i,y_i}),   lse(s) = log sum_v exp(s_v)
//   dloss / ds_{i,v} = (1 / N) (q_{i,v} - [v == y_i])            (zero for ignored tokens)
// N = the number of counted tokens (y_i >= 0) unless CrossEntropyOptions::normalizer sets it
// (the count of the whole accumulated batch, when micro-batches are summed).
//
// Targets are given per row of the hidden states [batch * seq, hidden]; shifting inputs to
// next-token targets is the caller's (the last position of a sequence gets -1 or the next
// sequence's first token, as the data pipeline decides). Every target must be in [-1, vocab).
// One pass gives the loss and the top-1 count; the gradient takes a second pass, over
// vocabulary slices when vocab_chunk is set (the same two-pass scheme as logit_kl).
#pragma once

#include <cstdint>
#include <span>

#include "kept/layers/linear.hpp"
#include "kept/xkd/chunked_logits.hpp"

namespace kept::xkd {

struct CrossEntropyOptions {
  Chunking chunking{};    // tokens per chunk and vocabulary slice (chunked_logits.hpp)
  double normalizer = 0;  // the mean's denominator; 0 = the counted tokens
};

struct CrossEntropyResult {
  double loss = 0;           // mean CE over the counted tokens (or / normalizer)
  std::int64_t tokens = 0;   // counted tokens (target != -1)
  std::int64_t correct = 0;  // of those, argmax == target
};

namespace detail {

template <class Backend>
struct CrossEntropyChunkMath {
  using Stat = typename Backend::Stat;
  using Kernels = LossKernels<Backend>;
  using RowBuffers = typename Kernels::RowBuffers;
  static constexpr bool kUsesTeacher = false, kTwoPass = true;

  std::span<const std::int32_t> targets;
  Stat gradient_scale;  // 1 / N
  ChunkSums sums;

  void observe(Backend& backend, RowBuffers& rows, std::int64_t r0, std::int64_t v0,
               MatrixView<const Stat>, MatrixView<Stat> student, bool) {
    Kernels::update(backend, rows, MatrixView<const Stat>(), student, v0, Stat(1),
                    targets.data() + r0, true);
  }
  void finish(Backend& backend, RowBuffers& rows, std::int64_t r0) {
    Kernels::finish(backend, rows);
    sums.add(Kernels::reduce(backend, rows, false, true, nullptr, targets.data() + r0, nullptr,
                             nullptr));
  }
  void gradient(Backend& backend, RowBuffers& rows, std::int64_t r0, std::int64_t v0,
                MatrixView<const Stat>, MatrixView<Stat> student) {
    Kernels::cross_entropy_gradient(backend, rows, student, v0, targets.data() + r0,
                                    gradient_scale);
  }
};

}  // namespace detail

// Mean next-token CE of `head` applied to `hidden` [tokens, hidden] against `targets` (one per
// token, -1 = ignore). dL/d(hidden) accumulates into *d_hidden when given, the head's gradient
// into its parameter grads when allocated; with neither, only the value is computed.
template <class Backend>
CrossEntropyResult cross_entropy(Backend& backend, Linear<Backend>& head,
                                 MatrixView<const typename Backend::Activation> hidden,
                                 std::span<const std::int32_t> targets,
                                 MatrixView<typename Backend::Activation>* d_hidden,
                                 const CrossEntropyOptions& options = {},
                                 LogitWorkspace<Backend>* workspace = nullptr) {
  using Stat = typename Backend::Stat;
  const std::int64_t counted = detail::check_targets(targets, hidden.rows, head.out_features());
  const double n = detail::denominator(options.normalizer, static_cast<double>(counted));
  detail::CrossEntropyChunkMath<Backend> math{
      targets, static_cast<Stat>(n > 0 ? 1.0 / n : 0.0), {}};
  LogitWorkspace<Backend> local;
  walk_logit_chunks(backend, static_cast<const Linear<Backend>*>(nullptr),
                    MatrixView<const typename Backend::Activation>(), head, hidden,
                    student_gradients(head, d_hidden), options.chunking,
                    workspace ? *workspace : local, math);
  return {n > 0 ? math.sums.student_ce / n : 0.0, math.sums.rows, math.sums.student_correct};
}

}  // namespace kept::xkd
