#include "calibration.hpp"

#include <cmath>
#include <cstdio>

#include "corpus.hpp"
#include "kept/backend/cpu.hpp"
#include "kept/convert/fidelity.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/weights.hpp"
#include "progress.hpp"
#include "tokenizer.hpp"

namespace kept::cli {

CalibrationData load_calibration(const std::filesystem::path& file,
                                 const std::filesystem::path& source_dir, const ModelConfig& config,
                                 const CalibrationOptions& options) {
  const Tokenizer tokenizer(source_dir / "tokenizer.model");
  tokenizer.check_fits(config.vocab_size, (source_dir / "config.json").string());
  const std::vector<std::int32_t> stream =
      tokenize_documents(read_documents(file), tokenizer, options.max_tokens);
  CalibrationData data;
  data.seq_len = std::min<std::int64_t>(options.seq_len, static_cast<std::int64_t>(stream.size()));
  KEPT_CHECK(data.seq_len >= 2, file.string(), ": the calibration text gives ", stream.size(),
             " tokens; at least 2 are needed");
  data.sequences = static_cast<std::int64_t>(stream.size()) / data.seq_len;
  data.batch = options.batch;
  data.tokens.assign(stream.begin(), stream.begin() + data.sequences * data.seq_len);
  return data;
}

NormCalibration calibrate_source(const CheckpointReader& source, const ModelConfig& config,
                                 const CalibrationData& data) {
  Cpu cpu;
  Decoder<LayerNorm, Cpu> model(cpu, config);
  load_weights(cpu, model, source);
  ProgressLine progress("calibrate");
  NormCalibration calibration = calibrate_norms(
      cpu, model, data.tokens, data.seq_len, data.batch,
      [&](std::int64_t done, std::int64_t total) {
        progress.update(static_cast<double>(done) / static_cast<double>(total),
                        std::to_string(done) + "/" + std::to_string(total) + " sequences");
      });
  progress.finish();
  return calibration;
}

Fidelity measure_fidelity(const std::filesystem::path& source_dir,
                          const std::filesystem::path& converted_dir, const CalibrationData& data) {
  Cpu cpu;
  const ModelConfig source_config = read_hf_config(source_dir / "config.json");
  const ModelConfig converted_config = read_hf_config(converted_dir / "config.json");
  Decoder<LayerNorm, Cpu> source(cpu, source_config);
  Decoder<RMSNorm, Cpu> converted(cpu, converted_config);
  load_weights(cpu, source, CheckpointReader::open(source_dir));
  load_weights(cpu, converted, CheckpointReader::open(converted_dir));
  const xkd::EvalSums sums =
      compare_models(cpu, source, converted, data.tokens, data.seq_len, data.batch);
  Fidelity fidelity;
  fidelity.tokens = sums.tokens;
  const double count = static_cast<double>(std::max<std::int64_t>(sums.tokens, 1));
  fidelity.kl = sums.kl / count;
  fidelity.top1_agreement = static_cast<double>(sums.agree) / count;
  fidelity.source_perplexity = std::exp(sums.teacher_ce / count);
  fidelity.converted_perplexity = std::exp(sums.student_ce / count);
  return fidelity;
}

}  // namespace kept::cli
