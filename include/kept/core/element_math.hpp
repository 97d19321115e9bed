// kept/core/element_math.hpp: per-element math shared by the CPU and CUDA backends.
//
// The same inline function computes a value on both sides, so the CPU reference (CpuBf16)
// rounds, rotates and gates exactly as a CUDA kernel does: nvcc sees these as
// __host__ __device__, g++ as plain inline functions. Only what both sides must agree on to the
// bit lives here (the rest of a kernel is free to differ, e.g. in its summation order):
//
//   bf16_from_float      fp32 -> bf16 round-to-nearest-even (NaN stays a quiet NaN); the same
//                        rounding as torch's and CUDA's __float2bfloat16_rn
//   bf16_stochastic      fp32 -> bf16 rounding up with probability (x - down) / ulp, from 16
//                        random bits (the unbiased rounding of a bf16 weight update, llm.c's
//                        stochastic_rounding)
//   silu, sigmoid        in fp32 (double for the float64 reference)
//   rope_inv_freq/angle  the angle p * theta^(-2i/D) formed in fp32 as transformers does
//   splitmix64           the counter-based 64-bit hash kept::Random and stochastic rounding use
//   mul_rounded          a product rounded on its own, which nvcc may not fuse into a following
//                        add (g++ for x86-64 never fuses; nvcc does by default, on the GPU only)
//   adamw_element        one torch-exact AdamW update of one element (kept/train/adamw.hpp
//                        derives the form; the CPU and CUDA optimizers both call it)
// The 8-bit optimizer-state code and its rounding bits are in kept/core/dynamic_code.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define KEPT_HOST_DEVICE __host__ __device__
#else
#define KEPT_HOST_DEVICE
#endif

namespace kept {

KEPT_HOST_DEVICE inline std::uint32_t float_bits(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}
KEPT_HOST_DEVICE inline float float_from_bits(std::uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// bf16 is the top half of an fp32; these work on its 16 bits.
KEPT_HOST_DEVICE inline float float_from_bf16(std::uint16_t bits) {
  return float_from_bits(static_cast<std::uint32_t>(bits) << 16);
}
KEPT_HOST_DEVICE inline std::uint16_t bf16_from_float(float value) {
  const std::uint32_t bits = float_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u)  // NaN: force a quiet mantissa bit so it stays NaN
    return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  const std::uint32_t rounding_bias = 0x7fffu + ((bits >> 16) & 1u);  // ties to even
  return static_cast<std::uint16_t>((bits + rounding_bias) >> 16);
}
// Rounds up (away from the truncated value) when the 16 dropped bits exceed `random16`, so
// E[result] = value. Infinities and NaN are rounded to nearest instead.
KEPT_HOST_DEVICE inline std::uint16_t bf16_stochastic(float value, std::uint32_t random16) {
  const std::uint32_t bits = float_bits(value);
  if ((bits & 0x7f800000u) == 0x7f800000u) return bf16_from_float(value);
  const std::uint32_t dropped = bits & 0xffffu;
  const std::uint32_t truncated = bits >> 16;
  const std::uint32_t rounded = dropped > (random16 & 0xffffu) ? truncated + 1 : truncated;
  return static_cast<std::uint16_t>(rounded);
}

template <class T>
KEPT_HOST_DEVICE inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}
template <class T>
KEPT_HOST_DEVICE inline T silu(T x) {
  return x * sigmoid(x);
}

// RoPE, rotate-half form: inv_freq_i = 1 / theta^(2i / D) in fp32, angle = p * inv_freq_i in
// fp32 (transformers' LlamaRotaryEmbedding), whatever the activation type.
KEPT_HOST_DEVICE inline float rope_inv_freq(std::int64_t i, std::int64_t head_dim, double theta) {
  const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
  return 1.0f / std::pow(static_cast<float>(theta), exponent);
}
KEPT_HOST_DEVICE inline float rope_angle(std::int64_t position, float inv_freq) {
  return static_cast<float>(position) * inv_freq;
}

// SplitMix64 as a stateless hash: the value its generator returns from state `counter`
// (kept::Random is built on it; the stochastic-rounding bits of kept/core/dynamic_code.hpp too).
inline constexpr std::uint64_t kSplitMixIncrement = 0x9e3779b97f4a7c15ull;
KEPT_HOST_DEVICE inline std::uint64_t splitmix64(std::uint64_t counter) {
  std::uint64_t z = counter + kSplitMixIncrement;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Element `index` of a seeded uniform draw on [-bound, bound): 24 bits of the hash, scaled in
// fp32 (exact: a 24-bit integer times a power of two, then one multiply by the bound), so every
// backend draws the same values (fill_uniform, the synthetic runs' weights).
KEPT_HOST_DEVICE inline float uniform_symmetric(std::uint64_t seed, std::uint64_t index,
                                                float bound) {
  const std::uint64_t bits = splitmix64(seed + index * kSplitMixIncrement) >> 40;
  const float unit = static_cast<float>(bits) * (1.0f / 16777216.0f);  // [0, 1)
  return bound * (2.0f * unit - 1.0f);
}

template <class T>
KEPT_HOST_DEVICE inline T mul_rounded(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(double))
    return __dmul_rn(a, b);
  else
    return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// One element of the AdamW update on the Master type M (float; double for the float64
// reference, whose scalars are still the fp32 ones torch would use); `s` is a kept::AdamWScalars
// (kept/backend/backend.hpp). In element order, with torch's fused multiply-adds:
//   p = p * keep (when decaying);  m = fma(w1, g - m, m) (or fma(w1 - 1, g - m, g), |w1| >= 0.5)
//   v = fma(w2 g, g, v b2);        p = p + (neg_step m) / (sqrt(v) / bc2_sqrt + eps)
template <class M, class Scalars>
KEPT_HOST_DEVICE inline M adamw_element(M value, M g, M& m, M& v, const Scalars& s) {
  const M w1 = s.one_minus_beta1;
  if (s.decay) value = mul_rounded(value, static_cast<M>(s.decay_keep));
  m = s.small_weight ? std::fma(w1, g - m, m) : std::fma(w1 - M(1), g - m, g);
  const M decayed = v * static_cast<M>(s.beta2);
  v = std::fma(static_cast<M>(s.one_minus_beta2) * g, g, decayed);
  const M denom = std::sqrt(v) / static_cast<M>(s.bias_correction2_sqrt) + static_cast<M>(s.eps);
  return value + (static_cast<M>(s.neg_step) * m) / denom;
}

}  // namespace kept
