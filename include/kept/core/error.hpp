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
#include <utility>

namespace kept {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
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
