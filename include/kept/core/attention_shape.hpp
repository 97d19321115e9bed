// kept/core/attention_shape.hpp: the shape of a batch of causal multi-head attention problems,
// shared by every backend (kept/backend/backend.hpp) and the Attention layer.
//
// q, k, v and o are [batch * seq, heads * head_dim] row-major (the projections' outputs), so
// head h of sequence b is a strided matrix with row stride heads * head_dim.
#pragma once

#include <cmath>
#include <cstdint>

namespace kept {

struct AttentionShape {
  std::int64_t batch = 0, seq = 0, heads = 0, head_dim = 0;
  std::int64_t row_stride() const { return heads * head_dim; }
  template <class T>
  T scale() const {
    return T(1) / std::sqrt(static_cast<T>(head_dim));
  }
};

}  // namespace kept
