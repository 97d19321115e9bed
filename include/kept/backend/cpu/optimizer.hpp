// kept/backend/cpu/optimizer.hpp: the optimizer's range kernels on the CPU.
//
// AdamW over one contiguous range, in the element order and with the fused multiply-adds that
// make it torch-exact (the derivation is at the top of kept/train/adamw.hpp):
//   p = p * keep                          when the range decays
//   m = fma(w1, g - m, m)                 (or fma(w1 - 1, g - m, g) when |w1| >= 0.5)
//   v = fma(w2 * g, g, v * b2)
//   p = p + (neg_step * m) / (sqrt(v) / bc2_sqrt + eps)
// The master form updates an fp32 master copy and stores round(master) into a bf16 value.
// sum_squares accumulates in double, in element order, so a gradient norm is the same on every
// run and thread count.
#pragma once

#include <cmath>
#include <cstdint>

#include "kept/backend/backend.hpp"
#include "kept/core/dtype.hpp"
#include "kept/core/element_math.hpp"

namespace kept::cpu {

template <class T>
inline double sum_squares(const T* values, std::int64_t count) {
  double sum = 0;
  for (std::int64_t i = 0; i < count; ++i)
    sum += static_cast<double>(values[i]) * static_cast<double>(values[i]);
  return sum;
}

template <class T>
inline void scale(T* values, std::int64_t count, T factor) {
  for (std::int64_t i = 0; i < count; ++i)
    values[i] *= factor;
}

template <class T>
inline bool all_finite(const T* values, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i)
    if (!std::isfinite(values[i])) return false;
  return true;
}

template <class T>
inline void adamw_update(T* value, const T* grad, T* exp_avg, T* exp_avg_sq, std::int64_t count,
                         const AdamWScalars& scalars) {
  for (std::int64_t i = 0; i < count; ++i)
    value[i] = kept::adamw_element<T>(value[i], grad[i], exp_avg[i], exp_avg_sq[i], scalars);
}

// bf16 values with fp32 master weights: the master is updated, the value is round(master).
inline void adamw_update_master(bf16* value, float* master, const float* grad, float* exp_avg,
                                float* exp_avg_sq, std::int64_t count,
                                const AdamWScalars& scalars) {
  for (std::int64_t i = 0; i < count; ++i) {
    master[i] = kept::adamw_element<float>(master[i], grad[i], exp_avg[i], exp_avg_sq[i], scalars);
    value[i] = to_bf16(master[i]);
  }
}

}  // namespace kept::cpu
