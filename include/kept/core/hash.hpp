// kept/core/hash.hpp: 64-bit FNV-1a, the one string/field hash of kept: Random::derive seeds
// from it (kept/core/random.hpp) and the data loader fingerprints its corpus with it
// (kept/train/loader.hpp).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

namespace kept {

inline constexpr std::uint64_t kFnvOffsetBasis = 0xcbf29ce484222325ull;
inline constexpr std::uint64_t kFnvPrime = 0x100000001b3ull;

// One FNV-1a step over one byte.
constexpr std::uint64_t fnv1a_byte(std::uint64_t hash, unsigned char byte) {
  return (hash ^ byte) * kFnvPrime;
}

// FNV-1a over the bytes of `text`, from `hash`.
constexpr std::uint64_t fnv1a(std::string_view text, std::uint64_t hash = kFnvOffsetBasis) {
  for (char c : text)
    hash = fnv1a_byte(hash, static_cast<unsigned char>(c));
  return hash;
}

// A 64-bit FNV-1a fingerprint, fed field by field (each value as its 8 little-endian bytes).
class Fingerprint {
 public:
  Fingerprint& add(std::uint64_t value) {
    for (int byte = 0; byte < 8; ++byte) {
      hash_ = fnv1a_byte(hash_, static_cast<unsigned char>((value >> (8 * byte)) & 0xffu));
    }
    return *this;
  }
  Fingerprint& add(std::string_view text) {
    add(static_cast<std::uint64_t>(text.size()));
    hash_ = fnv1a(text, hash_);
    return *this;
  }
  std::uint64_t value() const { return hash_; }
  std::string hex() const { return to_hex(hash_); }
  static std::string to_hex(std::uint64_t value) {
    char text[17];
    std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value));
    return text;
  }

 private:
  std::uint64_t hash_ = kFnvOffsetBasis;
};

}  // namespace kept
