#include "evaluate.hpp"

#include <algorithm>
#include <cmath>

namespace kept::cli {

EvalReport summarize(const xkd::EvalSums& sums, std::int64_t seq, bool has_teacher) {
  EvalReport report;
  report.tokens = sums.tokens;
  report.has_teacher = has_teacher;
  if (sums.tokens == 0) return report;
  report.student_perplexity = sums.student_perplexity();
  if (has_teacher) {
    report.teacher_perplexity = sums.teacher_perplexity();
    report.kl = sums.mean_kl();
    report.agreement = sums.agreement_rate();
  }
  // Context-length buckets [0, 1), [1, 2), [2, 4), [4, 8), ...: powers of two, so long contexts
  // still collect enough tokens for a stable perplexity.
  for (std::int64_t start = 0; start < seq; start = start ? start * 2 : 1) {
    const std::int64_t end = std::min(seq, start ? start * 2 : 1);
    double student_ce = 0, teacher_ce = 0;
    std::int64_t tokens = 0;
    for (std::int64_t k = start;
         k < end && k < static_cast<std::int64_t>(sums.tokens_by_position.size()); ++k) {
      student_ce += sums.student_ce_by_position[k];
      teacher_ce += sums.teacher_ce_by_position[k];
      tokens += sums.tokens_by_position[k];
    }
    if (tokens == 0) continue;
    report.bucket_start.push_back(start);
    report.student_perplexity_by_context.push_back(
        std::exp(student_ce / static_cast<double>(tokens)));
    report.teacher_perplexity_by_context.push_back(
        has_teacher ? std::exp(teacher_ce / static_cast<double>(tokens)) : 0.0);
  }
  return report;
}

}  // namespace kept::cli
