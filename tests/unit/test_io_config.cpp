// HF config.json reading and writing for orion, stablelm and llama: round trips, configs in the
// shapes transformers 4.x and 5.x write, and every unsupported or malformed field (each error
// must name the file and the field).
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/io/hf_config.hpp"
#include "kept/model/config.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"

using namespace kept;
using namespace kept::test;
using Catch::Contains;
using nlohmann::json;

namespace {

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// Orion-14B-Base's config.json (transformers 4.34 era), trimmed of auto_map.
json orion_config() {
  return json::parse(R"({
    "architectures": ["OrionForCausalLM"], "model_type": "orion",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 15360, "max_position_embeddings": 4096, "max_sequence_length": 4096,
    "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.34.0",
    "use_cache": true, "vocab_size": 84608})");
}

// What transformers 5.x writes for StableLmConfig (rope settings nested).
json stablelm_config() {
  return json::parse(R"({
    "architectures": ["StableLmForCausalLM"], "model_type": "stablelm",
    "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "silu",
    "hidden_dropout": 0.0, "hidden_size": 64, "initializer_range": 0.02,
    "intermediate_size": 96, "layer_norm_eps": 1e-05, "max_position_embeddings": 4096,
    "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
    "pad_token_id": null, "qk_layernorm": false,
    "rope_parameters": {"partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": false, "transformers_version": "5.23.0", "use_cache": true,
    "use_parallel_residual": false, "use_qkv_bias": false, "vocab_size": 128, "dtype": "float32"})");
}

// A transformers 4.x Llama config (top-level rope_theta), like Llamion's.
json llama_config() {
  return json::parse(R"({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 15360, "max_position_embeddings": 4096, "mlp_bias": false,
    "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 40,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.44.2",
    "use_cache": true, "vocab_size": 84608})");
}

ModelConfig small_config(Architecture architecture) {
  ModelConfig config = ModelConfig::decoder(architecture, 320, 96, 200, 3, 6);
  config.max_position_embeddings = 200000;
  config.rope_theta = 5e7;
  config.norm_eps = 1e-5;
  config.dtype = DType::BF16;
  config.bos_token_id = 1;
  config.eos_token_id = 2;
  config.pad_token_id = -1;
  return config;
}

void check_same(const ModelConfig& a, const ModelConfig& b) {
  CHECK(a.architecture == b.architecture);
  CHECK(a.vocab_size == b.vocab_size);
  CHECK(a.hidden_size == b.hidden_size);
  CHECK(a.intermediate_size == b.intermediate_size);
  CHECK(a.num_layers == b.num_layers);
  CHECK(a.num_heads == b.num_heads);
  CHECK(a.num_kv_heads == b.num_kv_heads);
  CHECK(a.head_dim == b.head_dim);
  CHECK(a.max_position_embeddings == b.max_position_embeddings);
  CHECK(a.rope_theta == b.rope_theta);
  CHECK(a.norm_eps == b.norm_eps);
  CHECK(a.attention_bias == b.attention_bias);
  CHECK(a.mlp_bias == b.mlp_bias);
  CHECK(a.dtype == b.dtype);
  CHECK(a.bos_token_id == b.bos_token_id);
  CHECK(a.eos_token_id == b.eos_token_id);
  CHECK(a.pad_token_id == b.pad_token_id);
}

}  // namespace

TEST_CASE("config round trips for all three architectures", "[io][config]") {
  TempDir dir("kept-io-cfg");
  for (Architecture architecture :
       {Architecture::Orion, Architecture::StableLm, Architecture::Llama}) {
    INFO(architecture_name(architecture));
    ModelConfig config = small_config(architecture);
    if (architecture == Architecture::Llama) {
      config.attention_bias = true;
      config.mlp_bias = true;
      config.pad_token_id = 0;
    }
    const auto path = dir / (std::string(architecture_name(architecture)) + ".json");
    write_hf_config(path, config);
    check_same(read_hf_config(path), config);
  }
}

TEST_CASE("the written llama config has every field transformers needs", "[io][config]") {
  TempDir dir("kept-io-cfg");
  ModelConfig config = small_config(Architecture::Llama);
  config.attention_bias = true;
  write_hf_config(dir / "config.json", config);
  json written = read_json(dir / "config.json");
  CHECK(written["architectures"] == json::array({"LlamaForCausalLM"}));
  CHECK(written["model_type"] == "llama");
  CHECK(written["rms_norm_eps"] == 1e-5);  // explicit: HF's default 1e-6 would be wrong
  CHECK(written["rope_theta"] == 5e7);
  CHECK(written["rope_parameters"] == json({{"rope_theta", 5e7}, {"rope_type", "default"}}));
  CHECK(written["rope_scaling"].is_null());
  CHECK(written["attention_bias"] == true);
  CHECK(written["mlp_bias"] == false);
  CHECK(written["head_dim"] == 16);
  CHECK(written["num_key_value_heads"] == 6);
  CHECK(written["max_position_embeddings"] == 200000);
  CHECK(written["tie_word_embeddings"] == false);
  CHECK(written["torch_dtype"] == "bfloat16");
  CHECK(written["hidden_act"] == "silu");
  CHECK(written["bos_token_id"] == 1);
  CHECK(written["eos_token_id"] == 2);
  CHECK(written["pad_token_id"].is_null());
}

TEST_CASE("the written stablelm config states full rotary in both places", "[io][config]") {
  TempDir dir("kept-io-cfg");
  write_hf_config(dir / "config.json", small_config(Architecture::StableLm));
  json written = read_json(dir / "config.json");
  CHECK(written["model_type"] == "stablelm");
  CHECK(written["architectures"] == json::array({"StableLmForCausalLM"}));
  CHECK(written["layer_norm_eps"] == 1e-5);
  CHECK(written["partial_rotary_factor"] == 1.0);
  CHECK(written["rope_parameters"]["partial_rotary_factor"] == 1.0);
  CHECK(written["rope_parameters"]["rope_theta"] == 5e7);
  CHECK(written["use_qkv_bias"] == false);
  CHECK(written["use_parallel_residual"] == false);
  CHECK(written["qk_layernorm"] == false);
  CHECK_FALSE(written.contains("rms_norm_eps"));
}

TEST_CASE("generation config holds the special token ids", "[io][config]") {
  TempDir dir("kept-io-cfg");
  ModelConfig config = small_config(Architecture::Llama);
  write_generation_config(dir / "generation_config.json", config);
  CHECK(read_json(dir / "generation_config.json") ==
        json({{"bos_token_id", 1}, {"eos_token_id", 2}}));
  config.pad_token_id = 0;
  CHECK(generation_config_json(config)["pad_token_id"] == 0);
}

TEST_CASE("configs as HF writes them are read correctly", "[io][config]") {
  TempDir dir("kept-io-cfg");
  auto read = [&](const json& config) {
    write_file(dir / "config.json", config.dump(2));
    return read_hf_config(dir / "config.json");
  };
  SECTION("Orion-14B: LayerNorm eps under rms_norm_eps") {
    ModelConfig config = read(orion_config());
    CHECK(config.architecture == Architecture::Orion);
    CHECK(config.norm_kind() == NormKind::LayerNorm);
    CHECK(config.norm_eps == 1e-5);
    CHECK(config.head_dim == 128);
    CHECK(config.vocab_size == 84608);
    CHECK(config.dtype == DType::BF16);
    CHECK(config.pad_token_id == 0);
  }
  SECTION("Orion LongChat rope theta") {
    json orion = orion_config();
    orion["rope_theta"] = 5e7;
    orion["max_position_embeddings"] = 200000;
    CHECK(read(orion).rope_theta == 5e7);
  }
  SECTION("stablelm, transformers 5.x layout") {
    ModelConfig config = read(stablelm_config());
    CHECK(config.architecture == Architecture::StableLm);
    CHECK(config.norm_eps == 1e-5);
    CHECK(config.dtype == DType::F32);
    CHECK(config.bos_token_id == 0);
    CHECK(config.pad_token_id == -1);
  }
  SECTION("stablelm, transformers 4.x layout (top-level rope settings)") {
    json stablelm = stablelm_config();
    stablelm.erase("rope_parameters");
    stablelm["rope_theta"] = 20000;
    stablelm["partial_rotary_factor"] = 1;
    stablelm.erase("dtype");
    stablelm["torch_dtype"] = "float16";
    ModelConfig config = read(stablelm);
    CHECK(config.rope_theta == 20000.0);
    CHECK(config.dtype == DType::F16);
  }
  SECTION("llama, transformers 4.x layout") {
    ModelConfig config = read(llama_config());
    CHECK(config.architecture == Architecture::Llama);
    CHECK(config.norm_kind() == NormKind::RmsNorm);
    CHECK(config.norm_eps == 1e-5);
    CHECK(config.pad_token_id == -1);
    CHECK_FALSE(config.attention_bias);
  }
  SECTION("llama, transformers 5.x layout") {
    json llama = llama_config();
    llama.erase("rope_theta");
    llama.erase("rope_scaling");
    llama.erase("torch_dtype");
    llama["dtype"] = "bfloat16";
    llama["rope_parameters"] = {{"rope_theta", 5e5}, {"rope_type", "default"}};
    llama["head_dim"] = 128;
    llama["attention_bias"] = true;
    llama["mlp_bias"] = true;
    llama["pad_token_id"] = nullptr;
    ModelConfig config = read(llama);
    CHECK(config.rope_theta == 5e5);
    CHECK(config.attention_bias);
    CHECK(config.mlp_bias);
    CHECK(config.dtype == DType::BF16);
  }
  SECTION("defaults: num_key_value_heads, rope_theta, dtype, token ids") {
    json llama = llama_config();
    for (const char* key : {"num_key_value_heads", "rope_theta", "torch_dtype", "bos_token_id",
                            "eos_token_id", "rope_scaling", "hidden_act", "tie_word_embeddings"})
      llama.erase(key);
    ModelConfig config = read(llama);
    CHECK(config.num_kv_heads == 40);
    CHECK(config.rope_theta == 10000.0);
    CHECK(config.dtype == DType::F32);
    CHECK(config.bos_token_id == 1);
    CHECK(config.eos_token_id == 2);
  }
  SECTION("a one-element eos list and a legacy rope_scaling of the default type") {
    json llama = llama_config();
    llama["eos_token_id"] = {7};
    llama["rope_scaling"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};
    CHECK(read(llama).eos_token_id == 7);
  }
  SECTION("unknown fields are not carried into a written config") {
    json llama = llama_config();
    llama["some_future_field"] = {1, 2, 3};
    ModelConfig config = read(llama);
    write_hf_config(dir / "out.json", config);
    json written = read_json(dir / "out.json");
    CHECK_FALSE(written.contains("some_future_field"));
    CHECK_FALSE(written.contains("transformers_version"));
  }
}

TEST_CASE("config errors name the file and the field", "[io][config][errors]") {
  TempDir dir("kept-io-cfg");
  const std::string path = (dir / "config.json").string();
  auto error = [&](const json& config) {
    write_file(dir / "config.json", config.dump(2));
    return error_of([&] { read_hf_config(dir / "config.json"); });
  };
  auto with = [](json config, const std::string& key, json value) {
    config[key] = std::move(value);
    return config;
  };
  auto without = [](json config, const std::string& key) {
    config.erase(key);
    return config;
  };
  auto names = [&](const std::string& field) { return ContainsAll({path, "\"" + field + "\""}); };

  SECTION("not a config") {
    write_file(dir / "config.json", "{\"model_type\": ");
    CHECK_THAT(error_of([&] { read_hf_config(dir / "config.json"); }),
               Contains(path) && Contains("not valid JSON"));
    write_file(dir / "config.json", R"({"model_type": "llama", "model_type": "orion"})");
    CHECK_THAT(error_of([&] { read_hf_config(dir / "config.json"); }),
               Contains(path) && Contains("duplicate key \"model_type\""));
    CHECK_THAT(error(json::array()), Contains(path) && Contains("top level must be a JSON object"));
    CHECK_THAT(error_of([&] { read_hf_config(dir / "absent.json"); }),
               Contains((dir / "absent.json").string()) && Contains("No such file"));
  }
  SECTION("architecture") {
    CHECK_THAT(error(with(llama_config(), "model_type", "gpt2")),
               Contains(path) && Contains("unknown architecture 'gpt2'"));
    CHECK_THAT(error(without(llama_config(), "model_type")),
               names("model_type") && Contains("missing required field"));
    CHECK_THAT(error(with(llama_config(), "model_type", 3)),
               names("model_type") && Contains("must be a string") && Contains("number 3"));
    CHECK_THAT(error(with(llama_config(), "architectures", json::array({"MistralForCausalLM"}))),
               names("architectures") && Contains("LlamaForCausalLM"));
    CHECK_THAT(error(with(llama_config(), "architectures", "LlamaForCausalLM")),
               names("architectures") && Contains("must be an array of strings"));
  }
  SECTION("required fields, for each architecture") {
    for (const json& base : {orion_config(), stablelm_config(), llama_config()}) {
      const std::string eps = base["model_type"] == "stablelm" ? "layer_norm_eps" : "rms_norm_eps";
      for (const std::string& field : std::vector<std::string>{
               "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", eps}) {
        INFO(base["model_type"] << " without " << field);
        CHECK_THAT(error(without(base, field)), names(field) && Contains("missing required field"));
      }
    }
  }
  SECTION("wrong JSON types") {
    CHECK_THAT(
        error(with(llama_config(), "hidden_size", "5120")),
        names("hidden_size") && Contains("must be an integer") && Contains("string \"5120\""));
    CHECK_THAT(error(with(llama_config(), "hidden_size", 5120.5)),
               names("hidden_size") && Contains("must be an integer"));
    CHECK_THAT(error(with(llama_config(), "num_hidden_layers", 1e30)),
               names("num_hidden_layers") && Contains("must be an integer"));
    CHECK_THAT(error(with(llama_config(), "rms_norm_eps", "1e-5")),
               names("rms_norm_eps") && Contains("must be a number"));
    CHECK_THAT(error(with(llama_config(), "rope_theta", true)),
               names("rope_theta") && Contains("must be a number"));
    CHECK_THAT(error(with(llama_config(), "attention_bias", "false")),
               names("attention_bias") && Contains("must be true or false"));
    CHECK_THAT(error(with(llama_config(), "tie_word_embeddings", 0)),
               names("tie_word_embeddings") && Contains("must be true or false"));
    CHECK_THAT(error(with(llama_config(), "hidden_act", 1)),
               names("hidden_act") && Contains("must be a string"));
    CHECK_THAT(error(with(llama_config(), "torch_dtype", 16)),
               names("torch_dtype") && Contains("must be a string"));
    CHECK_THAT(error(with(llama_config(), "rope_parameters", "default")),
               names("rope_parameters") && Contains("must be an object"));
    CHECK_THAT(error(with(llama_config(), "rope_parameters", json{{"rope_theta", "x"}})),
               names("rope_parameters.rope_theta") && Contains("must be a number"));
    CHECK_THAT(error(with(llama_config(), "bos_token_id", "1")),
               names("bos_token_id") && Contains("must be an integer"));
    CHECK_THAT(error(with(llama_config(), "pad_token_id", -5)),
               names("pad_token_id") && Contains("token id"));
  }
  SECTION("values kept cannot compute") {
    CHECK_THAT(error(with(llama_config(), "num_key_value_heads", 8)),
               names("num_key_value_heads") && Contains("multi-head attention only"));
    CHECK_THAT(error(with(llama_config(), "hidden_size", 5121)),
               names("hidden_size") && Contains("not a multiple of num_attention_heads"));
    CHECK_THAT(error(with(llama_config(), "vocab_size", 0)),
               names("vocab_size") && Contains("must be positive"));
    CHECK_THAT(error(with(llama_config(), "num_attention_heads", 0)),
               names("num_attention_heads") && Contains("must be positive"));
    CHECK_THAT(error(with(llama_config(), "rope_theta", -1.0)),
               names("rope_theta") && Contains("must be positive"));
    CHECK_THAT(error(with(llama_config(), "torch_dtype", "int8")),
               names("torch_dtype") && Contains("unsupported") && Contains("\"int8\""));
    CHECK_THAT(error(with(llama_config(), "dtype", "float16")),
               Contains(path) && Contains("\"torch_dtype\" and \"dtype\" disagree"));
    CHECK_THAT(error(with(llama_config(), "eos_token_id", json::array({2, 3}))),
               names("eos_token_id") && Contains("single token id"));
  }
  SECTION("llama-specific") {
    CHECK_THAT(error(with(llama_config(), "head_dim", 64)),
               names("head_dim") && Contains("unsupported") && Contains("= 64") &&
                   Contains("hidden_size / num_attention_heads = 128"));
    CHECK_THAT(
        error(with(llama_config(), "rope_scaling", json{{"rope_type", "linear"}, {"factor", 2.0}})),
        names("rope_scaling.rope_type") && Contains("unsupported") && Contains("\"linear\""));
    CHECK_THAT(
        error(with(llama_config(), "rope_scaling", json{{"type", "dynamic"}, {"factor", 2.0}})),
        names("rope_scaling.type") && Contains("\"dynamic\""));
    CHECK_THAT(error(with(llama_config(), "rope_parameters",
                          json{{"rope_type", "llama3"}, {"rope_theta", 5e5}})),
               names("rope_parameters.rope_type") && Contains("\"llama3\""));
    CHECK_THAT(error(with(llama_config(), "rope_scaling", json::array())),
               names("rope_scaling") && Contains("must be an object"));
    CHECK_THAT(error(with(llama_config(), "tie_word_embeddings", true)),
               names("tie_word_embeddings") && Contains("unsupported"));
    CHECK_THAT(error(with(llama_config(), "hidden_act", "gelu")),
               names("hidden_act") && Contains("unsupported") && Contains("\"gelu\""));
    CHECK_THAT(error(with(llama_config(), "rope_parameters",
                          json{{"rope_theta", 5e5}, {"rope_type", "default"}})),
               names("rope_parameters.rope_theta") && Contains("disagrees with \"rope_theta\""));
    CHECK_THAT(error(with(llama_config(), "rope_parameters",
                          json{{"partial_rotary_factor", 0.5}, {"rope_type", "default"}})),
               names("rope_parameters.partial_rotary_factor") && Contains("full rotary"));
  }
  SECTION("stablelm-specific") {
    CHECK_THAT(error(with(stablelm_config(), "use_qkv_bias", true)),
               names("use_qkv_bias") && Contains("unsupported"));
    CHECK_THAT(error(with(stablelm_config(), "use_parallel_residual", true)),
               names("use_parallel_residual") && Contains("unsupported"));
    CHECK_THAT(error(with(stablelm_config(), "qk_layernorm", true)),
               names("qk_layernorm") && Contains("unsupported"));
    CHECK_THAT(error(with(stablelm_config(), "hidden_act", "gelu")),
               names("hidden_act") && Contains("\"gelu\""));
    json quarter = stablelm_config();
    quarter["rope_parameters"]["partial_rotary_factor"] = 0.25;
    CHECK_THAT(error(quarter), names("rope_parameters.partial_rotary_factor") &&
                                   Contains("unsupported") && Contains("0.25"));
    json top_level = without(stablelm_config(), "rope_parameters");
    top_level["partial_rotary_factor"] = 0.25;
    CHECK_THAT(error(top_level), names("partial_rotary_factor") && Contains("0.25"));
    CHECK_THAT(error(without(stablelm_config(), "rope_parameters")),
               names("partial_rotary_factor") && Contains("absent") && Contains("0.25"));
    json disagree = stablelm_config();
    disagree["partial_rotary_factor"] = 0.5;
    CHECK_THAT(error(disagree), names("rope_parameters.partial_rotary_factor") &&
                                    Contains("disagrees with \"partial_rotary_factor\""));
    // HF's stablelm default for num_key_value_heads is 32, not num_attention_heads.
    CHECK_THAT(error(without(stablelm_config(), "num_key_value_heads")),
               names("num_key_value_heads") && Contains("is 32"));
  }
  SECTION("orion-specific") {
    CHECK_THAT(
        error(with(orion_config(), "rope_scaling", json{{"type", "dynamic"}, {"factor", 4.0}})),
        names("rope_scaling.type") && Contains("unsupported"));
    CHECK_THAT(error(with(orion_config(), "architectures", json::array({"LlamaForCausalLM"}))),
               names("architectures") && Contains("OrionForCausalLM"));
    CHECK_THAT(error(with(orion_config(), "attention_bias", true)),
               names("attention_bias") && Contains("unsupported"));
  }
}

TEST_CASE("writing an invalid config names the destination", "[io][config][errors]") {
  TempDir dir("kept-io-cfg");
  ModelConfig config = small_config(Architecture::StableLm);
  config.attention_bias = true;
  CHECK_THAT(error_of([&] { write_hf_config(dir / "config.json", config); }),
             Contains((dir / "config.json").string()) && Contains("attention_bias"));
  CHECK_FALSE(std::filesystem::exists(dir / "config.json"));
}
