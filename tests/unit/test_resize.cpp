// kept/convert/resize.hpp: mapping a Llama decoder's weights to another size, and interpolating.
//
// Checked on constructed models in float64 (Cpu64) with eps 0, against the models' own forward
// passes: growing (hidden, heads, FFN units, depth, with and without biases) preserves the logits;
// a grown model shrunk back gives the source's logits again (the padding ranks last and is
// dropped); a model mapped to its own shape comes back bit for bit; interpolation's ends and
// fixed point are exact; the size rule for alpha; shape errors name the field.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/convert/resize.hpp"
#include "kept/core/random.hpp"
#include "kept/model/decoder.hpp"
#include "kept/model/init.hpp"

namespace {

using kept::Cpu64;
using kept::ModelConfig;
using kept::NamedWeights;
using Model = kept::Decoder<kept::RMSNorm, Cpu64>;

ModelConfig llama(std::int64_t hidden, std::int64_t inter, std::int64_t layers, std::int64_t heads,
                  bool biases = false) {
  ModelConfig config =
      ModelConfig::decoder(kept::Architecture::Llama, 29, hidden, inter, layers, heads);
  config.rope_theta = 1e4;
  config.norm_eps = 0.0;  // growing is exact with eps 0 (resize.hpp)
  config.attention_bias = config.mlp_bias = biases;
  return config;
}

NamedWeights weights_of(Cpu64& cpu, Model& model) {
  NamedWeights weights;
  model.visit_parameters(
      [&](kept::Parameter& p) { weights.emplace(p.name, cpu.download(p.value)); });
  return weights;
}

void load(Cpu64& cpu, Model& model, const NamedWeights& weights) {
  std::size_t count = 0;
  model.visit_parameters([&](kept::Parameter& p) {
    auto found = weights.find(p.name);
    REQUIRE(found != weights.end());
    REQUIRE(found->second.shape() == p.value.shape());
    cpu.upload(found->second, p.value);
    ++count;
  });
  REQUIRE(count == weights.size());
}

Model random_model(Cpu64& cpu, const ModelConfig& config, std::uint64_t seed) {
  Model model(cpu, config);
  kept::init_parameters(cpu, model, {.seed = seed, .std = 0.3});
  // Norm weights away from 1 and biases away from 0, so that every rule is exercised.
  kept::Random random(seed + 1);
  model.visit_parameters([&](kept::Parameter& p) {
    if (p.role != kept::ParamRole::NormWeight && p.role != kept::ParamRole::Bias) return;
    kept::Tensor values = cpu.download(p.value);
    for (double& x : values.span<double>())
      x = (p.role == kept::ParamRole::NormWeight ? 1.0 : 0.0) + 0.3 * random.normal();
    cpu.upload(values, p.value);
  });
  return model;
}

std::vector<double> logits(Cpu64& cpu, Model& model) {
  std::vector<std::int32_t> tokens;
  for (int i = 0; i < 2 * 6; ++i)
    tokens.push_back((i * 11 + 4) % 29);
  Model::Activations acts;
  model.forward(cpu, tokens, 2, 6, acts, kept::ForwardMode::Inference);
  kept::Tensor out;
  model.logits(cpu, acts, out);
  const auto values = out.span<const double>();
  return {values.begin(), values.end()};
}

double max_relative_difference(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  double scale = 0, error = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    scale = std::max(scale, std::abs(want[i]));
    error = std::max(error, std::abs(got[i] - want[i]));
  }
  return error / scale;
}

Model mapped(Cpu64& cpu, const NamedWeights& source, const ModelConfig& from,
             const ModelConfig& to) {
  Model target(cpu, to);
  load(cpu, target, kept::resize_weights(source, from, to));
  return target;
}

}  // namespace

TEST_CASE("resize: a model mapped to its own shape comes back bit for bit", "[resize]") {
  Cpu64 cpu;
  for (bool biases : {false, true}) {
    const ModelConfig config = llama(16, 24, 3, 2, biases);
    Model model = random_model(cpu, config, 3);
    const NamedWeights source = weights_of(cpu, model);
    const NamedWeights same = kept::resize_weights(source, config, config);
    REQUIRE(same.size() == source.size());
    for (const auto& [name, tensor] : source) {
      INFO(name);
      const auto got = same.at(name).span<const double>();
      const auto want = tensor.span<const double>();
      REQUIRE(same.at(name).shape() == tensor.shape());
      CHECK(std::equal(got.begin(), got.end(), want.begin()));
    }
  }
}

TEST_CASE("resize: growing width and depth preserves the function", "[resize]") {
  Cpu64 cpu;
  for (bool biases : {false, true}) {
    INFO("biases " << biases);
    const ModelConfig small = llama(16, 24, 2, 2, biases);
    Model model = random_model(cpu, small, 7);
    const NamedWeights source = weights_of(cpu, model);
    const std::vector<double> want = logits(cpu, model);
    // Each axis alone, then all at once (hidden 16 -> 32 with heads 2 -> 4, head_dim 8).
    for (const ModelConfig& big : {llama(32, 24, 2, 4, biases), llama(16, 40, 2, 2, biases),
                                   llama(16, 24, 5, 2, biases), llama(32, 56, 5, 4, biases)}) {
      INFO("to hidden " << big.hidden_size << ", intermediate " << big.intermediate_size << ", "
                        << big.num_layers << " layers");
      Model grown = mapped(cpu, source, small, big);
      CHECK(max_relative_difference(logits(cpu, grown), want) < 1e-12);
    }
  }
}

TEST_CASE("resize: a grown model shrunk back computes the source again", "[resize]") {
  Cpu64 cpu;
  const ModelConfig small = llama(16, 24, 2, 2, true), big = llama(32, 40, 4, 4, true);
  Model model = random_model(cpu, small, 11);
  const NamedWeights source = weights_of(cpu, model);
  const NamedWeights grown = kept::resize_weights(source, small, big);
  // The padding has no weight to rank by, so the shrink drops exactly it (and the identity
  // layers, by depth); the source's coordinates come back in ranking order, an exact symmetry.
  const kept::ResizeMaps maps = kept::plan_resize(grown, big, small);
  for (std::int64_t c : maps.hidden)
    CHECK(c < small.hidden_size);
  CHECK(maps.layer == std::vector<std::int64_t>{0, 3});
  Model back(cpu, small);
  load(cpu, back, kept::apply_resize(grown, big, small, maps));
  CHECK(max_relative_difference(logits(cpu, back), logits(cpu, model)) < 1e-12);
}

TEST_CASE("resize: shrinking keeps the highest-ranked coordinates, heads and units", "[resize]") {
  Cpu64 cpu;
  const ModelConfig big = llama(24, 32, 4, 3), small = llama(16, 20, 2, 2);
  Model model = random_model(cpu, big, 5);
  NamedWeights source = weights_of(cpu, model);
  // Make hidden coordinate 5, head 1 of layer 3 and unit 7 of layer 0 the loudest.
  auto scale = [&](const std::string& name, auto&& select) {
    kept::Tensor& t = source.at(name);
    const std::int64_t cols = t.shape().rank() == 2 ? t.shape()[1] : 1;
    auto values = t.span<double>();
    for (std::int64_t e = 0; e < t.numel(); ++e)
      if (select(e / cols, e % cols)) values[static_cast<std::size_t>(e)] *= 50.0;
  };
  scale("model.embed_tokens.weight", [](std::int64_t, std::int64_t c) { return c == 5; });
  scale("model.layers.3.self_attn.q_proj.weight",
        [](std::int64_t r, std::int64_t) { return r / 8 == 1; });
  scale("model.layers.0.mlp.up_proj.weight", [](std::int64_t r, std::int64_t) { return r == 7; });
  const kept::ResizeMaps maps = kept::plan_resize(source, big, small);
  CHECK(maps.hidden.front() == 5);
  CHECK(maps.layer == std::vector<std::int64_t>{0, 3});  // evenly spaced: the first and last
  CHECK(maps.heads[1].front() == 1);
  CHECK(maps.units[0].front() == 7);
  CHECK(maps.norm_scale > 0);
  const NamedWeights out = kept::apply_resize(source, big, small, maps);
  CHECK(out.at("model.layers.1.self_attn.q_proj.weight").shape() == kept::Shape({16, 16}));
  CHECK(out.at("model.layers.1.mlp.down_proj.weight").shape() == kept::Shape({16, 20}));
  // Target layer 1 is source layer 3: its first head is source head 1, its first hidden input
  // column source coordinate 5.
  const auto q_out = out.at("model.layers.1.self_attn.q_proj.weight").span<const double>();
  const auto q_in = source.at("model.layers.3.self_attn.q_proj.weight").span<const double>();
  CHECK(q_out[0] == q_in[static_cast<std::size_t>(8 * 24 + 5)]);
}

TEST_CASE("interpolate: the ends, the fixed point and alpha from the sizes", "[resize]") {
  Cpu64 cpu;
  const ModelConfig config = llama(16, 24, 2, 2);
  Model a = random_model(cpu, config, 1), b = random_model(cpu, config, 2);
  const NamedWeights wa = weights_of(cpu, a), wb = weights_of(cpu, b);
  auto equal = [](const NamedWeights& x, const NamedWeights& y) {
    for (const auto& [name, tensor] : x) {
      const auto p = tensor.span<const double>(), q = y.at(name).span<const double>();
      if (!std::equal(p.begin(), p.end(), q.begin())) return false;
    }
    return true;
  };
  CHECK(equal(kept::interpolate_weights(wa, wb, 0.0), wa));
  CHECK(equal(kept::interpolate_weights(wa, wb, 1.0), wb));
  CHECK(equal(kept::interpolate_weights(wa, wa, 0.37), wa));
  const NamedWeights mid = kept::interpolate_weights(wa, wb, 0.25);
  const double x = wa.at("lm_head.weight").span<const double>()[3];
  const double y = wb.at("lm_head.weight").span<const double>()[3];
  CHECK(mid.at("lm_head.weight").span<const double>()[3] == Approx(0.75 * x + 0.25 * y));
  CHECK_THROWS_WITH(kept::interpolate_weights(wa, wb, 1.5), Catch::Contains("alpha 1.5"));

  const ModelConfig big = llama(32, 48, 4, 4), small = llama(16, 24, 2, 2);
  CHECK(kept::default_alpha(big, small, big) == 0.0);
  CHECK(kept::default_alpha(big, small, small) == 1.0);
  const ModelConfig middle = llama(24, 36, 3, 3);
  const double n_big = kept::parameter_count(big), n_small = kept::parameter_count(small),
               n_mid = kept::parameter_count(middle);
  CHECK(kept::default_alpha(big, small, middle) == Approx((n_big - n_mid) / (n_big - n_small)));
  // The parameter count is the models' own.
  Model counted(cpu, middle);
  double parameters = 0;
  counted.visit_parameters(
      [&](kept::Parameter& p) { parameters += static_cast<double>(p.value.numel()); });
  CHECK(n_mid == parameters);
}

TEST_CASE("resize: shapes it cannot map are refused by name", "[resize]") {
  Cpu64 cpu;
  const ModelConfig config = llama(16, 24, 2, 2);
  Model model = random_model(cpu, config, 1);
  const NamedWeights source = weights_of(cpu, model);
  ModelConfig other_vocab = config;
  other_vocab.vocab_size = 31;
  CHECK_THROWS_WITH(kept::resize_weights(source, config, other_vocab),
                    Catch::Contains("vocab_size 31"));
  const ModelConfig other_head = llama(24, 24, 2, 2);  // head_dim 12
  CHECK_THROWS_WITH(kept::resize_weights(source, config, other_head),
                    Catch::Contains("head_dim 12"));
  ModelConfig orion = config;
  orion.architecture = kept::Architecture::Orion;
  CHECK_THROWS_WITH(kept::resize_weights(source, orion, config), Catch::Contains("kept convert"));
  NamedWeights missing = source;
  missing.erase("model.layers.1.mlp.up_proj.weight");
  CHECK_THROWS_WITH(kept::resize_weights(missing, config, llama(16, 16, 2, 2)),
                    Catch::Contains("model.layers.1.mlp.up_proj.weight"));
}
