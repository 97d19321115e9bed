// kept/xkd/sparse_teacher.hpp: the offline teacher of one batch, as xkd::sparse_logit_kl takes it
// and kept/io/teacher_logits.hpp reads it: per token the teacher's k kept ids, their log-probs at
// the temperature and the mass of everything else. A view only (host memory), so the reader's
// buffers, a test's vectors or a caller's own storage all serve.
#pragma once

#include <cstdint>

namespace kept::xkd {

// One sparse teacher row per token, row-major [rows, k] (ids, logprobs) and [rows] (tail_mass).
struct SparseTeacher {
  const std::int32_t* ids = nullptr;  // the kept ids: distinct, in [0, vocab), any order
  const float* logprobs = nullptr;    // log p_i at the temperature (finite, or -inf)
  const float* tail_mass = nullptr;   // r = sum of p over the ids not kept, in [0, 1]
  std::int64_t rows = 0, k = 0;
};

}  // namespace kept::xkd
