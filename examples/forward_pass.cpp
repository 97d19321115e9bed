// A tiny Llama built in-process from the layer templates: random weights, one forward pass,
// the residual-stream states, the next-token cross-entropy (xkd::cross_entropy, logits a chunk
// at a time) and a backward pass, all through kept's public headers.
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
#include "kept/xkd/cross_entropy.hpp"

int main(int argc, char** argv) {
  kept::cpu::use_openblas_kernels_for_this_cpu(argv);  // OpenBLAS's fast kernels on any CPU
  std::uint64_t seed = 1;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--seed") == 0) seed = std::stoull(argv[i + 1]);

  kept::ModelConfig config =
      kept::ModelConfig::decoder(kept::Architecture::Llama, 256, 64, 172, 2, 4);
  config.norm_eps = 1e-5;

  kept::Cpu cpu;
  kept::LlamaDecoder<kept::Cpu> model(cpu, config);
  kept::init_parameters(cpu, model, {.seed = seed, .std = 0.02});

  const std::string text = "kept keeps knowledge";
  std::vector<std::int32_t> tokens(text.begin(), text.end());  // bytes as token ids
  kept::LlamaDecoder<kept::Cpu>::Activations acts;
  model.forward(cpu, tokens, 1, static_cast<std::int64_t>(tokens.size()), acts,
                kept::ForwardMode::Training);

  // Mean next-token cross-entropy of the random model (about log(256) = 5.55), through the LM
  // head a chunk of logits at a time; the head's gradient and d(loss)/d(hidden) come with it.
  std::vector<std::int32_t> targets(tokens.begin() + 1, tokens.end());
  targets.push_back(-1);  // the last position has no next token
  model.zero_grad(cpu);
  kept::Tensor d_hidden = cpu.zeros(kept::DType::F32, acts.hidden.shape());
  auto d_hidden_view = kept::as_matrix<float>(d_hidden);
  const kept::xkd::CrossEntropyResult ce = kept::xkd::cross_entropy(
      cpu, model.lm_head, kept::as_matrix<const float>(acts.hidden), targets, &d_hidden_view);
  std::printf("tokens %zu, residual-stream slots %zu\n", tokens.size(), acts.states.size());
  std::printf("next-token cross-entropy of the random model: %.4f (log vocab = %.4f)\n", ce.loss,
              std::log(static_cast<double>(config.vocab_size)));

  // Backward through the decoder: every parameter gets a gradient.
  model.backward(cpu, acts, d_hidden);
  std::size_t with_gradient = 0, total = 0;
  model.visit_parameters([&](kept::Parameter& p) {
    ++total;
    double norm = 0;
    for (float g : p.grad.span<float>())
      norm += static_cast<double>(g) * g;
    with_gradient += norm > 0;
  });
  std::printf("parameters with a non-zero gradient: %zu of %zu\n", with_gradient, total);
  return with_gradient == total ? 0 : 1;
}
