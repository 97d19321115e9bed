// kept/layers/linear.hpp: y = x W^T + b, the projection every layer is built from.
//
// W is [out_features, in_features] (the HF / torch.nn.Linear layout, so checkpoint tensors
// are used as stored), x is [rows, in_features], b is optional.
// Backward: dx += dy W,  dW += dy^T x,  db += sum_rows dy.
// dx accumulates because a normed activation feeds q, k and v (or gate and up) at once.
#pragma once

#include <cstdint>
#include <string>

#include "kept/core/tensor.hpp"
#include "kept/layers/parameter.hpp"

namespace kept {

template <class Backend>
class Linear {
 public:
  using Act = typename Backend::Activation;
  using Param = typename Backend::Param;
  using Grad = typename Backend::Grad;
  using Stat = typename Backend::Stat;

  Linear() = default;
  Linear(Backend& backend, std::string name, std::int64_t in_features, std::int64_t out_features,
         bool with_bias)
      : in_features_(in_features), out_features_(out_features), has_bias_(with_bias) {
    weight.name = name + ".weight";
    weight.value = backend.zeros(Backend::Precision::param, {out_features, in_features});
    weight.role = ParamRole::Weight;
    if (with_bias) {
      bias.name = name + ".bias";
      bias.value = backend.zeros(Backend::Precision::param, {out_features});
      bias.role = ParamRole::Bias;
    }
  }

  std::int64_t in_features() const { return in_features_; }
  std::int64_t out_features() const { return out_features_; }
  bool has_bias() const { return has_bias_; }

  // y is Activation, or Stat for logits.
  template <class Out>
  void forward(Backend& backend, MatrixView<const Act> x, MatrixView<Out> y) const {
    backend.gemm(x, Transpose::No, weight_view(), Transpose::Yes, y, Stat(1), Stat(0));
    if (has_bias()) backend.add_bias(y, bias.value.template data<Param>());
  }

  void backward(Backend& backend, MatrixView<const Act> x, MatrixView<const Act> dy,
                MatrixView<Act>* dx) {
    if (dx) backend.gemm(dy, Transpose::No, weight_view(), Transpose::No, *dx, Stat(1), Stat(1));
    if (weight.has_grad())
      backend.gemm(dy, Transpose::Yes, x, Transpose::No,
                   MatrixView<Grad>(weight.grad.template data<Grad>(), out_features_, in_features_),
                   Stat(1), Stat(1));
    if (has_bias() && bias.has_grad()) backend.bias_backward(dy, bias.grad.template data<Grad>());
  }

  template <class Visitor>
  void visit(Visitor&& visitor) {
    visitor(weight);
    if (has_bias()) visitor(bias);
  }

  Parameter weight;
  Parameter bias;

 private:
  MatrixView<const Param> weight_view() const {
    return MatrixView<const Param>(weight.value.template data<Param>(), out_features_,
                                   in_features_);
  }
  std::int64_t in_features_ = 0;
  std::int64_t out_features_ = 0;
  bool has_bias_ = false;
};

}  // namespace kept
