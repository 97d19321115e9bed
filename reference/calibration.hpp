// reference/calibration.hpp: the calibration steps of `kept convert` and `kept opm`:
// calibration text -> token sequences, OPM statistics from the source model, and the
// before-training fidelity of a converted checkpoint.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "kept/convert/calibrate.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/model/config.hpp"

namespace kept::cli {

struct CalibrationOptions {
  std::int64_t max_tokens = 65536;
  std::int64_t seq_len = 512;
  std::int64_t batch = 4;
};

struct CalibrationData {
  std::vector<std::int32_t> tokens;  // sequences * seq_len ids
  std::int64_t sequences = 0, seq_len = 0, batch = 0;
};

// Reads `file`, tokenizes it with `source_dir`/tokenizer.model and cuts it into whole sequences
// (shorter when the text is short).
CalibrationData load_calibration(const std::filesystem::path& file,
                                 const std::filesystem::path& source_dir, const ModelConfig& config,
                                 const CalibrationOptions& options);

// Runs the source model over the calibration data and solves every norm site.
NormCalibration calibrate_source(const CheckpointReader& source, const ModelConfig& config,
                                 const CalibrationData& data);

struct Fidelity {
  std::int64_t tokens = 0;
  double kl = 0;              // mean KL(p_source || p_converted), nats per token
  double top1_agreement = 0;  // fraction of tokens whose argmax agree
  double source_perplexity = 0, converted_perplexity = 0;
};

Fidelity measure_fidelity(const std::filesystem::path& source_dir,
                          const std::filesystem::path& converted_dir, const CalibrationData& data);

}  // namespace kept::cli
