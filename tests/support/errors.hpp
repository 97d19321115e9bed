// tests/support/errors.hpp: checking the kept::Error an action throws and what its message says.
#pragma once

#include <catch2/catch.hpp>

#include <string>
#include <utility>
#include <vector>

#include "kept/core/error.hpp"

namespace kept::test {

// The message of the kept::Error that `action` throws; the test fails if it throws nothing (an
// exception of another type propagates and fails it too).
template <class Action>
std::string error_of(Action&& action) {
  try {
    action();
  } catch (const kept::Error& error) {
    return error.what();
  }
  FAIL("expected a kept::Error");
  return "";
}

// Matches a string containing every one of `parts`. Unlike a stored `Contains(a) && Contains(b)`
// (Catch2 v2 combined matchers keep pointers to their parts), it owns its strings.
class ContainsAll : public Catch::MatcherBase<std::string> {
 public:
  explicit ContainsAll(std::vector<std::string> parts) : parts_(std::move(parts)) {}
  bool match(const std::string& text) const override {
    for (const std::string& part : parts_)
      if (text.find(part) == std::string::npos) return false;
    return true;
  }
  std::string describe() const override {
    std::string description = "contains all of";
    for (const std::string& part : parts_)
      description += " \"" + part + "\"";
    return description;
  }

 private:
  std::vector<std::string> parts_;
};

}  // namespace kept::test
