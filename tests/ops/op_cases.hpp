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
//
// CpuBf16 (kept/backend/cpu_bf16.hpp) runs every case too. Each buffer has the role its name
// gives it in the precision policy (role_of below: weights and tables are Param, parameter
// gradients Grad, mean/rstd/lse Stat, everything else Activation), so its Activation and Param
// buffers are bf16 and the rest fp32. Those bf16 inputs and initial outputs are rounded first and
// the float64 reference runs on the rounded values; CpuBf16 then computes in fp32 and rounds each
// bf16 output once, so its bound is the fp32 bound plus one bf16 rounding, u_bf16 = 2^-8:
//   |ybf16_i - y64_i| <= b32_i + u_bf16 (|y64_i| + b32_i)          (bf16 outputs)
//   |ybf16_i - y64_i| <= b32_i                                     (fp32 outputs)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/backend/cpu_bf16.hpp"
#include "kept/core/random.hpp"

// The CUDA backend joins the registry where it is compiled: the host-emulation build (g++,
// KEPT_CUDA_EMULATION) and the nvcc build of kept_ops for a GPU (kept_ops_cuda, KEPT_OPS_CUDA;
// every one of its sources is compiled by nvcc, so all see the same OpCase).
#if defined(KEPT_CUDA_EMULATION) || defined(KEPT_OPS_CUDA)
#define KEPT_OPS_WITH_CUDA 1
#include "kept/backend/cuda/backend.cuh"
#endif

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

// A buffer of the bf16 run: a pointer whose element type is the one its role gives it; it
// converts to exactly that pointer type and refuses any other (naming both dtypes).
template <bool kConst>
struct Slot {
  using Void = std::conditional_t<kConst, const void, void>;
  Void* data = nullptr;
  DType dtype = DType::F32;
  template <class T>
  requires(kConst || !std::is_const_v<T>) operator T*() const {
    KEPT_CHECK(dtype_of_v<std::remove_const_t<T>> == dtype, "op registry: a ", dtype_name(dtype),
               " buffer used as ", dtype_name(dtype_of_v<std::remove_const_t<T>>));
    return static_cast<T*>(data);
  }
};
using RunnerBf16 =
    std::function<void(CpuBf16&, const std::vector<Slot<true>>&, const std::vector<Slot<false>>&)>;
#if defined(KEPT_OPS_WITH_CUDA)
// The same slots, pointing into device memory.
using RunnerCuda = std::function<void(cuda::CudaBackend&, const std::vector<Slot<true>>&,
                                      const std::vector<Slot<false>>&)>;
#endif

enum class Role { Activation, Param, Grad, Stat };
// The role of a buffer, from its name (the registry's names follow the contract's parameters).
inline Role role_of(const std::string& op, const std::string& name) {
  if (name == "weight" || name == "bias" || name == "table" || (op == "gemm" && name == "b"))
    return Role::Param;
  if (name == "dweight" || name == "dbias" || name == "d_bias" || name == "d_table")
    return Role::Grad;
  if (name == "mean" || name == "rstd" || name == "lse") return Role::Stat;
  return Role::Activation;
}
inline bool stored_bf16(Role role) {
  return role == Role::Activation || role == Role::Param;
}
inline constexpr double kBf16Unit = 0x1p-8;
inline double round_bf16(double x) {
  return static_cast<double>(to_float(to_bf16(static_cast<float>(x))));
}

struct OpCase {
  std::string op;      // the contract's name, e.g. "layernorm_backward"
  std::string params;  // shapes, e.g. "rows=7 cols=33"
  std::vector<std::string> input_names, output_names;
  // Inputs and initial outputs (float64 values that are exactly fp32), from a seed.
  std::function<void(Random&, Buffers& inputs, Buffers& outputs)> generate;
  Runner<float> run32;
  Runner<double> run64;
  RunnerBf16 run_bf16{};
#if defined(KEPT_OPS_WITH_CUDA)
  RunnerCuda run_cuda{};
#endif
  // Per output, per element: the allowed |fp32 - float64| given the float64 run.
  std::function<Buffers(const Buffers& inputs, const Buffers& initial, const Buffers& reference)>
      bound{};
  std::string name() const {
    return op + "[" + params + "]";
  }
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
