// reference/evaluate.hpp: held-out evaluation of a student, against its teacher when there is
// one: perplexity, KL(teacher || student), top-1 agreement, and perplexity as a function of
// context length (the measurement of the report's Figure 4).
#pragma once

#include <cstdint>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/model/decoder.hpp"
#include "kept/train/data.hpp"
#include "kept/xkd/metrics.hpp"

namespace kept::cli {

struct EvalReport {
  std::int64_t tokens = 0;
  double student_perplexity = 0, teacher_perplexity = 0;
  double kl = 0;         // mean KL(p_teacher || p_student), nats per token
  double agreement = 0;  // top-1 agreement with the teacher
  bool has_teacher = false;
  // Perplexity over the positions [bucket_start[k], 2 bucket_start[k]) of each sequence.
  std::vector<std::int64_t> bucket_start;
  std::vector<double> student_perplexity_by_context, teacher_perplexity_by_context;
};

EvalReport summarize(const xkd::EvalSums& sums, std::int64_t seq, bool has_teacher);

// Evaluates `student` (and `teacher`, which may be null) on at most `max_batches` batches.
template <class B, class Student, class Teacher>
EvalReport evaluate(B& backend, Student& student, Teacher* teacher,
                    const std::vector<Batch>& batches, std::int64_t max_batches) {
  using Act = typename B::Activation;
  xkd::EvalSums sums;
  std::int64_t seq = 0;
  typename Student::Activations student_acts;
  typename Teacher::Activations teacher_acts;
  for (std::size_t i = 0; i < batches.size() && static_cast<std::int64_t>(i) < max_batches; ++i) {
    const Batch& batch = batches[i];
    seq = batch.seq;
    student.forward(backend, batch.inputs, batch.batch, batch.seq, student_acts,
                    ForwardMode::Inference);
    const auto student_hidden = as_matrix<const Act>(student_acts.hidden);
    if (teacher) {
      teacher->forward(backend, batch.inputs, batch.batch, batch.seq, teacher_acts,
                       ForwardMode::Inference);
      xkd::accumulate_eval(backend, &teacher->lm_head, as_matrix<const Act>(teacher_acts.hidden),
                           student.lm_head, student_hidden, batch.targets, batch.seq, sums);
    } else {
      xkd::accumulate_eval(backend, static_cast<const Linear<B>*>(nullptr), student_hidden,
                           student.lm_head, student_hidden, batch.targets, batch.seq, sums);
    }
  }
  return summarize(sums, seq, teacher != nullptr);
}

}  // namespace kept::cli
