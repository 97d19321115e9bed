// kept/layers/parameter.hpp: a named, trainable tensor and its gradient.
//
// Parameters carry their HF checkpoint name ("model.layers.3.self_attn.q_proj.weight"), so the
// loader, the writer, the optimizer and the error messages all speak the checkpoint's language.
// The role drives defaults such as "no weight decay on norms and biases".
#pragma once

#include <string>

#include "kept/core/tensor.hpp"

namespace kept {

enum class ParamRole { Weight, Bias, NormWeight, NormBias, Embedding };

struct Parameter {
  std::string name;
  Tensor value;  // in the backend's dtype and memory space
  Tensor grad;   // same shape; allocated by Decoder::zero_grad when training
  ParamRole role = ParamRole::Weight;
  bool trainable = true;

  bool has_grad() const { return trainable && grad.defined(); }
  // The gradient's data, or null when the parameter is frozen (kernels skip null outputs).
  template <class T>
  T* grad_data() {
    return has_grad() ? grad.data<T>() : nullptr;
  }
};

}  // namespace kept
