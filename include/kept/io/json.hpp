// kept/io/json.hpp: strict JSON reading shared by the safetensors, checkpoint-index and
// config.json readers.
//
// JSON itself allows an object to repeat a key, and nlohmann::json then silently keeps the last
// value. In a safetensors header or a shard index a repeated name means two tensors with one
// name, and in config.json a repeated field means two values for one hyper-parameter: both are
// ambiguous, so these readers reject them. Detection uses nlohmann's parser callback, which sees
// every key as it is parsed (the finished DOM no longer can). The same callback bounds the
// nesting depth, because the formats read here are shallow and a deeply nested hostile input
// would otherwise cost memory for nothing.
//
// Error messages never dump a whole JSON value: a value from an untrusted file can be huge, so
// describe_json() prints scalars and only the size of arrays and objects.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/error.hpp"

namespace kept::detail {

// The text of an errno value, e.g. "No space left on device".
inline std::string errno_text(int error_number) {
  return std::system_category().message(error_number);
}

// A short, printable description of a JSON value for error messages.
inline std::string describe_json(const nlohmann::json& value) {
  using Type = nlohmann::json::value_t;
  switch (value.type()) {
    case Type::null:
      return "null";
    case Type::boolean:
      return value.get<bool>() ? "true" : "false";
    case Type::number_integer:
    case Type::number_unsigned:
    case Type::number_float:
      return "number " + value.dump();
    case Type::string: {
      std::string text = value.get_ref<const std::string&>();
      bool truncated = text.size() > 80;
      if (truncated) text.resize(80);
      // `replace` keeps the dump from throwing on a UTF-8 sequence cut by the truncation.
      return "string " +
             nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
             (truncated ? "..." : "");
    }
    case Type::array:
      return "an array of " + std::to_string(value.size()) + " elements";
    case Type::object:
      return "an object with " + std::to_string(value.size()) + " keys";
    default:
      return "a non-JSON value";
  }
}

// A JSON string (quotes and escapes included) for an error message; never throws on bad UTF-8.
inline std::string quote_json(std::string_view text) {
  return nlohmann::json(std::string(text))
      .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// Parses `text`, rejecting duplicate object keys and nesting deeper than `max_depth` (the
// top-level value is depth 0, so a flat object of scalars needs max_depth 1). Errors start with
// `where` (e.g. "dir/model.safetensors: header"). When `top_level_keys` is given, it receives
// the top-level object's keys in file order (nlohmann::json sorts them).
// `top_level_label` names what a top-level key is in a duplicate-key message ("tensor name").
inline nlohmann::json parse_json_strict(std::string_view text, std::string_view where,
                                        int max_depth,
                                        std::vector<std::string>* top_level_keys = nullptr,
                                        std::string_view top_level_label = "key") {
  using Event = nlohmann::json::parse_event_t;
  std::vector<std::set<std::string, std::less<>>> open_objects;  // keys seen, innermost last
  std::vector<std::string> key_at_depth;  // the last key seen at each depth, for messages
  auto callback = [&](int depth, Event event, nlohmann::json& parsed) -> bool {
    switch (event) {
      case Event::object_start:
      case Event::array_start:
        if (depth >= max_depth)
          fail(where, ": JSON nests deeper than the ", max_depth,
               " level(s) this format allows (inside ",
               key_at_depth.empty() ? std::string("the top level") : quote_json(key_at_depth[0]),
               ")");
        if (event == Event::object_start) open_objects.emplace_back();
        break;
      case Event::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case Event::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        if (depth < 1 || open_objects.empty()) break;  // cannot happen; keeps the code total
        if (!open_objects.back().insert(key).second) {
          if (depth == 1) fail(where, ": duplicate ", top_level_label, " ", quote_json(key));
          std::size_t parent = static_cast<std::size_t>(depth) - 2;
          fail(where, ": duplicate key ", quote_json(key), " inside ",
               parent < key_at_depth.size() ? quote_json(key_at_depth[parent])
                                            : std::string("an array"));
        }
        if (key_at_depth.size() < static_cast<std::size_t>(depth)) key_at_depth.resize(depth);
        key_at_depth[static_cast<std::size_t>(depth) - 1] = key;
        if (depth == 1 && top_level_keys) top_level_keys->push_back(key);
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::exception& error) {
    fail(where, ": not valid JSON: ", error.what());
  }
}

// Reads a whole (small) file: config.json, an index. Refuses files over `max_bytes`, which
// protects against pointing the reader at a multi-gigabyte file by mistake.
inline std::string read_text_file(const std::filesystem::path& path, std::uint64_t max_bytes) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path.string(), ": cannot open: ", errno_text(errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat info {};
  if (::fstat(fd, &info) != 0) fail(path.string(), ": cannot stat: ", errno_text(errno));
  if (!S_ISREG(info.st_mode)) fail(path.string(), ": not a regular file");
  if (static_cast<std::uint64_t>(info.st_size) > max_bytes)
    fail(path.string(), ": file is ", info.st_size, " bytes, more than the ", max_bytes,
         "-byte limit for this kind of file");
  std::string text(static_cast<std::size_t>(info.st_size), '\0');
  std::size_t done = 0;
  while (done < text.size()) {
    ssize_t got = ::read(fd, text.data() + done, text.size() - done);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) fail(path.string(), ": cannot read: ", errno_text(errno));
    if (got == 0) break;  // the file shrank while we read it
    done += static_cast<std::size_t>(got);
  }
  text.resize(done);
  return text;
}

}  // namespace kept::detail
