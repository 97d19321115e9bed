// kept/layers/attention.hpp: Attention<MHA>, causal multi-head self-attention with RoPE.
//
// For x [tokens, hidden] made of `batch` sequences of `seq` tokens:
//   q = x Wq^T (+bq), k = x Wk^T (+bk), v = x Wv^T (+bv)      each [tokens, heads * head_dim]
//   q, k <- RoPE(q), RoPE(k)                                   rotate-half, theta = rope_theta
//   o_h = softmax(q_h k_h^T / sqrt(head_dim) + causal mask) v_h    per head h
//   y = o Wo^T (+bo)
// Biases exist for Llama with attention_bias (on q, k, v AND o); Orion has none.
// Backward runs the same steps in reverse; the RoPE backward is the inverse rotation, so the
// cache keeps the rotated q and k (what the attention kernel saw) and no pre-rotation copy.
// Only multi-head attention (as many k/v heads as q heads) is implemented: that is what Orion
// and Llamion use; the tag leaves room for a GQA specialisation.
#pragma once

#include <cstdint>
#include <string>

#include "kept/core/attention_shape.hpp"
#include "kept/core/tensor.hpp"
#include "kept/layers/linear.hpp"

namespace kept {

struct MHA {};

template <class Kind, class Backend>
class Attention;

template <class Backend>
class Attention<MHA, Backend> {
 public:
  using Act = typename Backend::Activation;
  using Stat = typename Backend::Stat;
  static constexpr DType kAct = Backend::Precision::activation;

  struct Cache {
    Tensor q, k, v;  // after RoPE, [tokens, hidden]
    Tensor o;        // attention output before o_proj
    Tensor lse;      // [batch, heads, seq]
  };

  Attention() = default;
  Attention(Backend& backend, const std::string& name, std::int64_t hidden, std::int64_t heads,
            bool with_bias)
      : heads_(heads),
        head_dim_(hidden / heads),
        q_proj(backend, name + ".q_proj", hidden, hidden, with_bias),
        k_proj(backend, name + ".k_proj", hidden, hidden, with_bias),
        v_proj(backend, name + ".v_proj", hidden, hidden, with_bias),
        o_proj(backend, name + ".o_proj", hidden, hidden, with_bias) {}

  std::int64_t heads() const { return heads_; }
  std::int64_t head_dim() const { return head_dim_; }

  void forward(Backend& backend, MatrixView<const Act> x, std::int64_t batch, std::int64_t seq,
               const typename Backend::RopeTable& rope, MatrixView<Act> y, Cache& cache) const {
    const std::int64_t tokens = x.rows, hidden = x.cols;
    KEPT_CHECK(tokens == batch * seq, "attention: ", tokens, " tokens is not ", batch, " x ", seq);
    for (Tensor* t : {&cache.q, &cache.k, &cache.v, &cache.o})
      backend.ensure(*t, kAct, {tokens, hidden});
    backend.ensure(cache.lse, Backend::Precision::stat, {batch, heads_, seq});
    q_proj.forward(backend, x, as_matrix<Act>(cache.q));
    k_proj.forward(backend, x, as_matrix<Act>(cache.k));
    v_proj.forward(backend, x, as_matrix<Act>(cache.v));
    backend.rope(cache.q.template data<Act>(), batch, seq, heads_, rope, +1);
    backend.rope(cache.k.template data<Act>(), batch, seq, heads_, rope, +1);
    const AttentionShape shape{batch, seq, heads_, head_dim_};
    backend.attention_forward(cache.q.template data<Act>(), cache.k.template data<Act>(),
                              cache.v.template data<Act>(), cache.o.template data<Act>(),
                              cache.lse.template data<Stat>(), shape);
    o_proj.forward(backend, as_matrix<const Act>(cache.o), y);
  }

  // dx += d(attention)/dx . dy; parameter gradients accumulate. `scratch` holds four
  // [tokens, hidden] buffers reused across layers.
  void backward(Backend& backend, MatrixView<const Act> x, std::int64_t batch, std::int64_t seq,
                const typename Backend::RopeTable& rope, MatrixView<const Act> dy,
                MatrixView<Act> dx, const Cache& cache, Tensor (&scratch)[4]) {
    const std::int64_t tokens = x.rows, hidden = x.cols;
    for (Tensor& t : scratch)
      backend.ensure(t, kAct, {tokens, hidden});
    Tensor& d_o = scratch[0];
    Tensor& dq = scratch[1];
    Tensor& dk = scratch[2];
    Tensor& dv = scratch[3];
    backend.fill_zero(d_o);
    MatrixView<Act> d_o_view = as_matrix<Act>(d_o);
    o_proj.backward(backend, as_matrix<const Act>(cache.o), dy, &d_o_view);
    for (Tensor* t : {&dq, &dk, &dv})
      backend.fill_zero(*t);
    const AttentionShape shape{batch, seq, heads_, head_dim_};
    backend.attention_backward(
        d_o.template data<Act>(), cache.q.template data<Act>(), cache.k.template data<Act>(),
        cache.v.template data<Act>(), cache.o.template data<Act>(), cache.lse.template data<Stat>(),
        dq.template data<Act>(), dk.template data<Act>(), dv.template data<Act>(), shape);
    backend.rope(dq.template data<Act>(), batch, seq, heads_, rope, -1);
    backend.rope(dk.template data<Act>(), batch, seq, heads_, rope, -1);
    q_proj.backward(backend, x, as_matrix<const Act>(dq), &dx);
    k_proj.backward(backend, x, as_matrix<const Act>(dk), &dx);
    v_proj.backward(backend, x, as_matrix<const Act>(dv), &dx);
  }

  template <class Visitor>
  void visit(Visitor&& visitor) {
    q_proj.visit(visitor);
    k_proj.visit(visitor);
    v_proj.visit(visitor);
    o_proj.visit(visitor);
  }

 private:
  std::int64_t heads_ = 0;
  std::int64_t head_dim_ = 0;

 public:
  Linear<Backend> q_proj, k_proj, v_proj, o_proj;
};

}  // namespace kept
