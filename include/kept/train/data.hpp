// kept/train/data.hpp: from raw text files to resumable batches of packed token sequences.
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
//
// Held-out split. Before anything is packed, round(fraction * documents) documents (at least
// one when fraction > 0) are held out, chosen by a Fisher-Yates shuffle of the document indices
// seeded from (seed, "held-out"). The split is by whole documents, so no document straddles
// training and evaluation. Both lists keep corpus order.
//
// Packing. For one epoch the training documents, in that epoch's order, are concatenated into
// one stream with EOS after every document (doc0 EOS doc1 EOS ... docN EOS; an empty document
// contributes just its EOS). Sequence i is the window stream[i*L .. i*L + L] of L+1 tokens:
// inputs = its first L tokens, targets = its last L (the next token at every position).
// Consecutive windows share one token (the last target of one is the first input of the next),
// so every stream token except the first is a target exactly once. The stream of T tokens gives
// (T-1)/L full windows (integer division); the rest, fewer than L targets, is
//   Remainder::Drop (default for training): dropped; the dropped tail differs every epoch
//     because the document order does;
//   Remainder::Pad: one more window, inputs past the stream filled with EOS and targets -1
//     (= ignore, which the loss must skip), so nothing is lost (always used for held-out data).
// Windows cross document boundaries and attention is not masked at them: the standard packing
// of the paper's setup ("sequences packed to 4,096").
//
// Shuffling. Epoch e permutes the training documents (Fisher-Yates seeded from (seed, e,
// "documents")), packs them, and permutes the windows (seeded from (seed, e, "sequences")), so
// both the document neighbourhoods and the batch composition change between epochs. kept::Random
// is fully specified, so a seed means the same order on every platform. Fisher-Yates draws
// j = next_u64() % (i + 1): the modulo bias is below 2^-40 for any realistic count, and exact
// reproducibility matters more here than removing it.
//
// Batches. A batch is `batch_size` consecutive windows of the epoch's permutation, as row-major
// [batch, seq_len] int32 inputs and targets. An epoch yields floor(windows / batch_size)
// batches; the leftover windows (fewer than a batch) are skipped for that epoch and, being
// shuffled, are different windows each time. LoaderState {seed, epoch, position (the next
// window index in the epoch's permutation), batches_served, fingerprint} is everything the
// loader needs: the permutations are recomputed from (seed, epoch), so restoring a state and
// calling next_batch() gives exactly the batch an uninterrupted loader would have given. The
// fingerprint (FNV-1a over the corpus tokens and the packing settings) makes a resume against a
// different corpus or different settings fail instead of silently continuing elsewhere.
#pragma once

#include <algorithm>
#include <bit>
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
#include "kept/core/random.hpp"
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

// ---- shuffling and the held-out split --------------------------------------------------------

// Fisher-Yates (Durstenfeld): for i = n-1 .. 1, swap a[i] with a[j], j = next_u64() % (i+1).
template <class T>
void shuffle_in_place(std::vector<T>& items, Random& random) {
  for (std::size_t i = items.size(); i > 1; --i) {
    const std::size_t j = static_cast<std::size_t>(random.below(i));
    std::swap(items[i - 1], items[j]);
  }
}

// A 64-bit FNV-1a fingerprint, fed field by field (each value as its 8 little-endian bytes).
class Fingerprint {
 public:
  Fingerprint& add(std::uint64_t value) {
    for (int byte = 0; byte < 8; ++byte) {
      hash_ = (hash_ ^ ((value >> (8 * byte)) & 0xffu)) * 0x100000001b3ull;
    }
    return *this;
  }
  Fingerprint& add(std::string_view text) {
    add(static_cast<std::uint64_t>(text.size()));
    for (char c : text)
      hash_ = (hash_ ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
    return *this;
  }
  std::uint64_t value() const { return hash_; }
  std::string hex() const { return to_hex(hash_); }
  static std::string to_hex(std::uint64_t value) {
    char text[17];
    std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(value));
    return text;
  }

 private:
  std::uint64_t hash_ = 0xcbf29ce484222325ull;
};

struct DocumentSplit {
  std::vector<std::size_t> train{};     // ascending document indices
  std::vector<std::size_t> held_out{};  // ascending document indices
};

// Holds out round(fraction * count) documents (at least one when fraction > 0); see the top
// comment. Throws if that leaves no training document.
inline DocumentSplit split_documents(std::size_t count, double fraction, std::uint64_t seed) {
  KEPT_CHECK(fraction >= 0.0 && fraction < 1.0, "held-out fraction must be in [0, 1), got ",
             fraction);
  std::size_t held = 0;
  if (fraction > 0.0) {
    held = static_cast<std::size_t>(std::llround(fraction * static_cast<double>(count)));
    held = std::max<std::size_t>(held, 1);
  }
  KEPT_CHECK(held < count, "held-out split: holding out ", held, " of ", count,
             " documents leaves none for training");
  std::vector<std::size_t> order(count);
  for (std::size_t i = 0; i < count; ++i)
    order[i] = i;
  Random random(Random::derive(seed, "held-out"));
  shuffle_in_place(order, random);
  DocumentSplit split;
  split.held_out.assign(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(held));
  split.train.assign(order.begin() + static_cast<std::ptrdiff_t>(held), order.end());
  std::sort(split.held_out.begin(), split.held_out.end());
  std::sort(split.train.begin(), split.train.end());
  return split;
}

// ---- packing ---------------------------------------------------------------------------------

using TokenDocument = std::vector<std::int32_t>;

// What happens to the last, partial window of a packed stream (see the top comment).
enum class Remainder { Drop, Pad };

// The target value that marks a position the loss must ignore.
inline constexpr std::int32_t kIgnoreTarget = -1;

// The packed stream of some documents in a given order, computed on demand (nothing is copied:
// the stream position of each document is a prefix sum, and a token lookup is a binary search).
class PackedStream {
 public:
  PackedStream() = default;
  PackedStream(std::shared_ptr<const std::vector<TokenDocument>> documents,
               std::vector<std::size_t> order, std::int32_t eos_id, std::int64_t seq_len,
               Remainder remainder)
      : documents_(std::move(documents)),
        order_(std::move(order)),
        eos_id_(eos_id),
        seq_len_(seq_len),
        remainder_(remainder) {
    KEPT_CHECK(documents_, "packing: no documents");
    KEPT_CHECK(seq_len_ >= 1, "packing: seq_len must be >= 1, got ", seq_len_);
    offsets_.reserve(order_.size() + 1);
    std::int64_t offset = 0;
    for (std::size_t index : order_) {
      KEPT_CHECK(index < documents_->size(), "packing: document index ", index, " out of range (",
                 documents_->size(), " documents)");
      offsets_.push_back(offset);
      offset += static_cast<std::int64_t>((*documents_)[index].size()) + 1;
    }
    offsets_.push_back(offset);
    if (offset <= 1) {
      sequences_ = 0;
    } else if (remainder_ == Remainder::Drop) {
      sequences_ = (offset - 1) / seq_len_;
    } else {
      sequences_ = (offset - 1 + seq_len_ - 1) / seq_len_;
    }
  }

  // Stream length: the documents' tokens plus one EOS each.
  std::int64_t tokens() const { return offsets_.empty() ? 0 : offsets_.back(); }
  std::int64_t sequences() const { return sequences_; }
  std::int64_t seq_len() const { return seq_len_; }
  const std::vector<std::size_t>& order() const { return order_; }

  std::int32_t token(std::int64_t position) const {
    KEPT_CHECK(position >= 0 && position < tokens(), "packing: stream position ", position,
               " out of range (", tokens(), " tokens)");
    const std::size_t k = document_at(position);
    const TokenDocument& doc = (*documents_)[order_[k]];
    const std::int64_t within = position - offsets_[k];
    return within < static_cast<std::int64_t>(doc.size()) ? doc[static_cast<std::size_t>(within)]
                                                          : eos_id_;
  }

  // Writes window `index` into inputs and targets (seq_len each); see the top comment.
  void sequence(std::int64_t index, std::span<std::int32_t> inputs,
                std::span<std::int32_t> targets) const {
    KEPT_CHECK(index >= 0 && index < sequences_, "packing: sequence ", index, " out of range (",
               sequences_, " sequences)");
    KEPT_CHECK(static_cast<std::int64_t>(inputs.size()) == seq_len_ &&
                   static_cast<std::int64_t>(targets.size()) == seq_len_,
               "packing: output rows must hold seq_len = ", seq_len_, " tokens");
    const std::int64_t total = tokens();
    const std::int64_t start = index * seq_len_;
    // Walk the window once: a cursor over (document, offset within it).
    std::size_t k = document_at(start);
    std::int64_t within = start - offsets_[k];
    auto next = [&]() -> std::int32_t {
      const TokenDocument& doc = (*documents_)[order_[k]];
      std::int32_t value = within < static_cast<std::int64_t>(doc.size())
                               ? doc[static_cast<std::size_t>(within)]
                               : eos_id_;
      if (within < static_cast<std::int64_t>(doc.size())) {
        ++within;
      } else {  // just returned the EOS: move to the next document
        ++k;
        within = 0;
      }
      return value;
    };
    std::int32_t current = next();  // stream[start], start < total always
    for (std::int64_t t = 0; t < seq_len_; ++t) {
      const std::int64_t pos = start + t;
      inputs[static_cast<std::size_t>(t)] = pos < total ? current : eos_id_;
      if (pos + 1 < total) {
        current = next();
        targets[static_cast<std::size_t>(t)] = current;
      } else {
        targets[static_cast<std::size_t>(t)] = kIgnoreTarget;
      }
    }
  }

 private:
  std::size_t document_at(std::int64_t position) const {
    auto it = std::upper_bound(offsets_.begin(), offsets_.end(), position);
    return static_cast<std::size_t>(it - offsets_.begin()) - 1;
  }

  std::shared_ptr<const std::vector<TokenDocument>> documents_;
  std::vector<std::size_t> order_;
  std::vector<std::int64_t> offsets_;  // stream start of each document in order_, then the end
  std::int32_t eos_id_ = 0;
  std::int64_t seq_len_ = 1;
  Remainder remainder_ = Remainder::Drop;
  std::int64_t sequences_ = 0;
};

// ---- the loader ------------------------------------------------------------------------------

struct DataConfig {
  std::int64_t seq_len = 0;     // L: tokens per row (each window holds L+1)
  std::int64_t batch_size = 0;  // B: rows per batch
  std::int32_t eos_id = -1;     // appended after every document; also the input padding
  std::uint64_t seed = 0;
  double held_out_fraction = 0.0;
  bool shuffle = true;  // false: corpus order and window order (for inspection)
  Remainder remainder = Remainder::Drop;
  std::int32_t vocab_size = 0;  // when > 0, every token must be below it
};

// One batch: row-major [batch, seq] inputs and next-token targets (kIgnoreTarget = skip).
struct Batch {
  std::int64_t batch = 0;
  std::int64_t seq = 0;
  std::vector<std::int32_t> inputs{};
  std::vector<std::int32_t> targets{};
  std::int64_t epoch = 0;
  std::vector<std::int64_t> windows{};  // each row's window index in its epoch's packed stream

  std::int64_t target_count() const {
    return static_cast<std::int64_t>(
        std::count_if(targets.begin(), targets.end(), [](auto t) { return t != kIgnoreTarget; }));
  }
};

// Where a loader stands; restoring it resumes with the very next batch.
struct LoaderState {
  std::uint64_t seed = 0;
  std::int64_t epoch = 0;
  std::int64_t position = 0;  // next window index in the epoch's permutation
  std::int64_t batches_served = 0;
  std::uint64_t fingerprint = 0;

  nlohmann::json to_json() const {
    return {{"seed", seed},
            {"epoch", epoch},
            {"position", position},
            {"batches_served", batches_served},
            {"fingerprint", Fingerprint::to_hex(fingerprint)}};
  }

  static LoaderState from_json(const nlohmann::json& json, std::string_view where) {
    KEPT_CHECK(json.is_object(), where, ": loader state must be an object, got ",
               detail::describe_json(json));
    auto integer = [&](const char* key) -> const nlohmann::json& {
      auto found = json.find(key);
      KEPT_CHECK(found != json.end(), where, ": loader state has no \"", key, "\"");
      KEPT_CHECK(found->is_number_integer(), where, ": loader state \"", key,
                 "\" must be an integer, got ", detail::describe_json(*found));
      return *found;
    };
    auto non_negative = [&](const char* key) {
      const nlohmann::json& value = integer(key);
      KEPT_CHECK(value.is_number_unsigned() || value.get<std::int64_t>() >= 0, where,
                 ": loader state \"", key, "\" must be >= 0, got ", value.dump());
      KEPT_CHECK(!value.is_number_unsigned() ||
                     value.get<std::uint64_t>() <=
                         static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                 where, ": loader state \"", key, "\" is too large: ", value.dump());
      return value.get<std::int64_t>();
    };
    LoaderState state;
    const nlohmann::json& seed = integer("seed");
    KEPT_CHECK(seed.is_number_unsigned(), where, ": loader state \"seed\" must be >= 0, got ",
               seed.dump());
    state.seed = seed.get<std::uint64_t>();
    state.epoch = non_negative("epoch");
    state.position = non_negative("position");
    state.batches_served = non_negative("batches_served");
    auto fingerprint = json.find("fingerprint");
    KEPT_CHECK(fingerprint != json.end() && fingerprint->is_string(), where,
               ": loader state needs a \"fingerprint\" string");
    const std::string& hex = fingerprint->get_ref<const std::string&>();
    KEPT_CHECK(hex.size() == 16 && hex.find_first_not_of("0123456789abcdef") == std::string::npos,
               where, ": loader state \"fingerprint\" must be 16 lowercase hex digits, got ",
               detail::quote_json(hex));
    state.fingerprint = std::stoull(hex, nullptr, 16);
    return state;
  }

  friend bool operator==(const LoaderState&, const LoaderState&) = default;
};

// ---- batches ---------------------------------------------------------------------------------

// Rows `first` .. `first + rows` of `order`, each a window of `stream`, as one batch.
inline Batch make_batch(const PackedStream& stream, const std::vector<std::int64_t>& order,
                        std::int64_t first, std::int64_t rows, std::int64_t seq_len) {
  Batch batch;
  batch.batch = rows;
  batch.seq = seq_len;
  const auto row = static_cast<std::size_t>(seq_len);
  batch.inputs.resize(static_cast<std::size_t>(rows) * row);
  batch.targets.resize(static_cast<std::size_t>(rows) * row);
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t window = order[static_cast<std::size_t>(first + r)];
    batch.windows.push_back(window);
    stream.sequence(window, std::span(batch.inputs).subspan(static_cast<std::size_t>(r) * row, row),
                    std::span(batch.targets).subspan(static_cast<std::size_t>(r) * row, row));
  }
  return batch;
}

// The documents `indices` packed in corpus order with Remainder::Pad (every token is scored
// once), in batches of `batch_size` rows, the last possibly smaller: what evaluation reads.
inline std::vector<Batch> evaluation_batches(
    std::shared_ptr<const std::vector<TokenDocument>> documents,
    const std::vector<std::size_t>& indices, std::int32_t eos_id, std::int64_t seq_len,
    std::int64_t batch_size) {
  std::vector<Batch> batches;
  if (indices.empty()) return batches;
  PackedStream stream(std::move(documents), indices, eos_id, seq_len, Remainder::Pad);
  std::vector<std::int64_t> order(static_cast<std::size_t>(stream.sequences()));
  for (std::size_t i = 0; i < order.size(); ++i)
    order[i] = static_cast<std::int64_t>(i);
  for (std::int64_t first = 0; first < stream.sequences(); first += batch_size)
    batches.push_back(make_batch(stream, order, first,
                                 std::min(batch_size, stream.sequences() - first), seq_len));
  return batches;
}

class DataLoader {
 public:
  DataLoader(std::vector<TokenDocument> documents, DataConfig config)
      : documents_(std::make_shared<const std::vector<TokenDocument>>(std::move(documents))),
        config_(config) {
    KEPT_CHECK(config_.seq_len >= 1, "data: seq_len must be >= 1, got ", config_.seq_len);
    KEPT_CHECK(config_.batch_size >= 1, "data: batch_size must be >= 1, got ", config_.batch_size);
    KEPT_CHECK(config_.eos_id >= 0, "data: eos_id must be set (>= 0), got ", config_.eos_id);
    KEPT_CHECK(config_.vocab_size <= 0 || config_.eos_id < config_.vocab_size, "data: eos_id ",
               config_.eos_id, " is not below vocab_size ", config_.vocab_size);
    KEPT_CHECK(!documents_->empty(), "data: no documents");
    Fingerprint fingerprint;
    fingerprint.add("kept.data.v1")
        .add(static_cast<std::uint64_t>(config_.seq_len))
        .add(static_cast<std::uint64_t>(config_.batch_size))
        .add(static_cast<std::uint64_t>(config_.eos_id))
        .add(std::bit_cast<std::uint64_t>(config_.held_out_fraction))
        .add(static_cast<std::uint64_t>(config_.shuffle))
        .add(static_cast<std::uint64_t>(config_.remainder))
        .add(static_cast<std::uint64_t>(documents_->size()));
    for (std::size_t d = 0; d < documents_->size(); ++d) {
      const TokenDocument& doc = (*documents_)[d];
      fingerprint.add(static_cast<std::uint64_t>(doc.size()));
      for (std::size_t t = 0; t < doc.size(); ++t) {
        // Negative ids would collide with the ignore target; ids past the vocabulary would
        // index out of the embedding.
        KEPT_CHECK(doc[t] >= 0 && (config_.vocab_size <= 0 || doc[t] < config_.vocab_size),
                   "data: document ", d, " token ", t, " is ", doc[t], ", outside [0, ",
                   config_.vocab_size > 0 ? std::to_string(config_.vocab_size) : "2^31", ")");
        fingerprint.add(static_cast<std::uint64_t>(static_cast<std::uint32_t>(doc[t])));
      }
    }
    fingerprint_ = fingerprint.value();
    split_ = split_documents(documents_->size(), config_.held_out_fraction, config_.seed);
    sequences_per_epoch_ = stream_for_epoch(0).sequences();
    KEPT_CHECK(sequences_per_epoch_ >= config_.batch_size, "data: the ", split_.train.size(),
               " training documents pack into ", sequences_per_epoch_, " windows of ",
               config_.seq_len + 1, " tokens, fewer than one batch of ", config_.batch_size);
    state_.seed = config_.seed;
    state_.fingerprint = fingerprint_;
  }

  const DataConfig& config() const { return config_; }
  const std::vector<TokenDocument>& documents() const { return *documents_; }
  const DocumentSplit& split() const { return split_; }
  std::uint64_t fingerprint() const { return fingerprint_; }
  std::int64_t sequences_per_epoch() const { return sequences_per_epoch_; }
  std::int64_t batches_per_epoch() const { return sequences_per_epoch_ / config_.batch_size; }

  // The packed training stream of an epoch (its document order), and its window permutation.
  PackedStream stream_for_epoch(std::int64_t epoch) const {
    std::vector<std::size_t> order = split_.train;
    if (config_.shuffle) {
      Random random(epoch_seed(epoch, "documents"));
      shuffle_in_place(order, random);
    }
    return PackedStream(documents_, std::move(order), config_.eos_id, config_.seq_len,
                        config_.remainder);
  }
  std::vector<std::int64_t> window_order(std::int64_t epoch) const {
    std::vector<std::int64_t> order(static_cast<std::size_t>(sequences_per_epoch_));
    for (std::int64_t i = 0; i < sequences_per_epoch_; ++i)
      order[static_cast<std::size_t>(i)] = i;
    if (config_.shuffle) {
      Random random(epoch_seed(epoch, "sequences"));
      shuffle_in_place(order, random);
    }
    return order;
  }

  // The next training batch; moves to the next epoch when fewer than a batch of windows is left.
  Batch next_batch() {
    if (state_.position + config_.batch_size > sequences_per_epoch_) {
      state_.epoch += 1;
      state_.position = 0;
    }
    prepare_epoch(state_.epoch);
    Batch batch = make_batch(cached_stream_, cached_order_, state_.position, config_.batch_size,
                             config_.seq_len);
    batch.epoch = state_.epoch;
    state_.position += config_.batch_size;
    state_.batches_served += 1;
    return batch;
  }

  LoaderState state() const { return state_; }

  // Continues from `state` (from state(), possibly through trainer.json). `where` names the
  // source in errors.
  void restore(const LoaderState& state, std::string_view where = "loader state") {
    KEPT_CHECK(state.fingerprint == fingerprint_, where,
               ": the saved loader state belongs to "
               "data fingerprint ",
               Fingerprint::to_hex(state.fingerprint),
               " but this corpus "
               "and packing configuration give ",
               Fingerprint::to_hex(fingerprint_),
               " (different documents, tokenizer, seq_len, batch size, EOS or split); resuming "
               "would not continue the same data order");
    KEPT_CHECK(state.seed == config_.seed, where, ": the saved loader state has seed ", state.seed,
               " but the loader is configured with seed ", config_.seed);
    KEPT_CHECK(state.epoch >= 0 && state.position >= 0 && state.position <= sequences_per_epoch_ &&
                   state.batches_served >= 0,
               where, ": position ", state.position, " of epoch ", state.epoch,
               " is outside the epoch's ", sequences_per_epoch_, " windows");
    state_ = state;
  }

  // The held-out documents packed in corpus order with Remainder::Pad, in batches of
  // batch_size rows (the last may have fewer). Empty when nothing is held out.
  std::vector<Batch> held_out_batches() const {
    std::vector<Batch> batches;
    if (split_.held_out.empty()) return batches;
    return evaluation_batches(documents_, split_.held_out, config_.eos_id, config_.seq_len,
                              config_.batch_size);
  }

 private:
  std::uint64_t epoch_seed(std::int64_t epoch, std::string_view what) const {
    return Random::derive(config_.seed, "epoch/" + std::to_string(epoch) + "/" + std::string(what));
  }

  void prepare_epoch(std::int64_t epoch) {
    if (cached_epoch_ == epoch) return;
    cached_stream_ = stream_for_epoch(epoch);
    cached_order_ = window_order(epoch);
    cached_epoch_ = epoch;
  }

  std::shared_ptr<const std::vector<TokenDocument>> documents_;
  DataConfig config_;
  DocumentSplit split_;
  std::uint64_t fingerprint_ = 0;
  std::int64_t sequences_per_epoch_ = 0;
  LoaderState state_;
  std::int64_t cached_epoch_ = -1;
  PackedStream cached_stream_;
  std::vector<std::int64_t> cached_order_;
};

}  // namespace kept
