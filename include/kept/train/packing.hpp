// kept/train/packing.hpp: the held-out split and the packing of token documents into windows.
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

#include "kept/core/error.hpp"
#include "kept/core/hash.hpp"
#include "kept/core/random.hpp"

namespace kept {

// ---- shuffling and the held-out split --------------------------------------------------------

// Fisher-Yates (Durstenfeld): for i = n-1 .. 1, swap a[i] with a[j], j = next_u64() % (i+1).
template <class T>
void shuffle_in_place(std::vector<T>& items, Random& random) {
  for (std::size_t i = items.size(); i > 1; --i) {
    const std::size_t j = static_cast<std::size_t>(random.below(i));
    std::swap(items[i - 1], items[j]);
  }
}

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

}  // namespace kept
