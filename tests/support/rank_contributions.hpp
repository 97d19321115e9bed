// tests/support/rank_contributions.hpp: made-up per-rank fp32 contributions for the collective
// tests (tests/cuda/test_nccl_communicator.cu, tests/emulation/test_rank_ordered_sum.cpp):
// both signs, magnitudes 2^-12 .. 2^12, full mantissas, so that adding them in another order
// rounds differently.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace kept::test {

inline std::uint64_t mix(std::uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Rank `rank`'s value at element i.
inline float contribution(std::uint64_t seed, int rank, std::int64_t i) {
  const std::uint64_t bits =
      mix(mix(seed ^ static_cast<std::uint64_t>(rank)) ^ static_cast<std::uint64_t>(i));
  const float mantissa = 1.0f + static_cast<float>(bits & 0xffffffu) / 16777216.0f;
  const int exponent = static_cast<int>((bits >> 24) % 25) - 12;
  const float value = std::ldexp(mantissa, exponent);
  return (bits >> 40) & 1u ? -value : value;
}

inline std::vector<float> contributions(std::uint64_t seed, int rank, std::int64_t count) {
  std::vector<float> values(static_cast<std::size_t>(count));
  for (std::int64_t i = 0; i < count; ++i)
    values[static_cast<std::size_t>(i)] = contribution(seed, rank, i);
  return values;
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace kept::test
