// kept/model/block.hpp: the pre-norm decoder block, templated on the norm kind.
//
//   mid = h + Attention(Norm1(h))       input_layernorm, self_attn
//   out = mid + SwiGLU(Norm2(mid))      post_attention_layernorm, mlp
// Orion / StableLM (sequential residual) is DecoderBlock<LayerNorm>; Llama is
// DecoderBlock<RMSNorm>. The residual stream h is read only through the norms, which is what
// makes KEPT's exact (centred) conversion possible.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "kept/layers/attention.hpp"
#include "kept/layers/norm.hpp"
#include "kept/layers/swiglu.hpp"
#include "kept/model/config.hpp"

namespace kept {

// Sees the input of every norm during a forward pass (the pre-norm activations), named by the
// norm's checkpoint prefix ("model.layers.3.input_layernorm"). OPM calibration feeds its
// accumulators from here without the decoder keeping anything extra.
template <class Act>
using NormInputObserver = std::function<void(const std::string& norm, MatrixView<const Act> input)>;

template <class NormTag, class Backend>
class DecoderBlock {
 public:
  using Act = typename Backend::Activation;
  static constexpr DType kAct = Backend::Precision::activation;

  struct Cache {
    typename Norm<NormTag, Backend>::Cache norm1, norm2;
    Tensor normed1, normed2;  // norm outputs, the inputs of attention and MLP
    typename Attention<MHA, Backend>::Cache attention;
    Tensor mid;  // residual stream after attention
    typename SwiGLU<Backend>::Cache mlp;
  };
  // Buffers backward needs only transiently; one set is shared by all layers.
  struct Scratch {
    Tensor attention[4];
    Tensor mlp[3];
    Tensor d_normed, d_mid;
  };

  DecoderBlock() = default;
  DecoderBlock(Backend& backend, const ModelConfig& config, std::int64_t index) {
    const std::string prefix = "model.layers." + std::to_string(index);
    const double eps = config.norm_eps;
    input_layernorm =
        Norm<NormTag, Backend>(backend, prefix + ".input_layernorm", config.hidden_size, eps);
    self_attn = Attention<MHA, Backend>(backend, prefix + ".self_attn", config.hidden_size,
                                        config.num_heads, config.attention_bias);
    post_attention_layernorm = Norm<NormTag, Backend>(backend, prefix + ".post_attention_layernorm",
                                                      config.hidden_size, eps);
    mlp = SwiGLU<Backend>(backend, prefix + ".mlp", config.hidden_size, config.intermediate_size,
                          config.mlp_bias);
  }

  void forward(Backend& backend, MatrixView<const Act> h, std::int64_t batch, std::int64_t seq,
               const typename Backend::RopeTable& rope, MatrixView<Act> out, Cache& cache,
               const NormInputObserver<Act>* observer = nullptr) const {
    const Shape shape{h.rows, h.cols};
    for (Tensor* t : {&cache.normed1, &cache.normed2, &cache.mid})
      backend.ensure(*t, kAct, shape);
    auto normed1 = as_matrix<Act>(cache.normed1);
    auto normed2 = as_matrix<Act>(cache.normed2);
    auto mid = as_matrix<Act>(cache.mid);
    if (observer) (*observer)(norm_name(input_layernorm), h);
    input_layernorm.forward(backend, h, normed1, cache.norm1);
    self_attn.forward(backend, normed1, batch, seq, rope, mid, cache.attention);
    backend.add(h.data, mid.data, mid.data, h.rows * h.cols);
    if (observer) (*observer)(norm_name(post_attention_layernorm), mid);
    post_attention_layernorm.forward(backend, mid, normed2, cache.norm2);
    mlp.forward(backend, normed2, out, cache.mlp);
    backend.add(mid.data, out.data, out.data, h.rows * h.cols);
  }

  // Given d_out = dL/d(out), writes d_h = dL/dh (overwritten, not accumulated).
  void backward(Backend& backend, MatrixView<const Act> h, std::int64_t batch, std::int64_t seq,
                const typename Backend::RopeTable& rope, MatrixView<const Act> d_out,
                MatrixView<Act> d_h, const Cache& cache, Scratch& scratch) {
    const Shape shape{h.rows, h.cols};
    backend.ensure(scratch.d_normed, kAct, shape);
    backend.ensure(scratch.d_mid, kAct, shape);
    auto d_normed = as_matrix<Act>(scratch.d_normed);
    auto d_mid = as_matrix<Act>(scratch.d_mid);
    const std::int64_t count = h.rows * h.cols;
    // out = mid + mlp(norm2(mid)): d_mid = d_out + norm2^T mlp^T d_out
    backend.fill_zero(scratch.d_normed);
    mlp.backward(backend, as_matrix<const Act>(cache.normed2), d_out, d_normed, cache.mlp,
                 scratch.mlp);
    backend.copy(d_out.data, d_mid.data, count);
    post_attention_layernorm.backward(backend, as_matrix<const Act>(cache.mid), d_normed, d_mid,
                                      cache.norm2);
    // mid = h + attention(norm1(h)): d_h = d_mid + norm1^T attention^T d_mid
    backend.fill_zero(scratch.d_normed);
    self_attn.backward(backend, as_matrix<const Act>(cache.normed1), batch, seq, rope, d_mid,
                       d_normed, cache.attention, scratch.attention);
    backend.copy(d_mid.data, d_h.data, count);
    input_layernorm.backward(backend, h, d_normed, d_h, cache.norm1);
  }

  template <class Visitor>
  void visit(Visitor&& visitor) {
    input_layernorm.visit(visitor);
    self_attn.visit(visitor);
    post_attention_layernorm.visit(visitor);
    mlp.visit(visitor);
  }

  // "model.layers.3.input_layernorm" from the weight's name.
  static std::string norm_name(const Norm<NormTag, Backend>& norm) {
    const std::string& weight = norm.weight.name;
    return weight.substr(0, weight.size() - std::string_view(".weight").size());
  }

  Norm<NormTag, Backend> input_layernorm;
  Attention<MHA, Backend> self_attn;
  Norm<NormTag, Backend> post_attention_layernorm;
  SwiGLU<Backend> mlp;
};

}  // namespace kept
