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
  using Scalar = typename Backend::Scalar;

  Linear() = default;
  Linear(Backend& backend, std::string name, std::int64_t in_features, std::int64_t out_features,
         bool with_bias)
      : in_features_(in_features), out_features_(out_features), has_bias_(with_bias) {
    weight.name = name + ".weight";
    weight.value = backend.zeros({out_features, in_features});
    weight.role = ParamRole::Weight;
    if (with_bias) {
      bias.name = name + ".bias";
      bias.value = backend.zeros({out_features});
      bias.role = ParamRole::Bias;
    }
  }

  std::int64_t in_features() const { return in_features_; }
  std::int64_t out_features() const { return out_features_; }
  bool has_bias() const { return has_bias_; }

  void forward(Backend& backend, MatrixView<const Scalar> x, MatrixView<Scalar> y) const {
    backend.gemm(x, Transpose::No, weight_view(), Transpose::Yes, y);
    if (has_bias()) backend.add_bias(y, bias.value.template data<Scalar>());
  }

  void backward(Backend& backend, MatrixView<const Scalar> x, MatrixView<const Scalar> dy,
                MatrixView<Scalar>* dx) {
    if (dx)
      backend.gemm(dy, Transpose::No, weight_view(), Transpose::No, *dx, Scalar(1), Scalar(1));
    if (weight.has_grad())
      backend.gemm(
          dy, Transpose::Yes, x, Transpose::No,
          MatrixView<Scalar>(weight.grad.template data<Scalar>(), out_features_, in_features_),
          Scalar(1), Scalar(1));
    if (has_bias() && bias.has_grad()) backend.bias_backward(dy, bias.grad.template data<Scalar>());
  }

  template <class Visitor>
  void visit(Visitor&& visitor) {
    visitor(weight);
    if (has_bias()) visitor(bias);
  }

  Parameter weight;
  Parameter bias;

 private:
  MatrixView<const Scalar> weight_view() const {
    return MatrixView<const Scalar>(weight.value.template data<Scalar>(), out_features_,
                                    in_features_);
  }
  std::int64_t in_features_ = 0;
  std::int64_t out_features_ = 0;
  bool has_bias_ = false;
};

}  // namespace kept
