// The whole decoder, Orion (LayerNorm) and Llama (RMSNorm, with and without biases): every
// parameter gradient and the residual-stream injection checked against finite differences in
// float64, then the fp32 model against the float64 one.
#include <catch2/catch.hpp>

#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/model/decoder.hpp"
#include "kept/model/init.hpp"
#include "kept/model/streamed_layers.hpp"
#include "support/gradcheck.hpp"
#include "support/layer_harness.hpp"

using namespace kept;
using namespace kept::test;

namespace {

// The loss every check uses: projections of the logits and of every residual-stream state, so
// both the LM-head path and the hidden-state injection of backward() are exercised.
struct ProjectedLoss {
  Tensor logits_projection;
  std::vector<Tensor> state_projections;
};

template <class Model, class Backend>
double evaluate(Model& model, Backend& backend, const std::vector<std::int32_t>& tokens,
                std::int64_t batch, std::int64_t seq, typename Model::Activations& acts,
                Tensor& logits, const ProjectedLoss& loss) {
  model.forward(backend, tokens, batch, seq, acts, ForwardMode::Training);
  model.logits(backend, acts, logits);
  double value = dot(logits, loss.logits_projection);
  for (std::size_t l = 0; l < loss.state_projections.size(); ++l)
    value += dot(acts.state(l), loss.state_projections[l]);
  return value;
}

template <class Model, class Backend>
void backward(Model& model, Backend& backend, typename Model::Activations& acts,
              const ProjectedLoss& loss, DType dtype) {
  model.zero_grad(backend);
  // dL/d(hidden) = dlogits W_lm, and the LM head's own gradient.
  Tensor d_hidden = backend.zeros(Backend::Precision::activation, acts.hidden.shape());
  Tensor d_logits = loss.logits_projection.to(dtype);
  using Scalar = typename Backend::Activation;
  auto d_hidden_view = as_matrix<Scalar>(d_hidden);
  model.lm_head.backward(backend, as_matrix<const Scalar>(acts.hidden),
                         as_matrix<const Scalar>(d_logits), &d_hidden_view);
  std::vector<Tensor> d_states;
  for (const Tensor& projection : loss.state_projections)
    d_states.push_back(projection.to(dtype));
  model.backward(backend, acts, d_hidden, &d_states);
}

}  // namespace

TEST_CASE("Decoder gradients match finite differences and fp32 matches float64", "[model]") {
  struct Case {
    Architecture architecture;
    bool attention_bias, mlp_bias;
  };
  const Case c =
      GENERATE(Case{Architecture::Orion, false, false}, Case{Architecture::Llama, false, false},
               Case{Architecture::Llama, true, true});
  const ModelConfig config = tiny_decoder_config(c.architecture, c.attention_bias, c.mlp_bias);
  INFO("architecture " << architecture_name(c.architecture) << ", attention_bias "
                       << c.attention_bias);
  auto run = [&](auto norm_tag) {
    using Tag = decltype(norm_tag);
    Cpu64 cpu64;
    Decoder<Tag, Cpu64> model(cpu64, config);
    Random random(42);
    randomize(model.embed_tokens, random, 1.0);
    for (auto& block : model.layers)
      randomize(block, random, 0.3);
    randomize(model.norm, random, 0.3);
    randomize(model.lm_head, random, 0.3);
    const std::int64_t batch = 2, seq = 5;
    std::vector<std::int32_t> tokens;
    for (int i = 0; i < batch * seq; ++i)
      tokens.push_back(static_cast<std::int32_t>(random.below(37)));
    ProjectedLoss loss{random_tensor({batch * seq, config.vocab_size}, random), {}};
    for (int l = 0; l <= config.num_layers; ++l)
      loss.state_projections.push_back(random_tensor({batch * seq, 12}, random, 0.5));

    typename Decoder<Tag, Cpu64>::Activations acts;
    Tensor logits;
    auto objective = [&] { return evaluate(model, cpu64, tokens, batch, seq, acts, logits, loss); };
    objective();
    backward(model, cpu64, acts, loss, DType::F64);
    std::size_t checked = 0;
    model.visit_parameters([&](Parameter& p) {
      check_gradient(p.name, p.value, p.grad, objective, random,
                     {.directions = 2, .coordinates = 2});
      ++checked;
    });
    // embedding + 2 layers x (2 norms + 4 attention + 3 MLP projections) + final norm + head.
    CHECK(checked >= 1 + 2 * 9 + 2);

    // The fp32 model from the same values: logits, states and every gradient.
    Cpu cpu;
    Decoder<Tag, Cpu> model32(cpu, config);
    std::vector<Parameter*> p64, p32;
    model.visit_parameters([&](Parameter& p) { p64.push_back(&p); });
    model32.visit_parameters([&](Parameter& p) { p32.push_back(&p); });
    REQUIRE(p64.size() == p32.size());
    for (std::size_t i = 0; i < p64.size(); ++i)
      p32[i]->value = p64[i]->value.to(DType::F32);
    objective();
    backward(model, cpu64, acts, loss, DType::F64);
    typename Decoder<Tag, Cpu>::Activations acts32;
    Tensor logits32;
    evaluate(model32, cpu, tokens, batch, seq, acts32, logits32, loss);
    backward(model32, cpu, acts32, loss, DType::F32);
    CHECK(relative_max_error(logits32, logits) < 2e-5);
    for (int l = 0; l <= config.num_layers; ++l)
      CHECK(relative_max_error(acts32.state(l), acts.state(l)) < 2e-5);
    for (std::size_t i = 0; i < p64.size(); ++i) {
      INFO("fp32 gradient of " << p32[i]->name);
      CHECK(relative_max_error(p32[i]->grad, p64[i]->grad) < 1e-4);
    }
  };
  if (c.architecture == Architecture::Llama)
    run(RMSNorm{});
  else
    run(LayerNorm{});
}

TEST_CASE("Inference mode gives the training-mode outputs with less memory", "[model]") {
  Cpu cpu;
  ModelConfig config = tiny_decoder_config(Architecture::Orion, false, false);
  config.num_layers = 3;
  Decoder<LayerNorm, Cpu> model(cpu, config);
  init_parameters(cpu, model, {.seed = 5, .std = 0.3});
  std::vector<std::int32_t> tokens{1, 5, 9, 2, 36, 0, 7, 7};
  Decoder<LayerNorm, Cpu>::Activations train, infer, infer_states;
  model.forward(cpu, tokens, 2, 4, train, ForwardMode::Training);
  model.forward(cpu, tokens, 2, 4, infer, ForwardMode::Inference);
  model.forward(cpu, tokens, 2, 4, infer_states, ForwardMode::Inference, /*keep_states=*/true);
  CHECK(infer.states.size() == 2);
  CHECK(infer.blocks.size() == 1);
  CHECK_THROWS_AS(infer.state(0), Error);
  for (std::int64_t i = 0; i < train.hidden.numel(); ++i)
    REQUIRE(train.hidden.data<float>()[i] == infer.hidden.data<float>()[i]);
  for (int l = 0; l <= 3; ++l)
    for (std::int64_t i = 0; i < train.hidden.numel(); ++i)
      REQUIRE(train.state(l).data<float>()[i] == infer_states.state(l).data<float>()[i]);
  CHECK_THROWS_AS(model.backward(cpu, infer, Tensor()), Error);
}

TEST_CASE("Decoder rejects bad token ids and shapes", "[model]") {
  Cpu cpu;
  Decoder<RMSNorm, Cpu> model(cpu, tiny_decoder_config(Architecture::Llama, false, false));
  Decoder<RMSNorm, Cpu>::Activations acts;
  std::vector<std::int32_t> tokens{1, 2, 37};
  CHECK_THROWS_WITH(model.forward(cpu, tokens, 1, 3, acts, ForwardMode::Inference),
                    Catch::Contains("token id 37") && Catch::Contains("vocabulary of 37"));
  CHECK_THROWS_WITH(model.forward(cpu, tokens, 2, 2, acts, ForwardMode::Inference),
                    Catch::Contains("batch 2"));
  ModelConfig bad = tiny_decoder_config(Architecture::Llama, false, false);
  bad.num_kv_heads = 1;
  CHECK_THROWS_WITH((Decoder<RMSNorm, Cpu>(cpu, bad)), Catch::Contains("num_key_value_heads"));
}

// The streamed teacher (kept/model/streamed_layers.hpp): the same outputs as resident weights,
// bit for bit, and every layer copied once per forward: layer l + 1 is queued while layer l is
// brought, and with an even number of layers layer 0 is queued after the last one, so the second
// forward finds it in place.
TEST_CASE("Streamed layers give the resident outputs and copy each layer once a forward",
          "[model]") {
  Cpu cpu;
  for (const std::int64_t layers : {1, 3, 4}) {
    INFO(layers << " layers");
    ModelConfig config = tiny_decoder_config(Architecture::Orion, false, false);
    config.num_layers = layers;
    Decoder<LayerNorm, Cpu> resident(cpu, config), streamed(cpu, config);
    init_parameters(cpu, resident, {.seed = 9, .std = 0.3});
    init_parameters(cpu, streamed, {.seed = 9, .std = 0.3});
    StreamedLayers<Cpu> slots(cpu, streamed);
    streamed.set_before_layer([&](std::size_t l) { slots.bring(cpu, streamed, l); });
    streamed.layers.back().visit([](Parameter& p) { CHECK(!p.value.defined()); });
    const std::vector<std::int32_t> tokens{1, 5, 9, 2, 36, 0, 7, 7};
    Decoder<LayerNorm, Cpu>::Activations want, got;
    resident.forward(cpu, tokens, 2, 4, want, ForwardMode::Inference);
    for (int pass = 1; pass <= 2; ++pass) {
      INFO("forward " << pass);
      streamed.forward(cpu, tokens, 2, 4, got, ForwardMode::Inference);
      for (std::int64_t i = 0; i < want.hidden.numel(); ++i)
        REQUIRE(got.hidden.data<float>()[i] == want.hidden.data<float>()[i]);
      // One layer: it stays in its slot. Three: layer 0 shares the last layer's slot and is
      // copied by the next forward itself, while layer 1 stays in slot 1 across forwards. Four:
      // layer 0 is prefetched after layer 3, so each forward copies every layer once.
      const std::int64_t expected = layers == 1   ? 1
                                    : layers == 3 ? 3 + 2 * (pass - 1)
                                                  : 4 * pass + 1;
      CHECK(slots.copies() == expected);
    }
  }
}

TEST_CASE("Layer-major backward of several micro-batches equals one backward per micro-batch",
          "[model]") {
  // Gradient accumulation without a gradient buffer (memory.gradients "none"): every layer's
  // gradient must be complete, for all micro-batches, when the after-layer hook sees it.
  Cpu cpu;
  ModelConfig config = tiny_decoder_config(Architecture::Llama, false, false);
  config.num_layers = 3;
  const std::size_t layers = 3, micro = 3;
  const std::int64_t batch = 2, seq = 4, hidden = config.hidden_size;
  Random random(17);
  std::vector<std::vector<std::int32_t>> tokens(micro);
  std::vector<Tensor> d_hidden(micro);
  std::vector<std::vector<Tensor>> d_states(micro);
  for (std::size_t m = 0; m < micro; ++m) {
    for (std::int64_t i = 0; i < batch * seq; ++i)
      tokens[m].push_back(static_cast<std::int32_t>(random.uniform() * 37));
    d_hidden[m] = random_tensor<float>({batch * seq, hidden}, random);
    // Micro-batch 1 has no state gradients; micro-batch 2 has them on two slots only.
    if (m == 1) continue;
    d_states[m].resize(layers + 1);
    for (std::size_t l = 0; l <= layers; ++l)
      if (m == 0 || l % 2 == 0)
        d_states[m][l] = random_tensor<float>({batch * seq, hidden}, random);
  }
  auto states_of = [&](std::size_t m) { return m == 1 ? nullptr : &d_states[m]; };
  auto grads_of = [](Decoder<RMSNorm, Cpu>& model) {
    std::vector<std::vector<float>> grads;
    model.visit_parameters([&](Parameter& p) {
      grads.emplace_back(p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
    });
    return grads;
  };
  for (const bool checkpointing : {false, true}) {
    INFO("checkpointing " << checkpointing);
    Decoder<RMSNorm, Cpu> model(cpu, config);
    init_parameters(cpu, model, {.seed = 3, .std = 0.3});
    model.set_activation_checkpointing(checkpointing);
    std::vector<Decoder<RMSNorm, Cpu>::Activations> acts(micro);

    // The reference: forward and backward of one micro-batch after the other.
    model.zero_grad(cpu);
    for (std::size_t m = 0; m < micro; ++m) {
      model.forward(cpu, tokens[m], batch, seq, acts[m], ForwardMode::Training);
      model.backward(cpu, acts[m], d_hidden[m], states_of(m));
    }
    const auto want = grads_of(model);

    // Layer-major: every forward, then one walk down the stack.
    model.zero_grad(cpu);
    for (std::size_t m = 0; m < micro; ++m)
      model.forward(cpu, tokens[m], batch, seq, acts[m], ForwardMode::Training);
    std::vector<std::size_t> hooked;
    model.set_after_layer_backward([&](std::size_t l) {
      hooked.push_back(l);
      // Layer l is complete now: its first parameter's gradient is the final one.
      const Parameter* first = nullptr;
      model.layers[l].visit([&](Parameter& p) {
        if (!first) first = &p;
      });
      std::size_t index = 0;
      model.visit_parameters([&](Parameter& p) {
        if (&p == first) {
          for (std::int64_t i = 0; i < p.grad.numel(); ++i)
            REQUIRE(p.grad.data<float>()[i] == want[index][static_cast<std::size_t>(i)]);
        }
        ++index;
      });
    });
    std::vector<Decoder<RMSNorm, Cpu>::Activations*> act_ptrs;
    std::vector<const Tensor*> hidden_ptrs;
    std::vector<const std::vector<Tensor>*> state_ptrs;
    for (std::size_t m = 0; m < micro; ++m) {
      act_ptrs.push_back(&acts[m]);
      hidden_ptrs.push_back(&d_hidden[m]);
      state_ptrs.push_back(states_of(m));
    }
    model.backward(cpu, act_ptrs, hidden_ptrs, state_ptrs);
    CHECK(hooked == std::vector<std::size_t>{2, 1, 0});
    const auto got = grads_of(model);
    REQUIRE(got.size() == want.size());
    for (std::size_t k = 0; k < want.size(); ++k) {
      INFO("parameter " << k);
      CHECK(got[k] == want[k]);
    }
    // Mismatched lists are refused.
    hidden_ptrs.pop_back();
    CHECK_THROWS_WITH(
        model.backward(cpu, act_ptrs, hidden_ptrs, state_ptrs),
        Catch::Contains("3 micro-batch forwards") && Catch::Contains("2 output gradients"));
  }
}
