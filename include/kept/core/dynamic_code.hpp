// kept/core/dynamic_code.hpp: the 8-bit dynamic-tree code of blockwise-quantised optimizer
// states (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", the code of
// bitsandbytes' 8-bit Adam), and the per-element functions that quantise with it.
//
// A state tensor is cut into blocks of kQuantBlock elements; block j stores one fp32 absmax
// a_j = max |x| and one byte per element, the index of the code value nearest to x / a_j. The
// code spends its 256 values like a float with a decimal exponent: a byte reads as
//
// clang-format off
//   [sign] 0 ... 0 1 f ... f        z leading zeros, an indicator 1, F fraction bits
//   value = +-10^-z * (0.1 + 0.9 * (f + 0.5) / 2^F)
// clang-format on
//
// so each decade below 1 gets its own linear grid, finer near 1 (z = 0: F = 6 signed, 7
// unsigned) and down to one value per decade at 10^-6. The signed code (first moment m) has a
// sign bit and 7 bits of magnitude; the unsigned code (second moment v >= 0) uses all 8. Both
// also hold 0 and exactly 1.0 (the block's absmax element is stored exactly); 254 + 2 = 256.
// The table is kept sorted ascending, so a byte is a rank and quantising is a binary search
// for the nearest value (ties to the lower rank): the same on the CPU and in a CUDA kernel,
// which read the same host-built table.
//
// One deliberate difference from nearest rounding: a positive second moment never rounds to
// 0. AdamW divides by sqrt(v) + eps, so an element whose v fell below half the smallest code
// (~1.6e-7 of its block's absmax) while its m did not would take a step of m / eps, i.e. of
// ~1e4 lr; rounded up to the smallest code instead, its step stays below ~lr.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

#include "kept/core/element_math.hpp"

namespace kept {

inline constexpr std::int64_t kQuantBlock = 256;  // elements per absmax

// Blocks covering `count` elements.
KEPT_HOST_DEVICE inline std::int64_t quant_blocks(std::int64_t count) {
  return (count + kQuantBlock - 1) / kQuantBlock;
}

namespace detail {

// The value of magnitude byte `r` (of `bits` bits) in the layout above; `special` is the byte
// that stands for exactly 1.0 instead.
inline float dynamic_code_magnitude(unsigned r, int bits) {
  if (r == 0) return 0.0f;
  int z = 0;
  while (!(r & (1u << (bits - 1 - z))))
    ++z;
  const int fraction_bits = bits - 1 - z;
  const unsigned f = r & ((1u << fraction_bits) - 1u);
  static constexpr float kPowers[] = {1.0f, 1e-1f, 1e-2f, 1e-3f, 1e-4f, 1e-5f, 1e-6f, 1e-7f};
  const float fraction = (static_cast<float>(f) + 0.5f) / static_cast<float>(1u << fraction_bits);
  return std::fma(0.9f, fraction, 0.1f) * kPowers[z];
}

inline std::array<float, 256> make_dynamic_code(bool is_signed) {
  std::array<float, 256> code{};
  for (unsigned byte = 0; byte < 256; ++byte) {
    if (is_signed) {
      const unsigned magnitude = byte & 0x7fu;
      const bool negative = byte & 0x80u;
      // The sign bit with a zero magnitude would be -0; it stands for 1.0.
      code[byte] = negative ? (magnitude == 0 ? 1.0f : -dynamic_code_magnitude(magnitude, 7))
                            : dynamic_code_magnitude(magnitude, 7);
    } else {
      // Byte 1 (seven zeros, the indicator, no fraction) would be a 10^-7 value; it stands
      // for 1.0, so the smallest decade is 10^-6 as in the signed code.
      code[byte] = byte == 1 ? 1.0f : dynamic_code_magnitude(byte, 8);
    }
  }
  // Insertion sort: 256 distinct values, built once.
  for (std::size_t i = 1; i < code.size(); ++i)
    for (std::size_t j = i; j > 0 && code[j - 1] > code[j]; --j)
      std::swap(code[j - 1], code[j]);
  return code;
}

}  // namespace detail

// The two code tables, sorted ascending, built once: the first moment's (signed) and the second
// moment's (unsigned). A device copy is the same 512 floats.
struct DynamicCodes {
  std::array<float, 256> signed_code;
  std::array<float, 256> unsigned_code;
};
inline const DynamicCodes& dynamic_codes() {
  static const DynamicCodes codes{detail::make_dynamic_code(true),
                                  detail::make_dynamic_code(false)};
  return codes;
}

// The rank of the code value nearest to `x` (ties to the lower rank). `code` is a sorted table.
KEPT_HOST_DEVICE inline std::uint8_t quantize_nearest(const float* code, float x) {
  int low = 0, high = 255;  // invariant: the answer lies in [low, high]
  while (high - low > 1) {
    const int middle = (low + high) / 2;
    if (code[middle] <= x)
      low = middle;
    else
      high = middle;
  }
  const float below = x - code[low], above = code[high] - x;
  return static_cast<std::uint8_t>(above < below ? high : low);
}

// A second moment's rank: nearest, but a positive value never becomes 0 (top comment).
KEPT_HOST_DEVICE inline std::uint8_t quantize_second_moment(const float* unsigned_code, float x) {
  const std::uint8_t rank = quantize_nearest(unsigned_code, x);
  return (rank == 0 && x > 0.0f) ? std::uint8_t{1} : rank;  // code[0] = 0, code[1] the smallest
}

// The normalised value of one element: x / absmax (0 for an all-zero block).
KEPT_HOST_DEVICE inline float quant_normalise(float x, float absmax) {
  return absmax > 0.0f ? x / absmax : 0.0f;
}

// 16 uniform random bits for element `index` of the update keyed `key`: SplitMix64
// (kept::splitmix64, the hash behind kept::Random) at counter key + index * its increment, so any
// thread order draws the same bits.
KEPT_HOST_DEVICE inline std::uint32_t rounding_bits(std::uint64_t key, std::uint64_t index) {
  return static_cast<std::uint32_t>(splitmix64(key + index * kSplitMixIncrement) >> 48);
}

// The keys of bf16 moments' stochastic rounding (moment 0: m, 1: v), derived from the update's
// key so the weights, m and v draw independent bits.
KEPT_HOST_DEVICE inline std::uint64_t moment_rounding_key(std::uint64_t key, int moment) {
  return splitmix64(key ^ (moment == 0 ? 0x6578705f61766731ull : 0x6578705f61766732ull));
}

}  // namespace kept
