// Core types: dtype conversions against independent references, shapes, tensors.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>

#include "kept/core/dtype.hpp"
#include "kept/core/random.hpp"
#include "kept/core/shape.hpp"
#include "kept/core/tensor.hpp"

using namespace kept;

namespace {
// Reference bf16 rounding computed with long double arithmetic, independent of the bit trick.
float reference_round_bf16(float value) {
  if (value == 0 || !std::isfinite(value)) return value;
  int exponent;
  std::frexp(value, &exponent);  // value = m * 2^exponent, 0.5 <= |m| < 1
  // bf16 has 8 significant bits: the spacing at this exponent is 2^(exponent - 8).
  long double ulp = std::ldexp(1.0L, std::max(exponent - 8, -133));
  long double scaled = static_cast<long double>(value) / ulp;
  long double rounded = std::nearbyint(scaled);  // default mode: ties to even
  return static_cast<float>(rounded * ulp);
}
float reference_round_f16(float value) {
  if (value == 0 || !std::isfinite(value)) return value;
  int exponent;
  std::frexp(value, &exponent);
  long double ulp = std::ldexp(1.0L, std::max(exponent - 11, -24));  // 11 bits, subnormals at 2^-24
  long double rounded = std::nearbyint(static_cast<long double>(value) / ulp) * ulp;
  if (std::fabs(rounded) > 65504.0L)
    return std::copysign(std::numeric_limits<float>::infinity(), value);
  return static_cast<float>(rounded);
}
}  // namespace

TEST_CASE("bf16 rounds to nearest even like an exact reference", "[core][dtype]") {
  std::uint32_t state = 12345;
  for (int i = 0; i < 200000; ++i) {
    state = state * 1664525u + 1013904223u;
    float value = std::bit_cast<float>(state);
    if (!std::isfinite(value)) continue;
    float expected = reference_round_bf16(value);
    if (std::isinf(expected)) continue;  // overflow to inf is covered below
    REQUIRE(to_float(to_bf16(value)) == expected);
  }
  REQUIRE(to_float(to_bf16(1.0f + 0x1p-8f)) == 1.0f);                // tie -> even (down)
  REQUIRE(to_float(to_bf16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f);  // tie -> even (up)
  REQUIRE(std::isnan(to_float(to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  REQUIRE(std::isinf(to_float(to_bf16(std::numeric_limits<float>::infinity()))));
}

TEST_CASE("every bf16 and f16 bit pattern survives a float round trip", "[core][dtype]") {
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    bf16 b{static_cast<std::uint16_t>(bits)};
    f16 h{static_cast<std::uint16_t>(bits)};
    float fb = to_float(b), fh = to_float(h);
    if (std::isnan(fb)) {
      REQUIRE(std::isnan(to_float(to_bf16(fb))));
    } else {
      REQUIRE(to_bf16(fb).bits == b.bits);
    }
    if (std::isnan(fh)) {
      REQUIRE(std::isnan(to_float(to_f16(fh))));
    } else {
      REQUIRE(to_f16(fh).bits == h.bits);
    }
  }
}

TEST_CASE("f16 conversion matches an exact reference, subnormals and overflow included",
          "[core][dtype]") {
  REQUIRE(to_float(f16{0x3c00}) == 1.0f);
  REQUIRE(to_float(f16{0x0001}) == 0x1p-24f);
  REQUIRE(to_float(f16{0x7bff}) == 65504.0f);
  REQUIRE(std::isinf(to_float(to_f16(65520.0f))));
  REQUIRE(to_float(to_f16(65519.0f)) == 65504.0f);
  std::uint32_t state = 777;
  for (int i = 0; i < 200000; ++i) {
    state = state * 1664525u + 1013904223u;
    // Magnitudes spread over the f16 range and a bit beyond.
    float value =
        std::ldexp(static_cast<float>(state & 0xffffff) / 0x1p24f + 0.5f,
                   static_cast<int>(state >> 27) - 26 + static_cast<int>((state >> 24) & 7));
    if (state & 0x800000u) value = -value;
    REQUIRE(to_float(to_f16(value)) == reference_round_f16(value));
  }
}

TEST_CASE("shapes count elements, strides and reject bad dimensions", "[core][shape]") {
  Shape shape{2, 3, 4};
  REQUIRE(shape.rank() == 3);
  REQUIRE(shape.numel() == 24);
  auto strides = shape.strides();
  REQUIRE(strides[0] == 12);
  REQUIRE(strides[1] == 4);
  REQUIRE(strides[2] == 1);
  REQUIRE(shape.to_string() == "[2, 3, 4]");
  REQUIRE(Shape{}.numel() == 1);
  REQUIRE_THROWS_AS((Shape{-1, 2}), Error);
  REQUIRE_THROWS_AS((Shape{1LL << 40, 1LL << 40}), Error);
  REQUIRE_THROWS_AS(shape[3], Error);
}

TEST_CASE("tensors convert between float dtypes and check typed access", "[core][tensor]") {
  Tensor t = Tensor::empty(DType::F32, {2, 3});
  for (int i = 0; i < 6; ++i)
    t.data<float>()[i] = 0.1f * static_cast<float>(i) - 0.2f;
  Tensor b = t.to(DType::BF16);
  REQUIRE(b.dtype() == DType::BF16);
  REQUIRE(b.nbytes() == 12);
  Tensor back = b.to(DType::F32);
  for (int i = 0; i < 6; ++i) {
    REQUIRE(back.data<float>()[i] == reference_round_bf16(t.data<float>()[i]));
  }
  REQUIRE_THROWS_AS(t.data<bf16>(), Error);
  REQUIRE_THROWS_AS(t.reshape({4, 2}).reshape({5}), Error);
  Tensor ints = Tensor::zeros(DType::I64, {3});
  REQUIRE_THROWS_WITH(ints.to(DType::F32), Catch::Contains("I64"));
  auto m = as_matrix<float>(t);
  REQUIRE(m.rows == 2);
  REQUIRE(m.cols == 3);
  REQUIRE(m(1, 2) == t.data<float>()[5]);
}

TEST_CASE("float64 to bf16 and f16 rounds once, correctly", "[core][dtype]") {
  // Values just above a bf16 halfway point between two floats: rounding to float first would
  // land on the halfway point and then round to even, the wrong way.
  auto reference = [](double value, int bits, int min_exponent) {
    int exponent;
    std::frexp(value, &exponent);
    const long double ulp = std::ldexp(1.0L, std::max(exponent - bits, min_exponent));
    return static_cast<double>(std::nearbyint(static_cast<long double>(value) / ulp) * ulp);
  };
  std::uint64_t state = 99;
  Tensor values = Tensor::empty(DType::F64, {20000});
  for (std::int64_t i = 0; i < values.numel(); ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const double base = std::ldexp(1.0 + static_cast<double>(state >> 12) * 0x1p-52,
                                   static_cast<int>(state % 20) - 10);
    // Half the values sit exactly at a bf16 halfway point plus a hair (below float precision).
    int exponent;
    std::frexp(base, &exponent);
    const double bf16_ulp = std::ldexp(1.0, exponent - 8);
    const double halfway = (std::floor(base / bf16_ulp) + 0.5) * bf16_ulp;
    values.data<double>()[i] = (i % 2) ? base : halfway + bf16_ulp * 0x1p-30;
  }
  const Tensor as_bf16 = values.to(DType::BF16), as_f16 = values.to(DType::F16);
  for (std::int64_t i = 0; i < values.numel(); ++i) {
    const double value = values.data<double>()[i];
    REQUIRE(to_float(as_bf16.data<bf16>()[i]) == reference(value, 8, -133));
    REQUIRE(to_float(as_f16.data<f16>()[i]) == reference(value, 11, -24));
  }
}

TEST_CASE("Random is SplitMix64: the published sequence for seed 0, and hash(counter)",
          "[core][random]") {
  // Vigna's reference splitmix64.c from state 0.
  kept::Random random(0);
  CHECK(random.next_u64() == 0xe220a8397b1dcdafull);
  CHECK(random.next_u64() == 0x6e789e6aa1b965f4ull);
  CHECK(random.next_u64() == 0x06c45d188009454full);
  // hash(state) is the value next_u64() returns from that state.
  CHECK(kept::Random::hash(0) == 0xe220a8397b1dcdafull);
  CHECK(kept::Random::hash(0x9e3779b97f4a7c15ull) == 0x6e789e6aa1b965f4ull);
}

// The memory meter (kept/core/memory_meter.hpp): host tensors are counted for as long as they
// live, the peak holds the largest total since the last reset, and a cap refuses an allocation
// that would pass it before taking any memory, naming the request, the total and the reason.
TEST_CASE("the host memory meter counts tensors, keeps a peak and enforces a cap", "[core]") {
  kept::MemoryMeter& meter = kept::host_memory_meter();
  const std::int64_t before = meter.current();
  meter.reset_peak();
  {
    kept::Tensor a = kept::Tensor::empty(kept::DType::F32, {1000});
    CHECK(meter.current() == before + 4000);
    {
      kept::Tensor b = kept::Tensor::zeros(kept::DType::BF16, {500});
      CHECK(meter.current() == before + 5000);
    }
    CHECK(meter.current() == before + 4000);
    CHECK(meter.peak() == before + 5000);
  }
  CHECK(meter.current() == before);
  meter.reset_peak();
  CHECK(meter.peak() == before);

  meter.set_cap(before + 4096, "--gpu test-4k");
  kept::Tensor fits = kept::Tensor::empty(kept::DType::F32, {1024});
  CHECK(meter.current() == before + 4096);
  CHECK_THROWS_WITH(kept::Tensor::empty(kept::DType::F32, {1}),
                    Catch::Contains("memory cap") && Catch::Contains("over the cap") &&
                        Catch::Contains("--gpu test-4k"));
  CHECK(meter.current() == before + 4096);  // the refused request took nothing
  meter.set_cap(0, "");
  fits = kept::Tensor();
  CHECK(meter.current() == before);
}
