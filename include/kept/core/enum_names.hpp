// kept/core/enum_names.hpp: one table per enum gives both directions, enum -> name (messages,
// files) and name -> enum (flags, JSON fields), so the two can never disagree.
//
//   inline constexpr EnumName<OpmMode> kOpmModeNames[] = {{OpmMode::Paper, "paper"}, ...};
//   enum_name(kOpmModeNames, mode)         -> "paper"   ("?" for a value not in the table)
//   parse_enum(kOpmModeNames, "paper")     -> OpmMode::Paper  (std::nullopt when unknown)
//   enum_name_list(kOpmModeNames)          -> "paper, calibrated, exact" (for error messages)
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <string_view>

namespace kept {

template <class Enum>
struct EnumName {
  Enum value;
  std::string_view name;
};

template <class Enum, std::size_t N>
constexpr std::string_view enum_name(const EnumName<Enum> (&table)[N], Enum value) {
  for (const EnumName<Enum>& entry : table)
    if (entry.value == value) return entry.name;
  return "?";
}

template <class Enum, std::size_t N>
constexpr std::optional<Enum> parse_enum(const EnumName<Enum> (&table)[N], std::string_view name) {
  for (const EnumName<Enum>& entry : table)
    if (entry.name == name) return entry.value;
  return std::nullopt;
}

template <class Enum, std::size_t N>
std::string enum_name_list(const EnumName<Enum> (&table)[N]) {
  std::string list;
  for (const EnumName<Enum>& entry : table) {
    if (!list.empty()) list += ", ";
    list += entry.name;
  }
  return list;
}

}  // namespace kept
