// kept/model/parameter_specs.hpp: the names, shapes and roles of a decoder's parameters,
// without allocating them.
//
// The decoder's constructor is the one place that knows which tensors a config implies; the
// planners (the converter, the checkpoint validator, parameter counting) get that list by
// building the decoder over MetaBackend, whose tensors carry a shape and no storage, so a 14B
// model is planned in microseconds and no memory.
#pragma once

#include <string>
#include <vector>

#include "kept/backend/backend.hpp"
#include "kept/core/rope_table.hpp"
#include "kept/core/tensor.hpp"
#include "kept/layers/parameter.hpp"
#include "kept/model/config.hpp"
#include "kept/model/decoder.hpp"

namespace kept {

struct MetaBackend : UsesPrecision<Precision<float, float, float, float, float>> {
  using RopeTable = kept::RopeTable<float>;
  Tensor zeros(DType dtype, const Shape& shape) { return Tensor::meta(dtype, shape); }
};

struct ParameterSpec {
  std::string name;
  Shape shape;
  ParamRole role = ParamRole::Weight;
};

// Every parameter the config implies, in checkpoint order (embedding, layers, norm, head).
inline std::vector<ParameterSpec> parameter_specs(const ModelConfig& config) {
  std::vector<ParameterSpec> specs;
  MetaBackend meta;
  auto collect = [&](auto& model) {
    model.visit_parameters([&](Parameter& p) {
      specs.push_back({p.name, p.value.shape(), p.role});
    });
  };
  if (config.norm_kind() == NormKind::LayerNorm) {
    Decoder<LayerNorm, MetaBackend> model(meta, config);
    collect(model);
  } else {
    Decoder<RMSNorm, MetaBackend> model(meta, config);
    collect(model);
  }
  return specs;
}

}  // namespace kept
