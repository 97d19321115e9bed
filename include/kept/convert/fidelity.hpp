// kept/convert/fidelity.hpp: how close a converted model is to its source, before training.
//
// Runs the source (LayerNorm) and converted (RMSNorm) decoders on the same token sequences and
// accumulates, per token, KL(p_source || p_converted), top-1 agreement and both models'
// next-token cross-entropy (xkd/metrics.hpp). This is the paper's "OPM only" row measured
// directly on logits.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kept/model/decoder.hpp"
#include "kept/xkd/metrics.hpp"

namespace kept {

template <class Backend, class TeacherTag, class StudentTag>
xkd::EvalSums compare_models(Backend& backend, Decoder<TeacherTag, Backend>& teacher,
                             Decoder<StudentTag, Backend>& student,
                             std::span<const std::int32_t> tokens, std::int64_t seq_len,
                             std::int64_t batch) {
  using Act = typename Backend::Activation;
  const std::int64_t sequences = static_cast<std::int64_t>(tokens.size()) / seq_len;
  KEPT_CHECK(sequences > 0, "comparison: ", tokens.size(), " tokens do not make one sequence of ",
             seq_len);
  xkd::EvalSums sums;
  typename Decoder<TeacherTag, Backend>::Activations teacher_acts;
  typename Decoder<StudentTag, Backend>::Activations student_acts;
  std::vector<std::int32_t> targets;
  for (std::int64_t first = 0; first < sequences; first += batch) {
    const std::int64_t rows = std::min(batch, sequences - first);
    const auto window = tokens.subspan(static_cast<std::size_t>(first * seq_len),
                                       static_cast<std::size_t>(rows * seq_len));
    teacher.forward(backend, window, rows, seq_len, teacher_acts, ForwardMode::Inference);
    student.forward(backend, window, rows, seq_len, student_acts, ForwardMode::Inference);
    // Next-token targets within each sequence; the last position has none.
    targets.assign(window.size(), -1);
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t t = 0; t + 1 < seq_len; ++t)
        targets[r * seq_len + t] = window[r * seq_len + t + 1];
    xkd::accumulate_eval(backend, &teacher.lm_head, as_matrix<const Act>(teacher_acts.hidden),
                         student.lm_head, as_matrix<const Act>(student_acts.hidden), targets,
                         seq_len, sums);
  }
  return sums;
}

}  // namespace kept
