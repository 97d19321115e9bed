// kept/layers/norm.hpp: Norm<LayerNorm> and Norm<RMSNorm>, the layers KEPT's OPM converts between.
//
//   LayerNorm: y = (x - mean(x)) / sqrt(var(x) + eps) * g + b     (weight g, bias b)
//   RMSNorm:   y = x / sqrt(mean(x^2) + eps) * w                  (weight w, no bias)
// over the last axis of x [tokens, hidden]. The kernels and their backward formulas are in
// backend/cpu/norm.hpp (CPU reference) and backend/cuda/{layernorm,rmsnorm}.cuh.
// The cache keeps the per-token (mean, rstd), not the normalised activations: backward
// recomputes x_hat from the layer input, which the caller keeps anyway (it is the residual
// stream).
#pragma once

#include <cstdint>
#include <string>

#include "kept/core/tensor.hpp"
#include "kept/layers/parameter.hpp"

namespace kept {

struct LayerNorm {};
struct RMSNorm {};

template <class Kind, class Backend>
class Norm {
  static constexpr bool kLayerNorm = std::is_same_v<Kind, LayerNorm>;
  static_assert(kLayerNorm || std::is_same_v<Kind, RMSNorm>, "Norm<LayerNorm> or Norm<RMSNorm>");

 public:
  using Act = typename Backend::Activation;
  using Param = typename Backend::Param;
  using Grad = typename Backend::Grad;
  using Stat = typename Backend::Stat;

  struct Cache {
    Tensor mean;  // [tokens], LayerNorm only
    Tensor rstd;  // [tokens]
  };

  Norm() = default;
  Norm(Backend& backend, std::string name, std::int64_t dim, double eps) : dim_(dim), eps_(eps) {
    weight.name = name + ".weight";
    weight.value = backend.zeros(Backend::Precision::param, {dim});
    weight.role = ParamRole::NormWeight;
    if constexpr (kLayerNorm) {
      bias.name = name + ".bias";
      bias.value = backend.zeros(Backend::Precision::param, {dim});
      bias.role = ParamRole::NormBias;
    }
  }

  std::int64_t dim() const { return dim_; }
  double eps() const { return eps_; }

  void forward(Backend& backend, MatrixView<const Act> x, MatrixView<Act> y, Cache& cache) const {
    check(x);
    backend.ensure(cache.rstd, Backend::Precision::stat, {x.rows});
    if constexpr (kLayerNorm) {
      backend.ensure(cache.mean, Backend::Precision::stat, {x.rows});
      backend.layernorm_forward(x.data, weight.value.template data<Param>(),
                                bias.value.template data<Param>(), y.data,
                                cache.mean.template data<Stat>(), cache.rstd.template data<Stat>(),
                                x.rows, dim_, static_cast<Stat>(eps_));
    } else {
      backend.rmsnorm_forward(x.data, weight.value.template data<Param>(), y.data,
                              cache.rstd.template data<Stat>(), x.rows, dim_,
                              static_cast<Stat>(eps_));
    }
  }

  // dx += dNorm/dx . dy, and the parameter gradients accumulate.
  void backward(Backend& backend, MatrixView<const Act> x, MatrixView<const Act> dy,
                MatrixView<Act> dx, const Cache& cache) {
    check(x);
    if constexpr (kLayerNorm) {
      backend.layernorm_backward(dy.data, x.data, weight.value.template data<Param>(),
                                 cache.mean.template data<Stat>(), cache.rstd.template data<Stat>(),
                                 dx.data, weight.template grad_data<Grad>(),
                                 bias.template grad_data<Grad>(), x.rows, dim_);
    } else {
      backend.rmsnorm_backward(dy.data, x.data, weight.value.template data<Param>(),
                               cache.rstd.template data<Stat>(), dx.data,
                               weight.template grad_data<Grad>(), x.rows, dim_);
    }
  }

  template <class Visitor>
  void visit(Visitor&& visitor) {
    visitor(weight);
    if constexpr (kLayerNorm) visitor(bias);
  }

  Parameter weight;
  Parameter bias;  // LayerNorm only

 private:
  void check(MatrixView<const Act> x) const {
    KEPT_CHECK(x.cols == dim_ && x.contiguous(), weight.name, ": input has ", x.cols,
               " features, the norm has ", dim_);
  }
  std::int64_t dim_ = 0;
  double eps_ = 0.0;
};

}  // namespace kept
