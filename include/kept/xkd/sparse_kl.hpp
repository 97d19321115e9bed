// kept/xkd/sparse_kl.hpp: XKD-logit against an offline teacher: the KL from the teacher's top-k
// log-probs and tail mass (precomputed once, kept/io/teacher_logits.hpp) instead of its logits.
//
// Per token the teacher is known on a set K of k ids: p_i = softmax(t / T)_i for i in K, and the
// tail mass r = sum_{v not in K} p_v. With q = softmax(s / T) (student logits s) and
// Q = sum_{v not in K} q_v, the loss is the KL of the coarse-grained distributions (each kept id
// its own bucket, the whole tail one bucket):
//   KL_sparse = sum_{i in K} p_i (log p_i - log q_i) + r (log r - log Q)      (0 log 0 = 0)
//   loss = (1 / N) sum_tokens w T^2 KL_sparse       (N and w exactly as logit_kl.hpp)
//   dloss / ds_v = (w / N) T (q_v - target_v),  target_v = p_v (v in K),  r q_v / Q (v not in K)
// (d/da_v of KL_sparse with a = s / T: -[v in K] p_v + (1 - r) q_v - [v not in K] r q_v / Q
// + r q_v = q_v - target_v, and ds = T da; the T^2 factor is logit_kl's, so with k = vocab, r = 0
// and both the loss and the gradient are logit_kl's to rounding.) Inside the tail the student is
// pulled towards its own tail shape scaled to the teacher's tail mass: the only information the
// file holds there.
//
// Error bound (per token, before the T^2 and the weights). By the chain rule of KL,
//   KL_dense - KL_sparse = r KL(p_tail / r || q_tail / Q) >= 0,
// the data-processing inequality: the sparse loss never exceeds the dense one. Bounding the
// expectation by its largest term, and using that a tail probability is at most both r and the
// smallest kept probability p_min (K being the teacher's top k):
//   KL_dense - KL_sparse <= r ( log(min(p_min, r) / r) + max_{v not in K} log(Q / q_v) )
//                        =  r ( min(log(p_min / r), 0) + lse_tail(a) - min_{v not in K} a_v ),
// with a = s / T and lse_tail the log-sum-exp over the tail: zero when r = 0, small when r is.
// sparse_kl_error_bound() computes it for one token; the tests check 0 <= error <= bound. The
// file stores log-probs in fp32, so p, r and hence both sides carry ~1e-7 relative rounding.
//
// Input: SparseTeacher, host memory, rows = the student's tokens, in the same order. Per row the
// ids are distinct, in [0, vocab), in any order; the log-probs finite (or -inf); r in [0, 1].
// Each row is renormalised in double so that sum_i p_i + r = 1 exactly (storage rounding must not
// make the objective negative, and with k = vocab it is then exactly a softmax). Rows are sorted by
// id on the host (the kernels walk the kept ids beside the vocabulary) and handed to the backend
// chunk by chunk (LossKernels<Backend>::sparse_kl_*, kept/backend/loss_kernels.hpp).
//
// Chunking as every logit objective (chunked_logits.hpp), with no teacher head: pass 1 folds each
// vocabulary slice into the student's softmax state and the tail's (own running max, so a tail
// far below the kept mass does not underflow); pass 2 writes the gradient. Top-1 agreement is the
// kept id of largest p against the student's argmax (ties to the lowest id).
//
// Use (the trainer with an offline teacher; reference/teacher_logits_run.hpp has the header):
//   auto reader = TeacherLogitsReader::open(dir, header);  // once (kept/io/teacher_logits.hpp)
//   // per micro-batch, before loader.next_batch(): its positions start at
//   const std::int64_t first = loader.state().batches_served * batch_size * seq_len;
//   const SparseTeacherRows rows = reader.read(first, batch_size * seq_len);
//   auto result = xkd::sparse_logit_kl(backend, rows.view(), student.lm_head, student_hidden,
//                                      &d_hidden, {.temperature = T, .normalizer = N});
// The result is logit_kl's struct (loss, weight_sum, tokens, top1_agree), with the same meaning.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/layers/linear.hpp"
#include "kept/xkd/chunked_logits.hpp"
#include "kept/xkd/logit_kl.hpp"
#include "kept/xkd/sparse_teacher.hpp"

namespace kept::xkd {

struct SparseKlOptions {
  double temperature = 1.0;  // must be the temperature the log-probs were computed at
  Chunking chunking{};       // tokens per chunk and vocabulary slice (chunked_logits.hpp)
  double normalizer = 0;     // the mean's denominator; 0 = sum of the token weights
};

namespace detail {

// The teacher rows as the kernels take them: sorted by id, renormalised, in the Stat type.
template <class Stat>
struct PreparedSparseTeacher {
  std::vector<std::int32_t> ids;
  std::vector<Stat> probs, tails;
  std::int64_t rows = 0, k = 0;

  SparseTeacherChunk<Stat> chunk(std::int64_t r0, std::int64_t n) const {
    return {ids.data() + r0 * k, probs.data() + r0 * k, tails.data() + r0, n, k};
  }
};

template <class Stat>
PreparedSparseTeacher<Stat> prepare_sparse_teacher(const SparseTeacher& teacher,
                                                   std::int64_t vocab) {
  PreparedSparseTeacher<Stat> prepared;
  const std::int64_t k = teacher.k, rows = teacher.rows;
  prepared.rows = rows;
  prepared.k = k;
  prepared.ids.resize(static_cast<std::size_t>(rows * k));
  prepared.probs.resize(static_cast<std::size_t>(rows * k));
  prepared.tails.resize(static_cast<std::size_t>(rows));
  std::vector<std::int64_t> order(static_cast<std::size_t>(k));
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int32_t* ids = teacher.ids + r * k;
    const float* logprobs = teacher.logprobs + r * k;
    const double tail = teacher.tail_mass[r];
    KEPT_CHECK(tail >= 0 && tail <= 1, "sparse teacher row ", r, ": tail mass ", tail,
               " is outside [0, 1]");
    double total = tail;
    for (std::int64_t i = 0; i < k; ++i) {
      KEPT_CHECK(ids[i] >= 0 && ids[i] < vocab, "sparse teacher row ", r, ": id ", ids[i],
                 " at position ", i, " is outside the vocabulary [0, ", vocab, ")");
      KEPT_CHECK(!std::isnan(logprobs[i]) && logprobs[i] < 1, "sparse teacher row ", r,
                 ": log-prob ", logprobs[i], " at position ", i, " is not a log-probability");
      total += std::exp(static_cast<double>(logprobs[i]));
    }
    KEPT_CHECK(total > 0, "sparse teacher row ", r,
               ": no probability mass (every kept log-prob is -inf and the tail is 0)");
    std::iota(order.begin(), order.end(), std::int64_t{0});
    std::sort(order.begin(), order.end(),
              [&](std::int64_t a, std::int64_t b) { return ids[a] < ids[b]; });
    for (std::int64_t i = 0; i < k; ++i) {
      const std::int64_t from = order[static_cast<std::size_t>(i)];
      if (i > 0)
        KEPT_CHECK(ids[from] != prepared.ids[static_cast<std::size_t>(r * k + i - 1)],
                   "sparse teacher row ", r, ": id ", ids[from], " is kept twice");
      prepared.ids[static_cast<std::size_t>(r * k + i)] = ids[from];
      prepared.probs[static_cast<std::size_t>(r * k + i)] =
          static_cast<Stat>(std::exp(static_cast<double>(logprobs[from])) / total);
    }
    prepared.tails[static_cast<std::size_t>(r)] = static_cast<Stat>(tail / total);
  }
  return prepared;
}

template <class Backend>
struct SparseKlChunkMath {
  using Stat = typename Backend::Stat;
  using Kernels = LossKernels<Backend>;
  using RowBuffers = typename Kernels::RowBuffers;
  static constexpr bool kUsesTeacher = false, kTwoPass = true;

  const PreparedSparseTeacher<Stat>& teacher;
  Stat temperature;
  std::span<const float> weights;
  Stat gradient_scale;  // 1 / N
  ChunkSums sums;

  void begin(Backend& backend, RowBuffers& rows, std::int64_t r0, std::int64_t n) {
    Kernels::sparse_kl_begin(backend, rows, teacher.chunk(r0, n));
  }
  void observe(Backend& backend, RowBuffers& rows, std::int64_t, std::int64_t v0,
               MatrixView<const Stat>, MatrixView<Stat> student, bool) {
    const Stat inv_temperature = Stat(1) / temperature;
    Kernels::update(backend, rows, MatrixView<const Stat>(), MatrixView<const Stat>(student), v0,
                    inv_temperature, nullptr, true);
    Kernels::sparse_kl_update(backend, rows, MatrixView<const Stat>(student), v0, inv_temperature);
  }
  void finish(Backend& backend, RowBuffers& rows, std::int64_t r0) {
    Kernels::finish(backend, rows);
    sums.add(Kernels::sparse_kl_reduce(backend, rows, offset_or_null(weights, r0)));
  }
  void gradient(Backend& backend, RowBuffers& rows, std::int64_t r0, std::int64_t v0,
                MatrixView<const Stat>, MatrixView<Stat> student) {
    Kernels::sparse_kl_gradient(backend, rows, student, v0, temperature,
                                offset_or_null(weights, r0), gradient_scale);
  }
};

}  // namespace detail

// Mean T^2 KL_sparse(teacher || student) over the tokens; see the top comment. `student_hidden`
// is the final-norm output [tokens, hidden] and `teacher.rows` must equal its token count;
// `token_weights` is empty (all 1) or one weight >= 0 per token. Pass a workspace to reuse the
// logit buffers across calls. Throws kept::Error naming the row for a malformed teacher row.
template <class Backend>
LogitLossResult sparse_logit_kl(Backend& backend, const SparseTeacher& teacher,
                                Linear<Backend>& student_head,
                                MatrixView<const typename Backend::Activation> student_hidden,
                                MatrixView<typename Backend::Activation>* d_student_hidden,
                                const SparseKlOptions& options = {},
                                std::span<const float> token_weights = {},
                                LogitWorkspace<Backend>* workspace = nullptr) {
  using Stat = typename Backend::Stat;
  KEPT_CHECK(options.temperature > 0 && std::isfinite(options.temperature),
             "KL temperature must be positive and finite, got ", options.temperature);
  KEPT_CHECK(teacher.rows == student_hidden.rows, "the sparse teacher has ", teacher.rows,
             " rows, the student ", student_hidden.rows, " tokens");
  const std::int64_t vocab = student_head.out_features();
  KEPT_CHECK(teacher.k >= 1 && teacher.k <= vocab, "the sparse teacher keeps k = ", teacher.k,
             " ids per token; k must be in [1, ", vocab, "] (the vocabulary)");
  KEPT_CHECK(teacher.rows == 0 || (teacher.ids && teacher.logprobs && teacher.tail_mass),
             "the sparse teacher has a null ids, logprobs or tail_mass pointer");
  const double weight_sum = detail::check_weights(token_weights, student_hidden.rows);
  const double n = detail::denominator(options.normalizer, weight_sum);
  const auto prepared = detail::prepare_sparse_teacher<Stat>(teacher, vocab);
  detail::SparseKlChunkMath<Backend> math{prepared,
                                          static_cast<Stat>(options.temperature),
                                          token_weights,
                                          static_cast<Stat>(n > 0 ? 1.0 / n : 0.0),
                                          {}};
  LogitWorkspace<Backend> local;
  walk_logit_chunks(backend, static_cast<const Linear<Backend>*>(nullptr),
                    MatrixView<const typename Backend::Activation>(), student_head, student_hidden,
                    student_gradients(student_head, d_student_hidden), options.chunking,
                    workspace ? *workspace : local, math);
  const double t2 = options.temperature * options.temperature;
  return {n > 0 ? t2 * math.sums.kl / n : 0.0, math.sums.weight, math.sums.rows, math.sums.agree};
}

// The bound of the top comment for one token: an upper bound on KL_dense - KL_sparse (unscaled,
// at temperature T) from the student's logits and the token's sparse teacher row, valid when the
// kept ids are the teacher's k most probable. Host, float64; O(vocab).
inline double sparse_kl_error_bound(std::span<const double> student_logits,
                                    std::span<const std::int32_t> ids,
                                    std::span<const float> logprobs, double tail_mass,
                                    double temperature) {
  KEPT_CHECK(ids.size() == logprobs.size(), "sparse_kl_error_bound: ", ids.size(), " ids and ",
             logprobs.size(), " log-probs");
  if (!(tail_mass > 0)) return 0.0;
  double total = tail_mass, smallest = std::numeric_limits<double>::infinity();
  for (float lp : logprobs) {
    total += std::exp(static_cast<double>(lp));
    smallest = std::min(smallest, std::exp(static_cast<double>(lp)));
  }
  const double r = tail_mass / total, p_min = smallest / total;  // as renormalised above
  std::vector<char> kept(student_logits.size(), 0);
  for (std::int32_t id : ids) {
    KEPT_CHECK(id >= 0 && static_cast<std::size_t>(id) < student_logits.size(),
               "sparse_kl_error_bound: id ", id, " is outside the vocabulary");
    kept[static_cast<std::size_t>(id)] = 1;
  }
  double max = -std::numeric_limits<double>::infinity(), min = -max;
  for (std::size_t v = 0; v < student_logits.size(); ++v)
    if (!kept[v]) {
      max = std::max(max, student_logits[v] / temperature);
      min = std::min(min, student_logits[v] / temperature);
    }
  if (max == -std::numeric_limits<double>::infinity()) return 0.0;  // no tail
  double sum = 0;
  for (std::size_t v = 0; v < student_logits.size(); ++v)
    if (!kept[v]) sum += std::exp(student_logits[v] / temperature - max);
  const double tail_lse = max + std::log(sum);
  return r * (std::min(std::log(p_min / r), 0.0) + tail_lse - min);
}

}  // namespace kept::xkd
