// kept init: a randomly initialised checkpoint of the architecture a config.json describes.
//
// Used to start pretraining from scratch and by the tests to produce kept-written Llama
// checkpoints that transformers must load. The weights follow HF's initialisation
// (N(0, initializer_range) for projections and embeddings, norms 1 and 0).
#include <cstdio>
#include <string>

#include "commands.hpp"
#include "kept/backend/cpu.hpp"
#include "kept/core/dtype.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/weights.hpp"
#include "kept/model/any_decoder.hpp"
#include "kept/model/init.hpp"

namespace kept::cli {

void register_init(CLI::App& app) {
  struct Options {
    std::string config_path, output;
    std::uint64_t seed = 0;
    double init_std = 0.02;
    std::string dtype;
    bool force = false;
  };
  auto [command, options] = add_command<Options>(
      app, "init", "Write a randomly initialised checkpoint for a config.json");
  add_existing_file(command, "--config", options->config_path,
                    "HF config.json (llama, orion or stablelm)");
  command->add_option("output", options->output, "Checkpoint directory to create")->required();
  command->add_option("--seed", options->seed, "Random seed")->capture_default_str();
  command->add_option("--init-std", options->init_std, "Standard deviation of weights")
      ->capture_default_str();
  command->add_option("--dtype", options->dtype, "Storage dtype (default: the config's)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  command->add_flag("--force", options->force, "Replace an existing output directory");
  command->callback([options] {
    ModelConfig config = read_hf_config(options->config_path);
    if (options->dtype == "f32") config.dtype = DType::F32;
    if (options->dtype == "bf16") config.dtype = DType::BF16;
    if (options->dtype == "f16") config.dtype = DType::F16;
    Cpu cpu;
    AnyDecoder<Cpu> model = make_decoder(cpu, config);
    with_decoder(model, [&](auto& decoder) {
      init_parameters(cpu, decoder, {.seed = options->seed, .std = options->init_std});
      save_pretrained(cpu, decoder, config, options->output, options->force);
    });
    std::printf("wrote %s: %s, %lld layers, hidden %lld, vocab %lld, %s\n", options->output.c_str(),
                architecture_name(config.architecture), static_cast<long long>(config.num_layers),
                static_cast<long long>(config.hidden_size),
                static_cast<long long>(config.vocab_size),
                std::string(dtype_name(config.dtype)).c_str());
  });
}

}  // namespace kept::cli
