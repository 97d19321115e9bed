// kept/layers/swiglu.hpp: the SwiGLU MLP, y = down(silu(gate(x)) * up(x)).
//
// gate, up: hidden -> intermediate; down: intermediate -> hidden; biases on all three only for
// Llama with mlp_bias. The elementwise gate and its derivative are in backend/cpu/swiglu.hpp:
//   s = silu(g) * u;  dg = ds * u * silu'(g),  du = ds * silu(g).
#pragma once

#include <cstdint>
#include <string>

#include "kept/core/tensor.hpp"
#include "kept/layers/linear.hpp"

namespace kept {

template <class Backend>
class SwiGLU {
 public:
  using Act = typename Backend::Activation;
  static constexpr DType kAct = Backend::Precision::activation;

  struct Cache {
    Tensor gate, up;  // projections, [tokens, intermediate]
    Tensor product;   // silu(gate) * up, the input of down_proj
  };

  SwiGLU() = default;
  SwiGLU(Backend& backend, const std::string& name, std::int64_t hidden, std::int64_t intermediate,
         bool with_bias)
      : gate_proj(backend, name + ".gate_proj", hidden, intermediate, with_bias),
        up_proj(backend, name + ".up_proj", hidden, intermediate, with_bias),
        down_proj(backend, name + ".down_proj", intermediate, hidden, with_bias) {}

  void forward(Backend& backend, MatrixView<const Act> x, MatrixView<Act> y, Cache& cache) const {
    const Shape shape{x.rows, gate_proj.out_features()};
    for (Tensor* t : {&cache.gate, &cache.up, &cache.product})
      backend.ensure(*t, kAct, shape);
    gate_proj.forward(backend, x, as_matrix<Act>(cache.gate));
    up_proj.forward(backend, x, as_matrix<Act>(cache.up));
    backend.swiglu_forward(cache.gate.template data<Act>(), cache.up.template data<Act>(),
                           cache.product.template data<Act>(), cache.gate.numel());
    down_proj.forward(backend, as_matrix<const Act>(cache.product), y);
  }

  // dx += dMLP/dx . dy; `scratch` holds three [tokens, intermediate] buffers.
  void backward(Backend& backend, MatrixView<const Act> x, MatrixView<const Act> dy,
                MatrixView<Act> dx, const Cache& cache, Tensor (&scratch)[3]) {
    const Shape shape{x.rows, gate_proj.out_features()};
    for (Tensor& t : scratch)
      backend.ensure(t, kAct, shape);
    Tensor& d_product = scratch[0];
    Tensor& d_gate = scratch[1];
    Tensor& d_up = scratch[2];
    backend.fill_zero(d_product);
    MatrixView<Act> d_product_view = as_matrix<Act>(d_product);
    down_proj.backward(backend, as_matrix<const Act>(cache.product), dy, &d_product_view);
    backend.swiglu_backward(d_product.template data<Act>(), cache.gate.template data<Act>(),
                            cache.up.template data<Act>(), d_gate.template data<Act>(),
                            d_up.template data<Act>(), d_product.numel());
    gate_proj.backward(backend, x, as_matrix<const Act>(d_gate), &dx);
    up_proj.backward(backend, x, as_matrix<const Act>(d_up), &dx);
  }

  template <class Visitor>
  void visit(Visitor&& visitor) {
    gate_proj.visit(visitor);
    up_proj.visit(visitor);
    down_proj.visit(visitor);
  }

  Linear<Backend> gate_proj, up_proj, down_proj;
};

}  // namespace kept
