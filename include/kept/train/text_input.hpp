// kept/train/text_input.hpp: raw text files to documents (tokenising with SentencePiece happens
// elsewhere, before packing: kept/train/packing.hpp).
//
// Reading raw text (tokenising with SentencePiece happens elsewhere, between the two halves):
//   - Plain text: documents are separated by blank lines (lines holding only spaces, tabs, \r,
//     \f, \v). A document is the exact bytes from the start of its first line to the end of its
//     last line, without the final newline: nothing inside is changed, not even a CRLF's \r.
//   - JSONL: one JSON object per line with a string field (default "text"); lines holding only
//     whitespace are skipped, anything else must be an object with that string field.
//   Both validate the whole file as UTF-8 first (RFC 3629: no overlong forms, no surrogates,
//   nothing above U+10FFFF, no truncated sequence) and report the byte offset and line of the
//   first bad sequence. Both skip a leading UTF-8 byte-order mark (an encoding marker, not
//   text) and drop documents that are empty strings (they would pack as a lone EOS). A file
//   without any document is an error naming the file. strip_ansi_escapes removes terminal
//   colour codes (ESC [ digits/semicolons letter), which fortunes-zh is full of; other cleaning
//   (markup, escapes) belongs to the corpus-specific code that calls this.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/error.hpp"
#include "kept/io/json.hpp"

namespace kept {

// ---- text: UTF-8 validation, ANSI escapes, plain text and JSONL readers ----------------------

struct Utf8Problem {
  std::size_t offset = 0;  // of the first byte of the bad sequence
  std::size_t line = 1;    // 1-based line of that byte
  std::string reason{};
};

namespace detail {
inline std::string utf8_hex_byte(unsigned char byte) {
  char text[8];
  std::snprintf(text, sizeof text, "0x%02x", byte);
  return text;
}
}  // namespace detail

// The first ill-formed UTF-8 sequence in `text`, if any (RFC 3629, Table 3-7 of Unicode).
inline std::optional<Utf8Problem> find_invalid_utf8(std::string_view text) {
  const std::size_t n = text.size();
  std::size_t line = 1;
  for (std::size_t i = 0; i < n;) {
    const auto lead = static_cast<unsigned char>(text[i]);
    if (lead < 0x80) {
      if (lead == '\n') ++line;
      ++i;
      continue;
    }
    std::size_t length = 0;
    unsigned char low = 0x80, high = 0xbf;  // allowed range of the second byte
    if (lead >= 0xc2 && lead <= 0xdf) {
      length = 2;
    } else if (lead == 0xe0) {
      length = 3, low = 0xa0;  // below: overlong
    } else if ((lead >= 0xe1 && lead <= 0xec) || lead == 0xee || lead == 0xef) {
      length = 3;
    } else if (lead == 0xed) {
      length = 3, high = 0x9f;  // above: UTF-16 surrogates
    } else if (lead == 0xf0) {
      length = 4, low = 0x90;  // below: overlong
    } else if (lead >= 0xf1 && lead <= 0xf3) {
      length = 4;
    } else if (lead == 0xf4) {
      length = 4, high = 0x8f;  // above: beyond U+10FFFF
    } else {
      std::string reason =
          "byte " + detail::utf8_hex_byte(lead) +
          (lead <= 0xbf ? " is a continuation byte without a lead byte"
                        : (lead <= 0xc1 ? " would start an overlong (non-shortest) encoding"
                                        : " never appears in UTF-8"));
      return Utf8Problem{i, line, std::move(reason)};
    }
    for (std::size_t k = 1; k < length; ++k) {
      if (i + k >= n)
        return Utf8Problem{i, line,
                           "the file ends inside a " + std::to_string(length) +
                               "-byte sequence starting with " + detail::utf8_hex_byte(lead)};
      const auto byte = static_cast<unsigned char>(text[i + k]);
      const unsigned char lo = k == 1 ? low : 0x80, hi = k == 1 ? high : 0xbf;
      if (byte < lo || byte > hi)
        return Utf8Problem{i, line,
                           "byte " + detail::utf8_hex_byte(byte) + " at offset " +
                               std::to_string(i + k) + " cannot follow " +
                               (k == 1 ? "the lead byte " + detail::utf8_hex_byte(lead)
                                       : std::string("the bytes before it")) +
                               " in a " + std::to_string(length) + "-byte sequence"};
    }
    i += length;
  }
  return std::nullopt;
}

// Throws kept::Error "<where>: invalid UTF-8 at byte offset N (line L): ..." on bad input.
inline void require_utf8(std::string_view text, std::string_view where) {
  if (auto problem = find_invalid_utf8(text))
    fail(where, ": invalid UTF-8 at byte offset ", problem->offset, " (line ", problem->line,
         "): ", problem->reason);
}

// Removes ANSI escape sequences ESC '[' [0-9;]* [A-Za-z] (colours, cursor moves). An ESC that
// does not start such a sequence is kept.
inline std::string strip_ansi_escapes(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (std::size_t i = 0; i < text.size();) {
    if (text[i] == '\x1b' && i + 1 < text.size() && text[i + 1] == '[') {
      std::size_t j = i + 2;
      while (j < text.size() && ((text[j] >= '0' && text[j] <= '9') || text[j] == ';'))
        ++j;
      if (j < text.size() &&
          ((text[j] >= 'A' && text[j] <= 'Z') || (text[j] >= 'a' && text[j] <= 'z'))) {
        i = j + 1;
        continue;
      }
    }
    out.push_back(text[i++]);
  }
  return out;
}

namespace detail {
inline std::string_view skip_utf8_bom(std::string_view text) {
  return text.starts_with("\xEF\xBB\xBF") ? text.substr(3) : text;
}
inline bool is_blank_text_line(std::string_view line) {
  return line.find_first_not_of(" \t\r\f\v") == std::string_view::npos;
}
// 1 GiB: far beyond the demo corpora, small enough to refuse a mistaken multi-GB path.
inline constexpr std::uint64_t kMaxCorpusFileBytes = 1ull << 30;
}  // namespace detail

// Splits plain text into documents at blank lines (see the top comment). `where` names the
// source in errors.
inline std::vector<std::string> split_plain_text_documents(std::string_view text,
                                                           std::string_view where) {
  text = detail::skip_utf8_bom(text);
  require_utf8(text, where);
  std::vector<std::string> documents;
  std::size_t doc_begin = std::string_view::npos, doc_end = 0;
  std::size_t pos = 0;
  while (pos <= text.size()) {
    std::size_t newline = text.find('\n', pos);
    const std::size_t line_end = newline == std::string_view::npos ? text.size() : newline;
    std::string_view line = text.substr(pos, line_end - pos);
    if (detail::is_blank_text_line(line)) {
      if (doc_begin != std::string_view::npos)
        documents.emplace_back(text.substr(doc_begin, doc_end - doc_begin));
      doc_begin = std::string_view::npos;
    } else {
      if (doc_begin == std::string_view::npos) doc_begin = pos;
      doc_end = line_end;
    }
    if (newline == std::string_view::npos) break;
    pos = newline + 1;
  }
  if (doc_begin != std::string_view::npos)
    documents.emplace_back(text.substr(doc_begin, doc_end - doc_begin));
  KEPT_CHECK(!documents.empty(), where,
             ": the corpus is empty (no document: the text has no non-blank line)");
  return documents;
}

inline std::vector<std::string> read_plain_text_documents(
    const std::filesystem::path& path, std::uint64_t max_bytes = detail::kMaxCorpusFileBytes) {
  return split_plain_text_documents(detail::read_text_file(path, max_bytes), path.string());
}

// Parses JSON Lines: every non-blank line an object with a string `field`.
inline std::vector<std::string> parse_jsonl_documents(std::string_view text, std::string_view where,
                                                      std::string_view field = "text") {
  text = detail::skip_utf8_bom(text);
  require_utf8(text, where);
  std::vector<std::string> documents;
  std::size_t pos = 0, line_number = 0, records = 0;
  const std::string quoted_field = detail::quote_json(field);
  while (pos < text.size()) {
    ++line_number;
    std::size_t newline = text.find('\n', pos);
    const std::size_t line_end = newline == std::string_view::npos ? text.size() : newline;
    std::string_view line = text.substr(pos, line_end - pos);
    pos = newline == std::string_view::npos ? text.size() : newline + 1;
    if (detail::is_blank_text_line(line)) continue;
    const std::string at = std::string(where) + ": line " + std::to_string(line_number);
    // Nesting up to 64 levels: records often carry metadata objects beside the text.
    nlohmann::json record = detail::parse_json_strict(line, at, 64);
    KEPT_CHECK(record.is_object(), at, ": expected a JSON object with a ", quoted_field,
               " string, got ", detail::describe_json(record));
    auto found = record.find(std::string(field));
    KEPT_CHECK(found != record.end(), at, ": the object has no ", quoted_field, " field");
    KEPT_CHECK(found->is_string(), at, ": field ", quoted_field, " is ",
               detail::describe_json(*found), ", expected a string");
    ++records;
    auto& value = found->get_ref<std::string&>();
    if (!value.empty()) documents.push_back(std::move(value));
  }
  KEPT_CHECK(!documents.empty(), where, ": the corpus is empty (",
             records ? "every " + quoted_field + " is an empty string" : std::string("no record"),
             ")");
  return documents;
}

inline std::vector<std::string> read_jsonl_documents(
    const std::filesystem::path& path, std::string_view field = "text",
    std::uint64_t max_bytes = detail::kMaxCorpusFileBytes) {
  return parse_jsonl_documents(detail::read_text_file(path, max_bytes), path.string(), field);
}

}  // namespace kept
