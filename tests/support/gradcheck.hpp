// tests/support/gradcheck.hpp: finite-difference checks of analytic gradients, in float64.
//
// Layers run on the Cpu64 backend for these checks: in float64 a central difference with a
// step of 1e-5 (relative) has truncation error ~1e-10 and rounding error ~1e-11, so analytic
// and numeric derivatives must agree to ~1e-6, a bar no plausible bug passes. The fp32
// backend is then compared against the float64 one (same parameters) by the callers.
//
// The loss is a fixed random projection of the outputs, L = sum(out * R). Each tensor is
// checked along random unit directions u, (L(x + h u) - L(x - h u)) / 2h against <dL/dx, u>,
// which covers the whole tensor at once, and at single coordinates picked among the largest
// gradients, so a wrong entry cannot hide in the sum.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kept/core/random.hpp"
#include "kept/core/tensor.hpp"

namespace kept::test {

template <class T = double>
Tensor random_tensor(const Shape& shape, Random& random, double scale = 1.0, double offset = 0.0) {
  Tensor tensor = Tensor::empty(dtype_of_v<T>, shape);
  for (T& value : tensor.span<T>())
    value = static_cast<T>(offset + scale * random.normal());
  return tensor;
}

inline double element(const Tensor& t, std::int64_t i) {
  return t.dtype() == DType::F64 ? t.data<double>()[i] : t.data<float>()[i];
}

// sum(a * b) in double for F32 or F64 tensors.
inline double dot(const Tensor& a, const Tensor& b) {
  REQUIRE(a.numel() == b.numel());
  double sum = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i)
    sum += element(a, i) * element(b, i);
  return sum;
}

// max |a - b| / max(|b|, floor): how far `a` is from the reference `b`, relative to its scale.
inline double relative_max_error(const Tensor& a, const Tensor& b, double floor = 1e-30) {
  REQUIRE(a.numel() == b.numel());
  double worst = 0, largest = floor;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    worst = std::max(worst, std::fabs(element(a, i) - element(b, i)));
    largest = std::max(largest, std::fabs(element(b, i)));
  }
  return worst / largest;
}

struct GradCheckOptions {
  int directions = 3;
  int coordinates = 3;
  double step = 1e-5;       // relative to the tensor's RMS
  double tolerance = 1e-6;  // relative to max(|analytic|, |numeric|, floor)
  double absolute_floor = 1e-8;
};

// Checks `gradient` = dL/d`tensor` (both F64), where `loss()` re-evaluates L with the
// tensor's current values. The tensor is restored afterwards.
inline void check_gradient(const std::string& label, Tensor& tensor, const Tensor& gradient,
                           const std::function<double()>& loss, Random& random,
                           const GradCheckOptions& options = {}) {
  INFO("gradient of " << label);
  REQUIRE(gradient.defined());
  REQUIRE(gradient.shape() == tensor.shape());
  auto values = tensor.span<double>();
  auto grad = gradient.span<const double>();
  double rms = 0;
  for (double v : values)
    rms += v * v;
  rms = std::sqrt(rms / static_cast<double>(std::max<std::size_t>(values.size(), 1)));
  const double h = options.step * (rms > 1e-3 ? rms : 1.0);
  const std::vector<double> saved(values.begin(), values.end());

  auto check_direction = [&](const std::vector<double>& direction, const std::string& what) {
    double analytic = 0;
    for (std::size_t i = 0; i < values.size(); ++i) {
      values[i] = saved[i] + h * direction[i];
      analytic += grad[i] * direction[i];
    }
    const double plus = loss();
    for (std::size_t i = 0; i < values.size(); ++i)
      values[i] = saved[i] - h * direction[i];
    const double minus = loss();
    std::copy(saved.begin(), saved.end(), values.begin());
    const double numeric = (plus - minus) / (2 * h);
    const double scale =
        std::max({std::fabs(analytic), std::fabs(numeric), options.absolute_floor});
    INFO(what << ": analytic " << analytic << ", finite difference " << numeric);
    CHECK(std::fabs(analytic - numeric) <= options.tolerance * scale);
  };

  for (int d = 0; d < options.directions; ++d) {
    std::vector<double> direction(values.size());
    double norm = 0;
    for (double& u : direction) {
      u = random.normal();
      norm += u * u;
    }
    for (double& u : direction)
      u /= std::sqrt(norm);
    check_direction(direction, "direction " + std::to_string(d));
  }
  for (int c = 0; c < options.coordinates && !values.empty(); ++c) {
    std::size_t best = random.below(values.size());
    for (int probe = 0; probe < 16; ++probe) {
      const std::size_t candidate = random.below(values.size());
      if (std::fabs(grad[candidate]) > std::fabs(grad[best])) best = candidate;
    }
    std::vector<double> direction(values.size(), 0.0);
    direction[best] = 1.0;
    check_direction(direction, "coordinate " + std::to_string(best));
  }
}

}  // namespace kept::test
