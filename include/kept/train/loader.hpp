// kept/train/loader.hpp: resumable batches of packed windows, epoch after epoch.
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
#include "kept/core/hash.hpp"
#include "kept/core/random.hpp"
#include "kept/io/json.hpp"
#include "kept/train/packing.hpp"

namespace kept {

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
    turn_epoch_if_done();
    prepare_epoch(state_.epoch);
    Batch batch = make_batch(cached_stream_, cached_order_, state_.position, config_.batch_size,
                             config_.seq_len);
    batch.epoch = state_.epoch;
    state_.position += config_.batch_size;
    state_.batches_served += 1;
    return batch;
  }

  // Moves past the batch next_batch() would give without reading its windows (a data-parallel
  // rank skipping the other ranks' micro-batches): the state afterwards is the same.
  void skip_batch() {
    turn_epoch_if_done();
    state_.position += config_.batch_size;
    state_.batches_served += 1;
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

  void turn_epoch_if_done() {
    if (state_.position + config_.batch_size > sequences_per_epoch_) {
      state_.epoch += 1;
      state_.position = 0;
    }
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
