// kept/io/torch_checkpoint.hpp: PyTorch .bin checkpoints (torch.save zip archives), read
// without executing code.
//
// A torch.save file (PyTorch >= 1.6, the format of every HF pytorch_model*.bin) is a zip (see
// zip.hpp) whose entries all sit in one folder named after the file, "<prefix>/": data.pkl (the
// state dict as a pickle, see torch_pickle.hpp), data/<key> (the raw bytes of each storage,
// 64-byte aligned by recent writers), byteorder ("little"), version, and a few more kept does
// not need. Like torch's own reader, the prefix is taken from the first entry's folder.
//
// TorchCheckpointFile reads one file: the pickle is CRC-checked and interpreted by the
// restricted VM, byteorder must be "little" when present, and each storage's record must exist
// and hold exactly numel * element size bytes. Tensors whose strides are contiguous are
// zero-copy views into the mmapped file (the Storage holds the mapping, so tensors outlive the
// file object; the mapping is private copy-on-write as in SafetensorsFile); tensors torch saved
// as non-contiguous views (a transpose, a column slice) are copied into contiguous tensors,
// since kept's tensors are always row-major contiguous. Two tensors that share a storage in
// torch (a slice of another) are two views of the same mapped bytes. The old pre-1.6 format
// (a bare pickle stream, not a zip) is refused with a message saying so.
//
// TorchCheckpointReader reads an HF checkpoint directory in the .bin layout, pytorch_model.bin
// or pytorch_model.bin.index.json plus shards, with the same public API and the same up-front
// validation as CheckpointReader (checkpoint.hpp) does for safetensors: exactly one layout, a
// weight_map of plain file names inside the directory, each shard holding exactly the tensors
// the index assigns to it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/json.hpp"
#include "kept/io/torch_pickle.hpp"
#include "kept/io/zip.hpp"

namespace kept {

inline constexpr std::string_view kTorchCheckpointSingleFile = "pytorch_model.bin";
inline constexpr std::string_view kTorchCheckpointIndexFile = "pytorch_model.bin.index.json";
// A 14B model's data.pkl is ~100 KB; this only stops absurd inputs early.
inline constexpr std::uint64_t kMaxTorchPickleBytes = 1ull << 30;

// The tensors of one torch.save archive, in the state dict's order.
struct TorchArchiveTensors {
  std::vector<std::string> names;
  std::vector<Tensor> tensors;  // parallel to names
};

// Reads a whole torch.save archive held in memory (`file`). Tensors are zero-copy views into
// `owner` where possible (when `owner` is the Storage whose bytes are `file`); with a null
// owner every tensor is a copy. `where` (the path) starts every message.
inline TorchArchiveTensors read_torch_archive(std::span<const std::byte> file,
                                              const std::shared_ptr<Storage>& owner,
                                              const std::string& where) {
  if (file.size() >= 2 && file[0] == std::byte{0x80} && file[1] <= std::byte{0x05})
    fail(where,
         ": a legacy (PyTorch < 1.6, non-zip) torch.save file; kept reads only the zip format "
         "(load and re-save it with a current torch, or convert it to safetensors)");
  if (file.size() >= 4 && !(file[0] == std::byte{'P'} && file[1] == std::byte{'K'}))
    fail(where, ": not a torch.save archive (it does not start with a zip header)");
  ZipReader zip(file, where);
  if (zip.entries().empty()) fail(where, ": the zip archive is empty; not a torch.save file");
  const std::string& first = zip.entries().front().name;
  const std::size_t slash = first.find('/');
  if (slash == std::string::npos || slash == 0)
    fail(where, ": zip entry ", detail::quote_bytes(first),
         " is not inside a folder; not a torch.save archive");
  const std::string prefix = first.substr(0, slash + 1);

  const ZipEntry* pickle_entry = zip.find(prefix + "data.pkl");
  if (!pickle_entry)
    fail(where, ": no zip entry ", detail::quote_bytes(prefix + "data.pkl"),
         "; not a torch.save archive");
  if (pickle_entry->size > kMaxTorchPickleBytes)
    fail(where, ": ", detail::quote_bytes(pickle_entry->name), " is ", pickle_entry->size,
         " bytes, more than the ", kMaxTorchPickleBytes, "-byte limit");
  if (const ZipEntry* byteorder = zip.find(prefix + "byteorder")) {
    auto bytes = zip.data(*byteorder, true);
    const std::string_view order(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    if (order == "big")
      fail(where,
           ": saved on a big-endian machine (byteorder \"big\"); kept reads only "
           "little-endian checkpoints");
    if (order != "little")
      fail(where, ": ", detail::quote_bytes(byteorder->name), " holds ", detail::quote_bytes(order),
           ", expected \"little\"");
  }

  const TorchPickle pickle = parse_torch_pickle(zip.data(*pickle_entry, true), where);

  // Each storage's record, checked once.
  std::vector<std::span<const std::byte>> records(pickle.storages.size());
  std::vector<bool> checked(pickle.storages.size(), false);
  TorchArchiveTensors result;
  result.names.reserve(pickle.tensors.size());
  result.tensors.reserve(pickle.tensors.size());
  for (const TorchTensorRef& ref : pickle.tensors) {
    const TorchStorageRef& storage = pickle.storages[ref.storage];
    const std::string tensor = where + ": tensor " + detail::quote_json(ref.name);
    if (!checked[ref.storage]) {
      const std::string record = prefix + "data/" + storage.key;
      const ZipEntry* entry = zip.find(record);
      if (!entry)
        fail(tensor, ": its storage record ", detail::quote_bytes(record),
             " is missing from the archive");
      const std::uint64_t element = dtype_size(storage.dtype);
      if (storage.numel > entry->size / element || entry->size != storage.numel * element)
        fail(tensor, ": its storage record ", detail::quote_bytes(record), " holds ", entry->size,
             " bytes, but the pickle describes ", storage.numel, " elements of ",
             dtype_name(storage.dtype), " (", element, " bytes each)");
      records[ref.storage] = zip.data(*entry, false);  // no CRC: see zip.hpp
      checked[ref.storage] = true;
    }
    result.names.push_back(ref.name);
    result.tensors.push_back(materialize_torch_tensor(ref, records[ref.storage], owner, where));
  }
  return result;
}

// One torch.save file, mmapped, with its tensors (see the top comment).
class TorchCheckpointFile {
 public:
  TorchCheckpointFile() = default;

  explicit TorchCheckpointFile(const std::filesystem::path& path) : path_(path) {
    const std::shared_ptr<Storage> mapping = detail::map_file_private(path);
    TorchArchiveTensors contents =
        read_torch_archive(detail::mapped_bytes(mapping), mapping, path.string());
    names_ = std::move(contents.names);
    tensors_ = std::move(contents.tensors);
    for (std::size_t i = 0; i < names_.size(); ++i)
      index_.emplace(names_[i], i);
  }

  const std::filesystem::path& path() const { return path_; }
  std::size_t size() const { return tensors_.size(); }
  // Tensor names in the state dict's order.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  const Tensor& tensor(std::string_view name) const {
    auto found = index_.find(name);
    if (found == index_.end())
      fail(path_.string(), ": tensor ", detail::quote_json(name), " not found (the file holds ",
           tensors_.size(), " tensors)");
    return tensors_[found->second];
  }

 private:
  std::filesystem::path path_;
  std::vector<std::string> names_;
  std::vector<Tensor> tensors_;  // parallel to names_
  std::map<std::string, std::size_t, std::less<>> index_;
};

namespace detail {
// A weight_map value must name a file inside the checkpoint directory.
inline bool torch_plain_file_name(std::string_view name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find_first_of(std::string_view("/\\\0", 3)) == std::string_view::npos;
}
}  // namespace detail

// An HF checkpoint directory in the .bin layout; the same API as CheckpointReader.
class TorchCheckpointReader {
 public:
  TorchCheckpointReader() = default;

  static TorchCheckpointReader open(const std::filesystem::path& directory) {
    TorchCheckpointReader reader;
    reader.directory_ = directory;
    const std::string where = directory.string();
    std::error_code error;
    if (!std::filesystem::is_directory(directory, error))
      fail(where, ": not a checkpoint directory (",
           std::filesystem::exists(directory, error) ? "not a directory" : "does not exist", ")");
    const bool has_single = std::filesystem::exists(directory / kTorchCheckpointSingleFile, error);
    const bool has_index = std::filesystem::exists(directory / kTorchCheckpointIndexFile, error);
    if (has_single && has_index)
      fail(where, ": holds both ", kTorchCheckpointSingleFile, " and ", kTorchCheckpointIndexFile,
           "; it is ambiguous which one is the checkpoint");
    if (!has_single && !has_index)
      fail(where, ": no ", kTorchCheckpointSingleFile, " or ", kTorchCheckpointIndexFile,
           " (not a PyTorch .bin checkpoint directory)");
    if (has_single) {
      reader.add_file(std::string(kTorchCheckpointSingleFile), nullptr);
    } else {
      reader.sharded_ = true;
      reader.open_sharded();
    }
    return reader;
  }

  const std::filesystem::path& directory() const { return directory_; }
  bool sharded() const { return sharded_; }
  // The .bin files, in the order names() visits them.
  const std::vector<std::string>& files() const { return file_names_; }
  std::size_t size() const { return names_.size(); }
  // All tensor names: files in order, state-dict order within each file.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(std::string_view name) const { return file_of_.find(name) != file_of_.end(); }

  const Tensor& tensor(std::string_view name) const { return files_[locate(name)].tensor(name); }
  // The file (name within the directory) that holds `name`.
  const std::string& file_of(std::string_view name) const { return file_names_[locate(name)]; }

 private:
  std::size_t locate(std::string_view name) const {
    auto found = file_of_.find(name);
    if (found == file_of_.end())
      fail(
          directory_.string(), ": tensor ", detail::quote_json(name),
          " not found in the checkpoint (",
          sharded_ ? std::string(kTorchCheckpointIndexFile) + " maps " : file_names_[0] + " holds ",
          names_.size(), " tensors)");
    return found->second;
  }

  void add_file(const std::string& file_name, const std::set<std::string>* expected,
                const std::map<std::string, std::string>* index = nullptr) {
    const std::filesystem::path path = directory_ / file_name;
    TorchCheckpointFile file(path);
    const std::size_t position = files_.size();
    for (const std::string& name : file.names()) {
      if (expected && !expected->count(name)) {
        auto mapped = index->find(name);
        if (mapped == index->end())
          fail(path.string(), ": holds tensor ", detail::quote_json(name), ", which ",
               kTorchCheckpointIndexFile, " does not list");
        fail(path.string(), ": holds tensor ", detail::quote_json(name), ", which ",
             kTorchCheckpointIndexFile, " maps to ", mapped->second, " (a tensor in two shards)");
      }
      file_of_.emplace(name, position);
      names_.push_back(name);
    }
    if (expected) {
      for (const std::string& name : *expected) {
        if (!file.contains(name))
          fail(path.string(), ": tensor ", detail::quote_json(name), " is missing, but ",
               kTorchCheckpointIndexFile, " maps it to this file");
      }
    }
    files_.push_back(std::move(file));
    file_names_.push_back(file_name);
  }

  void open_sharded() {
    const std::filesystem::path index_path = directory_ / kTorchCheckpointIndexFile;
    const std::string where = index_path.string();
    std::string text = detail::read_text_file(index_path, 100ull << 20);
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
      if (!detail::torch_plain_file_name(file_name))
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
  bool sharded_ = false;
  std::vector<std::string> file_names_;
  std::vector<TorchCheckpointFile> files_;  // parallel to file_names_
  std::map<std::string, std::size_t, std::less<>> file_of_;
  std::vector<std::string> names_;
};

}  // namespace kept
