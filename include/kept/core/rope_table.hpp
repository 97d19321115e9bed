// kept/core/rope_table.hpp: the host cos/sin table of rotary position embeddings.
//
// For head dimension D (even), half = D/2, position p and i < half the angle is
// p * inv_freq_i with inv_freq_i = 1 / theta^(2i/D), both formed in fp32 exactly as transformers
// does (kept/core/element_math.hpp, shared with the CUDA kernels) so that long positions carry
// the reference's rounding; the cosine and sine of that fp32 angle are taken in double and
// stored as T. A backend builds its table with Backend::rope_table(head_dim, theta, positions):
// the CPU backends keep this host table, a device backend uploads it.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "kept/core/element_math.hpp"
#include "kept/core/error.hpp"

namespace kept {

template <class T>
class RopeTable {
 public:
  RopeTable() = default;
  RopeTable(std::int64_t head_dim, double theta, std::int64_t positions)
      : head_dim_(head_dim), positions_(positions) {
    KEPT_CHECK(head_dim > 0 && head_dim % 2 == 0, "RoPE needs an even head_dim, got ", head_dim);
    KEPT_CHECK(positions >= 0, "RoPE table: positions must be >= 0, got ", positions);
    const std::int64_t half = head_dim / 2;
    cos_.resize(static_cast<std::size_t>(positions * half));
    sin_.resize(cos_.size());
    std::vector<float> inv_freq(static_cast<std::size_t>(half));
    for (std::int64_t i = 0; i < half; ++i)
      inv_freq[i] = rope_inv_freq(i, head_dim, theta);
    for (std::int64_t p = 0; p < positions; ++p) {
      for (std::int64_t i = 0; i < half; ++i) {
        const double angle = rope_angle(p, inv_freq[i]);
        cos_[p * half + i] = static_cast<T>(std::cos(angle));
        sin_[p * half + i] = static_cast<T>(std::sin(angle));
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

}  // namespace kept
