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
// Directories in the .bin layout (pytorch_model.bin, or pytorch_model.bin.index.json plus
// shards) are read by CheckpointReader (checkpoint.hpp), with the same validation as for
// safetensors.
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
#include "kept/io/tensor_table.hpp"
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
class TorchCheckpointFile : public TensorFile {  // tensors in the state dict's order
 public:
  TorchCheckpointFile() = default;

  explicit TorchCheckpointFile(const std::filesystem::path& path) : TensorFile(path) {
    const std::shared_ptr<Storage> mapping = map_file_private(path);
    TorchArchiveTensors contents =
        read_torch_archive(mapped_bytes(mapping), mapping, path.string());
    for (std::size_t i = 0; i < contents.names.size(); ++i)
      tensors_.add(std::move(contents.names[i]), std::move(contents.tensors[i]));
  }
};

}  // namespace kept
