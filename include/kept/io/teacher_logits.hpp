// kept/io/teacher_logits.hpp: the offline teacher's file: for every training position, the
// teacher's top-k log-probs and the remaining tail mass (xkd/sparse_kl.hpp computes the KL from
// them), sharded and checksummed.
//
// Layout: a directory holding
//   index.json      {"format": "kept.teacher-logits", "version": 1, "k", "vocab_size",
//                    "temperature", "tokenizer_hash", "data_identity", "teacher" and
//                    "tail_mass": {"mean", "max"} (informative, not checked),
//                    "record": {"ids": "int32", "logprobs": "float32", "tail_mass": "float32",
//                               "bytes": 8 k + 4},
//                    "positions_per_shard", "total_positions",
//                    "shards": [{"file", "first_position", "count", "bytes", "checksum"}, ...]}
//   shard-NNNNN.bin fixed-size little-endian records, one per position, in position order:
//                   k int32 ids (most probable first, ties to the lower id), k float32 log-probs
//                   log p_i = t_i / T - lse(t / T), float32 tail mass r = sum_{v not kept} p_v.
// Bytes per position: 8 k + 4 (k = 32: 260 B; DistillKit stores ~300). fp32 log-probs, because
// half precision would move a log-prob of -20 by ~0.01 (fp16) or ~0.08 (bf16), i.e. p by 1-8%.
// The tail mass is summed from the tail's own terms (never 1 - sum kept), so a tail of 1e-12
// keeps its relative precision.
//
// Positions: the trainer's micro-batch m (the m-th DataLoader::next_batch() of the run, m =
// LoaderState::batches_served before the call) covers positions [m B L, (m + 1) B L) in the
// batch's row-major [batch, seq] order. data_identity (teacher_data_identity) ties the file to
// the loader's corpus, packing and seed; tokenizer_hash (file_fingerprint of the tokenizer
// model) to the tokenizer.
//
// Crash safety: each shard is written through AtomicFile (a temporary name until complete and
// synced), and index.json is written last, also atomically: a killed run leaves complete shards
// and no index, which the reader refuses ("no index.json"), never a file that looks complete.
// Rewriting a directory (force) deletes its index.json first, for the same reason.
//
// Verification (TeacherLogitsReader::open): the index parses strictly, format and version are
// known, k / vocab_size / temperature / tokenizer_hash / data_identity equal the caller's (an
// error names index.json, the field and both values), the shard list is contiguous, and every
// shard's size on disk matches (a truncated shard is named). Each shard's checksum (64-bit
// FNV-1a over its bytes, kept/core/hash.hpp: any single changed byte changes it) is verified when
// the shard is first read; a mismatch names the shard.
#pragma once

#include <sys/stat.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <numeric>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/error.hpp"
#include "kept/core/hash.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/json.hpp"
#include "kept/io/mapped_file.hpp"
#include "kept/xkd/sparse_teacher.hpp"

namespace kept {

static_assert(std::endian::native == std::endian::little,
              "teacher-logits shards are little-endian and read in place");

inline constexpr const char* kTeacherLogitsFormat = "kept.teacher-logits";
inline constexpr std::int64_t kTeacherLogitsVersion = 1;

// What a teacher-logits file is of; the reader requires every field to match.
struct TeacherLogitsHeader {
  std::int64_t k = 0;  // reader: 0 = any (the file's; a job may leave k to the file)
  std::int64_t vocab_size = 0;
  double temperature = 1.0;
  std::string tokenizer_hash;  // e.g. file_fingerprint(tokenizer.model)
  std::string data_identity;   // e.g. teacher_data_identity(loader fingerprint, seed)
};

// Bytes of one position's record.
inline std::int64_t teacher_record_bytes(std::int64_t k) {
  return 8 * k + 4;
}

// The string a trainer and `kept teacher-logits` both derive from their DataLoader: its
// fingerprint (corpus tokens, seq_len, batch_size, eos, split, packing) and its shuffle seed.
inline std::string teacher_data_identity(std::uint64_t loader_fingerprint, std::uint64_t seed) {
  return "kept.data.v1 fingerprint " + Fingerprint::to_hex(loader_fingerprint) + " seed " +
         std::to_string(seed);
}

// FNV-1a (kept/core/hash.hpp) of a byte range, continuing from `hash`.
inline std::uint64_t fnv1a_bytes(std::span<const std::byte> bytes,
                                 std::uint64_t hash = kFnvOffsetBasis) {
  for (std::byte b : bytes)
    hash = fnv1a_byte(hash, static_cast<unsigned char>(b));
  return hash;
}

// "fnv1a64:<16 hex digits>" of a whole file (a tokenizer model, for tokenizer_hash).
inline std::string file_fingerprint(const std::filesystem::path& path) {
  const std::shared_ptr<Storage> mapping = map_file_private(path);
  std::uint64_t hash = kFnvOffsetBasis;
  if (mapping)
    hash = fnv1a_bytes(std::span(static_cast<const std::byte*>(mapping->data()), mapping->bytes()));
  return "fnv1a64:" + Fingerprint::to_hex(hash);
}

// ---- top-k extraction ------------------------------------------------------------------------

// From one row of full teacher logits: the k most probable ids at temperature T (descending
// probability, ties to the lower id), their log-probs and the tail mass, in float64 (stored as
// float). NaN or +inf logits are refused (`row` names the row in the message); -inf is p = 0.
template <class T>
void teacher_top_k(const T* logits, std::int64_t vocab, double temperature, std::int64_t k,
                   std::int32_t* ids, float* logprobs, float* tail_mass, std::int64_t row = 0) {
  KEPT_CHECK(k >= 1 && k <= vocab, "teacher top-k: k = ", k, " must be in [1, ", vocab, "]");
  KEPT_CHECK(temperature > 0 && std::isfinite(temperature),
             "teacher top-k: temperature must be positive and finite, got ", temperature);
  double max = -std::numeric_limits<double>::infinity();
  for (std::int64_t v = 0; v < vocab; ++v) {
    const double b = static_cast<double>(logits[v]);
    KEPT_CHECK(!std::isnan(b) && b != std::numeric_limits<double>::infinity(), "teacher row ", row,
               ": logit ", b, " at id ", v, " (a broken teacher?)");
    max = std::max(max, b / temperature);
  }
  KEPT_CHECK(max > -std::numeric_limits<double>::infinity(), "teacher row ", row,
             ": every logit is -inf");
  std::vector<std::int32_t> order(static_cast<std::size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  // Higher logit first, the lower id on ties: the same order on every platform.
  const auto before = [&](std::int32_t a, std::int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const auto cut = order.begin() + k;
  std::nth_element(order.begin(), cut - 1, order.end(), before);
  std::sort(order.begin(), cut, before);
  double sum = 0;
  for (std::int64_t v = 0; v < vocab; ++v)
    sum += std::exp(static_cast<double>(logits[v]) / temperature - max);
  const double lse = max + std::log(sum);
  // The tail in id order (not nth_element's), so the sum is the same on every platform.
  std::vector<char> kept(static_cast<std::size_t>(vocab), 0);
  for (auto it = order.begin(); it != cut; ++it)
    kept[static_cast<std::size_t>(*it)] = 1;
  double tail = 0;
  for (std::int64_t v = 0; v < vocab; ++v)
    if (!kept[static_cast<std::size_t>(v)])
      tail += std::exp(static_cast<double>(logits[v]) / temperature - lse);
  for (std::int64_t i = 0; i < k; ++i) {
    const std::int32_t id = order[static_cast<std::size_t>(i)];
    ids[i] = id;
    logprobs[i] = static_cast<float>(static_cast<double>(logits[id]) / temperature - lse);
  }
  *tail_mass = static_cast<float>(std::min(tail, 1.0));
}

// ---- rows in memory --------------------------------------------------------------------------

// Sparse teacher rows owned in memory: what the reader returns and the writer takes.
struct SparseTeacherRows {
  std::int64_t rows = 0, k = 0;
  std::vector<std::int32_t> ids;  // [rows, k]
  std::vector<float> logprobs;    // [rows, k]
  std::vector<float> tail_mass;   // [rows]

  SparseTeacherRows() = default;
  SparseTeacherRows(std::int64_t rows_, std::int64_t k_)
      : rows(rows_),
        k(k_),
        ids(static_cast<std::size_t>(rows_ * k_)),
        logprobs(static_cast<std::size_t>(rows_ * k_)),
        tail_mass(static_cast<std::size_t>(rows_)) {}

  xkd::SparseTeacher view() const {
    return {ids.data(), logprobs.data(), tail_mass.data(), rows, k};
  }
};

// teacher_top_k of every row of a [rows, vocab] logits matrix (host memory), appended to `out`
// (whose k must be `k`).
template <class T>
void append_teacher_top_k(const T* logits, std::int64_t rows, std::int64_t vocab,
                          double temperature, std::int64_t k, SparseTeacherRows& out) {
  KEPT_CHECK(out.k == k || out.rows == 0, "teacher top-k: appending k = ", k,
             " rows to k = ", out.k);
  out.k = k;
  const std::int64_t first = out.rows;
  out.rows += rows;
  out.ids.resize(static_cast<std::size_t>(out.rows * k));
  out.logprobs.resize(static_cast<std::size_t>(out.rows * k));
  out.tail_mass.resize(static_cast<std::size_t>(out.rows));
  // Rows are independent (each thread owns its rows' outputs; the result does not depend on the
  // thread count). An exception may not leave an OpenMP region: the first row's error (in row
  // order) is kept and rethrown after it.
  std::vector<std::string> errors(static_cast<std::size_t>(rows));
  bool failed = false;
#pragma omp parallel for schedule(dynamic, 8) reduction(|| : failed)
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t at = first + r;
    try {
      teacher_top_k(logits + r * vocab, vocab, temperature, k, out.ids.data() + at * k,
                    out.logprobs.data() + at * k, out.tail_mass.data() + at, at);
    } catch (const Error& error) {
      errors[static_cast<std::size_t>(r)] = error.what();
      failed = true;
    }
  }
  if (failed)
    for (const std::string& error : errors)
      if (!error.empty()) throw Error(error);
}

// ---- the writer ------------------------------------------------------------------------------

class TeacherLogitsWriter {
 public:
  // Starts a file in `directory` (created if missing). A directory that already holds an
  // index.json is refused unless `force`, which deletes that index first. `teacher` is recorded
  // for people (which model produced the file); it is not checked.
  TeacherLogitsWriter(const std::filesystem::path& directory, TeacherLogitsHeader header,
                      std::int64_t positions_per_shard, bool force = false,
                      std::string teacher = "")
      : directory_(directory),
        header_(std::move(header)),
        positions_per_shard_(positions_per_shard),
        teacher_(std::move(teacher)) {
    KEPT_CHECK(header_.k >= 1 && header_.k <= header_.vocab_size, directory_.string(),
               ": k = ", header_.k, " must be in [1, vocab_size = ", header_.vocab_size, "]");
    KEPT_CHECK(header_.temperature > 0 && std::isfinite(header_.temperature), directory_.string(),
               ": temperature must be positive and finite, got ", header_.temperature);
    KEPT_CHECK(positions_per_shard_ >= 1, directory_.string(),
               ": positions per shard must be >= 1, got ", positions_per_shard_);
    std::error_code error;
    std::filesystem::create_directories(directory_, error);
    KEPT_CHECK(!error, directory_.string(), ": cannot create the directory: ", error.message());
    const auto index = directory_ / "index.json";
    if (std::filesystem::exists(index, error)) {
      KEPT_CHECK(force, directory_.string(),
                 ": holds teacher logits already (index.json); --force replaces them");
      std::filesystem::remove(index, error);
      KEPT_CHECK(!error, index.string(), ": cannot remove: ", error.message());
      detail::fsync_directory(directory_, directory_.string());
    }
  }
  TeacherLogitsWriter(const TeacherLogitsWriter&) = delete;
  TeacherLogitsWriter& operator=(const TeacherLogitsWriter&) = delete;

  std::int64_t positions() const { return positions_; }
  // The mean and largest tail mass r so far: the share of the teacher's distribution the file
  // only knows as one bucket (the sparse KL's error grows with it, xkd/sparse_kl.hpp).
  double mean_tail_mass() const {
    return positions_ ? tail_sum_ / static_cast<double>(positions_) : 0.0;
  }
  double max_tail_mass() const { return tail_max_; }
  const std::filesystem::path& directory() const { return directory_; }

  // Appends rows (positions in order).
  void append(const xkd::SparseTeacher& rows) {
    KEPT_CHECK(!finished_, directory_.string(), ": append after finish");
    KEPT_CHECK(rows.k == header_.k, directory_.string(), ": appending rows of k = ", rows.k,
               " to a file of k = ", header_.k);
    const std::int64_t k = header_.k;
    std::vector<std::byte> record(static_cast<std::size_t>(teacher_record_bytes(k)));
    for (std::int64_t r = 0; r < rows.rows; ++r) {
      for (std::int64_t i = 0; i < k; ++i) {
        const std::int32_t id = rows.ids[r * k + i];
        KEPT_CHECK(id >= 0 && id < header_.vocab_size, directory_.string(), ": position ",
                   positions_, ": id ", id, " is outside [0, ", header_.vocab_size, ")");
      }
      std::memcpy(record.data(), rows.ids + r * k, static_cast<std::size_t>(4 * k));
      std::memcpy(record.data() + 4 * k, rows.logprobs + r * k, static_cast<std::size_t>(4 * k));
      std::memcpy(record.data() + 8 * k, rows.tail_mass + r, 4);
      tail_sum_ += static_cast<double>(rows.tail_mass[r]);
      tail_max_ = std::max(tail_max_, static_cast<double>(rows.tail_mass[r]));
      if (!shard_) open_shard();
      shard_->write(record);
      hash_ = fnv1a_bytes(record, hash_);
      ++in_shard_;
      ++positions_;
      if (in_shard_ == positions_per_shard_) close_shard();
    }
  }

  // Commits the last shard, then index.json: only now does the directory read as complete.
  void finish() {
    KEPT_CHECK(!finished_, directory_.string(), ": finish twice");
    if (shard_) close_shard();
    nlohmann::json index{{"format", kTeacherLogitsFormat},
                         {"version", kTeacherLogitsVersion},
                         {"k", header_.k},
                         {"vocab_size", header_.vocab_size},
                         {"temperature", header_.temperature},
                         {"tokenizer_hash", header_.tokenizer_hash},
                         {"data_identity", header_.data_identity},
                         {"teacher", teacher_},
                         {"tail_mass", {{"mean", mean_tail_mass()}, {"max", max_tail_mass()}}},
                         {"record",
                          {{"ids", "int32"},
                           {"logprobs", "float32"},
                           {"tail_mass", "float32"},
                           {"bytes", teacher_record_bytes(header_.k)}}},
                         {"positions_per_shard", positions_per_shard_},
                         {"total_positions", positions_},
                         {"shards", shards_}};
    write_file_atomically(directory_ / "index.json", index.dump(2) + "\n");
    finished_ = true;
  }

 private:
  static std::string shard_name(std::size_t index) {
    char name[32];
    std::snprintf(name, sizeof name, "shard-%05zu.bin", index);
    return name;
  }
  void open_shard() {
    shard_ = std::make_unique<AtomicFile>(directory_ / shard_name(shards_.size()));
    hash_ = kFnvOffsetBasis;
    in_shard_ = 0;
  }
  void close_shard() {
    const std::uint64_t bytes = shard_->bytes_written();
    shard_->commit();
    shards_.push_back({{"file", shard_name(shards_.size())},
                       {"first_position", positions_ - in_shard_},
                       {"count", in_shard_},
                       {"bytes", bytes},
                       {"checksum", "fnv1a64:" + Fingerprint::to_hex(hash_)}});
    shard_.reset();
  }

  std::filesystem::path directory_;
  TeacherLogitsHeader header_;
  std::int64_t positions_per_shard_;
  std::string teacher_;
  std::unique_ptr<AtomicFile> shard_;
  std::uint64_t hash_ = kFnvOffsetBasis;
  std::int64_t in_shard_ = 0, positions_ = 0;
  double tail_sum_ = 0, tail_max_ = 0;
  nlohmann::json shards_ = nlohmann::json::array();
  bool finished_ = false;
};

// ---- the reader ------------------------------------------------------------------------------

class TeacherLogitsReader {
 public:
  // Opens and verifies `directory` against what the caller expects (see the top comment).
  static TeacherLogitsReader open(const std::filesystem::path& directory,
                                  const TeacherLogitsHeader& expected) {
    TeacherLogitsReader reader;
    reader.directory_ = directory;
    const auto index_path = directory / "index.json";
    const std::string where = index_path.string();
    std::error_code error;
    KEPT_CHECK(std::filesystem::is_directory(directory, error), directory.string(),
               ": no teacher-logits directory (run `kept teacher-logits JOB` first)");
    KEPT_CHECK(std::filesystem::exists(index_path, error), where,
               ": missing: the teacher-logits file is incomplete (a run that did not finish "
               "writes no index); run `kept teacher-logits` again");
    const nlohmann::json index =
        detail::parse_json_strict(detail::read_text_file(index_path, 256u << 20), where, 4);
    KEPT_CHECK(index.is_object(), where, ": must be a JSON object");
    auto field = [&](const char* key) -> const nlohmann::json& {
      const auto found = index.find(key);
      KEPT_CHECK(found != index.end(), where, ": no field \"", key, "\"");
      return *found;
    };
    auto integer = [&](const nlohmann::json& value, const std::string& name) {
      KEPT_CHECK(value.is_number_integer(), where, ": field \"", name,
                 "\" must be an integer, got ", detail::describe_json(value));
      const auto result = value.get<std::int64_t>();
      KEPT_CHECK(result >= 0, where, ": field \"", name, "\" must be >= 0, got ", result);
      return result;
    };
    auto text = [&](const char* key) {
      const nlohmann::json& value = field(key);
      KEPT_CHECK(value.is_string(), where, ": field \"", key, "\" must be a string, got ",
                 detail::describe_json(value));
      return value.get<std::string>();
    };
    const std::string format = text("format");
    KEPT_CHECK(format == kTeacherLogitsFormat, where, ": field \"format\" is ",
               detail::quote_json(format), ", expected ", detail::quote_json(kTeacherLogitsFormat));
    const std::int64_t version = integer(field("version"), "version");
    KEPT_CHECK(version == kTeacherLogitsVersion, where, ": field \"version\" is ", version,
               "; this kept reads version ", kTeacherLogitsVersion);
    auto expect_int = [&](const char* key, std::int64_t wanted) {
      const std::int64_t found = integer(field(key), key);
      KEPT_CHECK(found == wanted || (wanted == 0 && std::string_view(key) == "k"), where,
                 ": field \"", key, "\" is ", found, " in the file, but the job expects ", wanted);
      return found;
    };
    auto expect_text = [&](const char* key, const std::string& wanted) {
      const std::string found = text(key);
      KEPT_CHECK(found == wanted, where, ": field \"", key, "\" is ", detail::quote_json(found),
                 " in the file, but the job expects ", detail::quote_json(wanted));
    };
    reader.header_.k = expect_int("k", expected.k);
    reader.header_.vocab_size = expect_int("vocab_size", expected.vocab_size);
    const nlohmann::json& temperature = field("temperature");
    KEPT_CHECK(temperature.is_number(), where, ": field \"temperature\" must be a number, got ",
               detail::describe_json(temperature));
    reader.header_.temperature = temperature.get<double>();
    KEPT_CHECK(reader.header_.temperature == expected.temperature, where,
               ": field \"temperature\" is ", reader.header_.temperature,
               " in the file, but the job expects ", expected.temperature);
    expect_text("tokenizer_hash", expected.tokenizer_hash);
    expect_text("data_identity", expected.data_identity);
    reader.header_.tokenizer_hash = expected.tokenizer_hash;
    reader.header_.data_identity = expected.data_identity;
    const nlohmann::json& record = field("record");
    KEPT_CHECK(record.is_object() && record.value("ids", "") == "int32" &&
                   record.value("logprobs", "") == "float32" &&
                   record.value("tail_mass", "") == "float32" && record.contains("bytes") &&
                   record["bytes"] == teacher_record_bytes(reader.header_.k),
               where, ": field \"record\" is not the int32 / float32 / float32 record of ",
               teacher_record_bytes(reader.header_.k), " bytes this kept reads");
    reader.record_bytes_ = teacher_record_bytes(reader.header_.k);
    reader.total_ = integer(field("total_positions"), "total_positions");
    const nlohmann::json& shards = field("shards");
    KEPT_CHECK(shards.is_array(), where, ": field \"shards\" must be an array");
    std::int64_t next = 0;
    for (std::size_t s = 0; s < shards.size(); ++s) {
      const nlohmann::json& entry = shards[s];
      const std::string name = "shards[" + std::to_string(s) + "]";
      KEPT_CHECK(entry.is_object(), where, ": ", name, " must be an object");
      Shard shard;
      const auto file = entry.find("file");
      KEPT_CHECK(file != entry.end() && file->is_string(), where, ": ", name,
                 " needs a \"file\" string");
      const std::string file_name = file->get<std::string>();
      KEPT_CHECK(
          !file_name.empty() && file_name.find('/') == std::string::npos && file_name[0] != '.',
          where, ": ", name, ".file ", detail::quote_json(file_name),
          " must be a plain file name inside the directory");
      shard.path = directory / file_name;
      auto member = [&](const char* key) -> const nlohmann::json& {
        const auto found = entry.find(key);
        KEPT_CHECK(found != entry.end(), where, ": ", name, " has no \"", key, "\"");
        return *found;
      };
      shard.first = integer(member("first_position"), name + ".first_position");
      shard.count = integer(member("count"), name + ".count");
      shard.bytes = integer(member("bytes"), name + ".bytes");
      KEPT_CHECK(shard.first == next, where, ": ", name, " (", file_name, ") starts at position ",
                 shard.first, ", but the shards before it end at ", next);
      KEPT_CHECK(shard.count <= std::numeric_limits<std::int64_t>::max() / reader.record_bytes_ &&
                     shard.bytes == shard.count * reader.record_bytes_,
                 where, ": ", name, " (", file_name, ") lists ", shard.bytes, " bytes for ",
                 shard.count, " positions of ", reader.record_bytes_, " bytes");
      const nlohmann::json& checksum = member("checksum");
      KEPT_CHECK(checksum.is_string() && checksum.get<std::string>().starts_with("fnv1a64:") &&
                     checksum.get<std::string>().size() == 8 + 16,
                 where, ": ", name, ".checksum must be \"fnv1a64:\" and 16 hex digits, got ",
                 detail::describe_json(checksum));
      shard.checksum = checksum.get<std::string>();
      next += shard.count;
      // The size on disk now (a truncated or extended shard is caught before any training).
      struct stat info {};
      KEPT_CHECK(::stat(shard.path.c_str(), &info) == 0, shard.path.string(),
                 ": teacher-logits shard missing (listed in ", where,
                 "): ", detail::errno_text(errno));
      KEPT_CHECK(static_cast<std::int64_t>(info.st_size) == shard.bytes, shard.path.string(),
                 ": teacher-logits shard is ", static_cast<std::int64_t>(info.st_size),
                 " bytes, the index lists ", shard.bytes,
                 info.st_size < shard.bytes ? " (truncated)" : " (changed)");
      reader.shards_.push_back(std::move(shard));
    }
    KEPT_CHECK(next == reader.total_, where, ": the shards hold ", next,
               " positions, field \"total_positions\" says ", reader.total_);
    return reader;
  }

  const TeacherLogitsHeader& header() const { return header_; }
  std::int64_t total_positions() const { return total_; }
  std::int64_t shard_count() const { return static_cast<std::int64_t>(shards_.size()); }

  // Positions [first, first + count). Each shard's checksum is verified on its first read.
  SparseTeacherRows read(std::int64_t first, std::int64_t count) {
    KEPT_CHECK(first >= 0 && count >= 0 && first <= total_ && count <= total_ - first,
               directory_.string(), ": positions [", first, ", ", first + count,
               ") asked for, but the teacher logits cover [0, ", total_,
               ") (a longer run than the file was made for?)");
    const std::int64_t k = header_.k;
    SparseTeacherRows rows(count, k);
    std::int64_t at = first;
    while (at < first + count) {
      // The shard holding `at` (shards are contiguous and sorted).
      const auto it = std::upper_bound(shards_.begin(), shards_.end(), at,
                                       [](std::int64_t p, const Shard& s) { return p < s.first; });
      Shard& shard = *(it - 1);
      const std::byte* bytes = shard_bytes(shard);
      const std::int64_t n = std::min(first + count, shard.first + shard.count) - at;
      for (std::int64_t i = 0; i < n; ++i) {
        const std::byte* record = bytes + (at - shard.first + i) * record_bytes_;
        const std::int64_t row = at - first + i;
        std::memcpy(rows.ids.data() + row * k, record, static_cast<std::size_t>(4 * k));
        std::memcpy(rows.logprobs.data() + row * k, record + 4 * k,
                    static_cast<std::size_t>(4 * k));
        std::memcpy(rows.tail_mass.data() + row, record + 8 * k, 4);
        for (std::int64_t j = 0; j < k; ++j) {
          const std::int32_t id = rows.ids[static_cast<std::size_t>(row * k + j)];
          KEPT_CHECK(id >= 0 && id < header_.vocab_size, shard.path.string(), ": position ", at + i,
                     " holds id ", id, ", outside [0, ", header_.vocab_size, ")");
        }
      }
      at += n;
    }
    return rows;
  }

 private:
  struct Shard {
    std::filesystem::path path;
    std::int64_t first = 0, count = 0, bytes = 0;
    std::string checksum;
    std::shared_ptr<Storage> mapping;  // while it is the current shard
  };

  // The shard's bytes, mapped; verifies the checksum on the first mapping. One shard is kept
  // mapped at a time (reads walk the positions in order).
  const std::byte* shard_bytes(Shard& shard) {
    const auto position = static_cast<std::ptrdiff_t>(&shard - shards_.data());
    if (position != current_) {
      if (current_ >= 0) shards_[static_cast<std::size_t>(current_)].mapping.reset();
      current_ = -1;
      struct stat info {};
      KEPT_CHECK(::stat(shard.path.c_str(), &info) == 0 &&
                     static_cast<std::int64_t>(info.st_size) == shard.bytes,
                 shard.path.string(), ": teacher-logits shard changed size since it was opened");
      shard.mapping = shard.bytes ? map_file_private(shard.path) : nullptr;
      KEPT_CHECK(shard.bytes == 0 || (shard.mapping && static_cast<std::int64_t>(
                                                           shard.mapping->bytes()) == shard.bytes),
                 shard.path.string(), ": teacher-logits shard changed size since it was opened");
      const std::byte* data =
          shard.mapping ? static_cast<const std::byte*>(shard.mapping->data()) : nullptr;
      if (!verified_.contains(shard.path.string())) {
        const std::string found = "fnv1a64:" + Fingerprint::to_hex(fnv1a_bytes(std::span(
                                                   data, static_cast<std::size_t>(shard.bytes))));
        KEPT_CHECK(found == shard.checksum, shard.path.string(),
                   ": teacher-logits shard is corrupt: checksum ", found, ", the index lists ",
                   shard.checksum);
        verified_.insert(shard.path.string());
      }
      current_ = position;
    }
    return shard.mapping ? static_cast<const std::byte*>(shard.mapping->data()) : nullptr;
  }

  std::filesystem::path directory_;
  TeacherLogitsHeader header_;
  std::int64_t record_bytes_ = 0, total_ = 0;
  std::vector<Shard> shards_;
  std::ptrdiff_t current_ = -1;  // the mapped shard
  std::set<std::string> verified_;
};

}  // namespace kept
