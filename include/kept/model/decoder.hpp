// kept/model/decoder.hpp: the whole decoder, Decoder<LayerNorm> (Orion) and Decoder<RMSNorm>
// (Llama).
//
//   h_0 = E[tokens]                               model.embed_tokens
//   h_{l+1} = DecoderBlock_l(h_l), l < L          model.layers.l
//   hidden = FinalNorm(h_L)                       model.norm
//   logits = hidden W_lm^T                        lm_head (untied)
// h_0 .. h_L are the L+1 residual-stream states that the hidden-state distillation objective
// (the paper's Eq. 1) compares; they are kept when asked for.
//
// The LM head is applied by the caller, chunk by chunk where the vocabulary is large (a loss
// never needs all [tokens x vocab] logits at once); logits() is the convenience for small jobs.
// Backward takes dL/d(hidden) and optional dL/dh_l for each residual-stream slot, and
// accumulates every trainable parameter's gradient (call zero_grad() between steps).
//
// Activation checkpointing (set_activation_checkpointing): a Training forward then keeps the
// L+1 residual-stream states (each layer's input); the block cache is the decoder's own, one,
// reused layer after layer and by every forward; backward runs each block's forward again from
// its input into that cache just before the block's backward. Every forward kernel is
// deterministic, so the recomputed cache is the first one bit for bit and the gradients do not
// change; the price is one more forward of the stack (about a third more GEMM work) for L - 1
// fewer block caches.
//
// Layer-major backward (the span overload of backward): several micro-batches' forwards are
// kept, and backward walks the stack once, running layer l's backward for every micro-batch
// before moving to layer l - 1. Each parameter still accumulates its micro-batches' gradients
// in micro-batch order, so the gradients equal those of one backward per micro-batch bit for
// bit; what changes is that layer l's gradient is complete, for the whole step, when the walk
// leaves it: the after_layer_backward hook can update the layer and free its gradient even
// with gradient accumulation (memory.gradients "none"). The price is every micro-batch's
// forward in memory at once, and one residual-stream gradient per micro-batch.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "kept/layers/embedding.hpp"
#include "kept/layers/linear.hpp"
#include "kept/layers/norm.hpp"
#include "kept/model/block.hpp"
#include "kept/model/config.hpp"

namespace kept {

enum class ForwardMode {
  Inference,  // keep only what the next layer needs (and the states if asked)
  Training,   // keep every layer's cache for backward
};

template <class NormTag, class Backend>
class Decoder {
 public:
  using Act = typename Backend::Activation;
  using Stat = typename Backend::Stat;
  static constexpr DType kAct = Backend::Precision::activation;

  using Block = DecoderBlock<NormTag, Backend>;
  using NormType = Norm<NormTag, Backend>;

  struct Activations {
    std::int64_t batch = 0, seq = 0;
    Tensor tokens;  // I32 [batch * seq] in the backend's memory
    ForwardMode mode = ForwardMode::Inference;
    bool keep_states = false;
    bool recompute = false;      // Training with activation checkpointing: caches recomputed
    std::vector<Tensor> states;  // Training or keep_states: L+1 slots; else two, ping-pong
    // Training: one per layer; Inference: one, reused; checkpointing: none (the decoder's own)
    std::vector<typename Block::Cache> blocks;
    typename NormType::Cache final_norm;
    Tensor hidden;  // final-norm output [tokens, hidden]

    std::int64_t tokens_count() const { return batch * seq; }
    // Residual-stream slot l (0 = embedding output, L = last layer's output).
    const Tensor& state(std::size_t slot) const {
      KEPT_CHECK(slot < states.size() && (mode == ForwardMode::Training || keep_states),
                 "residual-stream state ", slot, " was not kept by this forward pass");
      return states[slot];
    }
  };

  Decoder() = default;
  Decoder(Backend& backend, const ModelConfig& config) : config_(config) {
    config.validate("model config");
    embed_tokens =
        Embedding<Backend>(backend, "model.embed_tokens", config.vocab_size, config.hidden_size);
    layers.reserve(static_cast<std::size_t>(config.num_layers));
    for (std::int64_t l = 0; l < config.num_layers; ++l)
      layers.emplace_back(backend, config, l);
    norm = NormType(backend, "model.norm", config.hidden_size, config.norm_eps);
    lm_head = Linear<Backend>(backend, "lm_head", config.hidden_size, config.vocab_size, false);
  }

  const ModelConfig& config() const { return config_; }
  void set_activation_checkpointing(bool on) { checkpointing_ = on; }
  // Called with l before layer l runs forward, and before its backward (once for all
  // micro-batches, before any recompute): where a streamed model (kept/model/streamed_layers.hpp)
  // or a ZeRO stage 3 trainer (kept/train/zero.hpp) brings the layer's weights in.
  void set_before_layer(std::function<void(std::size_t)> hook) { before_layer_ = std::move(hook); }
  // Called with l once backward has finished layer l (its parameters' gradients are complete):
  // where a trainer without a whole-model gradient buffer updates the layer and frees the
  // gradient for the next one.
  void set_after_layer_backward(std::function<void(std::size_t)> hook) {
    after_layer_backward_ = std::move(hook);
  }
  bool activation_checkpointing() const { return checkpointing_; }
  std::int64_t num_layers() const { return config_.num_layers; }

  // Runs the stack on `batch` sequences of `seq` tokens (row-major [batch, seq]).
  // `observer`, when given, sees the input of every norm (see NormInputObserver).
  void forward(Backend& backend, std::span<const std::int32_t> tokens, std::int64_t batch,
               std::int64_t seq, Activations& acts, ForwardMode mode, bool keep_states = false,
               const NormInputObserver<Act>* observer = nullptr) {
    KEPT_CHECK(batch > 0 && seq > 0 && static_cast<std::int64_t>(tokens.size()) == batch * seq,
               "forward: got ", tokens.size(), " tokens for batch ", batch, " x seq ", seq);
    ensure_rope(backend, seq);
    const std::int64_t count = batch * seq, hidden = config_.hidden_size;
    const std::size_t num_layers = layers.size();
    acts.batch = batch;
    acts.seq = seq;
    backend.upload_tokens(tokens, acts.tokens);
    acts.mode = mode;
    acts.keep_states = keep_states;
    acts.recompute = mode == ForwardMode::Training && checkpointing_;
    const bool all_states = mode == ForwardMode::Training || keep_states;
    const bool cache_per_layer = mode == ForwardMode::Training && !acts.recompute;
    acts.states.resize(all_states ? num_layers + 1 : 2);
    acts.blocks.resize(cache_per_layer ? num_layers : acts.recompute ? 0 : 1);
    for (Tensor& state : acts.states)
      backend.ensure(state, kAct, {count, hidden});
    backend.ensure(acts.hidden, kAct, {count, hidden});

    embed_tokens.forward(backend, acts.tokens, as_matrix<Act>(acts.states[0]));
    for (std::size_t l = 0; l < num_layers; ++l) {
      Tensor& input = acts.states[all_states ? l : l % 2];
      Tensor& output = acts.states[all_states ? l + 1 : (l + 1) % 2];
      auto& cache = acts.recompute ? recompute_cache_ : acts.blocks[cache_per_layer ? l : 0];
      if (before_layer_) before_layer_(l);
      layers[l].forward(backend, as_matrix<const Act>(input), batch, seq, rope_,
                        as_matrix<Act>(output), cache, observer);
    }
    const Tensor& last = acts.states[all_states ? num_layers : num_layers % 2];
    if (observer) (*observer)("model.norm", as_matrix<const Act>(last));
    norm.forward(backend, as_matrix<const Act>(last), as_matrix<Act>(acts.hidden), acts.final_norm);
  }

  // Full logits [tokens, vocab] from a forward pass, in the Stat type (fp32 for bf16 models).
  void logits(Backend& backend, const Activations& acts, Tensor& out) const {
    backend.ensure(out, Backend::Precision::stat, {acts.tokens_count(), config_.vocab_size});
    lm_head.forward(backend, as_matrix<const Act>(acts.hidden), as_matrix<Stat>(out));
  }

  // Backpropagates d_hidden = dL/d(final-norm output) (the LM head's input; may be undefined
  // when only states carry gradient) and, when given, d_states[l] = dL/dh_l for the L+1
  // residual-stream slots (undefined tensors are skipped). Parameter gradients accumulate.
  void backward(Backend& backend, Activations& acts, const Tensor& d_hidden,
                const std::vector<Tensor>* d_states = nullptr) {
    Activations* const micro_acts[] = {&acts};
    const Tensor* const micro_d_hidden[] = {&d_hidden};
    const std::vector<Tensor>* const micro_d_states[] = {d_states};
    backward(backend, micro_acts, micro_d_hidden, micro_d_states);
  }

  // Layer-major backward of M micro-batches (see the top comment): acts[m], d_hidden[m] and
  // d_states[m] (may be null) as in the overload above, for micro-batch m. Every layer's
  // backward runs for micro-batches 0..M-1 in order, then after_layer_backward(l) is called.
  void backward(Backend& backend, std::span<Activations* const> acts,
                std::span<const Tensor* const> d_hidden,
                std::span<const std::vector<Tensor>* const> d_states) {
    const std::size_t micro = acts.size(), num_layers = layers.size();
    KEPT_CHECK(micro > 0 && d_hidden.size() == micro && d_states.size() == micro, "backward: got ",
               micro, " micro-batch forwards, ", d_hidden.size(), " output gradients and ",
               d_states.size(), " state-gradient lists");
    const std::int64_t hidden = config_.hidden_size;
    // residual_grads_[m] holds dL/dh_l of micro-batch m while walking down the stack; the extra
    // one receives a layer's input gradient and is swapped in.
    residual_grads_.resize(micro + 1);
    for (std::size_t m = 0; m < micro; ++m) {
      const Activations& a = *acts[m];
      KEPT_CHECK(a.mode == ForwardMode::Training, "backward needs a forward in Training mode");
      KEPT_CHECK(a.tokens_count() == acts[0]->tokens_count(), "backward: micro-batch ", m, " has ",
                 a.tokens_count(), " tokens, micro-batch 0 has ", acts[0]->tokens_count());
      KEPT_CHECK(!d_states[m] || d_states[m]->size() == num_layers + 1, "backward: got ",
                 d_states[m] ? d_states[m]->size() : 0, " state gradients for ", num_layers + 1,
                 " slots");
    }
    const std::int64_t count = acts[0]->tokens_count();
    for (Tensor& grad : residual_grads_)
      backend.ensure(grad, kAct, {count, hidden});
    for (std::size_t m = 0; m < micro; ++m) {
      Tensor& grad = residual_grads_[m];
      backend.fill_zero(grad);
      if (!d_hidden[m]->defined()) continue;
      KEPT_CHECK(d_hidden[m]->shape() == Shape({count, hidden}), "backward: d_hidden has shape ",
                 d_hidden[m]->shape(), ", expected ", Shape({count, hidden}));
      norm.backward(backend, as_matrix<const Act>(acts[m]->states[num_layers]),
                    as_matrix<const Act>(*d_hidden[m]), as_matrix<Act>(grad), acts[m]->final_norm);
    }
    Tensor& spare = residual_grads_[micro];
    for (std::size_t l = num_layers + 1; l-- > 0;) {
      if (l > 0 && before_layer_) before_layer_(l - 1);
      for (std::size_t m = 0; m < micro; ++m) {
        Tensor& grad = residual_grads_[m];
        if (d_states[m] && (*d_states[m])[l].defined())
          backend.accumulate((*d_states[m])[l].template data<Act>(), grad.template data<Act>(),
                             count * hidden);
        if (l == 0) continue;
        const Activations& a = *acts[m];
        const auto input = as_matrix<const Act>(a.states[l - 1]);
        if (a.recompute) {
          backend.ensure(recomputed_, kAct, {count, hidden});
          layers[l - 1].forward(backend, input, a.batch, a.seq, rope_, as_matrix<Act>(recomputed_),
                                recompute_cache_);
        }
        layers[l - 1].backward(backend, input, a.batch, a.seq, rope_, as_matrix<const Act>(grad),
                               as_matrix<Act>(spare),
                               a.recompute ? recompute_cache_ : a.blocks[l - 1], scratch_);
        std::swap(grad, spare);
      }
      if (l > 0 && after_layer_backward_) after_layer_backward_(l - 1);
    }
    for (std::size_t m = 0; m < micro; ++m)
      embed_tokens.backward(backend, acts[m]->tokens, as_matrix<const Act>(residual_grads_[m]));
  }

  // Allocates (once) and zeroes the gradient of every trainable parameter.
  void zero_grad(Backend& backend) {
    visit_parameters([&](Parameter& p) {
      if (!p.trainable) {
        p.grad = Tensor();
        return;
      }
      if (!p.grad.defined() || !(p.grad.shape() == p.value.shape()) ||
          p.grad.dtype() != Backend::Precision::grad)
        p.grad = backend.zeros(Backend::Precision::grad, p.value.shape());
      else
        backend.fill_zero(p.grad);
    });
  }

  // Visits every parameter in checkpoint order: embedding, layers, final norm, LM head.
  template <class Visitor>
  void visit_parameters(Visitor&& visitor) {
    embed_tokens.visit(visitor);
    for (Block& block : layers)
      block.visit(visitor);
    norm.visit(visitor);
    lm_head.visit(visitor);
  }

  Embedding<Backend> embed_tokens;
  std::vector<Block> layers;
  NormType norm;
  Linear<Backend> lm_head;

 private:
  void ensure_rope(Backend& backend, std::int64_t seq) {
    if (rope_.positions() < seq)
      rope_ = backend.rope_table(config_.head_dim, config_.rope_theta, seq);
  }

  ModelConfig config_;
  typename Backend::RopeTable rope_;
  std::vector<Tensor> residual_grads_;  // one per micro-batch + one spare (backward)
  Tensor recomputed_;  // a recomputed block's output (checkpointing), not needed by backward
  typename Block::Cache recompute_cache_;  // checkpointing: the one block cache
  typename Block::Scratch scratch_;
  bool checkpointing_ = false;
  std::function<void(std::size_t)> before_layer_, after_layer_backward_;
};

template <class Backend>
using LlamaDecoder = Decoder<RMSNorm, Backend>;

}  // namespace kept
