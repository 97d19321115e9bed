// reference/interpolate.hpp: one or two Llama checkpoints mapped to a target shape and, for two,
// interpolated (kept/convert/resize.hpp), written as a complete HF checkpoint. Used by
// `kept interpolate`, `kept chain` (each anchor starts as the previous one mapped to its shape)
// and the demo's Chain-based Distillation table.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "kept/model/config.hpp"

namespace kept::cli {

struct InterpolationRequest {
  std::vector<std::filesystem::path> anchors;  // one (a resize) or two
  ModelConfig target;                          // the shape to map to (its dtype is written)
  std::optional<double> alpha;                 // default: default_alpha from the sizes
  std::filesystem::path output;
  bool force = false;
  bool quiet = false;
};

struct InterpolationReport {
  double alpha = 0;  // 0 with one anchor
  std::vector<ModelConfig> anchor_configs;
  std::vector<double> anchor_parameters;
  double target_parameters = 0;
};

// Reads the anchors (and A's tokenizer, which B's must equal), maps, interpolates and writes
// `output` atomically (nothing is written when anything fails).
InterpolationReport interpolate_checkpoints(const InterpolationRequest& request);

// "shrink", "grow" or "equal" for each of hidden, heads, intermediate and layers.
std::string describe_mapping(const ModelConfig& from, const ModelConfig& to);

}  // namespace kept::cli
