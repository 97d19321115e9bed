// tests/support/layer_harness.hpp: helpers shared by the layer, model and XKD tests.
#pragma once

#include <catch2/catch.hpp>

#include <vector>

#include "kept/core/random.hpp"
#include "kept/layers/parameter.hpp"
#include "kept/model/config.hpp"
#include "support/gradcheck.hpp"

namespace kept::test {

template <class Module>
std::vector<Parameter*> parameters_of(Module& module) {
  std::vector<Parameter*> result;
  module.visit([&](Parameter& p) { result.push_back(&p); });
  return result;
}

// Gives every parameter of `module` a fresh zero gradient.
template <class Module, class Backend>
void zero_gradients(Module& module, Backend& backend) {
  module.visit(
      [&](Parameter& p) { p.grad = backend.zeros(Backend::Precision::grad, p.value.shape()); });
}

// Non-trivial random values: norm weights around 1, everything else around 0. HF-style
// initial values (ones and zeros) would hide bugs in norm and bias gradients.
template <class Module>
void randomize(Module& module, Random& random, double scale = 0.3) {
  module.visit([&](Parameter& p) {
    const bool norm_weight = p.role == ParamRole::NormWeight;
    p.value = random_tensor<double>(p.value.shape(), random, scale, norm_weight ? 1.0 : 0.0)
                  .to(p.value.dtype());
  });
}

// A decoder small enough for finite differences in float64: vocabulary 37, hidden size 12 (3
// heads of 4), intermediate size 20, 2 layers.
inline ModelConfig tiny_decoder_config(Architecture architecture, bool attention_bias = false,
                                       bool mlp_bias = false) {
  ModelConfig config = ModelConfig::decoder(architecture, 37, 12, 20, 2, 3);
  config.rope_theta = 1e4;
  config.norm_eps = 1e-5;
  config.attention_bias = attention_bias;
  config.mlp_bias = mlp_bias;
  return config;
}

}  // namespace kept::test
