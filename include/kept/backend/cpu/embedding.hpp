// kept/backend/cpu/embedding.hpp: token embedding lookup and its gradient.
//
// Forward: out[t] = table[token[t]]. Backward: d_table[token[t]] += d_out[t]. The backward
// scatters serially in token order: a row can be hit by many tokens, and a fixed order keeps
// the sum deterministic; it is a small share of a step next to the GEMMs.
#pragma once

#include <cstdint>
#include <cstring>

#include "kept/core/error.hpp"

namespace kept::cpu {

template <class T>
inline void embedding_forward(const std::int32_t* tokens, std::int64_t count, const T* table,
                              std::int64_t vocab, std::int64_t dim, T* out) {
  for (std::int64_t t = 0; t < count; ++t)
    KEPT_CHECK(tokens[t] >= 0 && tokens[t] < vocab, "token id ", tokens[t], " at position ", t,
               " is outside the vocabulary of ", vocab);
#pragma omp parallel for schedule(static)
  for (std::int64_t t = 0; t < count; ++t)
    std::memcpy(out + t * dim, table + static_cast<std::int64_t>(tokens[t]) * dim,
                sizeof(T) * static_cast<std::size_t>(dim));
}

template <class T>
inline void embedding_backward(const std::int32_t* tokens, std::int64_t count, const T* d_out,
                               std::int64_t dim, T* d_table) {
  for (std::int64_t t = 0; t < count; ++t) {
    T* row = d_table + static_cast<std::int64_t>(tokens[t]) * dim;
    const T* grad = d_out + t * dim;
    for (std::int64_t c = 0; c < dim; ++c)
      row[c] += grad[c];
  }
}

}  // namespace kept::cpu
