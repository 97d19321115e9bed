// kept/convert/convert.hpp: NPM + OPM, a LayerNorm decoder checkpoint -> a Llama checkpoint.
//
// NPM. Orion and StableLM use the Llama tensor names for everything Llama has (embedding,
// q/k/v/o, gate/up/down, the three norm weights per model, lm_head), so the name map is the
// identity and the layouts agree (rotate-half RoPE on both sides, so q/k need no
// permutation). Copied tensors keep their dtype and bytes: a bf16 tensor is bit-identical.
//
// OPM, three modes for each LayerNorm (weight g, bias b, eps) -> RMSNorm (weight w, same eps):
//   paper       w = g, b dropped (the report's mapping).
//   calibrated  w = w* = g A + b B, the closed-form optimum of sum_t ||LN(x_t) - RMS_w(x_t)||^2
//               over calibration activations (kept/opm.hpp); the caller supplies w* per site.
//   exact       the centred conversion. LayerNorm(h) = LayerNorm(h - mean h), and the residual
//               stream is read only through norms, so subtracting the mean over the hidden
//               dimension from everything written into the stream (embedding rows; the output
//               rows of o_proj and down_proj, i.e. each column minus its mean) changes nothing
//               and makes mean(h) = 0. Then LayerNorm(h) = RMSNorm_g(h) + b exactly, and b folds
//               into the next linear layer: bias_q = W_q b1 (likewise k, v; gate, up with b2),
//               o/down biases zero (Llama's attention_bias / mlp_bias put biases on all four /
//               three projections). What Llama cannot hold is the final norm's W_lm b_final: a
//               constant per-vocabulary logit offset, reported. --no-bias-fold keeps the pure
//               template (no biases): centring only, which removes the mean error and leaves
//               the bias terms to distillation.
// The centring and folding run in float64 and round once to the tensor's dtype, row by row
// (no tensor is widened to float64 as a whole).
//
// Streaming. Every target tensor is planned from the config first (names, shapes, dtypes),
// then produced one at a time while its bytes are written: a copied tensor is a view of the
// mmapped source, a computed one lives only while it is written, and the source pages a
// tensor used are released after it, so peak memory is a few tensors, not the model.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kept/core/enum_names.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/io/weights.hpp"
#include "kept/model/config.hpp"
#include "kept/model/parameter_specs.hpp"

namespace kept {

enum class OpmMode : std::uint8_t { Paper, Calibrated, Exact };

inline constexpr EnumName<OpmMode> kOpmModeNames[] = {
    {OpmMode::Paper, "paper"}, {OpmMode::Calibrated, "calibrated"}, {OpmMode::Exact, "exact"}};

constexpr const char* opm_mode_name(OpmMode mode) {
  return enum_name(kOpmModeNames, mode).data();  // the table's literals end in '\0'
}

inline std::optional<OpmMode> parse_opm_mode(std::string_view name) {
  return parse_enum(kOpmModeNames, name);
}

struct ConversionOptions {
  OpmMode mode = OpmMode::Paper;
  bool bias_fold = true;  // exact mode: fold the LayerNorm biases into q/k/v and gate/up biases
  // Calibrated mode: w* for every norm weight, keyed by its name ("model.norm.weight", ...).
  std::map<std::string, std::vector<double>> calibrated_norm_weights;
  std::uint64_t max_shard_bytes = kDefaultMaxShardBytes;
  // Called after each tensor is written.
  std::function<void(std::size_t done, std::size_t total, std::uint64_t bytes)> progress;
};

struct ConversionReport {
  ModelConfig target;
  std::size_t tensors = 0;
  std::uint64_t bytes = 0;
  std::size_t copied = 0;    // tensors written as bit-identical copies of the source
  std::size_t computed = 0;  // tensors computed (centred, folded, calibrated)
  std::size_t dropped = 0;   // source tensors with no Llama slot (the LayerNorm biases)
  double seconds = 0;
  // Exact mode: the final-norm term W_lm b_final that the Llama template cannot hold.
  double final_bias_logit_max_abs = 0;  // max_v |(W_lm b_final)_v|
  double final_bias_logit_range = 0;    // max_v - min_v: what changes the distributions
};

// The Llama config the conversion writes for `source`: same dimensions, rope_theta,
// max_position_embeddings, dtype and token ids; rms_norm_eps = the LayerNorm eps; biases only
// in exact mode with folding.
inline ModelConfig llama_config_for(const ModelConfig& source, const ConversionOptions& options) {
  ModelConfig target = source;
  target.architecture = Architecture::Llama;
  target.attention_bias = target.mlp_bias = options.mode == OpmMode::Exact && options.bias_fold;
  return target;
}

// Checks that `source` holds exactly the tensors `config` implies for a LayerNorm decoder:
// every one present, of that shape, of a float dtype, and nothing else. Throws naming the file
// and tensor. Returns the tensors that hold no parameter and are skipped (RoPE inv_freq buffers).
template <class Reader>
std::vector<std::string> validate_source_checkpoint(const Reader& source,
                                                    const ModelConfig& config) {
  KEPT_CHECK(config.norm_kind() == NormKind::LayerNorm, source.directory().string(),
             "/config.json: architecture '", architecture_name(config.architecture),
             "' is not a LayerNorm decoder; kept converts orion or stablelm checkpoints to llama");
  return check_checkpoint_tensors(source, config);
}

namespace convert_detail {

// The float64 arithmetic below streams: no tensor is ever widened to float64 as a whole (the
// 84,608 x 5,120 Orion embedding would be 3.5 GB of doubles). Each element is widened exactly
// when read and rounded once when written, with the same summation orders and the same
// rounding as widening the whole tensor (Tensor::to(F64)), computing, and rounding back
// (Tensor::to(dtype): round-to-odd then to the 16-bit type), so the bytes written are those of
// that reference. Memory: the output tensor (in the source dtype) and one row per thread.

// Calls fn(T{}) with T the element type of the float `dtype`.
template <class Fn>
decltype(auto) with_float_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::F32:
      return fn(float{});
    case DType::F64:
      return fn(double{});
    case DType::BF16:
      return fn(bf16{});
    case DType::F16:
      return fn(f16{});
    default:
      fail("dtype ", dtype_name(dtype), " is not a floating-point type");
  }
}

// Exact widening of a stored element to double.
template <class T>
double widen(T value) {
  if constexpr (std::is_same_v<T, double>)
    return value;
  else if constexpr (std::is_same_v<T, float>)
    return static_cast<double>(value);
  else
    return static_cast<double>(to_float(value));
}

// A double rounded once to T, exactly as Tensor::to(F64 -> T) rounds it.
template <class T>
T narrow(double value) {
  if constexpr (std::is_same_v<T, double>)
    return value;
  else if constexpr (std::is_same_v<T, float>)
    return static_cast<float>(value);
  else if constexpr (std::is_same_v<T, bf16>)
    return to_bf16(to_float_round_to_odd(value));
  else
    return to_f16(to_float_round_to_odd(value));
}

// Row r of `matrix` [rows, cols] minus its mean over the columns (embedding rows).
inline Tensor centre_rows(const Tensor& matrix) {
  const std::int64_t rows = matrix.dim(0), cols = matrix.dim(1);
  Tensor result = Tensor::empty(matrix.dtype(), matrix.shape());
  with_float_type(matrix.dtype(), [&]<class T>(T) {
    const T* in = matrix.data<T>();
    T* out = result.data<T>();
#pragma omp parallel
    {
      std::vector<double> row(static_cast<std::size_t>(cols));
#pragma omp for schedule(static)
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* source = in + r * cols;
        double mean = 0;
        for (std::int64_t c = 0; c < cols; ++c) {
          row[static_cast<std::size_t>(c)] = widen(source[c]);
          mean += row[static_cast<std::size_t>(c)];
        }
        mean /= static_cast<double>(cols);
        T* target = out + r * cols;
        for (std::int64_t c = 0; c < cols; ++c)
          target[c] = narrow<T>(row[static_cast<std::size_t>(c)] - mean);
      }
    }
  });
  return result;
}

// W [out, in] with each column minus its mean over the output dimension, so W x has zero
// mean over the output for every x (o_proj, down_proj). Two passes: the column sums (each
// column summed over the rows in order; threads take strips of columns), then the output.
inline Tensor centre_output_dimension(const Tensor& matrix) {
  const std::int64_t rows = matrix.dim(0), cols = matrix.dim(1);
  constexpr std::int64_t kStrip = 1024;  // columns per strip: 8 KB of sums, in L1
  Tensor result = Tensor::empty(matrix.dtype(), matrix.shape());
  std::vector<double> column_mean(static_cast<std::size_t>(cols), 0.0);
  with_float_type(matrix.dtype(), [&]<class T>(T) {
    const T* in = matrix.data<T>();
    T* out = result.data<T>();
    const std::int64_t strips = (cols + kStrip - 1) / kStrip;
#pragma omp parallel for schedule(static)
    for (std::int64_t strip = 0; strip < strips; ++strip) {
      const std::int64_t begin = strip * kStrip, end = std::min(cols, begin + kStrip);
      double* sums = column_mean.data() + begin;
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* source = in + r * cols;
        for (std::int64_t c = begin; c < end; ++c)
          sums[c - begin] += widen(source[c]);
      }
    }
    for (double& mean : column_mean)
      mean /= static_cast<double>(rows);
#pragma omp parallel for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* source = in + r * cols;
      T* target = out + r * cols;
      for (std::int64_t c = 0; c < cols; ++c)
        target[c] = narrow<T>(widen(source[c]) - column_mean[static_cast<std::size_t>(c)]);
    }
  });
  return result;
}

// W [out, in] b [in] in float64, as a tensor of `dtype`.
inline Tensor matrix_vector(const Tensor& matrix, const Tensor& vector, DType dtype) {
  const std::int64_t rows = matrix.dim(0), cols = matrix.dim(1);
  const Tensor b = vector.to(DType::F64);  // [in]: small
  const double* bias = b.data<double>();
  Tensor result = Tensor::empty(DType::F64, {rows});
  double* sums = result.data<double>();
  with_float_type(matrix.dtype(), [&]<class T>(T) {
    const T* in = matrix.data<T>();
#pragma omp parallel for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* source = in + r * cols;
      double sum = 0;
      for (std::int64_t c = 0; c < cols; ++c)
        sum += widen(source[c]) * bias[c];
      sums[r] = sum;
    }
  });
  return result.to(dtype);
}

inline Tensor from_doubles(const std::vector<double>& values, DType dtype) {
  Tensor result = Tensor::empty(DType::F64, {static_cast<std::int64_t>(values.size())});
  std::copy(values.begin(), values.end(), result.data<double>());
  return result.to(dtype);
}

// "model.layers.3.self_attn.q_proj.bias" -> ("model.layers.3.", "self_attn.q_proj.bias").
inline std::pair<std::string, std::string> split_layer_prefix(const std::string& name) {
  const std::string_view layers = "model.layers.";
  if (!name.starts_with(layers)) return {"", name};
  const std::size_t dot = name.find('.', layers.size());
  return {name.substr(0, dot + 1), name.substr(dot + 1)};
}

}  // namespace convert_detail

// Converts `source` (validated against `source_config`) into a Llama checkpoint in
// `directory` (which the caller created, normally an AtomicDirectory's temporary path):
// config.json, generation_config.json and the safetensors weights. Tokenizer files are the
// caller's (they are not tensors).
template <class Reader>
ConversionReport convert_checkpoint(const Reader& source, const ModelConfig& source_config,
                                    const std::filesystem::path& directory,
                                    const ConversionOptions& options) {
  using namespace convert_detail;
  const auto start = std::chrono::steady_clock::now();
  validate_source_checkpoint(source, source_config);
  ConversionReport report;
  report.target = llama_config_for(source_config, options);
  const ModelConfig& target = report.target;
  const bool exact = options.mode == OpmMode::Exact;

  // Plan: every target tensor, its dtype (the dtype of the source tensor it derives from) and
  // how to produce it.
  std::vector<TensorSpec> specs;
  std::vector<std::function<Tensor()>> producers;
  std::vector<bool> copies;
  std::vector<std::vector<std::string>> inputs;  // source tensors each one reads
  for (const ParameterSpec& spec : parameter_specs(target)) {
    const std::string& name = spec.name;
    const auto [layer, local] = split_layer_prefix(name);
    std::function<Tensor()> produce;
    std::string origin = name;  // the source tensor whose dtype the target keeps
    std::vector<std::string> reads{name};
    bool copy = false;
    if (spec.role == ParamRole::NormWeight) {
      if (options.mode == OpmMode::Calibrated) {
        auto found = options.calibrated_norm_weights.find(name);
        KEPT_CHECK(found != options.calibrated_norm_weights.end(),
                   "calibrated conversion: no calibrated weights for \"", name, "\"");
        KEPT_CHECK(static_cast<std::int64_t>(found->second.size()) == spec.shape[0],
                   "calibrated conversion: \"", name, "\" has ", found->second.size(),
                   " weights for ", spec.shape[0], " features");
        produce = [&source, name, &weights = found->second] {
          return from_doubles(weights, source.tensor(name).dtype());
        };
      } else {
        copy = true;  // paper and exact: w = g
      }
    } else if (spec.role == ParamRole::Bias) {
      // Only in exact mode with folding: q/k/v fold input_layernorm's bias, gate/up fold
      // post_attention_layernorm's; o and down get zeros.
      const std::string weight = name.substr(0, name.size() - 4) + "weight";
      origin = weight;
      const bool attention_input = local.starts_with("self_attn.q_proj") ||
                                   local.starts_with("self_attn.k_proj") ||
                                   local.starts_with("self_attn.v_proj");
      const bool mlp_input = local.starts_with("mlp.gate_proj") || local.starts_with("mlp.up_proj");
      if (attention_input || mlp_input) {
        const std::string norm_bias =
            layer + (attention_input ? "input_layernorm.bias" : "post_attention_layernorm.bias");
        produce = [&source, weight, norm_bias] {
          const Tensor& w = source.tensor(weight);
          return matrix_vector(w, source.tensor(norm_bias), w.dtype());
        };
        reads = {weight, norm_bias};
      } else {
        produce = [&source, weight, shape = spec.shape] {
          return Tensor::zeros(source.tensor(weight).dtype(), shape);
        };
        reads.clear();
      }
    } else if (exact && name == "model.embed_tokens.weight") {
      produce = [&source, name] { return centre_rows(source.tensor(name)); };
    } else if (exact && (local == "self_attn.o_proj.weight" || local == "mlp.down_proj.weight")) {
      produce = [&source, name] { return centre_output_dimension(source.tensor(name)); };
    } else {
      copy = true;
    }
    if (copy) produce = [&source, name] { return source.tensor(name); };
    specs.push_back({name, source.tensor(origin).dtype(), spec.shape});
    producers.push_back(std::move(produce));
    copies.push_back(copy);
    inputs.push_back(std::move(reads));
  }
  for (const ParameterSpec& spec : parameter_specs(source_config))
    if (spec.role == ParamRole::NormBias) ++report.dropped;
  for (const auto& [name, weights] : options.calibrated_norm_weights)
    KEPT_CHECK(std::any_of(specs.begin(), specs.end(),
                           [&](const TensorSpec& spec) { return spec.name == name; }),
               "calibrated conversion: weights given for \"", name,
               "\", which is not a norm of the model");

  ModelConfig written = target;
  write_hf_config(directory / "config.json", written);
  write_generation_config(directory / "generation_config.json", written);
  std::size_t done = 0;
  write_checkpoint(
      directory, specs,
      [&](std::size_t i) {
        Tensor tensor = producers[i]();
        // The previous tensor is written: give back the source pages it read.
        if (i > 0)
          for (const std::string& input : inputs[i - 1])
            release_file_pages(source.tensor(input));
        report.bytes += specs[i].nbytes();
        (copies[i] ? report.copied : report.computed)++;
        if (options.progress) options.progress(++done, specs.size(), report.bytes);
        return tensor;
      },
      options.max_shard_bytes);
  report.tensors = specs.size();

  if (exact) {
    const Tensor term = matrix_vector(source.tensor("lm_head.weight"),
                                      source.tensor("model.norm.bias"), DType::F64);
    double lowest = INFINITY, highest = -INFINITY;
    for (double value : term.span<double>()) {
      report.final_bias_logit_max_abs = std::max(report.final_bias_logit_max_abs, std::fabs(value));
      lowest = std::min(lowest, value);
      highest = std::max(highest, value);
    }
    report.final_bias_logit_range = highest - lowest;
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace kept
