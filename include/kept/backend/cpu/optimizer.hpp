// kept/backend/cpu/optimizer.hpp: the optimizer's range kernels on the CPU.
//
// AdamW over one contiguous range, in the element order and with the fused multiply-adds that
// make it torch-exact (the derivation is at the top of kept/train/adamw.hpp):
//   p = p * keep                          when the range decays
//   m = fma(w1, g - m, m)                 (or fma(w1 - 1, g - m, g) when |w1| >= 0.5)
//   v = fma(w2 * g, g, v * b2)
//   p = p + (neg_step * m) / (sqrt(v) / bc2_sqrt + eps)
// The master form updates an fp32 master copy and stores round(master) into a bf16 value;
// without a master the bf16 value takes the fp32 update rounded stochastically. 8-bit moments
// are dequantised, updated and requantised one kQuantBlock block at a time
// (kept/core/dynamic_code.hpp).
// sum_squares accumulates in double, in element order, so a gradient norm is the same on every
// run and thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kept/backend/backend.hpp"
#include "kept/core/dtype.hpp"
#include "kept/core/dynamic_code.hpp"
#include "kept/core/element_math.hpp"
#include "kept/core/error.hpp"

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

// One AdamW update of a range. P is the parameter type, M the optimizer's (Master); the value
// is its own master (P == M), or a bf16 value with an fp32 `master`, or, with `master` null, a
// bf16 value whose fp32 update is rounded stochastically. Moments fp32 or 8-bit blockwise: a
// block is dequantised, updated element by element, and requantised against its new absmax.
template <class P, class M>
inline void adamw_update(P* value, M* master, const M* grad, const AdamWMoments<M>& moments,
                         std::int64_t count, const AdamWScalars& scalars) {
  auto read = [&](std::int64_t i) -> M {
    if constexpr (std::is_same_v<P, M>)
      return value[i];
    else
      return master ? master[i] : to_float(value[i]);
  };
  auto write = [&](std::int64_t i, M updated) {
    if constexpr (std::is_same_v<P, M>) {
      value[i] = updated;
    } else if (master) {
      master[i] = updated;
      value[i] = to_bf16(updated);
    } else {
      const auto index = scalars.first_element + static_cast<std::uint64_t>(i);
      value[i] = bf16{bf16_stochastic(updated, rounding_bits(scalars.rounding_key, index))};
    }
  };
  if (moments.bf16_moments()) {
    if constexpr (std::is_same_v<M, float>) {
      const std::uint64_t m_key = moment_rounding_key(scalars.rounding_key, 0);
      const std::uint64_t v_key = moment_rounding_key(scalars.rounding_key, 1);
      for (std::int64_t i = 0; i < count; ++i) {
        float m = to_float(moments.exp_avg_bf16[i]), v = to_float(moments.exp_avg_sq_bf16[i]);
        write(i, kept::adamw_element<float>(read(i), grad[i], m, v, scalars));
        const auto index = scalars.first_element + static_cast<std::uint64_t>(i);
        moments.exp_avg_bf16[i] = bf16{bf16_stochastic(m, rounding_bits(m_key, index))};
        moments.exp_avg_sq_bf16[i] = bf16{bf16_stochastic(v, rounding_bits(v_key, index))};
      }
    } else {
      KEPT_CHECK(false, "adamw_update: bf16 moments need fp32 optimizer math, this backend's is ",
                 dtype_name(dtype_of_v<M>));
    }
    return;
  }
  if (!moments.quantized()) {
    for (std::int64_t i = 0; i < count; ++i)
      write(i, kept::adamw_element<M>(read(i), grad[i], moments.exp_avg[i], moments.exp_avg_sq[i],
                                      scalars));
    return;
  }
  if constexpr (std::is_same_v<M, float>) {
    const DynamicCodes& codes = dynamic_codes();
    float m[kQuantBlock], v[kQuantBlock];
    for (std::int64_t block = 0; block * kQuantBlock < count; ++block) {
      const std::int64_t begin = block * kQuantBlock;
      const std::int64_t size = std::min(kQuantBlock, count - begin);
      const float m_scale = moments.exp_avg_absmax[block],
                  v_scale = moments.exp_avg_sq_absmax[block];
      float m_max = 0.0f, v_max = 0.0f;
      for (std::int64_t k = 0; k < size; ++k) {
        const std::int64_t i = begin + k;
        m[k] = mul_rounded(codes.signed_code[moments.exp_avg_codes[i]], m_scale);
        v[k] = mul_rounded(codes.unsigned_code[moments.exp_avg_sq_codes[i]], v_scale);
        write(i, kept::adamw_element<float>(read(i), grad[i], m[k], v[k], scalars));
        m_max = std::max(m_max, std::fabs(m[k]));
        v_max = std::max(v_max, v[k]);
      }
      for (std::int64_t k = 0; k < size; ++k) {
        moments.exp_avg_codes[begin + k] =
            quantize_nearest(codes.signed_code.data(), quant_normalise(m[k], m_max));
        moments.exp_avg_sq_codes[begin + k] =
            quantize_second_moment(codes.unsigned_code.data(), quant_normalise(v[k], v_max));
      }
      moments.exp_avg_absmax[block] = m_max;
      moments.exp_avg_sq_absmax[block] = v_max;
    }
  } else {
    KEPT_CHECK(false, "adamw_update: 8-bit moments need fp32 optimizer math, this backend's is ",
               dtype_name(dtype_of_v<M>));
  }
}

}  // namespace kept::cpu
