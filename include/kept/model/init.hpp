// kept/model/init.hpp: random initialisation of a decoder.
//
// Matches the HF convention for these models: linear and embedding weights ~ N(0, std)
// (initializer_range, 0.02 by default), biases 0, norm weights 1 and norm biases 0. Each
// parameter draws from its own stream seeded by (seed, name), so adding a layer or changing
// visit order leaves the other parameters' values unchanged.
#pragma once

#include <cstdint>

#include "kept/core/random.hpp"
#include "kept/layers/parameter.hpp"

namespace kept {

struct InitOptions {
  std::uint64_t seed = 0;
  double std = 0.02;
};

namespace detail {
template <class T>
void init_values(T* values, std::int64_t count, const Parameter& parameter,
                 const InitOptions& options) {
  switch (parameter.role) {
    case ParamRole::Weight:
    case ParamRole::Embedding: {
      Random random(Random::derive(options.seed, parameter.name));
      // Drawn in double and rounded once, so fp32 and fp64 models start from the same values.
      for (std::int64_t i = 0; i < count; ++i)
        values[i] = static_cast<T>(static_cast<float>(options.std * random.normal()));
      break;
    }
    case ParamRole::NormWeight:
      for (std::int64_t i = 0; i < count; ++i)
        values[i] = T(1);
      break;
    case ParamRole::Bias:
    case ParamRole::NormBias:
      for (std::int64_t i = 0; i < count; ++i)
        values[i] = T(0);
      break;
  }
}
}  // namespace detail

// The values are drawn on the host (in double, rounded once to fp32) and uploaded, so every
// backend starts from the same numbers: fp32 and float64 models exactly, bf16 ones rounded.
template <class Backend>
void init_parameter(Backend& backend, Parameter& parameter, const InitOptions& options) {
  Tensor host = Tensor::empty(DType::F64, parameter.value.shape());
  detail::init_values(host.data<double>(), host.numel(), parameter, options);
  backend.upload(host, parameter.value);
}

template <class Backend, class Model>
void init_parameters(Backend& backend, Model& model, const InitOptions& options) {
  model.visit_parameters(
      [&](Parameter& parameter) { init_parameter(backend, parameter, options); });
}

}  // namespace kept
