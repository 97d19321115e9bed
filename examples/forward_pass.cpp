// A tiny Llama built in-process from the layer templates: random weights, one forward pass,
// the residual-stream states, and a backward pass, all through kept's public headers.
//
//   forward_pass [--seed N]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/model/decoder.hpp"
#include "kept/model/init.hpp"

int main(int argc, char** argv) {
  std::uint64_t seed = 1;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--seed") == 0) seed = std::stoull(argv[i + 1]);

  kept::ModelConfig config;
  config.architecture = kept::Architecture::Llama;
  config.vocab_size = 256;
  config.hidden_size = 64;
  config.intermediate_size = 172;
  config.num_layers = 2;
  config.num_heads = 4;
  config.num_kv_heads = 4;
  config.head_dim = 16;
  config.norm_eps = 1e-5;

  kept::Cpu cpu;
  kept::LlamaDecoder<kept::Cpu> model(cpu, config);
  kept::init_parameters(model, {.seed = seed, .std = 0.02});

  const std::string text = "kept keeps knowledge";
  std::vector<std::int32_t> tokens(text.begin(), text.end());  // bytes as token ids
  kept::LlamaDecoder<kept::Cpu>::Activations acts;
  model.forward(cpu, tokens, 1, static_cast<std::int64_t>(tokens.size()), acts, kept::ForwardMode::Training);
  kept::Tensor logits;
  model.logits(cpu, acts, logits);

  // Mean next-token cross-entropy of the random model: about log(256) = 5.55.
  const auto vocab = config.vocab_size;
  double loss = 0;
  for (std::size_t t = 0; t + 1 < tokens.size(); ++t) {
    const float* row = logits.data<float>() + t * vocab;
    double max_logit = row[0], sum = 0;
    for (std::int64_t v = 1; v < vocab; ++v) max_logit = std::max<double>(max_logit, row[v]);
    for (std::int64_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - max_logit);
    loss += max_logit + std::log(sum) - row[tokens[t + 1]];
  }
  loss /= static_cast<double>(tokens.size() - 1);
  std::printf("tokens %zu, logits [%lld, %lld], residual-stream slots %zu\n", tokens.size(),
              static_cast<long long>(logits.dim(0)), static_cast<long long>(logits.dim(1)), acts.states.size());
  std::printf("next-token cross-entropy of the random model: %.4f (log vocab = %.4f)\n", loss,
              std::log(static_cast<double>(vocab)));

  // Backward from d(loss)/d(logits) of a constant projection: every parameter gets a gradient.
  model.zero_grad(cpu);
  kept::Tensor d_hidden = cpu.zeros(acts.hidden.shape());
  kept::Tensor d_logits = cpu.zeros(logits.shape());
  for (float& value : d_logits.span<float>()) value = 1e-3f;
  auto d_hidden_view = kept::as_matrix<float>(d_hidden);
  model.lm_head.backward(cpu, kept::as_matrix<const float>(acts.hidden), kept::as_matrix<const float>(d_logits),
                         &d_hidden_view);
  model.backward(cpu, acts, d_hidden);
  std::size_t with_gradient = 0, total = 0;
  model.visit_parameters([&](kept::Parameter& p) {
    ++total;
    double norm = 0;
    for (float g : p.grad.span<float>()) norm += static_cast<double>(g) * g;
    with_gradient += norm > 0;
  });
  std::printf("parameters with a non-zero gradient: %zu of %zu\n", with_gradient, total);
  return with_gradient == total ? 0 : 1;
}
