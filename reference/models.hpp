// reference/models.hpp: loading checkpoints into a backend for the commands.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "kept/backend/cpu.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/weights.hpp"
#include "kept/model/any_decoder.hpp"
#include "tokenizer.hpp"

namespace kept::cli {

template <class B>
struct LoadedModelOn {
  std::filesystem::path directory;
  ModelConfig config;
  AnyDecoder<B> model;
};
using LoadedModel = LoadedModelOn<Cpu>;

// config.json + weights (safetensors or .bin) into a decoder on `backend` (converted to its
// parameter dtype: fp32 on Cpu, bf16 on CUDA).
template <class B>
LoadedModelOn<B> load_model(B& backend, const std::filesystem::path& directory) {
  const ModelConfig config = read_hf_config(directory / "config.json");
  LoadedModelOn<B> loaded{directory, config, make_decoder(backend, config)};
  const CheckpointReader reader = CheckpointReader::open(directory);
  with_decoder(loaded.model, [&](auto& decoder) { load_weights(backend, decoder, reader); });
  return loaded;
}

// The tokenizer a job names, else the first model directory that has a tokenizer.model.
inline Tokenizer find_tokenizer(const std::string& explicit_path,
                                std::initializer_list<std::filesystem::path> model_directories) {
  if (!explicit_path.empty()) return Tokenizer(explicit_path);
  for (const auto& directory : model_directories) {
    std::error_code error;
    if (!directory.empty() &&
        std::filesystem::is_regular_file(directory / "tokenizer.model", error))
      return Tokenizer(directory / "tokenizer.model");
  }
  fail(
      "no tokenizer: none given and no tokenizer.model in the model directories; train one with "
      "`kept tokenizer` and pass it with --tokenizer");
}

}  // namespace kept::cli
