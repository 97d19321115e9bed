// kept convert SRC DST --opm paper|calibrated|exact [--calib FILE] [--no-bias-fold] [--force]
//
// Reads an Orion / StableLM checkpoint (config.json + safetensors, single or sharded),
// writes a Llama checkpoint that transformers loads with trust_remote_code=False, and says what
// it did. DST is built under a temporary name beside it and renamed into place at the end, so
// an interrupted or failed conversion leaves no DST (and an existing DST is only replaced with
// --force).
#include <cstdio>
#include <filesystem>
#include <string>

#include "calibration.hpp"
#include "commands.hpp"
#include "kept/convert/convert.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "progress.hpp"

namespace kept::cli {
namespace {

// Tokenizer and chat-template files travel unchanged: the vocabulary is the same.
constexpr const char* kTokenizerFiles[] = {"tokenizer.model",
                                           "tokenizer.json",
                                           "tokenizer_config.json",
                                           "special_tokens_map.json",
                                           "added_tokens.json",
                                           "vocab.json",
                                           "merges.txt",
                                           "chat_template.jinja"};

std::size_t copy_tokenizer_files(const std::filesystem::path& from,
                                 const std::filesystem::path& to) {
  std::size_t copied = 0;
  for (const char* name : kTokenizerFiles) {
    std::error_code error;
    if (!std::filesystem::is_regular_file(from / name, error)) continue;
    std::filesystem::copy_file(from / name, to / name, error);
    KEPT_CHECK(!error, (from / name).string(), ": cannot copy to ", (to / name).string(), ": ",
               error.message());
    ++copied;
  }
  return copied;
}

struct Options {
  std::string source, destination, mode = "paper", calibration;
  bool bias_fold = true, force = false;
  std::int64_t calibration_tokens = 65536, sequence_length = 512;
};

void run(const Options& options) {
  const std::filesystem::path source_dir(options.source);
  const OpmMode mode = *parse_opm_mode(options.mode);
  if (mode == OpmMode::Calibrated)
    KEPT_CHECK(!options.calibration.empty(),
               "--opm calibrated needs calibration text: --calib FILE");
  const ModelConfig source_config = read_hf_config(source_dir / "config.json");
  const CheckpointReader source = CheckpointReader::open(source_dir);
  validate_source_checkpoint(source, source_config);

  // Refuse an existing DST before any work (AtomicDirectory checks again at commit).
  AtomicDirectory output(options.destination, options.force);

  ConversionOptions conversion;
  conversion.mode = mode;
  conversion.bias_fold = options.bias_fold;
  std::optional<CalibrationData> calibration;
  if (!options.calibration.empty()) {
    calibration = load_calibration(
        options.calibration, source_dir, source_config,
        {.max_tokens = options.calibration_tokens, .seq_len = options.sequence_length});
    std::printf("calibration: %s, %lld tokens in %lld sequences of %lld\n",
                options.calibration.c_str(), static_cast<long long>(calibration->tokens.size()),
                static_cast<long long>(calibration->sequences),
                static_cast<long long>(calibration->seq_len));
  }
  if (mode == OpmMode::Calibrated)
    conversion.calibrated_norm_weights =
        calibrated_weights(calibrate_source(source, source_config, *calibration));

  ProgressLine progress("convert");
  conversion.progress = [&](std::size_t done, std::size_t total, std::uint64_t bytes) {
    progress.update(static_cast<double>(done) / static_cast<double>(total),
                    format_bytes(bytes) + " written, tensor " + std::to_string(done) + "/" +
                        std::to_string(total));
  };
  const ConversionReport report =
      convert_checkpoint(source, source_config, output.path(), conversion);
  progress.finish();
  const std::size_t tokenizer_files = copy_tokenizer_files(source_dir, output.path());
  // Measured on the finished output before it is renamed into place: a failure here leaves no
  // DST behind.
  std::optional<Fidelity> fidelity;
  if (calibration) fidelity = measure_fidelity(source_dir, output.path(), *calibration);
  output.commit();

  std::printf("converted %s -> %s\n", options.source.c_str(), options.destination.c_str());
  std::printf("  opm mode         %s%s\n", opm_mode_name(mode),
              mode == OpmMode::Exact
                  ? (options.bias_fold ? " (centred, biases folded)" : " (centred only)")
                  : "");
  std::printf(
      "  tensors          %zu mapped (%zu copied bit-exact, %zu computed), %zu LayerNorm biases "
      "%s\n",
      report.tensors, report.copied, report.computed, report.dropped,
      mode == OpmMode::Exact && options.bias_fold ? "folded" : "dropped");
  std::printf("  bytes            %s in %.1f s (%.2f GB/s)\n", format_bytes(report.bytes).c_str(),
              report.seconds,
              static_cast<double>(report.bytes) / 1e9 / std::max(report.seconds, 1e-9));
  std::printf(
      "  target           LlamaForCausalLM, rms_norm_eps %g, rope_theta %g, attention_bias %s, "
      "mlp_bias %s\n",
      report.target.norm_eps, report.target.rope_theta,
      report.target.attention_bias ? "true" : "false", report.target.mlp_bias ? "true" : "false");
  std::printf("  tokenizer files  %zu copied\n", tokenizer_files);
  if (mode == OpmMode::Exact)
    std::printf(
        "  final-norm term  W_lm b_final: max |logit offset| %.4g, range %.4g (no Llama slot; 0 "
        "means exact)\n",
        report.final_bias_logit_max_abs, report.final_bias_logit_range);
  if (fidelity) {
    std::printf(
        "  before training  on %lld calibration tokens: KL(source || converted) %.5f nats/token, "
        "top-1 agreement %.2f%%, perplexity %.3f (source %.3f)\n",
        static_cast<long long>(fidelity->tokens), fidelity->kl, 100.0 * fidelity->top1_agreement,
        fidelity->converted_perplexity, fidelity->source_perplexity);
  }
}

}  // namespace

void register_convert(CLI::App& app) {
  auto options = std::make_shared<Options>();
  CLI::App* command =
      app.add_subcommand("convert", "Convert an Orion/StableLM checkpoint to Llama (NPM + OPM)");
  command->add_option("source", options->source, "Source checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  command->add_option("destination", options->destination, "Llama checkpoint directory to create")
      ->required();
  command
      ->add_option("--opm", options->mode,
                   "LayerNorm -> RMSNorm mapping: paper, calibrated or exact")
      ->check(CLI::IsMember({"paper", "calibrated", "exact"}))
      ->capture_default_str();
  command
      ->add_option(
          "--calib", options->calibration,
          "Calibration text (plain text or JSONL): needed by --opm calibrated; with any mode, "
          "also reports KL and top-1 agreement before training")
      ->check(CLI::ExistingFile);
  command->add_option("--calib-tokens", options->calibration_tokens, "Calibration tokens to use")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  command->add_option("--seq-len", options->sequence_length, "Calibration sequence length")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  command->add_flag("!--no-bias-fold", options->bias_fold,
                    "Exact mode: centre only, keep the pure Llama template (no biases)");
  command->add_flag("--force", options->force, "Replace an existing destination");
  command->callback([options] { run(*options); });
}

}  // namespace kept::cli
