// kept inspect: what a checkpoint directory holds, validated: the config as kept reads it,
// and every tensor with its dtype, shape and file. Useful before a conversion, and it fails
// with the same errors a conversion would give on a bad checkpoint.
#include <cstdio>
#include <string>

#include "commands.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"

namespace kept::cli {

void register_inspect(CLI::App& app) {
  auto model_dir = std::make_shared<std::string>();
  auto list_tensors = std::make_shared<bool>(false);
  CLI::App* command = app.add_subcommand("inspect", "Validate a checkpoint and summarise it");
  command->add_option("model", *model_dir, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  command->add_flag("--tensors", *list_tensors, "List every tensor");
  command->callback([model_dir, list_tensors] {
    const std::filesystem::path dir(*model_dir);
    const ModelConfig config = read_hf_config(dir / "config.json");
    const CheckpointReader reader = CheckpointReader::open(dir);
    std::printf("%s\n", dir.c_str());
    std::printf("  architecture   %s (%s)\n", architecture_name(config.architecture),
                config.norm_kind() == NormKind::LayerNorm ? "LayerNorm" : "RMSNorm");
    std::printf("  layers         %lld\n", static_cast<long long>(config.num_layers));
    std::printf("  hidden         %lld (%lld heads x %lld)\n",
                static_cast<long long>(config.hidden_size),
                static_cast<long long>(config.num_heads), static_cast<long long>(config.head_dim));
    std::printf("  intermediate   %lld\n", static_cast<long long>(config.intermediate_size));
    std::printf("  vocab          %lld\n", static_cast<long long>(config.vocab_size));
    std::printf("  rope_theta     %g\n", config.rope_theta);
    std::printf("  norm eps       %g\n", config.norm_eps);
    std::printf("  biases         attention %s, mlp %s\n", config.attention_bias ? "yes" : "no",
                config.mlp_bias ? "yes" : "no");
    std::int64_t elements = 0;
    std::uint64_t bytes = 0;
    for (const std::string& name : reader.names()) {
      const Tensor& tensor = reader.tensor(name);
      elements += tensor.numel();
      bytes += tensor.nbytes();
      if (*list_tensors)
        std::printf("  %-60s %-5s %-20s %s\n", name.c_str(),
                    std::string(dtype_name(tensor.dtype())).c_str(),
                    tensor.shape().to_string().c_str(), reader.file_of(name).c_str());
    }
    std::printf("  tensors        %zu in %zu file(s), %.3f B parameters, %.2f GB\n",
                reader.names().size(), reader.files().size(), static_cast<double>(elements) / 1e9,
                static_cast<double>(bytes) / 1e9);
  });
}

}  // namespace kept::cli
