// kept opm SRC --data FILE [--report out.json] [--plot out.png]
//
// Verifies OPM's numerics on a user's model and data, before any conversion: the source model
// runs over the text, and at every LayerNorm site kept reports how well each mode's RMSNorm
// reproduces the LayerNorm's output on those activations,
//   paper       w = g                              (the report's OPM)
//   calibrated  w = w*, the closed-form optimum    (kept/opm.hpp)
//   exact       centred conversion: zero error where the bias folds into the next layer, the
//               bias term itself where it cannot (the final norm, or every site without folding)
// as relative output errors ||LN(x) - RMS_w(x)|| / ||LN(x)|| over all tokens, plus the
// statistics that explain them: the distribution of |mu|/s per token (the paper's near-zero-
// mean assumption), the ranges of A and B in w* = g A + b B, and how far w* moves from g.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "calibration.hpp"
#include "commands.hpp"
#include "kept/convert/convert.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/hf_config.hpp"
#include "plot.hpp"

namespace kept::cli {
namespace {

struct SiteReport {
  std::string site;
  double paper = 0, calibrated = 0, exact_folded = 0, exact_centring_only = 0;
  const OpmSolution* solution = nullptr;
};

double squared_norm(const Tensor& vector) {
  double sum = 0;
  for (std::int64_t i = 0; i < vector.numel(); ++i) {
    const double value = detail::load_as_float(vector.raw(), vector.dtype(), i);
    sum += value * value;
  }
  return sum;
}

struct Options {
  std::string source, data, report, plot;
  std::int64_t tokens = 65536, seq_len = 512;
};

void run(const Options& options) {
  const std::filesystem::path source_dir(options.source);
  const ModelConfig config = read_hf_config(source_dir / "config.json");
  const CheckpointReader source = CheckpointReader::open(source_dir);
  validate_source_checkpoint(source, config);
  const CalibrationData data = load_calibration(
      options.data, source_dir, config, {.max_tokens = options.tokens, .seq_len = options.seq_len});
  const NormCalibration calibration = calibrate_source(source, config, data);

  std::vector<SiteReport> sites;
  for (const std::string& site : calibration.sites) {
    const OpmSolution& solution = calibration.solutions.at(site);
    SiteReport report{site, solution.rel_err_paper, solution.rel_err_calibrated, 0, 0, &solution};
    // With the stream centred, LN(x) = RMS_g(x) + b exactly: the error left is the bias
    // itself, T ||b||^2 of squared error, unless it folds into the next linear layer.
    const double bias_error = std::sqrt(static_cast<double>(solution.tokens) *
                                        squared_norm(source.tensor(site + ".bias")) /
                                        std::max(solution.output_energy, 1e-300));
    report.exact_centring_only = bias_error;
    report.exact_folded = site == "model.norm" ? bias_error : 0.0;
    sites.push_back(report);
  }

  std::printf("OPM numerics of %s on %s (%lld tokens)\n", options.source.c_str(),
              options.data.c_str(), static_cast<long long>(calibration.tokens));
  std::printf("relative output error ||LN(x) - RMSNorm_w(x)|| / ||LN(x)|| per site\n");
  std::printf("%-40s %10s %10s %10s %10s %9s %9s %10s\n", "site", "paper", "calibrated", "exact",
              "centred", "|mu|/s p50", "p99", "max|w*-g|");
  double sums[4] = {};
  for (const SiteReport& report : sites) {
    const OpmSolution& s = *report.solution;
    std::printf("%-40s %10.4g %10.4g %10.4g %10.4g %9.3g %9.3g %10.4g\n", report.site.c_str(),
                report.paper, report.calibrated, report.exact_folded, report.exact_centring_only,
                s.abs_mu_over_s_p50, s.abs_mu_over_s_p99, s.max_abs_shift);
    sums[0] += report.paper;
    sums[1] += report.calibrated;
    sums[2] += report.exact_folded;
    sums[3] += report.exact_centring_only;
  }
  const double count = static_cast<double>(sites.size());
  std::printf("%-40s %10.4g %10.4g %10.4g %10.4g\n", "mean over sites", sums[0] / count,
              sums[1] / count, sums[2] / count, sums[3] / count);
  std::printf("(exact: centred with the biases folded; centred: --no-bias-fold)\n");

  if (!options.report.empty()) {
    nlohmann::json json;
    json["model"] = options.source;
    json["data"] = options.data;
    json["tokens"] = calibration.tokens;
    json["eps"] = config.norm_eps;
    for (const SiteReport& report : sites) {
      const OpmSolution& s = *report.solution;
      nlohmann::json histogram = nlohmann::json::array();
      for (int bin = 0; bin < LogHistogram::kBins; ++bin)
        if (s.abs_mu_over_s.count(bin))
          histogram.push_back({{"lower", LogHistogram::lower_edge(bin)},
                               {"upper", LogHistogram::upper_edge(bin)},
                               {"count", s.abs_mu_over_s.count(bin)}});
      json["sites"].push_back({
          {"site", report.site},
          {"relative_error",
           {{"paper", report.paper},
            {"calibrated", report.calibrated},
            {"exact", report.exact_folded},
            {"exact_centring_only", report.exact_centring_only}}},
          {"loss", {{"paper", s.loss_at_g}, {"calibrated", s.loss_at_w_star}, {"gap", s.gap}}},
          {"output_energy", s.output_energy},
          {"w_star_shift", {{"max_abs", s.max_abs_shift}, {"relative", s.rel_shift}}},
          {"A", {{"min", s.A_range.min}, {"mean", s.A_range.mean}, {"max", s.A_range.max}}},
          {"abs_B",
           {{"min", s.abs_B_range.min}, {"mean", s.abs_B_range.mean}, {"max", s.abs_B_range.max}}},
          {"abs_mu_over_s",
           {{"min", s.abs_mu_over_s_min},
            {"mean", s.abs_mu_over_s_mean},
            {"p50", s.abs_mu_over_s_p50},
            {"p90", s.abs_mu_over_s_p90},
            {"p99", s.abs_mu_over_s_p99},
            {"max", s.abs_mu_over_s_max},
            {"histogram", histogram}}},
          {"abs_mu_over_r_mean", s.abs_mu_over_r_mean},
          {"inactive_coordinates", s.inactive_count()},
          {"w_star", s.w_star},
          {"A_per_feature", s.A},
          {"B_per_feature", s.B},
      });
    }
    write_file_atomically(options.report, json.dump(2) + "\n");
    std::printf("report: %s\n", options.report.c_str());
  }
  if (!options.plot.empty()) {
    Chart errors{"LayerNorm -> RMSNorm: relative output error per site",
                 "site (0 = layer 0 input norm, ..., last = final norm)",
                 "relative error",
                 true,
                 {}};
    Chart means{"Per-token mean over the scale, |mu|/s (the paper assumes ~0)",
                "site",
                "|mu| / s",
                true,
                {}};
    Series paper{"paper (w = g)", {}, {}, true}, calibrated{"calibrated (w = w*)", {}, {}, true},
        exact{"exact, centring only", {}, {}, true}, p50{"median", {}, {}, true},
        p99{"99th percentile", {}, {}, true}, maximum{"max", {}, {}, true};
    for (std::size_t i = 0; i < sites.size(); ++i) {
      const double x = static_cast<double>(i);
      for (Series* s : {&paper, &calibrated, &exact, &p50, &p99, &maximum})
        s->x.push_back(x);
      paper.y.push_back(sites[i].paper);
      calibrated.y.push_back(sites[i].calibrated);
      exact.y.push_back(sites[i].exact_centring_only);
      p50.y.push_back(sites[i].solution->abs_mu_over_s_p50);
      p99.y.push_back(sites[i].solution->abs_mu_over_s_p99);
      maximum.y.push_back(sites[i].solution->abs_mu_over_s_max);
    }
    errors.series = {paper, calibrated, exact};
    means.series = {p50, p99, maximum};
    write_png(options.plot, {errors, means});
    std::printf("plot: %s\n", options.plot.c_str());
  }
}

}  // namespace

void register_opm(CLI::App& app) {
  auto [command, options] =
      add_command<Options>(app, "opm", "Measure OPM's per-site numerics on a model and text");
  add_existing_directory(command, "source", options->source, "Orion/StableLM checkpoint directory");
  add_existing_file(command, "--data", options->data,
                    "Text to run the model on (plain text or JSONL)");
  command->add_option("--report", options->report, "Write the per-site diagnostics as JSON");
  command->add_option("--plot", options->plot, "Write the per-site errors as a PNG chart");
  add_positive(command, "--tokens", options->tokens, "Tokens of --data to use");
  add_positive(command, "--seq-len", options->seq_len, "Sequence length");
  command->callback([options] { run(*options); });
}

}  // namespace kept::cli
