// kept/io/safetensors.hpp: reading and writing .safetensors files.
//
// The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length N, N bytes of UTF-8 JSON, then the data region. The JSON maps each tensor name to
// {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data region), plus
// an optional "__metadata__" object of string to string.
//
// Reading. Checkpoints are large and come from anywhere, so the header is validated completely
// before any tensor is handed out, following the spec and the reference implementation:
// the header must start with '{', be valid JSON with no duplicate keys, and be at most 100 MiB;
// each entry has exactly the three keys, a known dtype, a shape of non-negative integers whose
// byte size does not overflow, and offsets with end - begin equal to that byte size; the
// offsets, sorted, must tile the data region exactly (no overlap, no gap, nothing after the last
// tensor). Every message starts with the file name, names the tensor (or "header"), and says
// what was expected and what was found. The parser runs on an in-memory buffer
// (parse_safetensors_header) so that a fuzzer can drive it.
// The file is mmapped and tensors are zero-copy views: their Storage holds the mapping through
// a shared_ptr whose deleter munmaps, so a tensor outlives the SafetensorsFile it came from.
// The mapping is private and writable (copy-on-write): writing into a view changes only this
// process's copy of the page, never the file, and never faults. A tensor whose bytes are not
// aligned to its element size (legal in the format, though writers align them) is copied into
// an aligned buffer, since typed access to misaligned memory is undefined behaviour.
//
// Writing. The layout matches the Python `safetensors` library: compact JSON with
// "__metadata__" first and each entry's keys in the order dtype, shape, data_offsets, padded
// with spaces to a multiple of 8 bytes so the data region starts 8-byte aligned. Tensors are
// laid out in the order given (the Python library sorts them by dtype size, then name; order
// does not affect readers). The file is streamed through AtomicFile: the header, then each
// tensor's bytes straight from its memory, so a multi-gigabyte tensor is never copied and a
// failed write leaves any previous file in place.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/dtype.hpp"
#include "kept/core/error.hpp"
#include "kept/core/shape.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/json.hpp"
#include "kept/io/mapped_file.hpp"
#include "kept/io/tensor_table.hpp"

namespace kept {

// The reference implementation's limit (it uses 100 MB); a real header is kilobytes.
inline constexpr std::uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

using SafetensorsMetadata = std::map<std::string, std::string>;

// One validated header entry.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::uint64_t begin = 0;  // byte offsets relative to the start of the data region
  std::uint64_t end = 0;
};

struct SafetensorsHeader {
  std::uint64_t json_bytes = 0;           // N, the length of the JSON text (padding included)
  std::uint64_t data_bytes = 0;           // size of the data region
  std::vector<SafetensorsEntry> tensors;  // in data order (by begin; ties in header order)
  SafetensorsMetadata metadata;

  std::uint64_t data_start() const { return 8 + json_bytes; }
};

// A tensor to write, with its name.
struct NamedTensor {
  std::string name;
  Tensor tensor;
};

// What a writer needs to lay out a tensor before its values exist: the streaming writers
// take specs up front and ask a producer for each tensor only when its bytes are due, so a
// conversion holds one tensor at a time, never the whole model.
struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  std::uint64_t nbytes() const {
    return static_cast<std::uint64_t>(shape.numel()) * dtype_size(dtype);
  }
};

// Returns the tensor for spec `index`; called once per tensor, in order.
using TensorProducer = std::function<Tensor(std::size_t index)>;

inline std::vector<TensorSpec> specs_of(std::span<const NamedTensor> tensors) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const NamedTensor& named : tensors) {
    specs.push_back({named.name, named.tensor.dtype(), named.tensor.shape()});
  }
  return specs;
}

namespace detail {

inline std::uint64_t read_u64_le(const std::byte* bytes) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i)
    value = (value << 8) | static_cast<std::uint64_t>(bytes[i]);
  return value;
}

// A non-negative JSON integer, or nullopt (floats, negatives and huge numbers do not qualify:
// nlohmann turns a number too large for 64 bits into a float).
inline std::optional<std::uint64_t> json_unsigned(const nlohmann::json& value) {
  if (value.is_number_unsigned()) return value.get<std::uint64_t>();
  if (value.is_number_integer() && value.get<std::int64_t>() >= 0)
    return static_cast<std::uint64_t>(value.get<std::int64_t>());
  return std::nullopt;
}

inline SafetensorsEntry parse_safetensors_entry(const std::string& where, const std::string& name,
                                                const nlohmann::json& entry,
                                                std::uint64_t data_bytes) {
  const std::string tensor = where + ": tensor " + quote_json(name);
  if (!entry.is_object())
    fail(tensor, ": expected an object with dtype, shape and data_offsets, found ",
         describe_json(entry));
  for (const auto& [key, value] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets")
      fail(tensor, ": unexpected key ", quote_json(key),
           " (an entry has exactly dtype, shape and data_offsets)");
  }
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(key)) fail(tensor, ": missing \"", key, "\"");
  }

  SafetensorsEntry result;
  result.name = name;
  const auto& dtype = entry.at("dtype");
  if (!dtype.is_string())
    fail(tensor, ": \"dtype\" must be a string, found ", describe_json(dtype));
  std::optional<DType> parsed = parse_dtype(dtype.get_ref<const std::string&>());
  if (!parsed)
    fail(tensor, ": unknown dtype ", describe_json(dtype),
         " (kept reads F32, BF16, F16, F64, I64, I32, I16, I8, U8, BOOL)");
  result.dtype = *parsed;

  const auto& shape = entry.at("shape");
  if (!shape.is_array())
    fail(tensor, ": \"shape\" must be an array of non-negative integers, found ",
         describe_json(shape));
  if (shape.size() > static_cast<std::size_t>(Shape::kMaxRank))
    fail(tensor, ": \"shape\" has ", shape.size(), " dimensions, kept supports at most ",
         Shape::kMaxRank);
  std::vector<std::int64_t> dims;
  std::uint64_t numel = 1;
  bool overflow = false;
  for (const auto& dim : shape) {
    std::optional<std::uint64_t> size = json_unsigned(dim);
    if (!size || *size > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      fail(tensor, ": \"shape\" must hold non-negative integers, found ", describe_json(dim));
    dims.push_back(static_cast<std::int64_t>(*size));
    if (*size != 0 && numel > std::numeric_limits<std::uint64_t>::max() / *size) overflow = true;
    numel *= *size;
  }
  // A zero dimension makes the product 0 however large the others are; an overflow before it
  // in the product does not matter then.
  bool has_zero = std::find(dims.begin(), dims.end(), 0) != dims.end();
  const std::uint64_t element_bytes = dtype_size(result.dtype);
  if (!has_zero &&
      (overflow || numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) /
                               element_bytes))
    fail(tensor, ": shape ", shape.dump(), " with dtype ", dtype_name(result.dtype),
         " overflows 64-bit byte sizes");
  if (has_zero) numel = 0;
  result.shape = Shape(dims);
  const std::uint64_t nbytes = numel * element_bytes;

  const auto& offsets = entry.at("data_offsets");
  if (!offsets.is_array() || offsets.size() != 2)
    fail(tensor, ": \"data_offsets\" must be an array [begin, end], found ",
         describe_json(offsets));
  std::optional<std::uint64_t> begin = json_unsigned(offsets[0]);
  std::optional<std::uint64_t> end = json_unsigned(offsets[1]);
  if (!begin || !end)
    fail(tensor, ": \"data_offsets\" must hold two non-negative integers, found [",
         describe_json(offsets[0]), ", ", describe_json(offsets[1]), "]");
  if (*begin > *end) fail(tensor, ": data_offsets [", *begin, ", ", *end, "] has begin after end");
  if (*end > data_bytes)
    fail(tensor, ": data_offsets [", *begin, ", ", *end, "] run past the data region of ",
         data_bytes, " bytes");
  if (*end - *begin != nbytes)
    fail(tensor, ": data_offsets [", *begin, ", ", *end, "] span ", *end - *begin,
         " bytes, but shape ", result.shape, " of ", dtype_name(result.dtype), " needs ", nbytes);
  result.begin = *begin;
  result.end = *end;
  return result;
}

inline SafetensorsMetadata parse_safetensors_metadata(const std::string& where,
                                                      const nlohmann::json& metadata) {
  if (!metadata.is_object())
    fail(where, ": header: \"__metadata__\" must be an object of string to string, found ",
         describe_json(metadata));
  SafetensorsMetadata result;
  for (const auto& [key, value] : metadata.items()) {
    if (!value.is_string())
      fail(where, ": header: \"__metadata__\" key ", quote_json(key),
           " must map to a string, found ", describe_json(value));
    result.emplace(key, value.get<std::string>());
  }
  return result;
}

}  // namespace detail

// Parses and validates the header of a whole safetensors file held in memory. `source_name`
// (a path) starts every error message.
inline SafetensorsHeader parse_safetensors_header(std::span<const std::byte> file,
                                                  std::string_view source_name) {
  const std::string where(source_name);
  if (file.size() < 8)
    fail(where, ": header: file is ", file.size(),
         " bytes, shorter than the 8-byte header length prefix");
  SafetensorsHeader header;
  header.json_bytes = detail::read_u64_le(file.data());
  if (header.json_bytes > kMaxSafetensorsHeaderBytes)
    fail(where, ": header: header length ", header.json_bytes, " is larger than the ",
         kMaxSafetensorsHeaderBytes, "-byte (100 MiB) limit");
  if (header.json_bytes > file.size() - 8)
    fail(where, ": header: header length ", header.json_bytes, " runs past the end of the file (",
         file.size() - 8, " bytes follow the length prefix)");
  header.data_bytes = file.size() - 8 - header.json_bytes;

  std::string_view text(reinterpret_cast<const char*>(file.data()) + 8,
                        static_cast<std::size_t>(header.json_bytes));
  if (text.empty() || text.front() != '{')
    fail(where, ": header: JSON must start with '{', found ",
         text.empty() ? std::string("an empty header") : detail::quote_json(text.substr(0, 1)));
  // Top level: the object (0), an entry (1), its shape or offsets array (2).
  std::vector<std::string> names_in_order;
  nlohmann::json json =
      detail::parse_json_strict(text, where + ": header", 3, &names_in_order, "tensor name");
  if (!json.is_object())
    fail(where, ": header: top level must be a JSON object, found ", detail::describe_json(json));

  for (const std::string& name : names_in_order) {
    const nlohmann::json& value = json.at(name);
    if (name == "__metadata__") {
      header.metadata = detail::parse_safetensors_metadata(where, value);
    } else {
      header.tensors.push_back(
          detail::parse_safetensors_entry(where, name, value, header.data_bytes));
    }
  }

  // The tensors must tile the data region: sorted by offsets, each starts where the previous
  // one ended, and the last ends at the end of the file.
  std::stable_sort(header.tensors.begin(), header.tensors.end(),
                   [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  std::uint64_t covered = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry& entry : header.tensors) {
    if (entry.begin < covered)
      fail(where, ": tensor ", detail::quote_json(entry.name), ": data_offsets [", entry.begin,
           ", ", entry.end, "] overlap tensor ", detail::quote_json(previous->name), " at [",
           previous->begin, ", ", previous->end, "]");
    if (entry.begin > covered)
      fail(where, ": tensor ", detail::quote_json(entry.name), ": data_offsets [", entry.begin,
           ", ", entry.end, "] leave a gap of ", entry.begin - covered,
           " unused bytes before it (expected it to start at ", covered, ")");
    covered = entry.end;
    previous = &entry;
  }
  if (covered != header.data_bytes)
    fail(where, ": header: the tensors cover ", covered, " bytes but the data region has ",
         header.data_bytes, " (", header.data_bytes - covered,
         " trailing bytes belong to no tensor)");
  return header;
}

// A safetensors file, mmapped, validated, with its tensors as zero-copy views.
class SafetensorsFile : public TensorFile {
 public:
  SafetensorsFile() = default;

  explicit SafetensorsFile(const std::filesystem::path& path) : TensorFile(path) {
    const std::string where = path.string();
    const std::shared_ptr<Storage> mapping = map_file_private(path);
    // An empty file: the parser gives the proper "too short" message.
    if (!mapping) parse_safetensors_header({}, where);
    KEPT_CHECK(mapping, where, ": empty file");
    const std::size_t size = mapping->bytes();
    std::span<const std::byte> bytes(static_cast<const std::byte*>(mapping->data()), size);
    header_ = parse_safetensors_header(bytes, where);

    for (const SafetensorsEntry& entry : header_.tensors) {
      const std::size_t offset = static_cast<std::size_t>(header_.data_start() + entry.begin);
      Tensor view = Tensor::from_storage(entry.dtype, entry.shape, mapping, offset);
      // Misaligned for its element type: copy (see the top comment).
      if (offset % dtype_size(entry.dtype) != 0) view = view.clone();
      tensors_.add(entry.name, std::move(view));
    }
  }

  const SafetensorsHeader& header() const { return header_; }
  const SafetensorsMetadata& metadata() const { return header_.metadata; }

 private:
  SafetensorsHeader header_;  // the tensors are in its order
};

namespace detail {

// The 8-byte length prefix and the padded JSON header for `tensors` laid out in order.
inline std::string safetensors_header_bytes(const std::string& where,
                                            std::span<const TensorSpec> tensors,
                                            const SafetensorsMetadata& metadata) {
  auto json_string = [&](const std::string& text, const std::string& what) {
    try {
      return nlohmann::json(text).dump();
    } catch (const nlohmann::json::exception&) {
      fail(where, ": ", what, " ", quote_json(text), " is not valid UTF-8");
    }
  };
  std::string json = "{";
  if (!metadata.empty()) {
    json += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [key, value] : metadata) {
      if (!first) json += ",";
      first = false;
      json += json_string(key, "metadata key") + ":" + json_string(value, "metadata value");
    }
    json += "}";
  }
  std::set<std::string_view> seen;
  std::uint64_t offset = 0;
  for (const TensorSpec& named : tensors) {
    const std::string tensor = where + ": tensor " + quote_json(named.name);
    if (named.name == "__metadata__") fail(tensor, ": the name is reserved for the metadata");
    if (!seen.insert(named.name).second) fail(tensor, ": name given twice");
    if (json.size() > 1) json += ",";
    const std::uint64_t nbytes = named.nbytes();
    json += json_string(named.name, "tensor name");
    json += ":{\"dtype\":\"" + std::string(dtype_name(named.dtype)) + "\",\"shape\":[";
    for (int axis = 0; axis < named.shape.rank(); ++axis) {
      if (axis) json += ",";
      json += std::to_string(named.shape[axis]);
    }
    json += "],\"data_offsets\":[" + std::to_string(offset) + "," +
            std::to_string(offset + nbytes) + "]}";
    offset += nbytes;
  }
  json += "}";
  json.append((8 - json.size() % 8) % 8, ' ');

  std::string bytes(8, '\0');
  std::uint64_t length = json.size();
  for (int i = 0; i < 8; ++i)
    bytes[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  return bytes + json;
}

}  // namespace detail

// Writes the tensors `specs` describes, in order, atomically; `produce(i)` supplies tensor i
// (host memory, exactly the spec's dtype and shape) just before its bytes are written, and
// the writer drops it right after.
inline void write_safetensors(const std::filesystem::path& path, std::span<const TensorSpec> specs,
                              const TensorProducer& produce,
                              const SafetensorsMetadata& metadata = {}) {
  const std::string where = path.string();
  std::string header = detail::safetensors_header_bytes(where, specs, metadata);
  AtomicFile file(path);
  file.write(header);
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const std::string tensor_name = where + ": tensor " + detail::quote_json(specs[i].name);
    const Tensor tensor = produce(i);
    if (!tensor.defined()) fail(tensor_name, ": tensor is undefined (has no storage)");
    if (tensor.space() != MemorySpace::Host)
      fail(tensor_name, ": tensor is in ", memory_space_name(tensor.space()),
           " memory; copy it to the host before writing");
    if (tensor.dtype() != specs[i].dtype || !(tensor.shape() == specs[i].shape))
      fail(tensor_name, ": produced ", dtype_name(tensor.dtype()), " ", tensor.shape(),
           ", but the header says ", dtype_name(specs[i].dtype), " ", specs[i].shape);
    file.write(tensor.bytes());
  }
  file.commit();
}

// Writes `tensors` (names unique, host memory) in the given order, atomically.
inline void write_safetensors(const std::filesystem::path& path,
                              std::span<const NamedTensor> tensors,
                              const SafetensorsMetadata& metadata = {}) {
  const std::vector<TensorSpec> specs = specs_of(tensors);
  write_safetensors(
      path, specs, [&](std::size_t i) { return tensors[i].tensor; }, metadata);
}

}  // namespace kept
