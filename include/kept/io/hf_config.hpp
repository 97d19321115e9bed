// kept/io/hf_config.hpp: HF config.json <-> kept::ModelConfig for orion, stablelm and llama.
//
// Reading. A config is accepted only when kept computes exactly what HF would build from it:
//   - "orion" (OrionForCausalLM): its norms are LayerNorms, yet the eps field is called
//     `rms_norm_eps`.
//   - "stablelm" (StableLmForCausalLM): eps in `layer_norm_eps`; it is the Orion computation only
//     with partial_rotary_factor 1, use_qkv_bias / use_parallel_residual / qk_layernorm false and
//     hidden_act silu. HF's defaults apply to absent fields, and HF's partial_rotary_factor
//     default is 0.25, so a stablelm config must state 1.0.
//   - "llama" (LlamaForCausalLM): `rms_norm_eps`, `attention_bias`, `mlp_bias`; `head_dim`, when
//     given, must be hidden_size / num_attention_heads; tied embeddings, rope scaling and
//     activations other than silu are refused.
// RoPE settings live in two places depending on the writer: transformers 4.x has top-level
// `rope_theta` (and stablelm `partial_rotary_factor`); 5.x nests them in
// `"rope_parameters": {"rope_theta", "rope_type", "partial_rotary_factor"}` (and 5.x still
// reads a legacy `rope_scaling` object in place of rope_parameters). All places are read; values
// given in more than one must agree, since 4.x and 5.x would each use a different one.
// The eps field is required although HF has defaults for it: HF's llama default (1e-6) differs
// from the LayerNorm models' 1e-5, and a silently defaulted eps is exactly the mistake that
// makes a conversion drift. Other absent fields take HF's default for that model_type
// (stablelm's num_key_value_heads default is 32, not num_attention_heads, as in HF).
// Every error names the file and the field, and what was expected vs found.
//
// Writing. The output depends on cfg.architecture. A llama config loads in transformers 4.4x
// and 5.x with trust_remote_code=False: eps is written explicitly, rope_theta both top-level
// (4.x) and in rope_parameters (5.x, which prefers it), dtype as "torch_dtype" (5.x still
// accepts it without a warning). A stablelm config is the third-party loadable form of the
// LayerNorm decoder (with partial_rotary_factor 1.0 in both places); an orion config is
// written in Orion's own format (it needs Orion's remote code to load in HF). Only fields of
// ModelConfig are written: unknown fields of a config that was read are never carried over.
// Keys are sorted and indented like transformers' to_json_string.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/dtype.hpp"
#include "kept/core/error.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/json.hpp"
#include "kept/model/config.hpp"

namespace kept {

inline constexpr std::uint64_t kMaxConfigFileBytes = 16ull << 20;

namespace detail {

// Typed access to the fields of one JSON object, with messages naming the file and the field.
// `prefix` qualifies nested fields ("rope_parameters.").
class ConfigFields {
 public:
  ConfigFields(const nlohmann::json& object, std::string source, std::string prefix = "")
      : object_(object), source_(std::move(source)), prefix_(std::move(prefix)) {}

  // The value, or nullptr when absent or null (HF treats an explicit null as "use the default").
  const nlohmann::json* find(std::string_view key) const {
    auto found = object_.find(key);
    if (found == object_.end() || found->is_null()) return nullptr;
    return &*found;
  }
  bool has(std::string_view key) const { return find(key) != nullptr; }
  // Present, possibly as null.
  bool present(std::string_view key) const { return object_.find(key) != object_.end(); }
  std::string field(std::string_view key) const { return prefix_ + std::string(key); }
  const std::string& source() const { return source_; }

  [[noreturn]] void wrong_type(std::string_view key, const char* expected,
                               const nlohmann::json& found) const {
    fail(source_, ": field \"", field(key), "\" must be ", expected, ", found ",
         describe_json(found));
  }
  [[noreturn]] void missing(std::string_view key) const {
    fail(source_, ": missing required field \"", field(key), "\"");
  }
  [[noreturn]] void unsupported(std::string_view key, const std::string& found,
                                const std::string& why) const {
    fail(source_, ": unsupported field \"", field(key), "\" = ", found, ": ", why);
  }

  std::optional<std::int64_t> optional_int(std::string_view key) const {
    const nlohmann::json* value = find(key);
    if (!value) return std::nullopt;
    if (value->is_number_unsigned()) {
      if (value->get<std::uint64_t>() > static_cast<std::uint64_t>(INT64_MAX))
        wrong_type(key, "an integer that fits 64 bits", *value);
      return static_cast<std::int64_t>(value->get<std::uint64_t>());
    }
    if (value->is_number_integer()) return value->get<std::int64_t>();
    wrong_type(key, "an integer", *value);
  }
  std::int64_t required_int(std::string_view key) const {
    if (auto value = optional_int(key)) return *value;
    missing(key);
  }
  std::int64_t int_or(std::string_view key, std::int64_t fallback) const {
    return optional_int(key).value_or(fallback);
  }

  std::optional<double> optional_number(std::string_view key) const {
    const nlohmann::json* value = find(key);
    if (!value) return std::nullopt;
    if (!value->is_number()) wrong_type(key, "a number", *value);
    return value->get<double>();
  }
  double required_number(std::string_view key) const {
    if (auto value = optional_number(key)) return *value;
    missing(key);
  }

  bool bool_or(std::string_view key, bool fallback) const {
    const nlohmann::json* value = find(key);
    if (!value) return fallback;
    if (!value->is_boolean()) wrong_type(key, "true or false", *value);
    return value->get<bool>();
  }

  std::optional<std::string> optional_string(std::string_view key) const {
    const nlohmann::json* value = find(key);
    if (!value) return std::nullopt;
    if (!value->is_string()) wrong_type(key, "a string", *value);
    return value->get<std::string>();
  }
  std::string required_string(std::string_view key) const {
    if (auto value = optional_string(key)) return *value;
    missing(key);
  }

  // A nested object (absent or null: nullopt).
  std::optional<ConfigFields> optional_object(std::string_view key) const {
    const nlohmann::json* value = find(key);
    if (!value) return std::nullopt;
    if (!value->is_object()) wrong_type(key, "an object", *value);
    return ConfigFields(*value, source_, field(key) + ".");
  }

 private:
  const nlohmann::json& object_;
  std::string source_;
  std::string prefix_;
};

struct ArchitectureInfo {
  Architecture architecture;
  const char* class_name;  // the `architectures` entry
  const char* eps_field;
  std::int64_t default_bos, default_eos, default_pad;  // HF's defaults; -1: None
};

inline std::optional<ArchitectureInfo> architecture_info(std::string_view model_type) {
  if (model_type == "orion")
    return ArchitectureInfo{Architecture::Orion, "OrionForCausalLM", "rms_norm_eps", 1, 2, 0};
  if (model_type == "stablelm")
    return ArchitectureInfo{
        Architecture::StableLm, "StableLmForCausalLM", "layer_norm_eps", 0, 0, -1};
  if (model_type == "llama")
    return ArchitectureInfo{Architecture::Llama, "LlamaForCausalLM", "rms_norm_eps", 1, 2, -1};
  return std::nullopt;
}

inline std::string format_number(double value) {
  return nlohmann::json(value).dump();
}

// A RoPE setting that may appear in several places: each one given must agree.
struct RopeValue {
  std::optional<double> value;
  std::string where;  // the field that gave `value`

  void add(const ConfigFields& fields, std::string_view key) {
    std::optional<double> found = fields.optional_number(key);
    if (!found) return;
    if (value && *value != *found)
      fail(fields.source(), ": field \"", fields.field(key), "\" = ", format_number(*found),
           " disagrees with \"", where, "\" = ", format_number(*value),
           " (transformers 4.x and 5.x would use different values)");
    value = found;
    where = fields.field(key);
  }
};

// rope_parameters (5.x) or a legacy rope_scaling object: only the plain "default" RoPE.
inline void check_rope_type(const ConfigFields& rope) {
  for (const char* key : {"rope_type", "type"}) {
    if (auto type = rope.optional_string(key); type && *type != "default")
      rope.unsupported(key, quote_json(*type), "kept implements only the default (unscaled) RoPE");
  }
}

inline std::int64_t token_id(const ConfigFields& fields, std::string_view key,
                             std::int64_t fallback) {
  const nlohmann::json* value = fields.find(key);
  if (!value) return fields.present(key) ? -1 : fallback;  // null: explicitly none
  if (value->is_array()) {
    // transformers allows a list of eos ids; kept's config holds one.
    if (value->size() != 1 || !value->at(0).is_number_integer())
      fields.unsupported(key, describe_json(*value), "kept supports a single token id");
    return value->at(0).get<std::int64_t>();
  }
  std::int64_t id = fields.required_int(key);
  if (id < -1) fields.wrong_type(key, "a token id (>= 0, or -1 / null for none)", *value);
  return id;
}

}  // namespace detail

// Builds a ModelConfig from a parsed config.json; `source` (the path) starts every message.
inline ModelConfig parse_hf_config(const nlohmann::json& json, const std::string& source) {
  if (!json.is_object())
    fail(source, ": top level must be a JSON object, found ", detail::describe_json(json));
  const detail::ConfigFields fields(json, source);
  const std::string model_type = fields.required_string("model_type");
  const std::optional<detail::ArchitectureInfo> info = detail::architecture_info(model_type);
  if (!info)
    fail(source, ": unknown architecture '", model_type,
         "' (field \"model_type\"; kept reads orion, stablelm and llama)");

  ModelConfig config;
  config.architecture = info->architecture;
  if (const nlohmann::json* classes = fields.find("architectures")) {
    if (!classes->is_array()) fields.wrong_type("architectures", "an array of strings", *classes);
    bool listed = false;
    for (const auto& name : *classes) {
      if (!name.is_string()) fields.wrong_type("architectures", "an array of strings", name);
      listed = listed || name.get_ref<const std::string&>() == info->class_name;
    }
    if (!listed)
      fields.unsupported(
          "architectures", detail::describe_json(*classes),
          std::string("model_type \"") + model_type + "\" needs " + info->class_name);
  }

  config.vocab_size = fields.required_int("vocab_size");
  config.hidden_size = fields.required_int("hidden_size");
  config.intermediate_size = fields.required_int("intermediate_size");
  config.num_layers = fields.required_int("num_hidden_layers");
  config.num_heads = fields.required_int("num_attention_heads");
  config.num_kv_heads = fields.int_or(
      "num_key_value_heads", info->architecture == Architecture::StableLm ? 32 : config.num_heads);
  config.max_position_embeddings = fields.required_int("max_position_embeddings");
  if (config.num_heads <= 0)
    fail(source, ": field \"num_attention_heads\" must be positive, got ", config.num_heads);
  if (config.hidden_size % config.num_heads != 0)
    fail(source, ": field \"hidden_size\" = ", config.hidden_size,
         " is not a multiple of num_attention_heads = ", config.num_heads);
  config.head_dim = config.hidden_size / config.num_heads;
  if (auto head_dim = fields.optional_int("head_dim"); head_dim && *head_dim != config.head_dim)
    fields.unsupported("head_dim", std::to_string(*head_dim),
                       "kept needs head_dim == hidden_size / num_attention_heads = " +
                           std::to_string(config.head_dim));

  config.norm_eps = fields.required_number(info->eps_field);
  if (auto act = fields.optional_string("hidden_act"); act && *act != "silu")
    fields.unsupported("hidden_act", detail::quote_json(*act), "kept implements silu only");
  if (fields.bool_or("tie_word_embeddings", false))
    fields.unsupported("tie_word_embeddings", "true", "kept needs a separate lm_head");

  // RoPE: theta and (for stablelm) the rotary fraction, from every place they may be.
  detail::RopeValue theta, rotary_fraction;
  theta.add(fields, "rope_theta");
  rotary_fraction.add(fields, "partial_rotary_factor");
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (auto rope = fields.optional_object(key)) {
      detail::check_rope_type(*rope);
      theta.add(*rope, "rope_theta");
      rotary_fraction.add(*rope, "partial_rotary_factor");
    }
  }
  config.rope_theta = theta.value.value_or(10000.0);
  const double default_fraction = info->architecture == Architecture::StableLm ? 0.25 : 1.0;
  if (rotary_fraction.value.value_or(default_fraction) != 1.0) {
    if (rotary_fraction.value)
      fail(source, ": unsupported field \"", rotary_fraction.where,
           "\" = ", detail::format_number(*rotary_fraction.value),
           ": kept implements full rotary embeddings (1.0) only");
    fail(source, ": unsupported field \"partial_rotary_factor\" (absent): HF's stablelm default ",
         "is 0.25, kept implements full rotary embeddings; the config must state 1.0");
  }

  switch (info->architecture) {
    case Architecture::StableLm:
      for (const char* flag : {"use_qkv_bias", "use_parallel_residual", "qk_layernorm"}) {
        if (fields.bool_or(flag, false))
          fields.unsupported(flag, "true", "kept implements the Orion-equivalent StableLM only");
      }
      break;
    case Architecture::Orion:
      if (fields.bool_or("attention_bias", false))
        fields.unsupported("attention_bias", "true", "Orion has no attention bias");
      break;
    case Architecture::Llama:
      config.attention_bias = fields.bool_or("attention_bias", false);
      config.mlp_bias = fields.bool_or("mlp_bias", false);
      break;
  }

  // "dtype" (transformers 5.x) or "torch_dtype" (4.x): both may be present and must agree.
  std::optional<DType> dtype;
  for (const char* key : {"torch_dtype", "dtype"}) {
    auto name = fields.optional_string(key);
    if (!name) continue;
    std::optional<DType> parsed = parse_torch_dtype(*name);
    if (!parsed)
      fields.unsupported(key, detail::quote_json(*name),
                         "expected float32, bfloat16, float16 or float64");
    if (dtype && *dtype != *parsed) fail(source, ": fields \"torch_dtype\" and \"dtype\" disagree");
    dtype = parsed;
  }
  config.dtype = dtype.value_or(DType::F32);  // what HF loads when the config names none

  config.bos_token_id = detail::token_id(fields, "bos_token_id", info->default_bos);
  config.eos_token_id = detail::token_id(fields, "eos_token_id", info->default_eos);
  config.pad_token_id = detail::token_id(fields, "pad_token_id", info->default_pad);

  config.validate(source);
  return config;
}

inline ModelConfig read_hf_config(const std::filesystem::path& path) {
  const std::string source = path.string();
  std::string text = detail::read_text_file(path, kMaxConfigFileBytes);
  // Depth 8 is ample for config.json (rope_parameters, auto_map, quantization settings).
  return parse_hf_config(detail::parse_json_strict(text, source, 8), source);
}

namespace detail {
inline nlohmann::json token_json(std::int64_t id) {
  return id < 0 ? nlohmann::json(nullptr) : nlohmann::json(id);
}
}  // namespace detail

// The config.json for `config` (see the top comment for what each architecture gets).
// `where` (the destination path) names the config in validation errors.
inline nlohmann::json hf_config_json(const ModelConfig& config,
                                     const std::string& where = "config.json") {
  config.validate(where);
  nlohmann::json json = {
      {"vocab_size", config.vocab_size},
      {"hidden_size", config.hidden_size},
      {"intermediate_size", config.intermediate_size},
      {"num_hidden_layers", config.num_layers},
      {"num_attention_heads", config.num_heads},
      {"num_key_value_heads", config.num_kv_heads},
      {"max_position_embeddings", config.max_position_embeddings},
      {"hidden_act", "silu"},
      {"rope_theta", config.rope_theta},
      {"rope_scaling", nullptr},
      {"tie_word_embeddings", false},
      {"torch_dtype", std::string(torch_dtype_name(config.dtype))},
      {"bos_token_id", detail::token_json(config.bos_token_id)},
      {"eos_token_id", detail::token_json(config.eos_token_id)},
      {"pad_token_id", detail::token_json(config.pad_token_id)},
      {"initializer_range", 0.02},
      {"use_cache", true},
  };
  nlohmann::json rope_parameters = {{"rope_theta", config.rope_theta}, {"rope_type", "default"}};
  switch (config.architecture) {
    case Architecture::Llama:
      json["architectures"] = {"LlamaForCausalLM"};
      json["model_type"] = "llama";
      json["rms_norm_eps"] = config.norm_eps;
      json["head_dim"] = config.head_dim;
      json["attention_bias"] = config.attention_bias;
      json["mlp_bias"] = config.mlp_bias;
      json["attention_dropout"] = 0.0;
      json["pretraining_tp"] = 1;
      json["rope_parameters"] = rope_parameters;
      break;
    case Architecture::StableLm:
      json["architectures"] = {"StableLmForCausalLM"};
      json["model_type"] = "stablelm";
      json["layer_norm_eps"] = config.norm_eps;
      json["partial_rotary_factor"] = 1.0;
      rope_parameters["partial_rotary_factor"] = 1.0;
      json["rope_parameters"] = rope_parameters;
      json["use_qkv_bias"] = false;
      json["use_parallel_residual"] = false;
      json["qk_layernorm"] = false;
      json["hidden_dropout"] = 0.0;
      json["attention_dropout"] = 0.0;
      break;
    case Architecture::Orion:
      // Orion's own config (transformers 4.34 era): top-level rope_theta, eps as rms_norm_eps.
      json["architectures"] = {"OrionForCausalLM"};
      json["model_type"] = "orion";
      json["rms_norm_eps"] = config.norm_eps;
      json["max_sequence_length"] = config.max_position_embeddings;
      json["pretraining_tp"] = 1;
      break;
  }
  return json;
}

inline void write_hf_config(const std::filesystem::path& path, const ModelConfig& config) {
  write_file_atomically(path, hf_config_json(config, path.string()).dump(2) + "\n");
}

// generation_config.json: the special token ids (transformers reads them from here for
// generate(); absent ids are left out rather than written as null).
inline nlohmann::json generation_config_json(const ModelConfig& config) {
  nlohmann::json json = nlohmann::json::object();
  if (config.bos_token_id >= 0) json["bos_token_id"] = config.bos_token_id;
  if (config.eos_token_id >= 0) json["eos_token_id"] = config.eos_token_id;
  if (config.pad_token_id >= 0) json["pad_token_id"] = config.pad_token_id;
  return json;
}

inline void write_generation_config(const std::filesystem::path& path, const ModelConfig& config) {
  write_file_atomically(path, generation_config_json(config).dump(2) + "\n");
}

}  // namespace kept
