// The conversion (kept/convert/convert.hpp, calibrate.hpp): small random Orion models with
// non-trivial LayerNorm biases and an embedding with a non-zero row mean, saved as float64
// checkpoints so that the float64 path can show exactness, converted, and loaded back as Llama
// (RMSNorm) decoders:
//   exact       logits equal the source's (b_final = 0) or differ by exactly W_lm b_final per
//               vocabulary entry; every residual-stream state is the centred source state;
//   exact, no bias fold: no biases anywhere, every residual-stream state has zero mean;
//   paper       every tensor a bit-identical copy (bf16 too), norm weights = g, no biases, the
//               config's eps, theta, positions and dtype preserved;
//   calibrated  L(w*) <= L(g) at every site (checked against a direct evaluation of L on the
//               captured activations), and the written norm weights are w* rounded to the dtype;
// the shard layout does not change the bytes written; bad sources are refused naming the file,
// the tensor and the shapes.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/backend/cpu.hpp"
#include "kept/convert/calibrate.hpp"
#include "kept/convert/convert.hpp"
#include "kept/convert/fidelity.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/weights.hpp"
#include "kept/model/decoder.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/gradcheck.hpp"
#include "support/tensors.hpp"

using namespace kept;
using namespace kept::test;
using Catch::Contains;

namespace {

namespace fs = std::filesystem;

using Source = Decoder<LayerNorm, Cpu64>;
using Target = Decoder<RMSNorm, Cpu64>;

constexpr std::int64_t kVocab = 41, kHidden = 16, kLayers = 2;

ModelConfig orion_config(DType dtype) {
  ModelConfig config = ModelConfig::decoder(Architecture::Orion, kVocab, kHidden, 24, kLayers, 4);
  config.max_position_embeddings = 96;
  config.rope_theta = 5e5;
  config.norm_eps = 1e-5;
  config.dtype = dtype;
  config.bos_token_id = 1;
  config.eos_token_id = 2;
  config.pad_token_id = 0;
  return config;
}

// Every parameter re-drawn: norm weights 1 + 0.3 n, norm biases 0.3 n, linears 0.3 n, and an
// embedding N(0.5, 1), so every row has a clearly non-zero mean over the hidden dimension.
void randomize_source(Source& model, std::uint64_t seed) {
  Random random(seed);
  model.visit_parameters([&](Parameter& p) {
    double scale = 0.3, offset = 0.0;
    if (p.role == ParamRole::NormWeight) offset = 1.0;
    if (p.role == ParamRole::Embedding) scale = 1.0, offset = 0.5;
    p.value = random_tensor<double>(p.value.shape(), random, scale, offset);
  });
}

// A random Orion model saved as a checkpoint at `dir`; returns the in-memory float64 model
// holding the values as stored (rounded to the dtype).
Source build_source(Cpu64& cpu, const fs::path& dir, DType dtype, std::uint64_t seed,
                    bool zero_final_bias = false, bool zero_all_norm_biases = false,
                    std::uint64_t max_shard_bytes = kDefaultMaxShardBytes) {
  const ModelConfig config = orion_config(dtype);
  Source model(cpu, config);
  randomize_source(model, seed);
  if (zero_final_bias || zero_all_norm_biases)
    std::memset(model.norm.bias.value.raw(), 0, model.norm.bias.value.nbytes());
  if (zero_all_norm_biases)
    for (auto& block : model.layers)
      for (auto* norm : {&block.input_layernorm, &block.post_attention_layernorm})
        std::memset(norm->bias.value.raw(), 0, norm->bias.value.nbytes());
  save_pretrained(cpu, model, config, dir, false, {}, max_shard_bytes);
  // The values as stored, so comparisons are against what the converter read.
  Source stored(cpu, read_hf_config(dir / "config.json"));
  load_weights(cpu, stored, CheckpointReader::open(dir));
  return stored;
}

ConversionReport convert_dir(const fs::path& source_dir, const fs::path& destination,
                             const ConversionOptions& options) {
  const ModelConfig config = read_hf_config(source_dir / "config.json");
  const CheckpointReader reader = CheckpointReader::open(source_dir);
  AtomicDirectory output(destination);
  ConversionReport report = convert_checkpoint(reader, config, output.path(), options);
  output.commit();
  return report;
}

ConversionOptions options_for(OpmMode mode, bool bias_fold = true) {
  ConversionOptions options;
  options.mode = mode;
  options.bias_fold = bias_fold;
  return options;
}

Target load_target(Cpu64& cpu, const fs::path& dir) {
  const ModelConfig config = read_hf_config(dir / "config.json");
  REQUIRE(config.architecture == Architecture::Llama);
  Target model(cpu, config);
  load_weights(cpu, model, CheckpointReader::open(dir));
  return model;
}

std::vector<std::int32_t> random_tokens(std::int64_t count, std::uint64_t seed) {
  Random random(seed);
  std::vector<std::int32_t> tokens;
  for (std::int64_t i = 0; i < count; ++i)
    tokens.push_back(static_cast<std::int32_t>(random.below(kVocab)));
  tokens.front() = kVocab - 1;  // both ends of the vocabulary
  tokens.back() = 0;
  return tokens;
}

constexpr std::int64_t kBatch = 2, kSeq = 7;

template <class Model>
struct Run {
  typename Model::Activations acts;
  Tensor logits;
};

template <class Model>
Run<Model> run_model(Cpu64& cpu, Model& model, const std::vector<std::int32_t>& tokens) {
  Run<Model> run;
  model.forward(cpu, tokens, kBatch, kSeq, run.acts, ForwardMode::Inference, /*keep_states=*/true);
  model.logits(cpu, run.acts, run.logits);
  return run;
}

// h - mean over the hidden dimension, per token.
Tensor centred(const Tensor& state) {
  Tensor result = state.clone();
  const std::int64_t rows = state.dim(0), cols = state.dim(1);
  double* data = result.data<double>();
  for (std::int64_t r = 0; r < rows; ++r) {
    double mean = 0;
    for (std::int64_t c = 0; c < cols; ++c)
      mean += data[r * cols + c];
    mean /= static_cast<double>(cols);
    for (std::int64_t c = 0; c < cols; ++c)
      data[r * cols + c] -= mean;
  }
  return result;
}

// max over tokens of |mean over hidden| / rms of the row.
double max_relative_row_mean(const Tensor& state) {
  const std::int64_t rows = state.dim(0), cols = state.dim(1);
  const double* data = state.data<double>();
  double worst = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    double sum = 0, squares = 0;
    for (std::int64_t c = 0; c < cols; ++c) {
      sum += data[r * cols + c];
      squares += data[r * cols + c] * data[r * cols + c];
    }
    const double rms = std::sqrt(squares / static_cast<double>(cols));
    worst = std::max(worst, std::fabs(sum / static_cast<double>(cols)) / rms);
  }
  return worst;
}

// W_lm b_final in float64, straight from the source model.
std::vector<double> final_bias_term(const Source& model) {
  const Tensor& w = model.lm_head.weight.value;
  const Tensor& b = model.norm.bias.value;
  std::vector<double> term(static_cast<std::size_t>(kVocab), 0.0);
  for (std::int64_t v = 0; v < kVocab; ++v)
    for (std::int64_t i = 0; i < kHidden; ++i)
      term[static_cast<std::size_t>(v)] += w.data<double>()[v * kHidden + i] * b.data<double>()[i];
  return term;
}

std::vector<std::string> norm_bias_names(const ModelConfig& config) {
  std::vector<std::string> names;
  for (const ParameterSpec& spec : parameter_specs(config))
    if (spec.role == ParamRole::NormBias) names.push_back(spec.name);
  return names;
}

// Rewrites the checkpoint of `from` into `to` (config.json copied) after `edit` changed the list
// of tensors.
void rewrite_checkpoint(const fs::path& from, const fs::path& to,
                        const std::function<void(std::vector<NamedTensor>&)>& edit) {
  const CheckpointReader reader = CheckpointReader::open(from);
  std::vector<NamedTensor> tensors;
  for (const std::string& name : reader.names())
    tensors.push_back({name, reader.tensor(name).clone()});
  edit(tensors);
  write_checkpoint(to, tensors);
  fs::copy_file(from / "config.json", to / "config.json");
}

// The inputs of every norm site during one forward pass, keyed by site.
std::map<std::string, std::vector<Tensor>> capture_norm_inputs(
    Cpu64& cpu, Source& model, const std::vector<std::int32_t>& tokens, std::int64_t batch,
    std::int64_t seq) {
  std::map<std::string, std::vector<Tensor>> inputs;
  const NormInputObserver<double> observer = [&](const std::string& site,
                                                 MatrixView<const double> x) {
    Tensor copy = Tensor::empty(DType::F64, {x.rows, x.cols});
    for (std::int64_t r = 0; r < x.rows; ++r)
      std::copy(x.row(r), x.row(r) + x.cols, copy.data<double>() + r * x.cols);
    inputs[site].push_back(std::move(copy));
  };
  Source::Activations acts;
  model.forward(cpu, tokens, batch, seq, acts, ForwardMode::Inference, false, &observer);
  return inputs;
}

// L(w) = sum_t sum_i (LN_{g,b}(x_t)_i - w_i x_ti / r_t)^2, evaluated directly.
double direct_objective(const std::vector<Tensor>& batches, std::span<const double> w,
                        std::span<const double> g, std::span<const double> b, double eps) {
  double total = 0;
  for (const Tensor& x : batches) {
    const std::int64_t rows = x.dim(0), cols = x.dim(1);
    for (std::int64_t r = 0; r < rows; ++r) {
      const double* row = x.data<double>() + r * cols;
      double mean = 0, squares = 0;
      for (std::int64_t c = 0; c < cols; ++c) {
        mean += row[c];
        squares += row[c] * row[c];
      }
      mean /= static_cast<double>(cols);
      double var = 0;
      for (std::int64_t c = 0; c < cols; ++c)
        var += (row[c] - mean) * (row[c] - mean);
      var /= static_cast<double>(cols);
      const double s = std::sqrt(var + eps),
                   rms = std::sqrt(squares / static_cast<double>(cols) + eps);
      for (std::int64_t c = 0; c < cols; ++c) {
        const auto i = static_cast<std::size_t>(c);
        const double y = g[i] * (row[c] - mean) / s + b[i];
        const double z = w[i] * row[c] / rms;
        total += (y - z) * (y - z);
      }
    }
  }
  return total;
}

const Norm<LayerNorm, Cpu64>& norm_of_site(const Source& model, const std::string& site) {
  if (site == "model.norm") return model.norm;
  for (const auto& block : model.layers) {
    if (block.input_layernorm.weight.name == site + ".weight") return block.input_layernorm;
    if (block.post_attention_layernorm.weight.name == site + ".weight")
      return block.post_attention_layernorm;
  }
  FAIL("no norm site " << site);
  return model.norm;
}

std::vector<double> doubles_of(const Tensor& tensor) {
  const Tensor values = tensor.to(DType::F64);
  return {values.span<double>().begin(), values.span<double>().end()};
}

// The bf16 neighbours of the bf16 value with bits `bits` (next up and next down).
float bf16_value(std::uint16_t bits) {
  const std::uint32_t word = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof value);
  return value;
}

}  // namespace

TEST_CASE("exact conversion with b_final = 0 reproduces the source in float64", "[convert]") {
  const std::uint64_t seed = GENERATE(11u, 12u);
  TempDir dir("kept-convert");
  Cpu64 cpu;
  Source source = build_source(cpu, dir / "src", DType::F64, seed, /*zero_final_bias=*/true);
  const ConversionReport report =
      convert_dir(dir / "src", dir / "dst", options_for(OpmMode::Exact));
  Target target = load_target(cpu, dir / "dst");

  // What the report and the config say.
  CHECK(report.target.attention_bias);
  CHECK(report.target.mlp_bias);
  CHECK(report.target.dtype == DType::F64);
  CHECK(report.dropped == static_cast<std::size_t>(2 * kLayers + 1));
  CHECK(report.tensors == parameter_specs(report.target).size());
  // Centred: embedding, o_proj, down_proj; folded: 7 biases per layer. The rest are copies.
  CHECK(report.computed == static_cast<std::size_t>(1 + 2 * kLayers + 7 * kLayers));
  CHECK(report.copied == report.tensors - report.computed);
  CHECK(report.final_bias_logit_max_abs == 0);
  CHECK(report.final_bias_logit_range == 0);
  const ModelConfig written = read_hf_config(dir / "dst" / "config.json");
  CHECK(written.attention_bias);
  CHECK(written.mlp_bias);
  CHECK(written.norm_eps == source.config().norm_eps);

  const auto tokens = random_tokens(kBatch * kSeq, seed + 100);
  auto src = run_model(cpu, source, tokens);
  auto dst = run_model(cpu, target, tokens);
  const double logits_error = relative_max_error(dst.logits, src.logits);
  INFO("max |logit difference| / max |logit| = " << logits_error);
  CHECK(logits_error < 1e-10);
  for (std::size_t l = 0; l <= static_cast<std::size_t>(kLayers); ++l) {
    INFO("residual-stream state " << l);
    // The source stream really has a mean to remove, and the converted one is its centred copy.
    CHECK(max_relative_row_mean(src.acts.state(l)) > 0.05);
    const double state_error = relative_max_error(dst.acts.state(l), centred(src.acts.state(l)));
    INFO("state error " << state_error);
    CHECK(state_error < 1e-10);
  }
  // The o/down biases are zero; q/k/v/gate/up carry W b.
  for (std::size_t l = 0; l < target.layers.size(); ++l) {
    for (const Tensor* bias : {&target.layers[l].self_attn.o_proj.bias.value,
                               &target.layers[l].mlp.down_proj.bias.value})
      for (double v : bias->span<double>())
        REQUIRE(v == 0.0);
  }

  // compare_models (the before-training fidelity) sees no difference: KL 0, full agreement.
  const auto eval_tokens = random_tokens(4 * 9, seed + 200);
  const xkd::EvalSums sums = compare_models(cpu, source, target, eval_tokens, 9, 3);
  CHECK(sums.tokens == 4 * 8);  // the last position of each sequence has no target
  CHECK(std::fabs(sums.kl) < 1e-12);
  CHECK(sums.agree == sums.tokens);
  CHECK(sums.student_ce == Approx(sums.teacher_ce).epsilon(1e-12));

  // The same model through the paper mapping is far off: the test can tell them apart.
  convert_dir(dir / "src", dir / "paper", options_for(OpmMode::Paper));
  Target paper = load_target(cpu, dir / "paper");
  auto pap = run_model(cpu, paper, tokens);
  CHECK(relative_max_error(pap.logits, src.logits) > 1e-3);
}

TEST_CASE("exact conversion differs from the source by W_lm b_final, as reported", "[convert]") {
  const std::uint64_t seed = GENERATE(21u, 22u);
  TempDir dir("kept-convert");
  Cpu64 cpu;
  Source source = build_source(cpu, dir / "src", DType::F64, seed);
  const ConversionReport report =
      convert_dir(dir / "src", dir / "dst", options_for(OpmMode::Exact));
  Target target = load_target(cpu, dir / "dst");

  const std::vector<double> term = final_bias_term(source);
  double max_abs = 0, lowest = INFINITY, highest = -INFINITY;
  for (double v : term) {
    max_abs = std::max(max_abs, std::fabs(v));
    lowest = std::min(lowest, v);
    highest = std::max(highest, v);
  }
  REQUIRE(max_abs > 0.1);  // b_final is far from zero
  CHECK(report.final_bias_logit_max_abs == Approx(max_abs).epsilon(1e-12));
  CHECK(report.final_bias_logit_range == Approx(highest - lowest).epsilon(1e-12));

  const auto tokens = random_tokens(kBatch * kSeq, seed + 100);
  auto src = run_model(cpu, source, tokens);
  auto dst = run_model(cpu, target, tokens);
  double scale = 0, worst = 0, plain = 0;
  for (std::int64_t t = 0; t < kBatch * kSeq; ++t)
    for (std::int64_t v = 0; v < kVocab; ++v) {
      const double s = src.logits.data<double>()[t * kVocab + v];
      const double c = dst.logits.data<double>()[t * kVocab + v];
      scale = std::max(scale, std::fabs(s));
      worst = std::max(worst, std::fabs((s - c) - term[static_cast<std::size_t>(v)]));
      plain = std::max(plain, std::fabs(s - c));
    }
  INFO("max |source - converted - W_lm b_final| = " << worst << ", max |logit| = " << scale
                                                    << ", max |source - converted| = " << plain);
  CHECK(worst < 1e-10 * scale);
  CHECK(plain == Approx(max_abs).epsilon(1e-6));  // every token is off by the same vector
  for (std::size_t l = 0; l <= static_cast<std::size_t>(kLayers); ++l)
    CHECK(relative_max_error(dst.acts.state(l), centred(src.acts.state(l))) < 1e-10);
}

TEST_CASE("exact --no-bias-fold: pure Llama template, centred residual stream", "[convert]") {
  TempDir dir("kept-convert");
  Cpu64 cpu;
  Source source = build_source(cpu, dir / "src", DType::F64, 31);
  const ConversionReport report =
      convert_dir(dir / "src", dir / "dst", options_for(OpmMode::Exact, /*bias_fold=*/false));
  CHECK_FALSE(report.target.attention_bias);
  CHECK_FALSE(report.target.mlp_bias);
  CHECK(report.computed == static_cast<std::size_t>(1 + 2 * kLayers));  // centring only
  const ModelConfig written = read_hf_config(dir / "dst" / "config.json");
  CHECK_FALSE(written.attention_bias);
  CHECK_FALSE(written.mlp_bias);
  const nlohmann::json json = nlohmann::json::parse(read_file(dir / "dst" / "config.json"));
  CHECK(json.at("attention_bias") == false);
  CHECK(json.at("mlp_bias") == false);
  const CheckpointReader converted = CheckpointReader::open(dir / "dst");
  for (const std::string& name : converted.names()) {
    INFO(name);
    CHECK_FALSE(name.ends_with(".bias"));
  }
  CHECK(converted.size() == parameter_specs(written).size());

  Target target = load_target(cpu, dir / "dst");
  const auto tokens = random_tokens(kBatch * kSeq, 131);
  auto src = run_model(cpu, source, tokens);
  auto dst = run_model(cpu, target, tokens);
  for (std::size_t l = 0; l <= static_cast<std::size_t>(kLayers); ++l) {
    INFO("residual-stream state " << l);
    CHECK(max_relative_row_mean(src.acts.state(l)) > 0.05);
    CHECK(max_relative_row_mean(dst.acts.state(l)) < 1e-12);
  }
  // The embedding output (before any bias matters) is exactly the centred source state.
  CHECK(relative_max_error(dst.acts.state(0), centred(src.acts.state(0))) < 1e-12);
  // The biases were not folded: the logits differ.
  CHECK(relative_max_error(dst.logits, src.logits) > 1e-3);
}

TEST_CASE("exact --no-bias-fold is exact when every LayerNorm bias is zero", "[convert]") {
  TempDir dir("kept-convert");
  Cpu64 cpu;
  Source source =
      build_source(cpu, dir / "src", DType::F64, 41, true, /*zero_all_norm_biases=*/true);
  convert_dir(dir / "src", dir / "dst", options_for(OpmMode::Exact, false));
  Target target = load_target(cpu, dir / "dst");
  const auto tokens = random_tokens(kBatch * kSeq, 141);
  auto src = run_model(cpu, source, tokens);
  auto dst = run_model(cpu, target, tokens);
  CHECK(relative_max_error(dst.logits, src.logits) < 1e-10);
  for (std::size_t l = 0; l <= static_cast<std::size_t>(kLayers); ++l)
    CHECK(relative_max_error(dst.acts.state(l), centred(src.acts.state(l))) < 1e-10);
}

TEST_CASE("paper conversion copies every tensor bit for bit and writes the Llama config",
          "[convert]") {
  const DType dtype = GENERATE(DType::BF16, DType::F32);
  INFO("source dtype " << dtype_name(dtype));
  TempDir dir("kept-convert");
  Cpu64 cpu;
  build_source(cpu, dir / "src", dtype, 51);
  const ModelConfig source_config = read_hf_config(dir / "src" / "config.json");
  const ConversionReport report =
      convert_dir(dir / "src", dir / "dst", options_for(OpmMode::Paper));
  CHECK(report.computed == 0);
  CHECK(report.copied == report.tensors);
  CHECK(report.dropped == static_cast<std::size_t>(2 * kLayers + 1));

  const CheckpointReader source = CheckpointReader::open(dir / "src");
  const CheckpointReader converted = CheckpointReader::open(dir / "dst");
  const std::vector<std::string> dropped = norm_bias_names(source_config);
  CHECK(converted.size() + dropped.size() == source.size());
  std::size_t norm_weights = 0;
  for (const std::string& name : converted.names()) {
    INFO(name);
    CHECK_FALSE(name.ends_with(".bias"));
    REQUIRE(source.contains(name));
    // Every tensor (norm weights = g included) is the source's bytes, dtype and shape.
    CHECK(same_bytes(converted.tensor(name), source.tensor(name)));
    CHECK(converted.tensor(name).dtype() == dtype);
    if (name.ends_with("norm.weight")) ++norm_weights;
  }
  CHECK(norm_weights == static_cast<std::size_t>(2 * kLayers + 1));
  for (const std::string& name : dropped)
    CHECK_FALSE(converted.contains(name));

  const ModelConfig target = read_hf_config(dir / "dst" / "config.json");
  CHECK(target.architecture == Architecture::Llama);
  CHECK(target.norm_eps == source_config.norm_eps);
  CHECK(target.rope_theta == source_config.rope_theta);
  CHECK(target.max_position_embeddings == source_config.max_position_embeddings);
  CHECK(target.dtype == dtype);
  CHECK_FALSE(target.attention_bias);
  CHECK_FALSE(target.mlp_bias);
  CHECK(target.vocab_size == source_config.vocab_size);
  CHECK(target.hidden_size == source_config.hidden_size);
  CHECK(target.intermediate_size == source_config.intermediate_size);
  CHECK(target.num_layers == source_config.num_layers);
  CHECK(target.num_heads == source_config.num_heads);
  CHECK(target.bos_token_id == source_config.bos_token_id);
  CHECK(target.eos_token_id == source_config.eos_token_id);
  CHECK(target.pad_token_id == source_config.pad_token_id);
  // The raw file: Llama's field names, the eps written explicitly (HF's llama default is 1e-6).
  const nlohmann::json json = nlohmann::json::parse(read_file(dir / "dst" / "config.json"));
  CHECK(json.at("model_type") == "llama");
  CHECK(json.at("architectures") == nlohmann::json::array({"LlamaForCausalLM"}));
  CHECK(json.at("rms_norm_eps").get<double>() == 1e-5);
  CHECK(json.at("rope_theta").get<double>() == 5e5);
  CHECK(json.at("max_position_embeddings") == 96);
  CHECK(json.at("torch_dtype") == std::string(torch_dtype_name(dtype)));
  CHECK_FALSE(json.contains("layer_norm_eps"));
  CHECK(fs::is_regular_file(dir / "dst" / "generation_config.json"));
}

TEST_CASE("calibrated OPM: L(w*) <= L(g) at every site, and the conversion writes w*",
          "[convert]") {
  const std::uint64_t seed = GENERATE(61u, 62u, 63u, 64u);
  INFO("seed " << seed);
  TempDir dir("kept-convert");
  Cpu64 cpu;
  Source source = build_source(cpu, dir / "src", DType::F64, seed);
  const std::int64_t seq = 16, sequences = 3;
  const auto tokens = random_tokens(seq * sequences, seed + 1000);
  const NormCalibration calibration = calibrate_norms(cpu, source, tokens, seq, /*batch=*/2);
  REQUIRE(calibration.sites.size() == static_cast<std::size_t>(2 * kLayers + 1));
  CHECK(calibration.tokens == seq * sequences);

  // The same activations, captured directly, to evaluate L without the closed form.
  const auto inputs = capture_norm_inputs(cpu, source, tokens, sequences, seq);
  REQUIRE(inputs.size() == calibration.sites.size());
  const double eps = source.config().norm_eps;
  for (const std::string& site : calibration.sites) {
    INFO("site " << site);
    const OpmSolution& solution = calibration.solutions.at(site);
    const auto& norm = norm_of_site(source, site);
    const std::vector<double> g = doubles_of(norm.weight.value), b = doubles_of(norm.bias.value);
    CHECK(solution.tokens == seq * sequences);
    CHECK(solution.inactive_count() == 0);
    // The ordering, from the solution's own fields...
    CHECK(solution.loss_at_w_star <= solution.loss_at_g);
    CHECK(solution.gap >= 0);
    CHECK(solution.rel_err_calibrated <= solution.rel_err_paper);
    // ...and from a direct evaluation of L on the activations the model produced.
    const double at_w_star = direct_objective(inputs.at(site), solution.w_star, g, b, eps);
    const double at_g = direct_objective(inputs.at(site), g, g, b, eps);
    const double energy = solution.output_energy;
    CHECK(at_w_star <= at_g);
    CHECK(std::fabs(at_w_star - solution.loss_at_w_star) <= 1e-9 * energy);
    CHECK(std::fabs(at_g - solution.loss_at_g) <= 1e-9 * energy);
    // The source has biases and means: the optimum really differs from g.
    CHECK(solution.gap > 1e-6 * energy);
    // w* is a minimum: any perturbation raises L.
    Random random(seed + 7);
    for (int trial = 0; trial < 3; ++trial) {
      std::vector<double> w = solution.w_star;
      for (double& v : w)
        v += 1e-3 * random.normal();
      CHECK(direct_objective(inputs.at(site), w, g, b, eps) > at_w_star);
    }
  }

  // The calibrated conversion: norm weights are w* (float64 source: exactly), the rest copies.
  ConversionOptions options = options_for(OpmMode::Calibrated);
  options.calibrated_norm_weights = calibrated_weights(calibration);
  const ConversionReport report = convert_dir(dir / "src", dir / "dst", options);
  CHECK(report.computed == static_cast<std::size_t>(2 * kLayers + 1));
  CHECK_FALSE(report.target.attention_bias);
  const CheckpointReader converted = CheckpointReader::open(dir / "dst");
  const CheckpointReader original = CheckpointReader::open(dir / "src");
  for (const std::string& site : calibration.sites) {
    INFO("site " << site);
    const std::vector<double>& w_star = calibration.solutions.at(site).w_star;
    const Tensor& written = converted.tensor(site + ".weight");
    REQUIRE(written.dtype() == DType::F64);
    REQUIRE(written.numel() == kHidden);
    for (std::int64_t i = 0; i < kHidden; ++i)
      CHECK(written.data<double>()[i] == w_star[static_cast<std::size_t>(i)]);
  }
  for (const std::string& name : converted.names())
    if (!name.ends_with("norm.weight"))
      CHECK(same_bytes(converted.tensor(name), original.tensor(name)));
}

TEST_CASE("calibrated norm weights are w* rounded once to the checkpoint dtype", "[convert]") {
  const DType dtype = GENERATE(DType::F32, DType::BF16);
  INFO("dtype " << dtype_name(dtype));
  TempDir dir("kept-convert");
  Cpu64 cpu;
  Source source = build_source(cpu, dir / "src", dtype, 71);
  const auto tokens = random_tokens(32, 171);
  const NormCalibration calibration = calibrate_norms(cpu, source, tokens, 16, 2);
  ConversionOptions options = options_for(OpmMode::Calibrated);
  options.calibrated_norm_weights = calibrated_weights(calibration);
  convert_dir(dir / "src", dir / "dst", options);
  const CheckpointReader converted = CheckpointReader::open(dir / "dst");
  for (const std::string& site : calibration.sites) {
    INFO("site " << site);
    const std::vector<double>& w_star = calibration.solutions.at(site).w_star;
    const Tensor& written = converted.tensor(site + ".weight");
    REQUIRE(written.dtype() == dtype);
    for (std::int64_t i = 0; i < kHidden; ++i) {
      const double w = w_star[static_cast<std::size_t>(i)];
      if (dtype == DType::F32) {
        CHECK(written.data<float>()[i] == static_cast<float>(w));
      } else {
        // The nearest bf16: neither neighbour is closer to w*.
        std::uint16_t bits;
        std::memcpy(&bits, static_cast<const char*>(written.raw()) + 2 * i, 2);
        const double stored = bf16_value(bits);
        const double up = bf16_value(static_cast<std::uint16_t>(bits + 1));
        const double down = bf16_value(static_cast<std::uint16_t>(bits - 1));
        INFO("w* " << w << ", stored " << stored);
        CHECK(std::fabs(stored - w) <= std::fabs(up - w));
        CHECK(std::fabs(stored - w) <= std::fabs(down - w));
      }
    }
  }
}

TEST_CASE("the shard layout does not change the bytes written", "[convert]") {
  const OpmMode mode = GENERATE(OpmMode::Exact, OpmMode::Paper);
  INFO("mode " << opm_mode_name(mode));
  TempDir dir("kept-convert");
  Cpu64 cpu;
  // A sharded source too: the reader's layout must not matter either.
  build_source(cpu, dir / "src", DType::F32, 81, false, false, /*max_shard_bytes=*/2048);
  REQUIRE(CheckpointReader::open(dir / "src").sharded());
  ConversionOptions many = options_for(mode), one = options_for(mode);
  many.max_shard_bytes = 1024;
  std::size_t progress_calls = 0, progress_total = 0;
  std::uint64_t progress_bytes = 0;
  many.progress = [&](std::size_t done, std::size_t total, std::uint64_t bytes) {
    ++progress_calls;
    CHECK(done == progress_calls);
    progress_total = total;
    progress_bytes = bytes;
  };
  const ConversionReport sharded = convert_dir(dir / "src", dir / "many", many);
  const ConversionReport single = convert_dir(dir / "src", dir / "one", one);
  CHECK(progress_calls == sharded.tensors);
  CHECK(progress_total == sharded.tensors);
  CHECK(progress_bytes == sharded.bytes);
  CHECK(sharded.bytes == single.bytes);

  const CheckpointReader a = CheckpointReader::open(dir / "many");
  const CheckpointReader b = CheckpointReader::open(dir / "one");
  CHECK(a.sharded());
  CHECK(a.files().size() > 5);
  CHECK_FALSE(b.sharded());
  CHECK(b.files().size() == 1);
  REQUIRE(a.size() == b.size());
  std::vector<std::string> names_a = a.names(), names_b = b.names();
  CHECK(names_a == names_b);  // the same order, too
  std::uint64_t total = 0;
  for (const std::string& name : b.names()) {
    INFO(name);
    CHECK(same_bytes(a.tensor(name), b.tensor(name)));
    total += b.tensor(name).nbytes();
  }
  CHECK(total == single.bytes);
  CHECK(read_file(dir / "many" / "config.json") == read_file(dir / "one" / "config.json"));
  const nlohmann::json index =
      nlohmann::json::parse(read_file(dir / "many" / "model.safetensors.index.json"));
  CHECK(index.at("metadata").at("total_size") == single.bytes);
}

TEST_CASE("conversion refuses sources that are not the LayerNorm decoder it converts",
          "[convert]") {
  TempDir dir("kept-convert");
  Cpu64 cpu;
  build_source(cpu, dir / "good", DType::F32, 91);
  const fs::path good = dir / "good";
  auto attempt = [&](const fs::path& source_dir, const ConversionOptions& options) {
    const fs::path destination = dir / ("out-" + source_dir.filename().string());
    const std::string message = error_of([&] { convert_dir(source_dir, destination, options); });
    // Nothing appears at the destination.
    CHECK_FALSE(fs::exists(destination));
    return message;
  };

  SECTION("a LayerNorm without its bias") {
    const std::string dropped = "model.layers.1.input_layernorm.bias";
    rewrite_checkpoint(good, dir / "nobias", [&](std::vector<NamedTensor>& tensors) {
      std::erase_if(tensors, [&](const NamedTensor& t) { return t.name == dropped; });
    });
    const std::string message = attempt(dir / "nobias", options_for(OpmMode::Paper));
    CHECK_THAT(message, Contains("\"" + dropped + "\"") && Contains("is missing") &&
                            Contains((dir / "nobias" / "model.safetensors").string()) &&
                            Contains("LayerNorm without bias"));
  }
  SECTION("a llama source") {
    ModelConfig config = orion_config(DType::F32);
    config.architecture = Architecture::Llama;
    Target llama(cpu, config);
    save_pretrained(cpu, llama, config, dir / "llama", false);
    const std::string message = attempt(dir / "llama", options_for(OpmMode::Exact));
    CHECK_THAT(message, Contains((dir / "llama" / "config.json").string()) && Contains("'llama'") &&
                            Contains("not a LayerNorm decoder"));
  }
  SECTION("a tensor of the wrong shape") {
    const std::string name = "model.layers.0.mlp.up_proj.weight";
    rewrite_checkpoint(good, dir / "shape", [&](std::vector<NamedTensor>& tensors) {
      for (NamedTensor& t : tensors)
        if (t.name == name) t.tensor = Tensor::zeros(t.tensor.dtype(), {24, 15});
    });
    const std::string message = attempt(dir / "shape", options_for(OpmMode::Exact));
    CHECK_THAT(message, Contains((dir / "shape" / "model.safetensors").string()) &&
                            Contains("\"" + name + "\"") && Contains("[24, 15]") &&
                            Contains("[24, 16]"));
  }
  SECTION("a tensor of a non-float dtype") {
    const std::string name = "model.norm.weight";
    rewrite_checkpoint(good, dir / "int", [&](std::vector<NamedTensor>& tensors) {
      for (NamedTensor& t : tensors)
        if (t.name == name) t.tensor = Tensor::zeros(DType::I32, {kHidden});
    });
    const std::string message = attempt(dir / "int", options_for(OpmMode::Paper));
    CHECK_THAT(message, Contains("\"" + name + "\"") && Contains("dtype"));
  }
  SECTION("an unexpected extra tensor") {
    const std::string extra = "model.layers.0.self_attn.q_norm.weight";
    rewrite_checkpoint(good, dir / "extra", [&](std::vector<NamedTensor>& tensors) {
      tensors.push_back({extra, Tensor::zeros(DType::F32, {kHidden})});
    });
    const std::string message = attempt(dir / "extra", options_for(OpmMode::Paper));
    CHECK_THAT(message, Contains("unexpected tensor") && Contains("\"" + extra + "\"") &&
                            Contains((dir / "extra" / "model.safetensors").string()));
  }
  SECTION("a RoPE buffer is not an unexpected tensor") {
    rewrite_checkpoint(good, dir / "rotary", [&](std::vector<NamedTensor>& tensors) {
      tensors.push_back(
          {"model.layers.0.self_attn.rotary_emb.inv_freq", Tensor::zeros(DType::F32, {2})});
    });
    convert_dir(dir / "rotary", dir / "rotary-out", options_for(OpmMode::Paper));
    CHECK_FALSE(CheckpointReader::open(dir / "rotary-out")
                    .contains("model.layers.0.self_attn.rotary_emb.inv_freq"));
  }
  SECTION("calibrated mode without weights for a site") {
    Source source(cpu, read_hf_config(good / "config.json"));
    load_weights(cpu, source, CheckpointReader::open(good));
    const NormCalibration calibration = calibrate_norms(cpu, source, random_tokens(16, 3), 8, 2);
    ConversionOptions options = options_for(OpmMode::Calibrated);
    options.calibrated_norm_weights = calibrated_weights(calibration);
    const std::string site = "model.layers.1.post_attention_layernorm.weight";
    SECTION("missing") {
      REQUIRE(options.calibrated_norm_weights.erase(site) == 1);
      CHECK_THAT(attempt(good, options),
                 Contains("no calibrated weights") && Contains("\"" + site + "\""));
    }
    SECTION("none at all") {
      options.calibrated_norm_weights.clear();
      CHECK_THAT(attempt(good, options), Contains("no calibrated weights"));
    }
    SECTION("the wrong count") {
      options.calibrated_norm_weights[site].pop_back();
      CHECK_THAT(attempt(good, options),
                 Contains("\"" + site + "\"") && Contains("15 weights for 16 features"));
    }
  }
}
