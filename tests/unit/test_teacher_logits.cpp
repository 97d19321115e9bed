// The offline teacher's file (kept/io/teacher_logits.hpp): top-k extraction against a brute-force
// sort, the sharded round trip, and every way a file can be wrong (truncated shard, flipped
// byte, other k / vocabulary / temperature / tokenizer / data order, a run that never wrote its
// index), each refused with the file, shard or field named.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "kept/core/random.hpp"
#include "kept/io/teacher_logits.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"

using namespace kept;
using namespace kept::test;

namespace {

std::vector<float> random_row(Random& random, std::int64_t vocab, bool ties) {
  std::vector<float> row(static_cast<std::size_t>(vocab));
  for (float& x : row)
    x = ties ? static_cast<float>(std::floor(4 * random.uniform())) - 2.0f
             : static_cast<float>(3.0 * random.normal());
  return row;
}

TeacherLogitsHeader header_for(std::int64_t k, std::int64_t vocab) {
  return {k, vocab, 2.0, "fnv1a64:0123456789abcdef", teacher_data_identity(0xfeedu, 7)};
}

// A file of `positions` rows of k = 4 over a vocabulary of 50, 10 positions per shard.
SparseTeacherRows write_sample(const std::filesystem::path& directory, std::int64_t positions,
                               std::int64_t per_shard = 10) {
  Random random(3);
  SparseTeacherRows rows;
  for (std::int64_t p = 0; p < positions; ++p) {
    const auto logits = random_row(random, 50, false);
    append_teacher_top_k(logits.data(), 1, 50, 2.0, 4, rows);
  }
  TeacherLogitsWriter writer(directory, header_for(4, 50), per_shard, false, "models/teacher");
  // Appended in uneven pieces, so shard boundaries fall inside an append.
  std::int64_t at = 0;
  for (std::int64_t piece : {3, 14, 1, 100}) {
    const std::int64_t n = std::min(piece, positions - at);
    writer.append({rows.ids.data() + at * 4, rows.logprobs.data() + at * 4,
                   rows.tail_mass.data() + at, n, 4});
    at += n;
  }
  writer.finish();
  return rows;
}

void flip_byte(const std::filesystem::path& file, std::int64_t offset) {
  std::fstream stream(file, std::ios::in | std::ios::out | std::ios::binary);
  REQUIRE(stream.good());
  stream.seekg(offset);
  char byte = 0;
  stream.read(&byte, 1);
  byte = static_cast<char>(byte ^ 0x10);
  stream.seekp(offset);
  stream.write(&byte, 1);
  REQUIRE(stream.good());
}

}  // namespace

TEST_CASE("teacher top-k matches a brute-force sort, with the tail summed directly", "[io]") {
  Random random(11);
  for (const bool ties : {false, true})
    for (const double temperature : {0.5, 1.0, 3.0})
      for (const std::int64_t k : {1, 5, 37}) {
        INFO("ties " << ties << ", T " << temperature << ", k " << k);
        const std::int64_t vocab = 37;
        const auto logits = random_row(random, vocab, ties);
        std::vector<std::int32_t> ids(k);
        std::vector<float> logprobs(k);
        float tail = -1;
        teacher_top_k(logits.data(), vocab, temperature, k, ids.data(), logprobs.data(), &tail);
        // Brute force: a full stable sort by logit, highest first (equal logits keep id order).
        std::vector<std::int32_t> order(vocab);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](std::int32_t a, std::int32_t b) { return logits[a] > logits[b]; });
        double max = -INFINITY, sum = 0;
        for (float x : logits)
          max = std::max(max, x / temperature);
        for (float x : logits)
          sum += std::exp(x / temperature - max);
        const double lse = max + std::log(sum);
        double kept = 0, rest = 0;
        std::vector<char> in_top(vocab, 0);
        for (std::int64_t i = 0; i < k; ++i) {
          const double lp = logits[order[i]] / temperature - lse;
          CHECK(ids[i] == order[i]);
          CHECK(logprobs[i] == static_cast<float>(lp));
          kept += std::exp(lp);
          in_top[order[i]] = 1;
        }
        for (std::int64_t v = 0; v < vocab; ++v)  // the tail in id order, as documented
          if (!in_top[v]) rest += std::exp(logits[v] / temperature - lse);
        CHECK(tail == static_cast<float>(rest));
        CHECK(kept + rest == Approx(1.0).epsilon(1e-12));
        if (k == vocab) CHECK(tail == 0.0f);
      }
  // A tail far below the kept mass keeps its relative precision (1 - sum would be 0 or noise).
  std::vector<float> peaked(20, -40.0f);
  peaked[3] = 0.0f;
  std::int32_t id = -1;
  float lp = 0, tail = 0;
  teacher_top_k(peaked.data(), 20, 1.0, 1, &id, &lp, &tail);
  CHECK(id == 3);
  CHECK(tail == Approx(19 * std::exp(-40.0)).epsilon(1e-6));
  // A broken teacher is refused, naming the row.
  peaked[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THAT(error_of([&] { teacher_top_k(peaked.data(), 20, 1.0, 1, &id, &lp, &tail, 42); }),
             ContainsAll({"teacher row 42", "id 5"}));
  // Rows run in parallel: the error still names the first bad row, after 3 rows already held.
  std::vector<float> matrix(40 * 20, 0.5f);
  matrix[17 * 20 + 4] = std::numeric_limits<float>::infinity();
  matrix[30 * 20 + 2] = std::numeric_limits<float>::quiet_NaN();
  SparseTeacherRows held(3, 2);
  CHECK_THAT(error_of([&] { append_teacher_top_k(matrix.data(), 40, 20, 1.0, 2, held); }),
             ContainsAll({"teacher row 20", "id 4"}));
}

TEST_CASE("teacher logits round-trip through sharded files", "[io]") {
  TempDir dir("kept-teacher-logits");
  const auto path = dir / "logits";
  const SparseTeacherRows rows = write_sample(path, 37);
  // Four shards of 10, 10, 10, 7 positions and an index written last.
  for (const char* name :
       {"shard-00000.bin", "shard-00001.bin", "shard-00002.bin", "shard-00003.bin", "index.json"})
    CHECK(std::filesystem::exists(path / name));
  CHECK(static_cast<std::int64_t>(std::filesystem::file_size(path / "shard-00003.bin")) ==
        7 * teacher_record_bytes(4));
  CHECK(teacher_record_bytes(32) == 260);

  TeacherLogitsReader reader = TeacherLogitsReader::open(path, header_for(4, 50));
  CHECK(reader.total_positions() == 37);
  // k = 0 takes the file's k.
  TeacherLogitsHeader any_k = header_for(4, 50);
  any_k.k = 0;
  CHECK(TeacherLogitsReader::open(path, any_k).header().k == 4);
  CHECK(reader.shard_count() == 4);
  for (const auto& [first, count] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {0, 37}, {8, 15}, {30, 7}, {36, 1}, {5, 0}}) {
    INFO("positions [" << first << ", " << first + count << ")");
    const SparseTeacherRows got = reader.read(first, count);
    REQUIRE(got.rows == count);
    REQUIRE(got.k == 4);
    for (std::int64_t i = 0; i < count * 4; ++i) {
      CHECK(got.ids[i] == rows.ids[first * 4 + i]);
      CHECK(got.logprobs[i] == rows.logprobs[first * 4 + i]);
    }
    for (std::int64_t i = 0; i < count; ++i)
      CHECK(got.tail_mass[i] == rows.tail_mass[first + i]);
    const xkd::SparseTeacher view = got.view();
    CHECK(view.rows == count);
    CHECK(view.k == 4);
  }
  CHECK_THAT(error_of([&] { reader.read(30, 8); }),
             ContainsAll({path.string(), "[30, 38)", "[0, 37)"}));
}

TEST_CASE("teacher logits refuse a damaged or mismatched file, naming it", "[io]") {
  TempDir dir("kept-teacher-logits");
  const auto path = dir / "logits";
  write_sample(path, 25);
  const auto index = (path / "index.json").string();

  SECTION("other k, vocabulary, temperature, tokenizer or data order") {
    TeacherLogitsHeader other = header_for(4, 50);
    other.k = 8;
    CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, other); }),
               ContainsAll({index, "\"k\"", "is 4 in the file", "expects 8"}));
    other = header_for(4, 64);
    CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, other); }),
               ContainsAll({index, "\"vocab_size\"", "50", "64"}));
    other = header_for(4, 50);
    other.temperature = 1.0;
    CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, other); }),
               ContainsAll({index, "\"temperature\"", "2", "1"}));
    other = header_for(4, 50);
    other.data_identity = teacher_data_identity(0xfeedu, 8);
    CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, other); }),
               ContainsAll({index, "\"data_identity\"", "seed 7", "seed 8"}));
    other = header_for(4, 50);
    other.tokenizer_hash = "fnv1a64:ffffffffffffffff";
    CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, other); }),
               ContainsAll({index, "\"tokenizer_hash\"", "0123456789abcdef", "ffffffffffffffff"}));
  }
  SECTION("a truncated shard is named when the file is opened") {
    const auto shard = path / "shard-00001.bin";
    std::filesystem::resize_file(shard, std::filesystem::file_size(shard) - 3);
    CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, header_for(4, 50)); }),
               ContainsAll({shard.string(), "truncated"}));
  }
  SECTION("a flipped byte is named when its shard is first read") {
    const auto shard = path / "shard-00002.bin";
    flip_byte(shard, 17);
    TeacherLogitsReader reader = TeacherLogitsReader::open(path, header_for(4, 50));
    CHECK(reader.read(0, 20).rows == 20);  // shards 0 and 1 are intact
    CHECK_THAT(error_of([&] { reader.read(18, 4); }),
               ContainsAll({shard.string(), "corrupt", "checksum"}));
  }
  SECTION("a missing shard") {
    std::filesystem::remove(path / "shard-00000.bin");
    CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, header_for(4, 50)); }),
               ContainsAll({(path / "shard-00000.bin").string(), "missing"}));
  }
  SECTION("an unknown format or version") {
    std::string text = read_file(path / "index.json");
    text.replace(text.find("\"version\": 1"), 12, "\"version\": 9");
    write_file(path / "index.json", text);
    CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, header_for(4, 50)); }),
               ContainsAll({index, "\"version\" is 9"}));
  }
}

TEST_CASE("an unfinished teacher-logits run leaves no index, and is refused", "[io]") {
  TempDir dir("kept-teacher-logits");
  const auto path = dir / "logits";
  {
    Random random(5);
    SparseTeacherRows rows;
    for (int p = 0; p < 15; ++p) {
      const auto logits = random_row(random, 50, false);
      append_teacher_top_k(logits.data(), 1, 50, 2.0, 4, rows);
    }
    TeacherLogitsWriter writer(path, header_for(4, 50), 10);
    writer.append(rows.view());
    // Destroyed without finish(): the killed run. The full shard is committed, the partial one
    // only ever existed under a hidden temporary name, and there is no index.
  }
  CHECK(std::filesystem::exists(path / "shard-00000.bin"));
  CHECK_FALSE(std::filesystem::exists(path / "shard-00001.bin"));
  CHECK_FALSE(std::filesystem::exists(path / "index.json"));
  for (const auto& entry : std::filesystem::directory_iterator(path))
    CHECK(entry.path().filename() == "shard-00000.bin");
  CHECK_THAT(error_of([&] { TeacherLogitsReader::open(path, header_for(4, 50)); }),
             ContainsAll({(path / "index.json").string(), "incomplete"}));

  // A finished file is not replaced by accident; force deletes its index before rewriting.
  write_sample(dir / "done", 5);
  CHECK_THAT(error_of([&] { TeacherLogitsWriter(dir / "done", header_for(4, 50), 10); }),
             ContainsAll({"done", "--force"}));
  {
    TeacherLogitsWriter writer(dir / "done", header_for(4, 50), 10, /*force=*/true);
    CHECK_FALSE(std::filesystem::exists(dir / "done" / "index.json"));
  }
}
