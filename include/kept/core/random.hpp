// kept/core/random.hpp: a small deterministic random source.
//
// std::normal_distribution is implementation-defined, so a seed would not give the same model
// on another standard library. kept uses SplitMix64 (a well-studied 64-bit mixer) and
// Box-Muller, which are fully specified here: the same seed gives the same numbers on every
// platform and compiler.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <string_view>

#include "kept/core/element_math.hpp"
#include "kept/core/hash.hpp"

namespace kept {

class Random {
 public:
  explicit Random(std::uint64_t seed) : state_(seed) {}

  // SplitMix64 as a stateless hash (kept::splitmix64): the value next_u64() returns from state
  // `counter`. Loops that fill data in parallel use it to get the same numbers in any order.
  static std::uint64_t hash(std::uint64_t counter) { return splitmix64(counter); }
  std::uint64_t next_u64() {
    const std::uint64_t value = hash(state_);
    state_ += kSplitMixIncrement;
    return value;
  }
  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next_u64() >> 11) * 0x1p-53; }
  // Uniform integer in [0, bound).
  std::uint64_t below(std::uint64_t bound) { return bound ? next_u64() % bound : 0; }
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    const double radius = std::sqrt(-2.0 * std::log(u1));
    spare_ = radius * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return radius * std::cos(2.0 * std::numbers::pi * u2);
  }

  // A seed derived from a base seed and a name (FNV-1a), so each parameter's initial values
  // depend on its name, not on the order parameters are visited in.
  static std::uint64_t derive(std::uint64_t seed, std::string_view name) {
    return fnv1a(name, kFnvOffsetBasis ^ seed);
  }

 private:
  std::uint64_t state_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace kept
