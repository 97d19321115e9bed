// tests/ops/op_cases.hpp: the op registry: every op of the backend contract
// (kept/backend/backend.hpp) as cases with shapes (odd sizes included), inputs, an a-priori error
// bound for fp32 against the float64 reference, and, for differentiable ops, the forward/backward
// pair that tests/ops/kept_ops.cpp checks by finite differences in float64.
//
// Error bounds. Inputs are drawn in float64 and rounded to fp32 before either backend sees them,
// so both compute on identical values and the difference is the fp32 arithmetic alone. With
// u = 2^-24 and gamma(n) = n u / (1 - n u), the standard forward-error bound of a sum or dot
// product of n terms is gamma(n) * (the same sum of absolute values). Each case states, per output
// element, that absolute-value magnitude M_i and the reduction length n, and the check is
//   |y32_i - y64_i| <= c * gamma(n) * M_i + 2 u |y64_i|
// (2u|y|: the final rounding of the stored output and of the fp32 copy of an accumulated output).
// c is 4 everywhere except where a comment derives more: it covers the few extra roundings of
// scale factors (rstd, 1/sum, the vectorised exp within 1 ulp) on top of the sums. The derivations,
// op by op, are next to each case.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/core/random.hpp"

namespace kept::ops {

using Buffers = std::vector<std::vector<double>>;

inline constexpr double kUnit = 0x1p-24;
inline double gamma(double n) {
  return n * kUnit / (1.0 - n * kUnit);
}

// Runs an op on one backend: inputs (read-only) and outputs (pre-filled, since some ops
// accumulate) as that backend's scalars.
template <class T>
using Runner =
    std::function<void(CpuBackend<T>&, const std::vector<const T*>&, const std::vector<T*>&)>;

struct OpCase {
  std::string op;      // the contract's name, e.g. "layernorm_backward"
  std::string params;  // shapes, e.g. "rows=7 cols=33"
  std::vector<std::string> input_names, output_names;
  // Inputs and initial outputs (float64 values that are exactly fp32), from a seed.
  std::function<void(Random&, Buffers& inputs, Buffers& outputs)> generate;
  Runner<float> run32;
  Runner<double> run64;
  // Per output, per element: the allowed |fp32 - float64| given the float64 run.
  std::function<Buffers(const Buffers& inputs, const Buffers& initial, const Buffers& reference)>
      bound;
  std::string name() const { return op + "[" + params + "]"; }
};

// A differentiable op for --grad: y = f(x) in float64, and its backward: given dy, the
// gradients of the differentiable inputs (accumulated into zeroed buffers). Outputs whose
// cotangent is not meaningful (saved statistics) are listed in `statistics` and get dy = 0.
struct GradCase {
  std::string op, params;
  std::vector<std::string> input_names;
  std::vector<int> differentiable;  // indices into the inputs
  std::vector<int> statistics;      // output indices excluded from the loss
  std::function<void(Random&, Buffers& inputs)> generate;
  std::function<Buffers(Cpu64&, const Buffers& inputs)> forward;
  std::function<Buffers(Cpu64&, const Buffers& inputs, const Buffers& outputs,
                        const Buffers& d_outputs)>
      backward;  // returns one gradient per differentiable input
  std::string name() const { return op + "[" + params + "]"; }
};

// ---- helpers -------------------------------------------------------------------------------

inline double fp32(double x) {
  return static_cast<double>(static_cast<float>(x));
}

inline std::vector<double> draw(Random& random, std::int64_t count, double scale,
                                double mean = 0.0) {
  std::vector<double> values(static_cast<std::size_t>(count));
  for (double& v : values)
    v = fp32(mean + scale * random.normal());
  return values;
}

template <class T>
std::vector<T> as(const std::vector<double>& values) {
  return std::vector<T>(values.begin(), values.end());
}

inline std::string shape_text(std::initializer_list<std::pair<const char*, std::int64_t>> items) {
  std::string text;
  for (const auto& [key, value] : items) {
    if (!text.empty()) text.push_back(' ');
    text.append(key).push_back('=');
    text.append(std::to_string(value));
  }
  return text;
}

// Elementwise |a| + |b| style magnitudes.
inline std::vector<double> abs_sum(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> out(a.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    out[i] = std::abs(a[i]) + std::abs(b[i]);
  return out;
}

inline std::vector<double> scaled_bound(const std::vector<double>& magnitude, double n,
                                        const std::vector<double>& reference, double c = 4.0) {
  std::vector<double> out(magnitude.size());
  for (std::size_t i = 0; i < out.size(); ++i)
    out[i] = c * gamma(n) * magnitude[i] + 2 * kUnit * std::abs(reference[i]);
  return out;
}

}  // namespace kept::ops
