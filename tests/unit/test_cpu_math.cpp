// The CPU backend's vectorisable elementwise math (kept/backend/cpu/vector_math.hpp) against
// double-precision std::exp: the error bounds its header states, and the special values; the
// seeded uniform fill against the moments of a uniform distribution.
#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kept/backend/cpu/vector_math.hpp"
#include "kept/backend/cpu_bf16.hpp"

using namespace kept::cpu;

namespace {

// |value - reference| in units of the float spacing at the reference (the spacing of the
// smallest subnormal below FLT_MIN): 0.5 is a correctly rounded result.
double ulp_error(float value, double reference) {
  const float rounded = static_cast<float>(reference);
  const float magnitude = std::fabs(rounded);
  const double spacing =
      magnitude < std::numeric_limits<float>::min()
          ? static_cast<double>(std::numeric_limits<float>::denorm_min())
          : static_cast<double>(std::nextafter(magnitude, std::numeric_limits<float>::infinity())) -
                magnitude;
  return std::fabs(static_cast<double>(value) - reference) / spacing;
}

}  // namespace

TEST_CASE("vexp(float) is within 1 ulp of exp over its whole range", "[cpu][math]") {
  double worst = 0;
  float worst_at = 0;
  auto check = [&](float x) {
    const double error = ulp_error(vexp(x), std::exp(static_cast<double>(x)));
    if (error > worst) worst = error, worst_at = x;
  };
  // Every 2^10th float pattern in [-104, 88.7] (both signs), then a dense sweep of [-20, 20].
  for (std::uint32_t bits = 0; bits < 0x7f800000u; bits += 1u << 10) {
    const float positive = std::bit_cast<float>(bits);
    if (positive <= 88.7f) check(positive);
    if (positive <= 104.0f) check(-positive);
  }
  for (float x = -20.0f; x <= 20.0f; x += 1.0f / 4096)
    check(x);
  INFO("worst " << worst << " ulp at x = " << worst_at);
  CHECK(worst <= 1.0);
}

TEST_CASE("vexp(float) special values: overflow, underflow, NaN, signed zero", "[cpu][math]") {
  constexpr float inf = std::numeric_limits<float>::infinity();
  CHECK(vexp(0.0f) == 1.0f);
  CHECK(vexp(-0.0f) == 1.0f);
  CHECK(vexp(89.0f) == inf);
  CHECK(vexp(1e30f) == inf);
  CHECK(vexp(inf) == inf);
  CHECK(vexp(-105.0f) == 0.0f);
  CHECK(vexp(-1e30f) == 0.0f);
  CHECK(vexp(-inf) == 0.0f);
  CHECK(std::isnan(vexp(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isnan(vexp(-std::numeric_limits<float>::quiet_NaN())));
  // Results in the subnormal range are rounded once, not flushed.
  CHECK(vexp(-100.0f) > 0.0f);
  CHECK(ulp_error(vexp(-100.0f), std::exp(-100.0)) <= 1.0);
}

TEST_CASE("vsigmoid(float) matches the double sigmoid and saturates without NaN", "[cpu][math]") {
  double worst = 0;
  for (float x = -30.0f; x <= 30.0f; x += 1.0f / 512) {
    const double reference = 1.0 / (1.0 + std::exp(-static_cast<double>(x)));
    worst = std::max(worst, ulp_error(vsigmoid(x), reference));
  }
  INFO("worst " << worst << " ulp");
  CHECK(worst <= 3.0);  // vexp's 1 ulp, then one add and one divide (and a multiply for x < 0)
  CHECK(vsigmoid(std::numeric_limits<float>::infinity()) == 1.0f);
  CHECK(vsigmoid(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(vsigmoid(-200.0f) == 0.0f);
  CHECK(vsigmoid(200.0f) == 1.0f);
  CHECK(vsigmoid(0.0f) == 0.5f);
}

TEST_CASE("row_max(float) is the largest element, negative values and infinities included",
          "[cpu][math]") {
  const std::vector<float> negative{-3.0f, -0.5f, -7.0f, -0.25f, -1e30f};
  CHECK(row_max(negative.data(), 5) == -0.25f);
  const std::vector<float> mixed{-0.0f, 0.0f, -1.0f};
  CHECK(row_max(mixed.data(), 3) == 0.0f);
  const std::vector<float> infinite{1.0f, -std::numeric_limits<float>::infinity(),
                                    std::numeric_limits<float>::infinity(), 2.0f};
  CHECK(row_max(infinite.data(), 4) == std::numeric_limits<float>::infinity());
  const float single = -42.0f;
  CHECK(row_max(&single, 1) == -42.0f);
  std::vector<float> long_row(1031);
  for (std::size_t i = 0; i < long_row.size(); ++i)
    long_row[i] = -static_cast<float>((i * 7919) % 1031) / 3.0f;
  long_row[517] = 5.5f;
  CHECK(row_max(long_row.data(), static_cast<std::int64_t>(long_row.size())) == 5.5f);
}

// fill_uniform (the synthetic runs' weights): the moments of a uniform distribution on
// [-b, b) (mean 0, variance b^2 / 3, no value outside), seeds that differ give other values, the
// same seed the same ones, and the CPU backends agree (fp32 exactly, bf16 within one rounding).
TEST_CASE("fill_uniform draws uniform values from a seed", "[cpu][random]") {
  constexpr std::int64_t n = 200000;
  constexpr float bound = 0.5f;
  kept::Cpu cpu;
  std::vector<float> a(n), b(n), c(n);
  cpu.fill_uniform(a.data(), n, 42, bound);
  cpu.fill_uniform(b.data(), n, 42, bound);
  cpu.fill_uniform(c.data(), n, 43, bound);
  CHECK(a == b);
  std::int64_t same = 0;
  double sum = 0, squares = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    REQUIRE(a[i] >= -bound);
    REQUIRE(a[i] < bound);
    same += a[i] == c[i];
    sum += a[i];
    squares += static_cast<double>(a[i]) * a[i];
  }
  CHECK(same < 10);
  const double variance = bound * bound / 3.0;
  // The mean of n draws has standard deviation sqrt(variance / n); 5 sigma.
  CHECK(std::abs(sum / n) < 5 * std::sqrt(variance / n));
  // The sample second moment: its standard deviation is sqrt((E x^4 - var^2) / n), E x^4 = b^4/5.
  const double fourth = std::pow(bound, 4) / 5.0;
  CHECK(std::abs(squares / n - variance) < 5 * std::sqrt((fourth - variance * variance) / n));

  kept::CpuBf16 bf16;
  std::vector<kept::bf16> rounded(n);
  bf16.fill_uniform(rounded.data(), n, 42, bound);
  for (std::int64_t i = 0; i < n; i += 997)
    CHECK(kept::to_float(rounded[i]) == kept::to_float(kept::to_bf16(a[i])));
}
