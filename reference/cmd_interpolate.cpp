// kept interpolate: Chain-based Distillation's initialisation of a model of any size between two
// anchors: both mapped to the target shape (kept/convert/resize.hpp: selection by importance when
// shrinking, function-preserving zero-padding when growing, layers by relative depth) and
// interpolated, w = (1 - a) w_A + a w_B, with a = (N_A - N_T) / (N_A - N_B) from the parameter
// counts unless --alpha gives it. With one anchor it only maps it (the nearest-anchor
// initialisation). The output is a complete HF Llama checkpoint with A's tokenizer.
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "commands.hpp"
#include "interpolate.hpp"
#include "kept/core/dtype.hpp"
#include "kept/io/hf_config.hpp"

namespace kept::cli {

void register_interpolate(CLI::App& app) {
  struct Options {
    std::vector<std::string> paths;
    std::string config_path, dtype;
    double alpha = -1;
    bool force = false;
  };
  auto [command, options] = add_command<Options>(
      app, "interpolate",
      "Map one or two Llama checkpoints to a target shape and interpolate them (Chain-based "
      "Distillation's initialisation)");
  command->add_option("paths", options->paths, "ANCHOR_A [ANCHOR_B] OUTPUT")
      ->required()
      ->expected(2, 3);
  add_existing_file(command, "--config", options->config_path,
                    "HF config.json of the target shape (llama; same vocabulary and head_dim)");
  command
      ->add_option("--alpha", options->alpha,
                   "Weight of B: w = (1 - alpha) w_A + alpha w_B (default: from the sizes, "
                   "(N_A - N_T) / (N_A - N_B))")
      ->check(CLI::Range(0.0, 1.0));
  command->add_option("--dtype", options->dtype, "Storage dtype (default: the target config's)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  command->add_flag("--force", options->force, "Replace an existing output directory");
  command->callback([options] {
    InterpolationRequest request;
    for (std::size_t k = 0; k + 1 < options->paths.size(); ++k) {
      std::error_code error;
      KEPT_CHECK(std::filesystem::is_directory(options->paths[k], error), options->paths[k],
                 ": not a checkpoint directory");
      request.anchors.emplace_back(options->paths[k]);
    }
    request.output = options->paths.back();
    request.target = read_hf_config(options->config_path);
    if (options->dtype == "f32") request.target.dtype = DType::F32;
    if (options->dtype == "bf16") request.target.dtype = DType::BF16;
    if (options->dtype == "f16") request.target.dtype = DType::F16;
    if (options->alpha >= 0) request.alpha = options->alpha;
    request.force = options->force;
    const InterpolationReport report = interpolate_checkpoints(request);
    std::printf("wrote %s: %.0f parameters", request.output.c_str(), report.target_parameters);
    if (request.anchors.size() == 2)
      std::printf(", alpha %.4f between %.0f (A) and %.0f (B) parameters%s", report.alpha,
                  report.anchor_parameters[0], report.anchor_parameters[1],
                  options->alpha >= 0 ? " (given)" : " (from the sizes)");
    std::printf("\n");
  });
}

}  // namespace kept::cli
