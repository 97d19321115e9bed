// kept/io/checkpoint.hpp: Hugging Face checkpoint directories: safetensors (read and write)
// and PyTorch .bin (read).
//
// HF stores weights either as one `model.safetensors` or, when they exceed the shard size, as
// shards `model-00001-of-00003.safetensors` ... plus `model.safetensors.index.json`:
//   {"metadata": {"total_size": <bytes of tensor data>}, "weight_map": {tensor name: file}}
// The names, the 5-digit numbering and the greedy split follow huggingface_hub's
// split_state_dict_into_shards_factory (filename pattern "model{suffix}.safetensors", suffix
// "-{i:05d}-of-{n:05d}"), and the index is written like transformers' save_pretrained
// (json.dumps(indent=2, sort_keys=True) + "\n"). Every file carries the metadata
// {"format": "pt"}, which transformers requires of safetensors files that have metadata.
// One deliberate difference in the split: huggingface_hub gives a tensor larger than the shard
// size its own shard *ahead of* the shard being filled, which reorders tensors; kept closes
// the current shard first, so the files list the tensors in the order given.
//
// Reading validates the whole directory up front, because a silently partial checkpoint would
// surface hours later as a wrong model: exactly one of the two layouts must be present; the
// index must be an object whose "weight_map" maps each tensor to a plain file name in the
// directory (no '/', no ".."; the index must not make the reader open files elsewhere); every
// mapped file must exist and hold exactly the tensors the index assigns to it (each shard
// file is itself fully validated by SafetensorsFile). The index's "metadata" is not checked
// against the data: checkpoints in the wild disagree about what total_size counts.
// Tensors are zero-copy views into the mmapped files. names() lists them in a stable order:
// shards by file name, then in data order within a file, which for files kept wrote is the
// order they were written in.
//
// write_checkpoint writes each file atomically but not the directory as a whole: use it inside
// an AtomicDirectory for an all-or-nothing output.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/json.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/io/torch_checkpoint.hpp"

namespace kept {

inline constexpr std::string_view kCheckpointSingleFile = "model.safetensors";
inline constexpr std::string_view kCheckpointIndexFile = "model.safetensors.index.json";
// transformers' default max_shard_size, "5GB" (decimal, as huggingface_hub parses it).
inline constexpr std::uint64_t kDefaultMaxShardBytes = 5'000'000'000ull;
// huggingface_hub refuses index files over 10 MiB; kept allows more but still bounds it.
inline constexpr std::uint64_t kMaxCheckpointIndexBytes = 100ull << 20;

// "model-00001-of-00003.safetensors" for shard 1 (1-based) of 3.
inline std::string shard_file_name(std::size_t shard, std::size_t shard_count) {
  char buffer[96];
  std::snprintf(buffer, sizeof buffer, "model-%05zu-of-%05zu.safetensors", shard, shard_count);
  return buffer;
}

// Splits `tensors` into shards of at most `max_shard_bytes` of tensor data each (a larger
// tensor gets a shard of its own), keeping the order. Returns the indices in each shard.
inline std::vector<std::vector<std::size_t>> plan_shards(std::span<const TensorSpec> tensors,
                                                         std::uint64_t max_shard_bytes) {
  KEPT_CHECK(max_shard_bytes > 0, "max_shard_bytes must be positive");
  std::vector<std::vector<std::size_t>> shards;
  std::vector<std::size_t> current;
  std::uint64_t current_bytes = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::uint64_t bytes = tensors[i].nbytes();
    if (!current.empty() && current_bytes + bytes > max_shard_bytes) {
      shards.push_back(std::move(current));
      current.clear();
      current_bytes = 0;
    }
    current.push_back(i);
    current_bytes += bytes;
  }
  if (!current.empty() || shards.empty()) shards.push_back(std::move(current));
  return shards;
}
inline std::vector<std::vector<std::size_t>> plan_shards(std::span<const NamedTensor> tensors,
                                                         std::uint64_t max_shard_bytes) {
  return plan_shards(specs_of(tensors), max_shard_bytes);
}

namespace detail {

// A weight_map value must name a file inside the checkpoint directory.
inline bool is_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of(std::string_view("/\\\0", 3)) == std::string_view::npos;
}

// Files a previous write_checkpoint may have left: the two fixed names and shard names.
inline bool is_checkpoint_weight_file(const std::string& name) {
  if (name == kCheckpointSingleFile || name == kCheckpointIndexFile) return true;
  // model-<digits>-of-<digits>.safetensors
  const std::string_view prefix = "model-", middle = "-of-", suffix = ".safetensors";
  std::string_view rest = name;
  if (!rest.starts_with(prefix) || !rest.ends_with(suffix)) return false;
  rest = rest.substr(prefix.size(), rest.size() - prefix.size() - suffix.size());
  std::size_t split = rest.find(middle);
  if (split == std::string_view::npos) return false;
  auto digits = [](std::string_view text) {
    return text.size() >= 5 && text.find_first_not_of("0123456789") == std::string_view::npos;
  };
  return digits(rest.substr(0, split)) && digits(rest.substr(split + middle.size()));
}

}  // namespace detail

// The two on-disk layouts HF uses for weights; a reader accepts either.
struct CheckpointFormat {
  std::string_view single_file;
  std::string_view index_file;
  std::string_view description;
};
inline constexpr CheckpointFormat kSafetensorsFormat{kCheckpointSingleFile, kCheckpointIndexFile,
                                                     "safetensors"};
inline constexpr CheckpointFormat kTorchBinFormat{kTorchCheckpointSingleFile,
                                                  kTorchCheckpointIndexFile, "PyTorch .bin"};

class CheckpointReader {
 public:
  CheckpointReader() = default;

  // Opens a safetensors checkpoint, or a PyTorch .bin one (read without executing code, see
  // torch_checkpoint.hpp) when the directory has no safetensors: transformers prefers
  // safetensors the same way.
  static CheckpointReader open(const std::filesystem::path& directory) {
    CheckpointReader reader;
    reader.directory_ = directory;
    const std::string where = directory.string();
    std::error_code error;
    if (!std::filesystem::is_directory(directory, error))
      fail(where, ": not a checkpoint directory (",
           std::filesystem::exists(directory, error) ? "not a directory" : "does not exist", ")");
    for (const CheckpointFormat* format : {&kSafetensorsFormat, &kTorchBinFormat}) {
      const bool has_single = std::filesystem::exists(directory / format->single_file, error);
      const bool has_index = std::filesystem::exists(directory / format->index_file, error);
      if (has_single && has_index)
        fail(where, ": holds both ", format->single_file, " and ", format->index_file,
             "; it is ambiguous which one is the checkpoint");
      if (!has_single && !has_index) continue;
      reader.format_ = format;
      if (has_single) {
        reader.add_file(std::string(format->single_file), nullptr);
      } else {
        reader.sharded_ = true;
        reader.open_sharded();
      }
      return reader;
    }
    fail(where, ": no ", kCheckpointSingleFile, " or ", kCheckpointIndexFile, ", and no ",
         kTorchCheckpointSingleFile, " or ", kTorchCheckpointIndexFile,
         " (not a checkpoint directory)");
  }

  const std::filesystem::path& directory() const { return directory_; }
  bool sharded() const { return sharded_; }
  // "safetensors" or "PyTorch .bin".
  std::string_view format() const { return format_ ? format_->description : ""; }
  // The index file of a sharded checkpoint ("model.safetensors.index.json").
  std::string_view index_file() const { return format_ ? format_->index_file : ""; }
  // The weight files, in the order names() visits them.
  const std::vector<std::string>& files() const { return file_names_; }
  std::size_t size() const { return names_.size(); }
  // All tensor names: files in order, data order within each file.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(std::string_view name) const { return file_of_.find(name) != file_of_.end(); }

  const Tensor& tensor(std::string_view name) const {
    return std::visit([&](const auto& file) -> const Tensor& { return file.tensor(name); },
                      files_[locate(name)]);
  }
  // The file (name within the directory) that holds `name`.
  const std::string& file_of(std::string_view name) const { return file_names_[locate(name)]; }

 private:
  using WeightFile = std::variant<SafetensorsFile, TorchCheckpointFile>;

  std::size_t locate(std::string_view name) const {
    auto found = file_of_.find(name);
    if (found == file_of_.end())
      fail(directory_.string(), ": tensor ", detail::quote_json(name),
           " not found in the checkpoint (",
           sharded_ ? std::string(index_file()) + " maps " : file_names_[0] + " holds ",
           names_.size(), " tensors)");
    return found->second;
  }

  WeightFile open_file(const std::filesystem::path& path) const {
    if (format_ == &kTorchBinFormat)
      return WeightFile(std::in_place_type<TorchCheckpointFile>, path);
    return WeightFile(std::in_place_type<SafetensorsFile>, path);
  }

  // Opens `file_name`; with an index, checks it holds exactly `expected` (the tensors the index
  // maps to it) and that `index` maps none of its tensors elsewhere.
  void add_file(const std::string& file_name, const std::set<std::string>* expected,
                const std::map<std::string, std::string>* index = nullptr) {
    const std::filesystem::path path = directory_ / file_name;
    WeightFile file = open_file(path);
    const std::size_t position = files_.size();
    const std::vector<std::string> file_names =
        std::visit([](const auto& f) { return std::vector<std::string>(f.names()); }, file);
    for (const std::string& name : file_names) {
      if (expected && !expected->count(name)) {
        auto mapped = index->find(name);
        if (mapped == index->end())
          fail(path.string(), ": holds tensor ", detail::quote_json(name), ", which ", index_file(),
               " does not list");
        fail(path.string(), ": holds tensor ", detail::quote_json(name), ", which ", index_file(),
             " maps to ", mapped->second, " (a tensor in two shards)");
      }
      file_of_.emplace(name, position);
      names_.push_back(name);
    }
    if (expected) {
      for (const std::string& name : *expected) {
        if (!std::visit([&](const auto& f) { return f.contains(name); }, file))
          fail(path.string(), ": tensor ", detail::quote_json(name), " is missing, but ",
               index_file(), " maps it to this file");
      }
    }
    files_.push_back(std::move(file));
    file_names_.push_back(file_name);
  }

  void open_sharded() {
    const std::filesystem::path index_path = directory_ / index_file();
    const std::string where = index_path.string();
    std::string text = detail::read_text_file(index_path, kMaxCheckpointIndexBytes);
    // Generous depth: "metadata" may carry nested values kept does not read.
    nlohmann::json index = detail::parse_json_strict(text, where, 16);
    if (!index.is_object())
      fail(where, ": top level must be a JSON object, found ", detail::describe_json(index));
    if (index.contains("metadata") && !index["metadata"].is_object() &&
        !index["metadata"].is_null())
      fail(where, ": \"metadata\" must be an object, found ",
           detail::describe_json(index["metadata"]));
    if (!index.contains("weight_map")) fail(where, ": missing \"weight_map\"");
    const nlohmann::json& weight_map = index["weight_map"];
    if (!weight_map.is_object())
      fail(where, ": \"weight_map\" must be an object of tensor name to file name, found ",
           detail::describe_json(weight_map));
    if (weight_map.empty()) fail(where, ": \"weight_map\" is empty");

    std::map<std::string, std::string> file_of_tensor;
    std::map<std::string, std::set<std::string>> tensors_of_file;  // sorted by file name
    for (const auto& [name, file] : weight_map.items()) {
      const std::string tensor = where + ": weight_map: tensor " + detail::quote_json(name);
      if (!file.is_string())
        fail(tensor, ": file must be a string, found ", detail::describe_json(file));
      const std::string& file_name = file.get_ref<const std::string&>();
      if (!detail::is_plain_file_name(file_name))
        fail(tensor, ": file ", detail::quote_json(file_name),
             " must be a plain file name inside the checkpoint directory (no '/' or '..')");
      std::error_code error;
      if (!std::filesystem::is_regular_file(directory_ / file_name, error))
        fail(tensor, ": mapped to ", detail::quote_json(file_name), ", which does not exist in ",
             directory_.string());
      file_of_tensor.emplace(name, file_name);
      tensors_of_file[file_name].insert(name);
    }
    for (const auto& [file_name, names] : tensors_of_file)
      add_file(file_name, &names, &file_of_tensor);
  }

  std::filesystem::path directory_;
  const CheckpointFormat* format_ = nullptr;
  bool sharded_ = false;
  std::vector<std::string> file_names_;
  std::vector<WeightFile> files_;  // parallel to file_names_
  std::map<std::string, std::size_t, std::less<>> file_of_;
  std::vector<std::string> names_;
};

// Writes `tensors` (unique names) into `directory` (created if missing) as model.safetensors,
// or as shards of at most `max_shard_bytes` plus the index when one file would exceed it.
// Weight files from an earlier write that the new layout does not use are removed, so the
// directory never holds two layouts. Returns the file names written, index last.
inline std::vector<std::string> write_checkpoint(
    const std::filesystem::path& directory, std::span<const TensorSpec> specs,
    const TensorProducer& produce, std::uint64_t max_shard_bytes = kDefaultMaxShardBytes) {
  const std::string where = directory.string();
  KEPT_CHECK(max_shard_bytes > 0, where, ": max_shard_bytes must be positive");
  // Check names across all shards before writing anything.
  std::set<std::string_view> seen;
  for (const TensorSpec& spec : specs) {
    if (!seen.insert(spec.name).second)
      fail(where, ": tensor ", detail::quote_json(spec.name), ": name given twice");
  }
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  if (error) fail(where, ": cannot create the checkpoint directory: ", error.message());

  const SafetensorsMetadata metadata{{"format", "pt"}};
  const std::vector<std::vector<std::size_t>> shards = plan_shards(specs, max_shard_bytes);
  std::vector<std::string> written;
  if (shards.size() == 1) {
    write_safetensors(directory / kCheckpointSingleFile, specs, produce, metadata);
    written.emplace_back(kCheckpointSingleFile);
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    std::uint64_t total_size = 0;
    for (std::size_t shard = 0; shard < shards.size(); ++shard) {
      const std::string file_name = shard_file_name(shard + 1, shards.size());
      std::vector<TensorSpec> members;
      members.reserve(shards[shard].size());
      for (std::size_t index : shards[shard]) {
        members.push_back(specs[index]);
        weight_map[specs[index].name] = file_name;
        total_size += specs[index].nbytes();
      }
      const std::vector<std::size_t>& global = shards[shard];
      write_safetensors(
          directory / file_name, members, [&](std::size_t i) { return produce(global[i]); },
          metadata);
      written.push_back(file_name);
    }
    nlohmann::json index = {{"metadata", {{"total_size", total_size}}},
                            {"weight_map", std::move(weight_map)}};
    // Like Python's json.dumps(indent=2, sort_keys=True) + "\n" (nlohmann::json sorts keys;
    // ensure_ascii matches json.dumps' default).
    write_file_atomically(directory / kCheckpointIndexFile, index.dump(2, ' ', true) + "\n");
    written.emplace_back(kCheckpointIndexFile);
  }

  const std::set<std::string> keep(written.begin(), written.end());
  for (const auto& entry : std::filesystem::directory_iterator(directory)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_regular_file() && detail::is_checkpoint_weight_file(name) && !keep.count(name)) {
      std::filesystem::remove(entry.path(), error);
      if (error) fail(where, ": cannot remove stale weight file ", name, ": ", error.message());
    }
  }
  return written;
}

// The same for tensors already in memory.
inline std::vector<std::string> write_checkpoint(
    const std::filesystem::path& directory, std::span<const NamedTensor> tensors,
    std::uint64_t max_shard_bytes = kDefaultMaxShardBytes) {
  const std::vector<TensorSpec> specs = specs_of(tensors);
  return write_checkpoint(
      directory, specs, [&](std::size_t i) { return tensors[i].tensor; }, max_shard_bytes);
}

}  // namespace kept
