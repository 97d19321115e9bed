// tests/support/layer_harness.hpp: helpers shared by the layer and model tests.
#pragma once

#include <catch2/catch.hpp>

#include <vector>

#include "kept/core/random.hpp"
#include "kept/layers/parameter.hpp"
#include "support/gradcheck.hpp"

namespace kept::test {

template <class Module>
std::vector<Parameter*> parameters_of(Module& module) {
  std::vector<Parameter*> result;
  module.visit([&](Parameter& p) { result.push_back(&p); });
  return result;
}

// Copies parameter values from `source` to `target` (same structure), converting the dtype:
// builds the fp32 twin of a float64 module.
template <class Source, class Target>
void copy_parameters(Source& source, Target& target) {
  auto from = parameters_of(source);
  auto to = parameters_of(target);
  REQUIRE(from.size() == to.size());
  for (std::size_t i = 0; i < from.size(); ++i) {
    REQUIRE(from[i]->name == to[i]->name);
    to[i]->value = from[i]->value.to(to[i]->value.dtype());
  }
}

// Gives every parameter of `module` a fresh zero gradient.
template <class Module, class Backend>
void zero_gradients(Module& module, Backend& backend) {
  module.visit([&](Parameter& p) { p.grad = backend.zeros(p.value.shape()); });
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

}  // namespace kept::test
