// kept/backend/cpu/rope.hpp: rotary position embedding, rotate-half form (HF Llama, StableLM).
//
// For head dimension D (even), half = D/2, position p and i < half:
//   inv_freq_i = 1 / theta^(2i / D),  angle = p * inv_freq_i
//   out_i        = x_i * cos(angle) - x_{i+half} * sin(angle)
//   out_{i+half} = x_{i+half} * cos(angle) + x_i * sin(angle)
// The backward is the transpose of that rotation (angle -> -angle).
//
// The angle is formed in fp32 exactly as transformers does (inv_freq = 1 / theta^(2i/D) in
// fp32, then p * inv_freq in fp32) so that long positions carry the same rounding as the
// reference; the cosine and sine of that fp32 angle are then taken in double.
// For T = double (the float64 reference) the same fp32 angle is used, so the two paths differ
// only in the arithmetic that follows.
// The table holds cos and sin for positions [0, positions) and is shared by q and k.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "kept/backend/cpu/vector_math.hpp"
#include "kept/core/error.hpp"

namespace kept::cpu {

template <class T>
class RopeTable {
 public:
  RopeTable() = default;
  RopeTable(std::int64_t head_dim, double theta, std::int64_t positions)
      : head_dim_(head_dim), positions_(positions) {
    KEPT_CHECK(head_dim > 0 && head_dim % 2 == 0, "RoPE needs an even head_dim, got ", head_dim);
    const std::int64_t half = head_dim / 2;
    cos_.resize(static_cast<std::size_t>(positions * half));
    sin_.resize(cos_.size());
    std::vector<float> inv_freq(static_cast<std::size_t>(half));
    for (std::int64_t i = 0; i < half; ++i) {
      const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
      inv_freq[i] = 1.0f / std::pow(static_cast<float>(theta), exponent);
    }
    for (std::int64_t p = 0; p < positions; ++p) {
      for (std::int64_t i = 0; i < half; ++i) {
        const float angle = static_cast<float>(p) * inv_freq[i];
        cos_[p * half + i] = static_cast<T>(std::cos(static_cast<double>(angle)));
        sin_[p * half + i] = static_cast<T>(std::sin(static_cast<double>(angle)));
      }
    }
  }
  std::int64_t head_dim() const { return head_dim_; }
  std::int64_t positions() const { return positions_; }
  const T* cos(std::int64_t position) const { return cos_.data() + position * (head_dim_ / 2); }
  const T* sin(std::int64_t position) const { return sin_.data() + position * (head_dim_ / 2); }

 private:
  std::int64_t head_dim_ = 0;
  std::int64_t positions_ = 0;
  std::vector<T> cos_, sin_;
};

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
