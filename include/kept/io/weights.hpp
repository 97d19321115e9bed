// kept/io/weights.hpp: moving a decoder's parameters to and from an HF checkpoint.
//
// Loading is strict, because a silently ignored tensor is a wrong model: every parameter the
// config implies must be present with exactly the shape the config implies and a float
// dtype, and every tensor in the checkpoint must be used. Errors name the checkpoint file
// and the tensor. bf16/fp16 tensors are widened into the model's compute dtype; saving
// rounds back (round-to-nearest-even), so a bf16 checkpoint loaded and saved unchanged is
// bit-identical.
#pragma once

#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "kept/io/atomic_file.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/layers/parameter.hpp"
#include "kept/model/config.hpp"
#include "kept/model/parameter_specs.hpp"

namespace kept {

// Tensors that HF checkpoints may carry but that hold no parameter (older exports saved the
// RoPE frequency buffer).
// Matches `model.layers.<digits>.self_attn.rotary_emb.inv_freq` (no std::regex: GCC 12's
// <regex> trips -Wmaybe-uninitialized under the sanitizers).
inline bool is_ignorable_checkpoint_tensor(const std::string& name) {
  constexpr std::string_view prefix = "model.layers.";
  constexpr std::string_view suffix = ".self_attn.rotary_emb.inv_freq";
  const std::string_view view(name);
  if (view.size() <= prefix.size() + suffix.size() || !view.starts_with(prefix) ||
      !view.ends_with(suffix))
    return false;
  const std::string_view layer =
      view.substr(prefix.size(), view.size() - prefix.size() - suffix.size());
  for (const char c : layer)
    if (c < '0' || c > '9') return false;
  return true;
}

// Where a reader looks tensors up: its one weight file, or the index of a sharded checkpoint.
template <class Reader>
std::string checkpoint_location(const Reader& reader) {
  const auto& files = reader.files();
  if (reader.sharded() || files.size() != 1)
    return (reader.directory() / reader.index_file()).string();
  return (reader.directory() / files[0]).string();
}

// Checks that `source` holds exactly the tensors `config` implies: every one present, of that
// shape, of a float dtype, and nothing else. Throws naming the file and tensor. Returns the
// tensors that hold no parameter and are skipped (RoPE inv_freq buffers).
template <class Reader>
std::vector<std::string> check_checkpoint_tensors(const Reader& source, const ModelConfig& config) {
  std::set<std::string, std::less<>> expected;
  for (const ParameterSpec& spec : parameter_specs(config)) {
    expected.insert(spec.name);
    if (!source.contains(spec.name)) {
      const bool norm_bias = spec.role == ParamRole::NormBias;
      fail(checkpoint_location(source), ": tensor \"", spec.name, "\" is missing",
           norm_bias ? " (a LayerNorm without bias: not the LayerNorm decoder kept converts; "
                       "if it is an RMSNorm model there is nothing to convert)"
                     : "");
    }
    const Tensor& tensor = source.tensor(spec.name);
    const std::string where = (source.directory() / source.file_of(spec.name)).string();
    KEPT_CHECK(is_float(tensor.dtype()), where, ": tensor \"", spec.name, "\" has dtype ",
               dtype_name(tensor.dtype()), "; expected F32, BF16, F16 or F64");
    KEPT_CHECK(tensor.shape() == spec.shape, where, ": tensor \"", spec.name, "\" has shape ",
               tensor.shape(), ", but config.json implies ", spec.shape);
  }
  std::vector<std::string> skipped;
  for (const std::string& name : source.names()) {
    if (expected.count(name)) continue;
    if (is_ignorable_checkpoint_tensor(name)) {
      skipped.push_back(name);
      continue;
    }
    fail((source.directory() / source.file_of(name)).string(), ": unexpected tensor \"", name,
         "\"; config.json does not describe it (a different architecture?)");
  }
  return skipped;
}

// Fills every parameter of `model` from `reader`, converting to the parameters' dtype on the way
// into the backend's memory (Backend::upload).
template <class Backend, class Model>
void load_weights(Backend& backend, Model& model, const CheckpointReader& reader) {
  std::set<std::string> used;
  model.visit_parameters([&](Parameter& parameter) {
    const std::string& name = parameter.name;
    if (!reader.contains(name))
      fail(checkpoint_location(reader), ": tensor \"", name,
           "\" is missing from the checkpoint (the config implies it)");
    const std::string where = (reader.directory() / reader.file_of(name)).string();
    const Tensor& stored = reader.tensor(name);
    KEPT_CHECK(is_float(stored.dtype()), where, ": tensor \"", name, "\" has dtype ",
               dtype_name(stored.dtype()), "; expected a float dtype (F32, BF16, F16 or F64)");
    KEPT_CHECK(stored.shape() == parameter.value.shape(), where, ": tensor \"", name,
               "\" has shape ", stored.shape(), ", but config.json implies ",
               parameter.value.shape());
    backend.upload(stored, parameter.value);
    used.insert(name);
  });
  std::vector<std::string> unexpected;
  for (const std::string& name : reader.names())
    if (!used.count(name) && !is_ignorable_checkpoint_tensor(name)) unexpected.push_back(name);
  if (!unexpected.empty()) {
    std::string list;
    for (std::size_t i = 0; i < unexpected.size() && i < 5; ++i)
      list += (i ? ", \"" : "\"") + unexpected[i] + "\"";
    if (unexpected.size() > 5) list += ", ... (" + std::to_string(unexpected.size()) + " in all)";
    fail(reader.directory().string(), ": unexpected tensor ", list, " in ",
         reader.file_of(unexpected[0]), "; the config does not describe it");
  }
}

// Writes a loadable HF checkpoint directory: config.json, generation_config.json and the
// weights in config.dtype (sharded above `max_shard_bytes`). The directory is built under a
// temporary name and renamed into place, so `destination` is either the old content or the
// complete new one; an existing destination is replaced only with `force`.
template <class Backend, class Model>
void save_pretrained(Backend& backend, Model& model, const ModelConfig& config,
                     const std::filesystem::path& destination, bool force,
                     const std::function<void(const std::filesystem::path&)>& extra_files = {},
                     std::uint64_t max_shard_bytes = kDefaultMaxShardBytes) {
  AtomicDirectory directory(destination, force);
  write_hf_config(directory.path() / "config.json", config);
  write_generation_config(directory.path() / "generation_config.json", config);
  // Each parameter is converted to the storage dtype only when its bytes are written.
  std::vector<const Parameter*> parameters;
  std::vector<TensorSpec> specs;
  model.visit_parameters([&](Parameter& parameter) {
    parameters.push_back(&parameter);
    specs.push_back({parameter.name, config.dtype, parameter.value.shape()});
  });
  write_checkpoint(
      directory.path(), specs,
      [&](std::size_t i) { return backend.download(parameters[i]->value).to(config.dtype); },
      max_shard_bytes);
  // Tokenizer and other files join the checkpoint before it is renamed into place.
  if (extra_files) extra_files(directory.path());
  directory.commit();
}

}  // namespace kept
