// kept/core/error.hpp: the one error type of the library.
//
// Every failure a user can cause (a bad checkpoint, a wrong shape, a bad flag) surfaces as a
// kept::Error whose message names the thing at fault: the file, then the tensor or field, then
// what was expected and what was found. Programming errors inside the library use the same type,
// so a caller needs a single catch clause.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace kept {

// `text` with every byte that is not printable UTF-8 escaped: control bytes as \n, \t, \r or
// \xNN, bytes of invalid UTF-8 sequences as \xNN. Valid multi-byte UTF-8 (a Korean path, a
// Chinese piece) is kept. Idempotent on its own output.
inline std::string escape_for_message(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(text.size());
  auto escape_byte = [&](unsigned char byte) {
    out += "\\x";
    out += kHex[byte >> 4];
    out += kHex[byte & 15];
  };
  std::size_t i = 0;
  while (i < text.size()) {
    const auto byte = static_cast<unsigned char>(text[i]);
    if (byte < 0x80) {
      if (byte == '\n')
        out += "\\n";
      else if (byte == '\t')
        out += "\\t";
      else if (byte == '\r')
        out += "\\r";
      else if (byte < 0x20 || byte == 0x7f)
        escape_byte(byte);
      else
        out += static_cast<char>(byte);
      ++i;
      continue;
    }
    // The length of a well-formed sequence starting here (RFC 3629: no overlongs, no
    // surrogates, nothing above U+10FFFF), or 0.
    std::size_t length = 0;
    if (byte >= 0xc2 && byte <= 0xdf)
      length = 2;
    else if (byte >= 0xe0 && byte <= 0xef)
      length = 3;
    else if (byte >= 0xf0 && byte <= 0xf4)
      length = 4;
    bool valid = length != 0 && i + length <= text.size();
    for (std::size_t k = 1; valid && k < length; ++k)
      valid = (static_cast<unsigned char>(text[i + k]) & 0xc0) == 0x80;
    if (valid && length >= 3) {
      const auto second = static_cast<unsigned char>(text[i + 1]);
      if ((byte == 0xe0 && second < 0xa0) || (byte == 0xed && second > 0x9f) ||
          (byte == 0xf0 && second < 0x90) || (byte == 0xf4 && second > 0x8f))
        valid = false;
    }
    if (!valid) {
      escape_byte(byte);
      ++i;
      continue;
    }
    out.append(text.substr(i, length));
    i += length;
  }
  return out;
}

// Messages are escaped on construction: a message may quote a name or a parser's excerpt from a
// corrupt file, and raw bytes from it must not reach a terminal or a log.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(escape_for_message(message)) {}
};

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

// Throws kept::Error with the parts streamed together: fail("file ", path, ": tensor ", name, ...).
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw Error(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace kept

// KEPT_CHECK(condition, message parts...): throws kept::Error when the condition is false.
#define KEPT_CHECK(condition, ...)               \
  do {                                           \
    if (!(condition)) ::kept::fail(__VA_ARGS__); \
  } while (0)
