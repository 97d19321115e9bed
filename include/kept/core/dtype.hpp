// kept/core/dtype.hpp: element types and the 16-bit float storage types.
//
// Compute on the CPU backend is fp32; bf16 and fp16 exist as storage (checkpoints on disk, and
// device buffers for the CUDA backend). Conversions follow IEEE round-to-nearest-even, the rule
// PyTorch and CUDA's __float2bfloat16 use, so a bf16 checkpoint loaded into fp32 and saved back
// is bit-identical, and an fp32 value rounds to the same bf16 that torch would produce.
//
// The safetensors dtypes kept does not compute with (F64, integers, BOOL) are still named here
// so that a reader can validate and copy such tensors, and reject them by name where compute
// needs a float.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "kept/core/element_math.hpp"
#include "kept/core/enum_names.hpp"
#include "kept/core/error.hpp"

namespace kept {

enum class DType : std::uint8_t { F32, BF16, F16, F64, I64, I32, I16, I8, U8, Bool };

constexpr std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F64:
    case DType::I64:
      return 8;
    case DType::F32:
    case DType::I32:
      return 4;
    case DType::BF16:
    case DType::F16:
    case DType::I16:
      return 2;
    case DType::I8:
    case DType::U8:
    case DType::Bool:
      return 1;
  }
  return 0;
}

// The names used by the safetensors format (and by kept's messages).
inline constexpr EnumName<DType> kDTypeNames[] = {
    {DType::F32, "F32"}, {DType::BF16, "BF16"}, {DType::F16, "F16"}, {DType::F64, "F64"},
    {DType::I64, "I64"}, {DType::I32, "I32"},   {DType::I16, "I16"}, {DType::I8, "I8"},
    {DType::U8, "U8"},   {DType::Bool, "BOOL"}};

constexpr std::string_view dtype_name(DType dtype) {
  return enum_name(kDTypeNames, dtype);
}

inline std::optional<DType> parse_dtype(std::string_view name) {
  return parse_enum(kDTypeNames, name);
}

// HF config.json spells dtypes as torch names ("bfloat16").
inline std::string_view torch_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32:
      return "float32";
    case DType::BF16:
      return "bfloat16";
    case DType::F16:
      return "float16";
    case DType::F64:
      return "float64";
    default:
      fail("dtype ", dtype_name(dtype), " has no torch floating-point name");
  }
}

inline std::optional<DType> parse_torch_dtype(std::string_view name) {
  if (name == "float32" || name == "float") return DType::F32;
  if (name == "bfloat16") return DType::BF16;
  if (name == "float16" || name == "half") return DType::F16;
  if (name == "float64" || name == "double") return DType::F64;
  return std::nullopt;
}

constexpr bool is_float(DType dtype) {
  return dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::F64;
}

// bfloat16: the top 16 bits of an fp32.
struct bf16 {
  std::uint16_t bits = 0;
};

// IEEE 754 binary16.
struct f16 {
  std::uint16_t bits = 0;
};

inline float to_float(bf16 value) {
  return float_from_bf16(value.bits);
}
// Round to nearest even (kept/core/element_math.hpp, shared with the CUDA kernels).
inline bf16 to_bf16(float value) {
  return bf16{bf16_from_float(value)};
}

// A double rounded to float with round-to-odd: toward zero, then the last bit set if anything
// was lost. Rounding that float again to a type with at most 22 bits of mantissa (bf16, fp16)
// gives the correctly rounded result of the double, avoiding double-rounding errors.
inline float to_float_round_to_odd(double value) {
  float rounded = static_cast<float>(value);
  if (!std::isfinite(rounded) || static_cast<double>(rounded) == value) return rounded;
  if (std::fabs(static_cast<double>(rounded)) > std::fabs(value))
    rounded = std::nextafter(rounded, 0.0f);
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(rounded) | 1u);
}

inline float to_float(f16 value) {
  std::uint32_t sign = static_cast<std::uint32_t>(value.bits & 0x8000u) << 16;
  std::uint32_t exponent = (value.bits >> 10) & 0x1fu;
  std::uint32_t mantissa = value.bits & 0x3ffu;
  std::uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf or NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal half: value = mantissa * 2^-24, exact in fp32.
    float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    bits = sign | std::bit_cast<std::uint32_t>(magnitude);
  }
  return std::bit_cast<float>(bits);
}

inline f16 to_f16(float value) {
  std::uint32_t bits = std::bit_cast<std::uint32_t>(value);
  std::uint16_t sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return f16{static_cast<std::uint16_t>(sign | 0x7e00u)};   // NaN
  if (magnitude >= 0x477ff000u) return f16{static_cast<std::uint16_t>(sign | 0x7c00u)};  // overflow
  if (magnitude < 0x38800000u) {
    // Result is subnormal (or zero): round |value| * 2^24 to the nearest integer, ties to even.
    float scaled = std::bit_cast<float>(magnitude) * 0x1p24f;
    // Adding 2^23 forces rounding at the integer position in the current (nearest-even) mode.
    float rounded = (scaled + 0x1p23f) - 0x1p23f;
    return f16{static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(rounded))};
  }
  // Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even.
  std::uint32_t rebased = magnitude - (112u << 23);
  std::uint32_t rounding_bias = 0x0fffu + ((rebased >> 13) & 1u);
  return f16{static_cast<std::uint16_t>(sign | ((rebased + rounding_bias) >> 13))};
}

// Maps a C++ element type to its DType, for typed access to type-erased tensors.
template <class T>
struct dtype_of;
// clang-format off
#define KEPT_DTYPE_OF(Type, Tag) \
  template <> struct dtype_of<Type> { static constexpr DType value = DType::Tag; };
KEPT_DTYPE_OF(float, F32)
KEPT_DTYPE_OF(double, F64)
KEPT_DTYPE_OF(bf16, BF16)
KEPT_DTYPE_OF(f16, F16)
KEPT_DTYPE_OF(std::int64_t, I64)
KEPT_DTYPE_OF(std::int32_t, I32)
KEPT_DTYPE_OF(std::uint8_t, U8)
#undef KEPT_DTYPE_OF
// clang-format on
template <class T>
inline constexpr DType dtype_of_v = dtype_of<T>::value;

}  // namespace kept
