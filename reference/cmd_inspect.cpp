// kept inspect: what a checkpoint directory holds, validated: the config as kept reads it,
// every tensor checked against config.json (present, shaped as the config implies, nothing
// extra), and the tokenizer (class, vocabulary against the model's, special tokens, whether it
// loads without remote code). Useful before a conversion, and it fails with the same errors a
// conversion would give on a bad checkpoint.
#include <cstdio>
#include <string>

#include "commands.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/hf_tokenizer.hpp"
#include "kept/io/weights.hpp"

namespace kept::cli {

namespace {

void report_tokenizer(const std::filesystem::path& dir, const ModelConfig& config) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(dir / "tokenizer.model", error)) {
    std::printf("  tokenizer      none (no tokenizer.model)\n");
    return;
  }
  const TokenizerSource source = read_tokenizer_source(dir);
  const SentencePieceModel& model = source.model;
  std::string cls = "(no tokenizer_config.json)";
  if (source.tokenizer_config.is_object() && source.tokenizer_config.contains("tokenizer_class") &&
      source.tokenizer_config["tokenizer_class"].is_string())
    cls = source.tokenizer_config["tokenizer_class"].get<std::string>();
  std::printf("  tokenizer      %s, SentencePiece %s, %lld pieces (model vocabulary %lld%s)\n",
              cls.c_str(), sentencepiece_kind_name(model.kind),
              static_cast<long long>(model.size()), static_cast<long long>(config.vocab_size),
              model.size() <= config.vocab_size ? "" : ": TOO SMALL for the tokenizer");
  std::printf("  special        unk %s, bos %s, eos %s, pad %s\n",
              model.piece_or_empty(model.unk_id).c_str(),
              model.piece_or_empty(model.bos_id).c_str(),
              model.piece_or_empty(model.eos_id).c_str(),
              model.pad_id >= 0 ? model.piece_or_empty(model.pad_id).c_str() : "(none)");
  std::printf("  normaliser     rule %s, dummy prefix %s, extra whitespace %s, byte fallback %s\n",
              model.normalizer_name.empty() ? "(none)" : model.normalizer_name.c_str(),
              model.add_dummy_prefix ? "yes" : "no",
              model.remove_extra_whitespaces ? "removed" : "kept",
              model.byte_fallback ? "yes" : "no");
  const bool has_json = std::filesystem::is_regular_file(dir / "tokenizer.json", error);
  const char* loads = source.had_auto_map
                          ? "no: tokenizer_config.json has auto_map (remote code); `kept convert` "
                            "or `kept tokenizer --from` writes one that does"
                      : !source.tokenizer_config.is_object()
                          ? "no: no tokenizer_config.json (`kept tokenizer --from DIR` writes it)"
                      : !has_json ? "slow only: no tokenizer.json"
                                  : "yes";
  std::printf("  without remote code  %s%s\n", loads,
              source.chat_template.empty() ? "" : "; has a chat template");
  check_tokenizer_fits(source, config.vocab_size, (dir / "config.json").string());
}

}  // namespace

void register_inspect(CLI::App& app) {
  auto model_dir = std::make_shared<std::string>();
  auto list_tensors = std::make_shared<bool>(false);
  CLI::App* command = app.add_subcommand("inspect", "Validate a checkpoint and summarise it");
  add_existing_directory(command, "model", *model_dir, "Checkpoint directory");
  command->add_flag("--tensors", *list_tensors, "List every tensor");
  command->callback([model_dir, list_tensors] {
    const std::filesystem::path dir(*model_dir);
    const ModelConfig config = read_hf_config(dir / "config.json");
    const CheckpointReader reader = CheckpointReader::open(dir);
    const std::vector<std::string> skipped = check_checkpoint_tensors(reader, config);
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
    std::printf(
        "  tensors check  every tensor config.json implies, of its shape%s\n",
        skipped.empty()
            ? ""
            : (", " + std::to_string(skipped.size()) + " without a parameter skipped").c_str());
    report_tokenizer(dir, config);
  });
}

}  // namespace kept::cli
