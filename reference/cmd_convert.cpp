// kept convert SRC DST --opm paper|calibrated|exact [--calib FILE] [--no-bias-fold] [--force]
//
// Reads an Orion / StableLM checkpoint (config.json + safetensors, single or sharded),
// writes a Llama checkpoint that transformers loads with trust_remote_code=False, and says what
// it did, with a complete HF tokenizer (kept/io/hf_tokenizer.hpp; the source's remote-code
// tokenizer files and any *.py are never copied). DST is built under a temporary name beside it and
// renamed into place at the end, so an interrupted or failed conversion leaves no DST (and an
// existing DST is only replaced with
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
#include "kept/io/hf_tokenizer.hpp"
#include "progress.hpp"

namespace kept::cli {
namespace {

struct Options {
  std::string source, destination, mode = "paper", calibration, chat_template = "auto";
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
  const std::vector<std::string> skipped = validate_source_checkpoint(source, source_config);
  // The tokenizer is read (and any problem with it reported) before the long tensor work.
  std::error_code missing;
  const bool has_tokenizer =
      std::filesystem::is_regular_file(source_dir / "tokenizer.model", missing);
  std::optional<TokenizerSource> tokenizer;
  if (has_tokenizer) tokenizer = read_tokenizer_source(source_dir);
  HfTokenizerOptions tokenizer_options = tokenizer_options_for(source_config);
  choose_chat_template(tokenizer_options, options.chat_template);
  if (tokenizer) {
    check_tokenizer_fits(*tokenizer, source_config.vocab_size,
                         (source_dir / "config.json").string());
    // Fails here, before any tensor is written, if the tokenizer cannot be expressed.
    check_tokenizer_supported(tokenizer->model, tokenizer->model_file.string());
  }

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
  std::optional<HfTokenizerReport> tokenizer_report;
  if (tokenizer)
    tokenizer_report = write_hf_tokenizer(*tokenizer, output.path(), tokenizer_options);
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
  if (!skipped.empty())
    std::printf("  skipped          %zu tensor(s) that hold no parameter (e.g. %s)\n",
                skipped.size(), skipped.front().c_str());
  if (tokenizer_report) {
    std::printf(
        "  tokenizer        %s, %lld pieces%s%s\n", tokenizer_report->tokenizer_class.c_str(),
        static_cast<long long>(tokenizer_report->vocab_size),
        tokenizer_report->chat_template ? ", chat template" : "",
        tokenizer_report->dropped_auto_map ? ", the source's auto_map (remote code) dropped" : "");
    if (!tokenizer_report->class_reason.empty())
      std::printf(
          "                   (not LlamaTokenizer: %s; tokenizer.json keeps the ids exact)\n",
          tokenizer_report->class_reason.c_str());
  } else {
    std::printf("  tokenizer        none: %s has no tokenizer.model\n", options.source.c_str());
  }
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
  auto [command, options] = add_command<Options>(
      app, "convert", "Convert an Orion/StableLM checkpoint to Llama (NPM + OPM)");
  add_existing_directory(command, "source", options->source, "Source checkpoint directory");
  command->add_option("destination", options->destination, "Llama checkpoint directory to create")
      ->required();
  command
      ->add_option("--opm", options->mode,
                   "LayerNorm -> RMSNorm mapping: paper, calibrated or exact")
      ->check(CLI::IsMember({"paper", "calibrated", "exact"}))
      ->capture_default_str();
  add_existing_file(
      command, "--calib", options->calibration,
      "Calibration text (plain text or JSONL): needed by --opm calibrated; with any mode, "
      "also reports KL and top-1 agreement before training",
      Need::Optional);
  add_positive(command, "--calib-tokens", options->calibration_tokens, "Calibration tokens to use");
  add_positive(command, "--seq-len", options->sequence_length, "Calibration sequence length");
  command->add_flag("!--no-bias-fold", options->bias_fold,
                    "Exact mode: centre only, keep the pure Llama template (no biases)");
  command
      ->add_option("--chat-template", options->chat_template,
                   "Chat template of the output: auto (the source's, if any), none, orion "
                   "(<s>Human: {q}\\n\\nAssistant: </s>{a}</s>), or a Jinja file")
      ->capture_default_str();
  command->add_flag("--force", options->force, "Replace an existing destination");
  command->callback([options] { run(*options); });
}

}  // namespace kept::cli
