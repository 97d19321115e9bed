// kept/backend/cpu/rope.hpp: rotary position embedding, rotate-half form (HF Llama, StableLM).
//
// For head dimension D (even), half = D/2, position p and i < half:
//   inv_freq_i = 1 / theta^(2i / D),  angle = p * inv_freq_i
//   out_i        = x_i * cos(angle) - x_{i+half} * sin(angle)
//   out_{i+half} = x_{i+half} * cos(angle) + x_i * sin(angle)
// The backward is the transpose of that rotation (angle -> -angle).
//
// The table (cos and sin per position, shared by q and k) is kept/core/rope_table.hpp.
#pragma once

#include <cstdint>

#include "kept/backend/cpu/vector_math.hpp"
#include "kept/core/error.hpp"
#include "kept/core/rope_table.hpp"

namespace kept::cpu {

// Rotates x [batch * seq, heads * head_dim] in place; token t of a sequence sits at position t.
// direction +1 applies the embedding, -1 its transpose (the backward of the forward).
template <class T>
inline void rope_apply(T* x, std::int64_t batch, std::int64_t seq, std::int64_t heads,
                       const RopeTable<T>& table, int direction) {
  const std::int64_t head_dim = table.head_dim(), half = head_dim / 2;
  KEPT_CHECK(seq <= table.positions(), "sequence of ", seq, " tokens exceeds the RoPE table of ",
             table.positions(), " positions");
  const T sign = direction >= 0 ? T(1) : T(-1);
#pragma omp parallel for schedule(static)
  for (std::int64_t token = 0; token < batch * seq; ++token) {
    const std::int64_t position = token % seq;
    const T* __restrict cos = table.cos(position);
    const T* __restrict sin = table.sin(position);
    T* row = x + token * heads * head_dim;
    for (std::int64_t h = 0; h < heads; ++h) {
      T* __restrict first = row + h * head_dim;
      T* __restrict second = first + half;
      KEPT_PRAGMA_SIMD
      for (std::int64_t i = 0; i < half; ++i) {
        const T a = first[i], b = second[i], s = sign * sin[i];
        first[i] = a * cos[i] - b * s;
        second[i] = b * cos[i] + a * s;
      }
    }
  }
}

}  // namespace kept::cpu
