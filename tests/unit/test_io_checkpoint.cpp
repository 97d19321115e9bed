// HF checkpoint directories (single file and sharded, index validation) and the atomic file and
// directory helpers they are written with.
#include <catch2/catch.hpp>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/tensor.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/io/weights.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/tensors.hpp"

using namespace kept;
using namespace kept::test;
using Catch::Contains;

namespace {

// Ten tensors of 40..400 bytes, in a deliberately non-alphabetical order.
std::vector<NamedTensor> sample_tensors() {
  std::vector<NamedTensor> tensors;
  for (int i = 0; i < 10; ++i) {
    std::string name = "model.layers." + std::to_string(9 - i) + ".weight";
    tensors.push_back(
        {name, patterned_tensor(i % 2 ? DType::BF16 : DType::F32, {i + 1, 10}, 13, i)});
  }
  tensors.push_back({"lm_head.weight", patterned_tensor(DType::F16, {0, 4}, 13, 0)});
  return tensors;
}

void check_reads_back(const CheckpointReader& reader, const std::vector<NamedTensor>& tensors) {
  std::vector<std::string> expected;
  for (const auto& named : tensors)
    expected.push_back(named.name);
  CHECK(reader.names() == expected);
  for (const auto& named : tensors) {
    INFO(named.name);
    REQUIRE(reader.contains(named.name));
    CHECK(same_bytes(reader.tensor(named.name), named.tensor));
  }
}

// A two-shard checkpoint: shard 1 holds "a", shard 2 holds "b" and "c".
void write_two_shards(const TempDir& dir) {
  std::vector<NamedTensor> first = {{"a", patterned_tensor(DType::F32, {2}, 13, 1)}};
  std::vector<NamedTensor> second = {{"b", patterned_tensor(DType::F32, {3}, 13, 2)},
                                     {"c", patterned_tensor(DType::BF16, {4}, 13, 3)}};
  write_safetensors(dir / "model-00001-of-00002.safetensors", first, {{"format", "pt"}});
  write_safetensors(dir / "model-00002-of-00002.safetensors", second, {{"format", "pt"}});
}

std::string index_json(const std::string& weight_map) {
  return R"({"metadata": {"total_size": 28}, "weight_map": )" + weight_map + "}";
}

const std::string kGoodMap =
    R"({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"})";

}  // namespace

TEST_CASE("shard names and the split follow huggingface_hub", "[io][checkpoint]") {
  CHECK(shard_file_name(1, 3) == "model-00001-of-00003.safetensors");
  CHECK(shard_file_name(12, 123456) == "model-00012-of-123456.safetensors");

  std::vector<NamedTensor> tensors = {
      {"a", Tensor::empty(DType::U8, {40})},  {"b", Tensor::empty(DType::U8, {60})},
      {"c", Tensor::empty(DType::U8, {1})},   {"big", Tensor::empty(DType::U8, {500})},
      {"d", Tensor::empty(DType::U8, {100})}, {"e", Tensor::empty(DType::U8, {0})}};
  // a+b = 100 fits; c would tip over; big gets its own shard, in place.
  CHECK(plan_shards(tensors, 100) ==
        std::vector<std::vector<std::size_t>>{{0, 1}, {2}, {3}, {4, 5}});
  CHECK(plan_shards(tensors, 10000) == std::vector<std::vector<std::size_t>>{{0, 1, 2, 3, 4, 5}});
  CHECK(plan_shards(std::span<const NamedTensor>{}, 10) ==
        std::vector<std::vector<std::size_t>>{{}});
}

TEST_CASE("a checkpoint that fits one shard is model.safetensors", "[io][checkpoint]") {
  TempDir dir("kept-io-ck");
  std::vector<NamedTensor> tensors = sample_tensors();
  CHECK(write_checkpoint(dir.path(), tensors) == std::vector<std::string>{"model.safetensors"});
  CHECK(listing(dir.path()) == std::vector<std::string>{"model.safetensors"});
  CheckpointReader reader = CheckpointReader::open(dir.path());
  CHECK_FALSE(reader.sharded());
  check_reads_back(reader, tensors);
  CHECK(reader.file_of("lm_head.weight") == "model.safetensors");
  CHECK(SafetensorsFile(dir / "model.safetensors").metadata().at("format") == "pt");
}

TEST_CASE("a sharded checkpoint round trips with an HF-style index", "[io][checkpoint]") {
  TempDir dir("kept-io-ck");
  std::vector<NamedTensor> tensors = sample_tensors();
  std::uint64_t total = 0;
  for (const auto& named : tensors)
    total += named.tensor.nbytes();
  std::vector<std::string> files = write_checkpoint(dir.path(), tensors, 600);
  REQUIRE(files.size() > 2);
  const std::size_t shards = files.size() - 1;
  for (std::size_t i = 0; i < shards; ++i)
    CHECK(files[i] == shard_file_name(i + 1, shards));
  CHECK(files.back() == "model.safetensors.index.json");

  const std::string index_text = read_file(dir / "model.safetensors.index.json");
  CHECK(index_text.starts_with("{\n  \"metadata\": {\n    \"total_size\": "));
  CHECK(index_text.ends_with("}\n"));
  nlohmann::json index = nlohmann::json::parse(index_text);
  CHECK(index["metadata"]["total_size"] == total);
  CHECK(index["weight_map"].size() == tensors.size());

  CheckpointReader reader = CheckpointReader::open(dir.path());
  CHECK(reader.sharded());
  CHECK(reader.files() == std::vector<std::string>(files.begin(), files.end() - 1));
  check_reads_back(reader, tensors);
  for (const auto& named : tensors) {
    CHECK(reader.file_of(named.name) == index["weight_map"][named.name]);
    // Each shard holds at most 600 bytes unless a single tensor is larger.
    CHECK(std::filesystem::file_size(dir / reader.file_of(named.name)) < 600 + 1024);
  }
}

TEST_CASE("rewriting a checkpoint removes the other layout's weight files", "[io][checkpoint]") {
  TempDir dir("kept-io-ck");
  std::vector<NamedTensor> tensors = sample_tensors();
  write_file(dir / "config.json", "{}");
  write_checkpoint(dir.path(), tensors, 600);
  write_checkpoint(dir.path(), tensors);
  CHECK(listing(dir.path()) == std::vector<std::string>{"config.json", "model.safetensors"});
  std::vector<std::string> files = write_checkpoint(dir.path(), tensors, 1000);
  std::vector<std::string> expected = files;
  expected.push_back("config.json");
  std::sort(expected.begin(), expected.end());
  CHECK(listing(dir.path()) == expected);
  check_reads_back(CheckpointReader::open(dir.path()), tensors);
}

TEST_CASE("write_checkpoint rejects duplicate names before writing anything",
          "[io][checkpoint][errors]") {
  TempDir dir("kept-io-ck");
  std::vector<NamedTensor> tensors = {{"x", patterned_tensor(DType::F32, {100}, 13, 0)},
                                      {"y", patterned_tensor(DType::F32, {100}, 13, 0)},
                                      {"x", patterned_tensor(DType::F32, {100}, 13, 0)}};
  CHECK_THAT(error_of([&] { write_checkpoint(dir.path(), tensors, 500); }),
             Contains(dir.path().string()) && Contains("tensor \"x\"") && Contains("twice"));
  CHECK(listing(dir.path()).empty());
}

TEST_CASE("checkpoint reader names the directory and tensor when a tensor is absent",
          "[io][checkpoint][errors]") {
  TempDir dir("kept-io-ck");
  write_checkpoint(dir.path(), sample_tensors());
  CheckpointReader single = CheckpointReader::open(dir.path());
  CHECK_FALSE(single.contains("nope"));
  CHECK_THAT(error_of([&] { single.tensor("nope"); }),
             Contains(dir.path().string()) && Contains("tensor \"nope\" not found") &&
                 Contains("model.safetensors holds 11 tensors"));
  CHECK_THAT(error_of([&] { single.file_of("nope"); }), Contains("tensor \"nope\""));

  TempDir sharded_dir("kept-io-ck");
  write_two_shards(sharded_dir);
  write_file(sharded_dir / "model.safetensors.index.json", index_json(kGoodMap));
  CheckpointReader sharded = CheckpointReader::open(sharded_dir.path());
  CHECK(sharded.names() == std::vector<std::string>{"a", "b", "c"});
  CHECK_THAT(error_of([&] { sharded.tensor("d"); }),
             Contains(sharded_dir.path().string()) && Contains("tensor \"d\" not found") &&
                 Contains("model.safetensors.index.json maps 3 tensors"));
}

TEST_CASE("checkpoint reader rejects directories without exactly one layout",
          "[io][checkpoint][errors]") {
  TempDir dir("kept-io-ck");
  CHECK_THAT(error_of([&] { CheckpointReader::open(dir / "missing"); }),
             Contains((dir / "missing").string()) && Contains("does not exist"));
  write_file(dir / "file", "x");
  CHECK_THAT(error_of([&] { CheckpointReader::open(dir / "file"); }),
             Contains((dir / "file").string()) && Contains("not a directory"));
  CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }),
             Contains(dir.path().string()) && Contains("no model.safetensors or"));
  write_two_shards(dir);
  write_file(dir / "model.safetensors.index.json", index_json(kGoodMap));
  write_checkpoint(dir / "single", sample_tensors());
  std::filesystem::copy_file(dir / "single" / "model.safetensors", dir / "model.safetensors");
  CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }),
             Contains(dir.path().string()) && Contains("holds both") && Contains("ambiguous"));
}

TEST_CASE("checkpoint reader validates the shard index", "[io][checkpoint][errors]") {
  TempDir dir("kept-io-ck");
  write_two_shards(dir);
  const std::string index_path = (dir / "model.safetensors.index.json").string();
  auto open_with = [&](const std::string& text) {
    write_file(dir / "model.safetensors.index.json", text);
    return error_of([&] { CheckpointReader::open(dir.path()); });
  };
  const std::string shard1 = "model-00001-of-00002.safetensors";
  const std::string shard2 = "model-00002-of-00002.safetensors";

  SECTION("not an index") {
    CHECK_THAT(open_with("{\"weight_map\": "), Contains(index_path) && Contains("not valid JSON"));
    CHECK_THAT(open_with("[]"),
               Contains(index_path) && Contains("top level must be a JSON object"));
    CHECK_THAT(open_with(R"({"metadata": {}})"),
               Contains(index_path) && Contains("missing \"weight_map\""));
    CHECK_THAT(open_with(R"({"weight_map": ["a"]})"),
               Contains(index_path) && Contains("\"weight_map\" must be an object"));
    CHECK_THAT(open_with(R"({"weight_map": {}})"), Contains(index_path) && Contains("is empty"));
    CHECK_THAT(open_with(R"({"metadata": 5, "weight_map": {"a": "x"}})"),
               Contains(index_path) && Contains("\"metadata\" must be an object"));
    CHECK_THAT(open_with(R"({"weight_map": {"a": 1}})"),
               Contains(index_path) && Contains("tensor \"a\"") && Contains("must be a string"));
  }
  SECTION("a tensor listed twice") {
    CHECK_THAT(open_with(index_json(R"({"a": ")" + shard1 + R"(", "a": ")" + shard2 + R"("})")),
               Contains(index_path) && Contains("duplicate key \"a\" inside \"weight_map\""));
  }
  SECTION("file names that escape the directory") {
    for (std::string name : {"../model-00001-of-00002.safetensors", "sub/x.safetensors", "..",
                             "/etc/passwd", "", "a\\\\b"}) {
      INFO(name);
      CHECK_THAT(open_with(index_json(R"({"a": ")" + name + R"("})")),
                 Contains(index_path) && Contains("tensor \"a\"") &&
                     Contains("must be a plain file name"));
    }
  }
  SECTION("index pointing at a missing file") {
    CHECK_THAT(open_with(index_json(R"({"a": ")" + shard1 +
                                    R"(", "b": "model-00003-of-00003.safetensors"})")),
               Contains(index_path) && Contains("tensor \"b\"") &&
                   Contains("model-00003-of-00003.safetensors") && Contains("does not exist"));
  }
  SECTION("a tensor missing from its shard") {
    CHECK_THAT(open_with(index_json(R"({"a": ")" + shard1 + R"(", "b": ")" + shard2 +
                                    R"(", "c": ")" + shard2 + R"(", "d": ")" + shard2 + R"("})")),
               Contains((dir / shard2).string()) && Contains("tensor \"d\" is missing") &&
                   Contains("model.safetensors.index.json maps it to this file"));
  }
  SECTION("a shard holding a tensor the index does not list") {
    CHECK_THAT(
        open_with(index_json(R"({"a": ")" + shard1 + R"(", "b": ")" + shard2 + R"("})")),
        Contains((dir / shard2).string()) && Contains("tensor \"c\"") && Contains("does not list"));
  }
  SECTION("a tensor in two shards") {
    std::vector<NamedTensor> second = {{"a", patterned_tensor(DType::F32, {2}, 13, 1)},
                                       {"b", patterned_tensor(DType::F32, {3}, 13, 2)},
                                       {"c", patterned_tensor(DType::BF16, {4}, 13, 3)}};
    write_safetensors(dir / shard2, second);
    CHECK_THAT(open_with(index_json(kGoodMap)), Contains((dir / shard2).string()) &&
                                                    Contains("tensor \"a\"") && Contains(shard1) &&
                                                    Contains("two shards"));
  }
  SECTION("a corrupt shard is reported with its own path") {
    write_file(dir / shard2, "garbage!garbage!");
    CHECK_THAT(open_with(index_json(kGoodMap)),
               Contains((dir / shard2).string()) && Contains("header"));
  }
  SECTION("the valid index opens") {
    write_file(dir / "model.safetensors.index.json", index_json(kGoodMap));
    CheckpointReader reader = CheckpointReader::open(dir.path());
    CHECK(reader.file_of("c") == shard2);
    CHECK(reader.tensor("c").dtype() == DType::BF16);
  }
}

// ---- atomic files and directories ----------------------------------------------------------

TEST_CASE("atomic file replaces the destination only on commit", "[io][atomic]") {
  TempDir dir("kept-io-ck");
  write_file_atomically(dir / "f.txt", "first");
  CHECK(read_file(dir / "f.txt") == "first");
  write_file_atomically(dir / "f.txt", "second");
  CHECK(read_file(dir / "f.txt") == "second");
  {
    AtomicFile file(dir / "f.txt");
    file.write("third, never committed");
    CHECK(std::filesystem::exists(file.temp_path()));
    CHECK(file.temp_path().parent_path() == dir.path());
    CHECK(file.temp_path().filename().string().starts_with(".f.txt.tmp-"));
  }  // destroyed without commit, as when an exception unwinds
  CHECK(read_file(dir / "f.txt") == "second");
  CHECK(listing(dir.path()) == std::vector<std::string>{"f.txt"});
}

TEST_CASE("a failing atomic write leaves the previous file intact and no temporary",
          "[io][atomic][errors]") {
  TempDir dir("kept-io-ck");
  write_file_atomically(dir / "weights.safetensors", "previous contents");

  SECTION("the disk fills up part-way (simulated with RLIMIT_FSIZE)") {
    std::string big(1 << 20, 'x');
    std::string message;
    {
      FileSizeLimit limit(64 << 10);
      message = error_of([&] { write_file_atomically(dir / "weights.safetensors", big); });
    }
    CHECK_THAT(message, Contains((dir / "weights.safetensors").string()) &&
                            Contains("cannot write") && Contains("File too large"));
  }
  SECTION("the same through write_safetensors") {
    std::vector<NamedTensor> tensors = {{"w", patterned_tensor(DType::F32, {1 << 16}, 13, 0)}};
    std::string message;
    {
      FileSizeLimit limit(16 << 10);
      message = error_of([&] { write_safetensors(dir / "weights.safetensors", tensors); });
    }
    CHECK_THAT(message,
               Contains((dir / "weights.safetensors").string()) && Contains("File too large"));
  }
  SECTION("the parent is a file") {
    CHECK_THAT(
        error_of([&] { write_file_atomically(dir / "weights.safetensors" / "x", "new"); }),
        Contains((dir / "weights.safetensors" / "x").string()) && Contains("Not a directory"));
  }
  SECTION("the parent does not exist") {
    CHECK_THAT(error_of([&] { write_file_atomically(dir / "no" / "x", "new"); }),
               Contains((dir / "no" / "x").string()) && Contains("No such file or directory"));
  }
  SECTION("the final rename fails (destination is a non-empty directory)") {
    std::filesystem::create_directory(dir / "occupied");
    write_file(dir / "occupied" / "inner", "keep me");
    CHECK_THAT(error_of([&] { write_file_atomically(dir / "occupied", "new"); }),
               Contains((dir / "occupied").string()) && Contains("cannot rename") &&
                   Contains("Is a directory"));
    CHECK(read_file(dir / "occupied" / "inner") == "keep me");
    std::filesystem::remove_all(dir / "occupied");
  }
  CHECK(read_file(dir / "weights.safetensors") == "previous contents");
  CHECK(listing(dir.path()) == std::vector<std::string>{"weights.safetensors"});
}

TEST_CASE("atomic directory appears only at commit", "[io][atomic]") {
  TempDir dir("kept-io-ck");
  const auto destination = dir / "out";
  {
    AtomicDirectory output(destination);
    CHECK_FALSE(std::filesystem::exists(destination));
    write_file_atomically(output.path() / "config.json", "{}");
    write_checkpoint(output.path(), sample_tensors(), 600);
    CHECK_FALSE(std::filesystem::exists(destination));
    output.commit();
    CHECK(output.committed());
  }
  CHECK(read_file(destination / "config.json") == "{}");
  check_reads_back(CheckpointReader::open(destination), sample_tensors());
  CHECK(listing(dir.path()) == std::vector<std::string>{"out"});

  SECTION("abandoned: nothing appears and the temporary directory is removed") {
    {
      AtomicDirectory output(dir / "abandoned/");  // a trailing separator names the same directory
      write_file_atomically(output.path() / "partial", "x");
      CHECK(output.destination().filename() == "abandoned");
    }
    CHECK(listing(dir.path()) == std::vector<std::string>{"out"});
  }
  SECTION("an existing destination is refused without force") {
    CHECK_THAT(error_of([&] { AtomicDirectory again(destination); }),
               Contains(destination.string()) && Contains("already exists"));
    CHECK(listing(dir.path()) == std::vector<std::string>{"out"});
  }
  SECTION("a destination that appears while building is refused at commit") {
    AtomicDirectory late(dir / "late");
    std::filesystem::create_directory(dir / "late");
    CHECK_THAT(error_of([&] { late.commit(); }),
               Contains((dir / "late").string()) && Contains("already exists"));
    CHECK(std::filesystem::is_empty(dir / "late"));
  }
  SECTION("force replaces the old directory entirely") {
    {
      AtomicDirectory output(destination, /*force=*/true);
      write_file_atomically(output.path() / "new.txt", "new");
      CHECK(std::filesystem::exists(destination / "config.json"));  // untouched until commit
      output.commit();
    }
    CHECK(listing(destination) == std::vector<std::string>{"new.txt"});
    CHECK(listing(dir.path()) == std::vector<std::string>{"out"});
  }
  SECTION("force does not replace a file") {
    write_file(dir / "plain", "x");
    CHECK_THAT(error_of([&] { AtomicDirectory output(dir / "plain", true); }),
               Contains((dir / "plain").string()) && Contains("not a directory"));
  }
}

TEST_CASE("only per-layer RoPE frequency buffers are ignorable checkpoint tensors",
          "[io][checkpoint]") {
  CHECK(kept::is_ignorable_checkpoint_tensor("model.layers.0.self_attn.rotary_emb.inv_freq"));
  CHECK(kept::is_ignorable_checkpoint_tensor("model.layers.39.self_attn.rotary_emb.inv_freq"));
  CHECK_FALSE(kept::is_ignorable_checkpoint_tensor("model.layers..self_attn.rotary_emb.inv_freq"));
  CHECK_FALSE(kept::is_ignorable_checkpoint_tensor("model.layers.x.self_attn.rotary_emb.inv_freq"));
  CHECK_FALSE(
      kept::is_ignorable_checkpoint_tensor("model.layers.1.self_attn.rotary_emb.inv_freqs"));
  CHECK_FALSE(kept::is_ignorable_checkpoint_tensor("model.rotary_emb.inv_freq"));
  CHECK_FALSE(kept::is_ignorable_checkpoint_tensor("model.layers.0.self_attn.q_proj.weight"));
}
