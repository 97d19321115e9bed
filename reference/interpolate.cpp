#include "interpolate.hpp"

#include <cstdio>
#include <fstream>
#include <iterator>

#include <nlohmann/json.hpp>

#include "kept/backend/cpu.hpp"
#include "kept/convert/resize.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/hf_tokenizer.hpp"
#include "kept/io/weights.hpp"
#include "kept/model/decoder.hpp"
#include "models.hpp"

namespace kept::cli {

namespace fs = std::filesystem;

namespace {

std::string file_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  KEPT_CHECK(in, path.string(), ": cannot read");
  return std::string(std::istreambuf_iterator<char>(in), {});
}

NamedWeights weights_of(Cpu& cpu, LoadedModel& loaded) {
  NamedWeights weights;
  with_decoder(loaded.model, [&](auto& model) {
    model.visit_parameters([&](Parameter& p) { weights.emplace(p.name, cpu.download(p.value)); });
  });
  return weights;
}

}  // namespace

std::string describe_mapping(const ModelConfig& from, const ModelConfig& to) {
  auto axis = [](const char* name, std::int64_t a, std::int64_t b) {
    return std::string(name) + " " + std::to_string(a) + (a == b ? " (equal)" : " -> ") +
           (a == b ? "" : std::to_string(b) + (b < a ? " (shrink)" : " (grow)"));
  };
  return axis("hidden", from.hidden_size, to.hidden_size) + ", " +
         axis("heads", from.num_heads, to.num_heads) + ", " +
         axis("intermediate", from.intermediate_size, to.intermediate_size) + ", " +
         axis("layers", from.num_layers, to.num_layers);
}

InterpolationReport interpolate_checkpoints(const InterpolationRequest& request) {
  const std::size_t count = request.anchors.size();
  KEPT_CHECK(count == 1 || count == 2, "interpolate: ", count,
             " anchors given; give one (a resize) or two");
  KEPT_CHECK(count == 2 || !request.alpha, "interpolate: --alpha needs two anchors");
  const ModelConfig& target = request.target;
  target.validate("target config");
  InterpolationReport report;
  report.target_parameters = parameter_count(target);
  for (const fs::path& anchor : request.anchors) {
    const ModelConfig config = read_hf_config(anchor / "config.json");
    check_resizable(config, anchor.string(), target, "target config");
    report.anchor_configs.push_back(config);
    report.anchor_parameters.push_back(parameter_count(config));
  }
  // A's tokenizer goes with the output; B, if it has one, must have the same.
  const fs::path tokenizer_file = request.anchors[0] / "tokenizer.model";
  std::error_code error;
  KEPT_CHECK(fs::is_regular_file(tokenizer_file, error), request.anchors[0].string(),
             ": has no tokenizer.model; the output must be a complete checkpoint with its "
             "tokenizer");
  if (count == 2 && fs::is_regular_file(request.anchors[1] / "tokenizer.model", error))
    KEPT_CHECK(file_bytes(tokenizer_file) == file_bytes(request.anchors[1] / "tokenizer.model"),
               request.anchors[1].string(), ": its tokenizer.model differs from ",
               request.anchors[0].string(), "'s; interpolating needs one vocabulary");
  const TokenizerSource tokenizer = read_tokenizer_source(request.anchors[0]);
  if (count == 2) {
    report.alpha = request.alpha.value_or(
        default_alpha(report.anchor_configs[0], report.anchor_configs[1], target));
    KEPT_CHECK(report.alpha >= 0 && report.alpha <= 1, "interpolate: --alpha ", report.alpha,
               " is outside [0, 1]");
  }

  Cpu cpu;
  std::vector<NamedWeights> mapped;
  for (std::size_t k = 0; k < count; ++k) {
    LoadedModel loaded = load_model(cpu, request.anchors[k]);
    mapped.push_back(resize_weights(weights_of(cpu, loaded), report.anchor_configs[k], target,
                                    request.anchors[k].string()));
    if (!request.quiet)
      std::fprintf(stderr, "%s: %s\n", request.anchors[k].c_str(),
                   describe_mapping(report.anchor_configs[k], target).c_str());
  }
  const NamedWeights weights =
      count == 2 ? interpolate_weights(mapped[0], mapped[1], report.alpha) : std::move(mapped[0]);
  LlamaDecoder<Cpu> model(cpu, target);
  model.visit_parameters([&](Parameter& p) {
    auto found = weights.find(p.name);
    KEPT_CHECK(found != weights.end(), "interpolate: no weights for ", p.name);
    cpu.upload(found->second, p.value);
  });
  nlohmann::json provenance{{"anchors", nlohmann::json::array()},
                            {"alpha", report.alpha},
                            {"target_parameters", report.target_parameters},
                            {"rule",
                             "kept/convert/resize.hpp: w = w_A + alpha (w_B - w_A) after "
                             "mapping both anchors to the target shape"}};
  for (std::size_t k = 0; k < count; ++k)
    provenance["anchors"].push_back(
        {{"path", request.anchors[k].string()},
         {"parameters", report.anchor_parameters[k]},
         {"mapping", describe_mapping(report.anchor_configs[k], target)}});
  if (request.output.has_parent_path()) {
    fs::create_directories(request.output.parent_path(), error);
    KEPT_CHECK(!error, request.output.parent_path().string(), ": cannot create: ", error.message());
  }
  save_pretrained(
      cpu, model, target, request.output, request.force, [&](const fs::path& directory) {
        write_hf_tokenizer(tokenizer, directory, tokenizer_options_for(target));
        std::ofstream(directory / "kept_interpolation.json") << provenance.dump(2) << "\n";
      });
  return report;
}

}  // namespace kept::cli
