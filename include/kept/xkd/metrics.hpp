// kept/xkd/metrics.hpp: evaluation of a student against its teacher, without gradients.
//
// Per batch, on the same chunked driver as the objectives (one pass over the vocabulary,
// no gradient pass), over the tokens whose target is not -1:
//   kl          = sum_i KL(p_teacher,i || p_student,i)   at temperature 1
//   student_ce  = sum_i (lse(s_i) - s_{i,y_i}),  teacher_ce likewise
//   agree       = #{i : argmax t_i == argmax s_i}, student_correct = #{i : argmax s_i == y_i}
//   *_by_position[k]: the same CE sums over the tokens at position k of their sequence
//                     (row i of [batch * seq] is position i mod seq)
// EvalSums holds sums, not means, so an evaluator adds batch after batch (merge() for sums
// from different workers) and reports at the end: perplexity = exp(ce / tokens), mean KL,
// agreement rate, and perplexity as a function of context length from the per-position sums.
// The KL is at temperature 1: the distribution the student will be sampled from.
//
// The teacher head may be null (a single model's perplexity); teacher fields then stay 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "kept/layers/linear.hpp"
#include "kept/xkd/chunked_logits.hpp"

namespace kept::xkd {

struct EvalOptions {
  Chunking chunking{};  // tokens per chunk and vocabulary slice (chunked_logits.hpp)
};

struct EvalSums {
  std::int64_t tokens = 0;  // tokens counted (target != -1)
  double kl = 0;            // sum of KL(teacher || student)
  double student_ce = 0, teacher_ce = 0;
  std::int64_t agree = 0;  // argmax teacher == argmax student
  std::int64_t student_correct = 0, teacher_correct = 0;
  std::vector<double> student_ce_by_position, teacher_ce_by_position;
  std::vector<std::int64_t> tokens_by_position;

  void merge(const EvalSums& other) {
    tokens += other.tokens;
    kl += other.kl;
    student_ce += other.student_ce;
    teacher_ce += other.teacher_ce;
    agree += other.agree;
    student_correct += other.student_correct;
    teacher_correct += other.teacher_correct;
    grow(other.tokens_by_position.size());
    for (std::size_t k = 0; k < other.tokens_by_position.size(); ++k) {
      student_ce_by_position[k] += other.student_ce_by_position[k];
      teacher_ce_by_position[k] += other.teacher_ce_by_position[k];
      tokens_by_position[k] += other.tokens_by_position[k];
    }
  }
  // Sizes the per-position vectors to at least `positions`.
  void grow(std::size_t positions) {
    if (tokens_by_position.size() >= positions) return;
    student_ce_by_position.resize(positions, 0.0);
    teacher_ce_by_position.resize(positions, 0.0);
    tokens_by_position.resize(positions, 0);
  }

  double student_perplexity() const { return std::exp(mean(student_ce)); }
  double teacher_perplexity() const { return std::exp(mean(teacher_ce)); }
  double mean_kl() const { return mean(kl); }
  double agreement_rate() const { return mean(static_cast<double>(agree)); }
  double student_accuracy() const { return mean(static_cast<double>(student_correct)); }

 private:
  double mean(double sum) const {
    return tokens ? sum / static_cast<double>(tokens) : std::nan("");
  }
};

namespace detail {

template <class Backend>
struct EvalChunkMath {
  using Stat = typename Backend::Stat;
  using Kernels = LossKernels<Backend>;
  using RowBuffers = typename Kernels::RowBuffers;
  static constexpr bool kUsesTeacher = false, kTwoPass = false;

  bool with_teacher;
  std::span<const std::int32_t> targets;
  std::int64_t seq;
  EvalSums& sums;
  std::vector<double> student_ce_rows, teacher_ce_rows;

  void begin(Backend&, RowBuffers&, std::int64_t, std::int64_t count) {
    student_ce_rows.resize(static_cast<std::size_t>(count));
    teacher_ce_rows.resize(static_cast<std::size_t>(count));
  }
  void observe(Backend& backend, RowBuffers& rows, std::int64_t r0, std::int64_t v0,
               MatrixView<const Stat> teacher, MatrixView<Stat> student, bool) {
    Kernels::update(backend, rows, teacher, student, v0, Stat(1), targets.data() + r0, true);
  }
  void finish(Backend& backend, RowBuffers& rows, std::int64_t r0) {
    Kernels::finish(backend, rows);
    const ChunkSums chunk =
        Kernels::reduce(backend, rows, with_teacher, true, nullptr, targets.data() + r0,
                        student_ce_rows.data(), teacher_ce_rows.data());
    sums.tokens += chunk.rows;
    sums.kl += chunk.kl;
    sums.student_ce += chunk.student_ce;
    sums.teacher_ce += chunk.teacher_ce;
    sums.agree += chunk.agree;
    sums.student_correct += chunk.student_correct;
    sums.teacher_correct += chunk.teacher_correct;
    for (std::size_t r = 0; r < student_ce_rows.size(); ++r) {
      const std::int64_t row = r0 + static_cast<std::int64_t>(r);
      if (targets[static_cast<std::size_t>(row)] < 0) continue;
      const auto position = static_cast<std::size_t>(row % seq);
      sums.student_ce_by_position[position] += student_ce_rows[r];
      sums.teacher_ce_by_position[position] += teacher_ce_rows[r];
      ++sums.tokens_by_position[position];
    }
  }
  void gradient(Backend&, RowBuffers&, std::int64_t, std::int64_t, MatrixView<const Stat>,
                MatrixView<Stat>) {}
};

}  // namespace detail

// Adds one batch's sums to `sums`. Hidden states are [batch * seq, hidden] final-norm outputs;
// `targets` has one id per token (-1 = not counted); `seq` maps rows to positions.
template <class Backend>
void accumulate_eval(Backend& backend, const Linear<Backend>* teacher_head,
                     MatrixView<const typename Backend::Activation> teacher_hidden,
                     const Linear<Backend>& student_head,
                     MatrixView<const typename Backend::Activation> student_hidden,
                     std::span<const std::int32_t> targets, std::int64_t seq, EvalSums& sums,
                     const EvalOptions& options = {},
                     LogitWorkspace<Backend>* workspace = nullptr) {
  KEPT_CHECK(seq > 0 && student_hidden.rows % seq == 0, "evaluation: ", student_hidden.rows,
             " tokens are not a whole number of sequences of ", seq);
  detail::check_targets(targets, student_hidden.rows, student_head.out_features());
  sums.grow(static_cast<std::size_t>(seq));
  detail::EvalChunkMath<Backend> math{teacher_head != nullptr, targets, seq, sums, {}, {}};
  LogitWorkspace<Backend> local;
  walk_logit_chunks(backend, teacher_head, teacher_hidden, student_head, student_hidden,
                    StudentGradients<Backend>{}, options.chunking, workspace ? *workspace : local,
                    math);
}

}  // namespace kept::xkd
