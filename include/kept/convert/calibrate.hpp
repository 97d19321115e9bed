// kept/convert/calibrate.hpp: OPM statistics from the source model's own forward pass.
//
// Calibrated OPM needs, for every LayerNorm site, the activations that reach it: the source
// model runs (fp32, no gradients) over calibration tokens, and a NormInputObserver feeds each
// site's OpmAccumulator (three running sums per feature, one pass). Nothing is stored per
// token, so the calibration budget is bounded by time, not memory. Each site is then solved in
// closed form with its own (g, b): w* = g A + b B, with the diagnostics of kept/opm.hpp.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "kept/io/weights.hpp"
#include "kept/model/decoder.hpp"
#include "kept/opm.hpp"

namespace kept {

// OPM solutions keyed by norm prefix ("model.layers.0.input_layernorm", ..., "model.norm"), in
// checkpoint order of the sites.
struct NormCalibration {
  std::vector<std::string> sites;
  std::map<std::string, OpmSolution> solutions;
  std::int64_t tokens = 0;
};

// Runs `model` (a loaded LayerNorm decoder) over `tokens`, cut into `sequences` rows of
// `seq_len`, `batch` sequences at a time, and solves every norm site.
template <class Backend>
NormCalibration calibrate_norms(
    Backend& backend, Decoder<LayerNorm, Backend>& model, std::span<const std::int32_t> tokens,
    std::int64_t seq_len, std::int64_t batch,
    const std::function<void(std::int64_t done, std::int64_t total)>& progress = {}) {
  using Act = typename Backend::Activation;
  KEPT_CHECK(seq_len > 0 && batch > 0, "calibration: seq_len and batch must be positive");
  const std::int64_t sequences = static_cast<std::int64_t>(tokens.size()) / seq_len;
  KEPT_CHECK(sequences > 0, "calibration: ", tokens.size(), " tokens do not make one sequence of ",
             seq_len);
  const ModelConfig& config = model.config();

  NormCalibration result;
  std::map<std::string, OpmAccumulator> accumulators;
  std::map<std::string, const Norm<LayerNorm, Backend>*> norms;
  auto add_site = [&](const Norm<LayerNorm, Backend>& norm) {
    const std::string& weight = norm.weight.name;
    const std::string site = weight.substr(0, weight.size() - std::string_view(".weight").size());
    result.sites.push_back(site);
    accumulators.emplace(site, OpmAccumulator(config.hidden_size, config.norm_eps));
    norms.emplace(site, &norm);
  };
  for (const auto& block : model.layers) {
    add_site(block.input_layernorm);
    add_site(block.post_attention_layernorm);
  }
  add_site(model.norm);

  const NormInputObserver<Act> observer = [&](const std::string& site,
                                              MatrixView<const Act> input) {
    accumulators.at(site).add(input);
  };
  typename Decoder<LayerNorm, Backend>::Activations acts;
  for (std::int64_t first = 0; first < sequences; first += batch) {
    const std::int64_t rows = std::min(batch, sequences - first);
    model.forward(backend,
                  tokens.subspan(static_cast<std::size_t>(first * seq_len),
                                 static_cast<std::size_t>(rows * seq_len)),
                  rows, seq_len, acts, ForwardMode::Inference, false, &observer);
    if (progress) progress(first + rows, sequences);
  }
  result.tokens = sequences * seq_len;
  for (const std::string& site : result.sites) {
    const auto* norm = norms.at(site);
    const Tensor g = norm->weight.value.to(DType::F64), b = norm->bias.value.to(DType::F64);
    result.solutions.emplace(site, accumulators.at(site).solve(g.span<double>(), b.span<double>()));
  }
  return result;
}

// The calibrated norm weights for convert_checkpoint: w* keyed by weight name.
inline std::map<std::string, std::vector<double>> calibrated_weights(
    const NormCalibration& calibration) {
  std::map<std::string, std::vector<double>> weights;
  for (const std::string& site : calibration.sites)
    weights.emplace(site + ".weight", calibration.solutions.at(site).w_star);
  return weights;
}

}  // namespace kept
