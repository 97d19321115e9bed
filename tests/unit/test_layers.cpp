// Layers on the CPU backend. For each layer:
//   1. the float64 forward (Cpu64) against loops written from the definitions;
//   2. the float64 backward against finite differences (support/gradcheck.hpp), through the
//      whole layer (projections, RoPE, the gate), and gradients that accumulate.
// The fp32 and bf16 backends' precision is checked op by op, against float64 and within bounds
// derived for each op, by the op registry (tests/ops/, kept_ops), which replaced the loose
// fp32-vs-float64 comparisons that used to end each case here.
#include <catch2/catch.hpp>

#include <cmath>
#include <tuple>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/layers/attention.hpp"
#include "kept/layers/linear.hpp"
#include "kept/layers/norm.hpp"
#include "kept/layers/swiglu.hpp"
#include "support/gradcheck.hpp"
#include "support/layer_harness.hpp"

using namespace kept;
using namespace kept::test;

namespace {

constexpr double kFloat64Tolerance = 1e-12;  // independent float64 loops vs the kernels

double max_relative_to_reference(const Tensor& actual, const std::vector<double>& reference) {
  double worst = 0, largest = 1e-30;
  for (std::int64_t i = 0; i < actual.numel(); ++i) {
    worst = std::max(worst, std::fabs(element(actual, i) - reference[static_cast<std::size_t>(i)]));
    largest = std::max(largest, std::fabs(reference[static_cast<std::size_t>(i)]));
  }
  return worst / largest;
}

std::vector<double> reference_norm(const Tensor& x, const Tensor& weight, const Tensor* bias,
                                   double eps, bool layer_norm) {
  const auto rows = x.dim(0), cols = x.dim(1);
  std::vector<double> out(static_cast<std::size_t>(rows * cols));
  for (std::int64_t r = 0; r < rows; ++r) {
    double mean = 0, squares = 0;
    for (std::int64_t c = 0; c < cols; ++c)
      mean += element(x, r * cols + c);
    mean = layer_norm ? mean / static_cast<double>(cols) : 0.0;
    for (std::int64_t c = 0; c < cols; ++c)
      squares += std::pow(element(x, r * cols + c) - mean, 2);
    const double inv = 1.0 / std::sqrt(squares / static_cast<double>(cols) + eps);
    for (std::int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = (element(x, r * cols + c) - mean) * inv * element(weight, c) +
                          (bias ? element(*bias, c) : 0.0);
  }
  return out;
}

std::vector<double> reference_linear(const Tensor& x, const Linear<Cpu64>& linear) {
  const std::int64_t rows = x.dim(0), in = linear.in_features(), out = linear.out_features();
  std::vector<double> y(static_cast<std::size_t>(rows * out));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t o = 0; o < out; ++o) {
      double sum = linear.has_bias() ? element(linear.bias.value, o) : 0.0;
      for (std::int64_t i = 0; i < in; ++i)
        sum += element(x, r * in + i) * element(linear.weight.value, o * in + i);
      y[r * out + o] = sum;
    }
  return y;
}

Tensor to_tensor(const std::vector<double>& values, const Shape& shape) {
  Tensor t = Tensor::empty(DType::F64, shape);
  std::copy(values.begin(), values.end(), t.data<double>());
  return t;
}

// Causal attention with rotate-half RoPE, from the definitions, on projected q, k, v.
std::vector<double> reference_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                        std::int64_t batch, std::int64_t seq, std::int64_t heads,
                                        double theta) {
  const std::int64_t hidden = q.dim(1), head_dim = hidden / heads, half = head_dim / 2;
  auto rotate = [&](const Tensor& t) {
    std::vector<double> out(static_cast<std::size_t>(t.numel()));
    for (std::int64_t token = 0; token < batch * seq; ++token)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t i = 0; i < half; ++i) {
          // The angle rounded to fp32 as transformers forms it (see backend/cpu/rope.hpp).
          const float inv_freq =
              1.0f / std::pow(static_cast<float>(theta),
                              static_cast<float>(2 * i) / static_cast<float>(head_dim));
          const double angle = static_cast<float>(token % seq) * inv_freq;
          const std::int64_t base = token * hidden + h * head_dim;
          const double a = element(t, base + i), b = element(t, base + i + half);
          out[base + i] = a * std::cos(angle) - b * std::sin(angle);
          out[base + i + half] = b * std::cos(angle) + a * std::sin(angle);
        }
    return out;
  };
  const auto qr = rotate(q), kr = rotate(k);
  std::vector<double> out(static_cast<std::size_t>(q.numel()), 0.0);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < seq; ++i) {
        std::vector<double> weights(static_cast<std::size_t>(i + 1));
        double max_score = -1e300, sum = 0;
        for (std::int64_t j = 0; j <= i; ++j) {
          double s = 0;
          for (std::int64_t d = 0; d < head_dim; ++d)
            s += qr[(b * seq + i) * hidden + h * head_dim + d] *
                 kr[(b * seq + j) * hidden + h * head_dim + d];
          weights[j] = s / std::sqrt(static_cast<double>(head_dim));
          max_score = std::max(max_score, weights[j]);
        }
        for (double& w : weights)
          sum += (w = std::exp(w - max_score));
        for (std::int64_t j = 0; j <= i; ++j)
          for (std::int64_t d = 0; d < head_dim; ++d)
            out[(b * seq + i) * hidden + h * head_dim + d] +=
                weights[j] / sum * element(v, (b * seq + j) * hidden + h * head_dim + d);
      }
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("Norm: forward, finite-difference gradients", "[layers][norm]", LayerNorm,
                   RMSNorm) {
  constexpr bool kLayerNorm = std::is_same_v<TestType, LayerNorm>;
  Cpu64 cpu64;
  const auto [rows, cols] = GENERATE(std::pair<std::int64_t, std::int64_t>{5, 8},
                                     std::pair<std::int64_t, std::int64_t>{7, 96},
                                     std::pair<std::int64_t, std::int64_t>{3, 517});
  Random random(static_cast<std::uint64_t>(rows * 1000 + cols));
  Norm<TestType, Cpu64> norm(cpu64, "norm", cols, 1e-5);
  randomize(norm, random);
  // A non-zero per-token mean, as real pre-norm activations have.
  Tensor x = random_tensor({rows, cols}, random, 2.0, 0.7);
  Tensor y = Tensor::empty(DType::F64, {rows, cols});
  typename Norm<TestType, Cpu64>::Cache cache;
  auto forward = [&] {
    norm.forward(cpu64, as_matrix<const double>(x), as_matrix<double>(y), cache);
  };
  forward();
  CHECK(max_relative_to_reference(
            y, reference_norm(x, norm.weight.value, kLayerNorm ? &norm.bias.value : nullptr, 1e-5,
                              kLayerNorm)) < kFloat64Tolerance);

  Tensor projection = random_tensor({rows, cols}, random);
  auto loss = [&] {
    forward();
    return dot(y, projection);
  };
  loss();
  zero_gradients(norm, cpu64);
  Tensor dx = Tensor::zeros(DType::F64, {rows, cols});
  norm.backward(cpu64, as_matrix<const double>(x), as_matrix<const double>(projection),
                as_matrix<double>(dx), cache);
  check_gradient("x", x, dx, loss, random);
  norm.visit([&](Parameter& p) { check_gradient(p.name, p.value, p.grad, loss, random); });

  // Gradients accumulate: a second backward doubles every one of them.
  const Tensor dx_once = dx.clone(), dweight_once = norm.weight.grad.clone();
  norm.backward(cpu64, as_matrix<const double>(x), as_matrix<const double>(projection),
                as_matrix<double>(dx), cache);
  for (std::int64_t i = 0; i < dx.numel(); ++i)
    REQUIRE(element(dx, i) == Approx(2 * element(dx_once, i)));
  for (std::int64_t i = 0; i < cols; ++i)
    REQUIRE(element(norm.weight.grad, i) == Approx(2 * element(dweight_once, i)));
  zero_gradients(norm, cpu64);
  dx = Tensor::zeros(DType::F64, {rows, cols});
  norm.backward(cpu64, as_matrix<const double>(x), as_matrix<const double>(projection),
                as_matrix<double>(dx), cache);
}

TEST_CASE("Linear: forward, finite-difference gradients", "[layers][linear]") {
  Cpu64 cpu64;
  Random random(3);
  const bool with_bias = GENERATE(false, true);
  Linear<Cpu64> linear(cpu64, "proj", 13, 7, with_bias);
  randomize(linear, random);
  Tensor x = random_tensor({9, 13}, random);
  Tensor y = Tensor::empty(DType::F64, {9, 7});
  Tensor projection = random_tensor({9, 7}, random);
  auto loss = [&] {
    linear.forward(cpu64, as_matrix<const double>(x), as_matrix<double>(y));
    return dot(y, projection);
  };
  loss();
  CHECK(max_relative_to_reference(y, reference_linear(x, linear)) < kFloat64Tolerance);
  zero_gradients(linear, cpu64);
  Tensor dx = Tensor::zeros(DType::F64, {9, 13});
  auto dx_view = as_matrix<double>(dx);
  linear.backward(cpu64, as_matrix<const double>(x), as_matrix<const double>(projection), &dx_view);
  check_gradient("x", x, dx, loss, random);
  linear.visit([&](Parameter& p) { check_gradient(p.name, p.value, p.grad, loss, random); });
}

TEST_CASE("Attention<MHA>: forward, finite-difference gradients", "[layers][attention]") {
  // seq 70 crosses the kernel's 64-row block; seq 7 does not fill one.
  const auto [batch, seq, heads, head_dim] =
      GENERATE(std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>{2, 7, 3, 4},
               std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t>{1, 70, 2, 8});
  const bool with_bias = GENERATE(false, true);
  const std::int64_t hidden = heads * head_dim, tokens = batch * seq;
  const double theta = 5e4;
  Cpu64 cpu64;
  Random random(static_cast<std::uint64_t>(seq * 31 + with_bias));
  Attention<MHA, Cpu64> attention(cpu64, "attn", hidden, heads, with_bias);
  randomize(attention, random, 0.4);
  Cpu64::RopeTable rope(head_dim, theta, seq);
  Tensor x = random_tensor({tokens, hidden}, random);
  Tensor y = Tensor::empty(DType::F64, {tokens, hidden});
  Attention<MHA, Cpu64>::Cache cache;
  auto forward = [&] {
    attention.forward(cpu64, as_matrix<const double>(x), batch, seq, rope, as_matrix<double>(y),
                      cache);
  };
  forward();
  const Shape shape{tokens, hidden};
  auto reference_o = reference_attention(to_tensor(reference_linear(x, attention.q_proj), shape),
                                         to_tensor(reference_linear(x, attention.k_proj), shape),
                                         to_tensor(reference_linear(x, attention.v_proj), shape),
                                         batch, seq, heads, theta);
  CHECK(max_relative_to_reference(cache.o, reference_o) < kFloat64Tolerance);
  CHECK(max_relative_to_reference(y, reference_linear(to_tensor(reference_o, shape),
                                                      attention.o_proj)) < kFloat64Tolerance);

  Tensor projection = random_tensor({tokens, hidden}, random);
  auto loss = [&] {
    forward();
    return dot(y, projection);
  };
  loss();
  zero_gradients(attention, cpu64);
  Tensor dx = Tensor::zeros(DType::F64, {tokens, hidden});
  Tensor scratch[4];
  attention.backward(cpu64, as_matrix<const double>(x), batch, seq, rope,
                     as_matrix<const double>(projection), as_matrix<double>(dx), cache, scratch);
  check_gradient("x", x, dx, loss, random);
  attention.visit([&](Parameter& p) { check_gradient(p.name, p.value, p.grad, loss, random); });
}

TEST_CASE("SwiGLU: forward, finite-difference gradients", "[layers][swiglu]") {
  Cpu64 cpu64;
  Random random(11);
  const bool with_bias = GENERATE(false, true);
  const std::int64_t tokens = 6, hidden = 10, intermediate = 23;
  SwiGLU<Cpu64> mlp(cpu64, "mlp", hidden, intermediate, with_bias);
  randomize(mlp, random, 0.4);
  Tensor x = random_tensor({tokens, hidden}, random);
  Tensor y = Tensor::empty(DType::F64, {tokens, hidden});
  SwiGLU<Cpu64>::Cache cache;
  auto forward = [&] {
    mlp.forward(cpu64, as_matrix<const double>(x), as_matrix<double>(y), cache);
  };
  forward();
  auto gate = reference_linear(x, mlp.gate_proj), up = reference_linear(x, mlp.up_proj);
  std::vector<double> product(gate.size());
  for (std::size_t i = 0; i < gate.size(); ++i)
    product[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
  CHECK(max_relative_to_reference(y, reference_linear(to_tensor(product, {tokens, intermediate}),
                                                      mlp.down_proj)) < kFloat64Tolerance);

  Tensor projection = random_tensor({tokens, hidden}, random);
  auto loss = [&] {
    forward();
    return dot(y, projection);
  };
  loss();
  zero_gradients(mlp, cpu64);
  Tensor dx = Tensor::zeros(DType::F64, {tokens, hidden});
  Tensor scratch[3];
  mlp.backward(cpu64, as_matrix<const double>(x), as_matrix<const double>(projection),
               as_matrix<double>(dx), cache, scratch);
  check_gradient("x", x, dx, loss, random);
  mlp.visit([&](Parameter& p) { check_gradient(p.name, p.value, p.grad, loss, random); });
}
