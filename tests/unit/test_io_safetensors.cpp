// The safetensors reader and writer: round trips, files crafted byte by byte against the spec,
// a golden file from the Python library, and every malformed header the reader must reject
// (each error must be a kept::Error naming the file and the tensor or "header").
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kept/core/tensor.hpp"
#include "kept/io/safetensors.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"
#include "support/tensors.hpp"

using namespace kept;
using namespace kept::test;
using Catch::Contains;

namespace {

std::string length_prefix(std::uint64_t length) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i)
    bytes[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  return bytes;
}

// A safetensors file: prefix, the JSON exactly as given (no padding), the data bytes.
std::string craft(const std::string& json, const std::string& data = "") {
  return length_prefix(json.size()) + json + data;
}

template <class T>
std::string raw_bytes(std::initializer_list<T> values) {
  std::string bytes;
  for (T value : values)
    bytes.append(reinterpret_cast<const char*>(&value), sizeof(T));
  return bytes;
}

// Writes `bytes` to a file and returns the message of opening it.
std::string open_error(const TempDir& dir, const std::string& bytes,
                       const std::string& name = "bad.safetensors") {
  write_file(dir / name, bytes);
  return error_of([&] { SafetensorsFile file(dir / name); });
}

}  // namespace

TEST_CASE("safetensors round trip keeps dtypes, shapes, bytes, order and metadata",
          "[io][safetensors]") {
  TempDir dir("kept-io-st");
  std::vector<NamedTensor> tensors = {
      {"model.embed_tokens.weight", patterned_tensor(DType::F32, {3, 5}, 7, 3)},
      {"bf16", patterned_tensor(DType::BF16, {7}, 7, 3)},
      {"f16", patterned_tensor(DType::F16, {2, 3, 1}, 7, 3)},
      {"ids", patterned_tensor(DType::I64, {4}, 7, 3)},
      {"zero_rows", Tensor::empty(DType::F32, {0, 4})},
      {"i32", patterned_tensor(DType::I32, {3}, 7, 3)},
      {"bytes", patterned_tensor(DType::U8, {5}, 7, 3)},
      {"flags", patterned_tensor(DType::Bool, {3}, 7, 3)},
      {"double", patterned_tensor(DType::F64, {2}, 7, 3)},
      {"scalar", patterned_tensor(DType::F32, {}, 7, 3)},
      {"zero_last", Tensor::empty(DType::BF16, {2, 0})},
  };
  SafetensorsMetadata metadata{{"format", "pt"}, {"note", "h\u00e9llo \"quoted\"\n"}};
  write_safetensors(dir / "t.safetensors", tensors, metadata);

  SafetensorsFile file(dir / "t.safetensors");
  CHECK(file.metadata() == metadata);
  REQUIRE(file.size() == tensors.size());
  std::vector<std::string> expected_names;
  for (const auto& named : tensors)
    expected_names.push_back(named.name);
  CHECK(file.names() == expected_names);
  for (const auto& named : tensors) {
    INFO(named.name);
    REQUIRE(file.contains(named.name));
    CHECK(same_bytes(file.tensor(named.name), named.tensor));
  }
  // The data region starts 8-byte aligned, as the Python library lays it out.
  CHECK(file.header().data_start() % 8 == 0);
  CHECK(file.header().json_bytes % 8 == 0);
}

TEST_CASE("safetensors bf16 round trip is bit-exact, NaN payloads and signed zeros included",
          "[io][safetensors]") {
  TempDir dir("kept-io-st");
  std::vector<std::uint16_t> bits;
  for (std::uint32_t value = 0; value < 0x10000; value += 1)
    bits.push_back(static_cast<std::uint16_t>(value));
  Tensor tensor = Tensor::empty(DType::BF16, {static_cast<std::int64_t>(bits.size())});
  std::memcpy(tensor.raw(), bits.data(), bits.size() * 2);
  std::vector<NamedTensor> tensors = {{"all_bf16_patterns", tensor}};
  write_safetensors(dir / "bf16.safetensors", tensors);
  SafetensorsFile file(dir / "bf16.safetensors");
  const Tensor& read = file.tensor("all_bf16_patterns");
  REQUIRE(read.numel() == 0x10000);
  CHECK(std::memcmp(read.raw(), bits.data(), bits.size() * 2) == 0);
}

TEST_CASE("safetensors writer output equals the Python safetensors library's bytes",
          "[io][safetensors]") {
  // Produced by safetensors 0.8.0: save_file({"w": f32 [1.5, -2], "bias": bf16 [1, -0.5, 3],
  // "empty": int64 zeros (0, 3)}, metadata={"format": "pt"}). The library orders tensors by
  // dtype size, so the same order is given here; note the six padding spaces.
  const std::string golden =
      std::string("\xd0\0\0\0\0\0\0\0", 8) +
      R"({"__metadata__":{"format":"pt"},"empty":{"dtype":"I64","shape":[0,3],"data_offsets":[0,0]},)"
      R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("bias":{"dtype":"BF16","shape":[3],"data_offsets":[8,14]}}      )" +
      std::string("\x00\x00\xc0\x3f\x00\x00\x00\xc0\x80\x3f\x00\xbf\x40\x40", 14);
  REQUIRE(golden.size() == 230);

  Tensor w = Tensor::empty(DType::F32, {2});
  w.data<float>()[0] = 1.5f;
  w.data<float>()[1] = -2.0f;
  Tensor bias = Tensor::empty(DType::BF16, {3});
  bias.data<bf16>()[0] = to_bf16(1.0f);
  bias.data<bf16>()[1] = to_bf16(-0.5f);
  bias.data<bf16>()[2] = to_bf16(3.0f);
  std::vector<NamedTensor> tensors = {
      {"empty", Tensor::empty(DType::I64, {0, 3})}, {"w", w}, {"bias", bias}};
  TempDir dir("kept-io-st");
  write_safetensors(dir / "mine.safetensors", tensors, {{"format", "pt"}});
  CHECK(read_file(dir / "mine.safetensors") == golden);

  write_file(dir / "golden.safetensors", golden);
  SafetensorsFile file(dir / "golden.safetensors");
  CHECK(file.tensor("w").data<float>()[1] == -2.0f);
  CHECK(to_float(file.tensor("bias").data<bf16>()[1]) == -0.5f);
  CHECK(file.tensor("empty").shape() == Shape{0, 3});
  CHECK(file.metadata().at("format") == "pt");
}

TEST_CASE("safetensors reader accepts hand-made files the spec allows", "[io][safetensors]") {
  TempDir dir("kept-io-st");
  SECTION("no padding, misaligned data: values are right and typed access is aligned") {
    // Trailing spaces are legal padding; pad so that the F32 data starts misaligned.
    std::string json =
        R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"U8","shape":[1],"data_offsets":[8,9]}})";
    while ((8 + json.size()) % 4 != 1)
      json += ' ';
    write_file(dir / "a.safetensors", craft(json, raw_bytes({0.25f, -8.0f}) + "\x2a"));
    SafetensorsFile file(dir / "a.safetensors");
    REQUIRE((8 + json.size()) % 4 != 0);
    const Tensor& x = file.tensor("x");
    CHECK(reinterpret_cast<std::uintptr_t>(x.raw()) % alignof(float) == 0);
    CHECK(x.data<float>()[0] == 0.25f);
    CHECK(x.data<float>()[1] == -8.0f);
    CHECK(file.tensor("y").data<std::uint8_t>()[0] == 42);
  }
  SECTION("trailing space padding, header order differs from data order") {
    std::string json =
        R"({"late":{"dtype":"F16","shape":[1],"data_offsets":[4,6]},"early":{"dtype":"F32","shape":[],"data_offsets":[0,4]}})";
    json.append(5, ' ');
    write_file(dir / "b.safetensors",
               craft(json, raw_bytes({1.0f}) + raw_bytes<std::uint16_t>({0x3c00})));
    SafetensorsFile file(dir / "b.safetensors");
    CHECK(file.names() == std::vector<std::string>{"early", "late"});
    CHECK(file.tensor("early").rank() == 0);
    CHECK(file.tensor("early").data<float>()[0] == 1.0f);
    CHECK(to_float(file.tensor("late").data<f16>()[0]) == 1.0f);
  }
  SECTION("empty header, metadata only, zero-size tensors sharing an offset") {
    write_file(dir / "c.safetensors", craft("{}"));
    CHECK(SafetensorsFile(dir / "c.safetensors").size() == 0);
    write_file(dir / "d.safetensors", craft(R"({"__metadata__":{"a":"b"}})"));
    CHECK(SafetensorsFile(dir / "d.safetensors").metadata().at("a") == "b");
    write_file(
        dir / "e.safetensors",
        craft(
            R"({"z1":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"v":{"dtype":"I8","shape":[2],"data_offsets":[0,2]},"z2":{"dtype":"BF16","shape":[3,0],"data_offsets":[2,2]},"z3":{"dtype":"I64","shape":[0,99999999999],"data_offsets":[2,2]}})",
            "\x01\x02"));
    SafetensorsFile file(dir / "e.safetensors");
    CHECK(file.names() == std::vector<std::string>{"z1", "v", "z2", "z3"});
    CHECK(file.tensor("z3").numel() == 0);
  }
}

TEST_CASE("safetensors tensors are zero-copy views that outlive the file object",
          "[io][safetensors]") {
  TempDir dir("kept-io-st");
  std::vector<NamedTensor> tensors = {{"a", patterned_tensor(DType::F32, {4}, 7, 3)},
                                      {"b", patterned_tensor(DType::F32, {2}, 7, 3)}};
  write_safetensors(dir / "v.safetensors", tensors);
  Tensor kept_alive;
  {
    SafetensorsFile file(dir / "v.safetensors");
    CHECK(file.tensor("a").storage() == file.tensor("b").storage());  // one mapping
    CHECK(file.tensor("a").storage()->bytes() == std::filesystem::file_size(dir / "v.safetensors"));
    kept_alive = file.tensor("b");
  }
  CHECK(same_bytes(kept_alive, tensors[1].tensor));
  // The mapping is private: writing into a view never reaches the file.
  const std::string before = read_file(dir / "v.safetensors");
  kept_alive.data<float>()[0] = 123.0f;
  CHECK(read_file(dir / "v.safetensors") == before);
}

TEST_CASE("safetensors reader rejects a bad length prefix", "[io][safetensors][errors]") {
  TempDir dir("kept-io-st");
  const std::string path = (dir / "bad.safetensors").string();
  CHECK_THAT(open_error(dir, ""),
             Contains(path) && Contains("header") && Contains("shorter than the 8-byte"));
  CHECK_THAT(open_error(dir, std::string("\x05\0\0\0", 4), "short.safetensors"),
             Contains((dir / "short.safetensors").string()) && Contains("file is 4 bytes"));
  CHECK_THAT(open_error(dir, length_prefix(100) + "{}"),
             Contains(path) && Contains("header length 100 runs past the end of the file"));
  CHECK_THAT(open_error(dir, length_prefix((100ull << 20) + 1) + "{}"),
             Contains(path) && Contains("header") && Contains("100 MiB"));
  CHECK_THAT(open_error(dir, length_prefix(~0ull) + "{}"), Contains(path) && Contains("100 MiB"));
}

TEST_CASE("safetensors reader rejects headers that are not a JSON object",
          "[io][safetensors][errors]") {
  TempDir dir("kept-io-st");
  const std::string path = (dir / "bad.safetensors").string();
  CHECK_THAT(open_error(dir, craft(R"({"a": )")),
             Contains(path) && Contains("header: not valid JSON"));
  CHECK_THAT(open_error(dir, craft("{\"a\":\"\xff\"}")),
             Contains(path) && Contains("not valid JSON"));
  CHECK_THAT(open_error(dir, craft("{}garbage")), Contains(path) && Contains("not valid JSON"));
  CHECK_THAT(open_error(dir, craft("[1, 2]")),
             Contains(path) && Contains("header") && Contains("must start with '{'"));
  CHECK_THAT(open_error(dir, craft(" {}")), Contains(path) && Contains("must start with '{'"));
  CHECK_THAT(open_error(dir, craft("")), Contains(path) && Contains("an empty header"));
  CHECK_THAT(open_error(dir, craft("\"text\"")), Contains(path) && Contains("must start with '{'"));
}

TEST_CASE("safetensors reader rejects duplicate names and keys", "[io][safetensors][errors]") {
  TempDir dir("kept-io-st");
  const std::string path = (dir / "bad.safetensors").string();
  const std::string entry = R"({"dtype":"U8","shape":[1],"data_offsets":[0,1]})";
  CHECK_THAT(open_error(dir, craft(R"({"w":)" + entry + R"(,"w":)" + entry + "}", "\x01")),
             Contains(path) && Contains("duplicate tensor name \"w\""));
  CHECK_THAT(
      open_error(dir, craft(R"({"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}})",
                            "\x01")),
      Contains(path) && Contains("duplicate key \"dtype\" inside \"w\""));
  CHECK_THAT(open_error(dir, craft(R"({"__metadata__":{"k":"a","k":"b"}})")),
             Contains(path) && Contains("duplicate key \"k\" inside \"__metadata__\""));
  CHECK_THAT(open_error(dir, craft(R"({"__metadata__":{},"__metadata__":{}})")),
             Contains(path) && Contains("duplicate tensor name \"__metadata__\""));
}

TEST_CASE("safetensors reader rejects malformed entries, naming the tensor",
          "[io][safetensors][errors]") {
  TempDir dir("kept-io-st");
  const std::string path = (dir / "bad.safetensors").string();
  auto bad = [&](const std::string& entry_json, const std::string& data = "\x01\x02\x03\x04") {
    return open_error(dir, craft(R"({"t.w":)" + entry_json + "}", data));
  };
  const ContainsAll names_tensor({path, "tensor \"t.w\""});

  CHECK_THAT(bad("5"), names_tensor && Contains("expected an object") && Contains("number 5"));
  CHECK_THAT(bad(R"({"shape":[4],"data_offsets":[0,4]})"),
             names_tensor && Contains("missing \"dtype\""));
  CHECK_THAT(bad(R"({"dtype":"U8","data_offsets":[0,4]})"),
             names_tensor && Contains("missing \"shape\""));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[4]})"),
             names_tensor && Contains("missing \"data_offsets\""));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[4],"data_offsets":[0,4],"extra":1})"),
             names_tensor && Contains("unexpected key \"extra\""));

  CHECK_THAT(bad(R"({"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]})"),
             names_tensor && Contains("unknown dtype") && Contains("F8_E4M3"));
  CHECK_THAT(bad(R"({"dtype":"f32","shape":[1],"data_offsets":[0,4]})"),
             names_tensor && Contains("unknown dtype"));
  CHECK_THAT(bad(R"({"dtype":4,"shape":[4],"data_offsets":[0,4]})"),
             names_tensor && Contains("\"dtype\" must be a string") && Contains("number 4"));

  CHECK_THAT(bad(R"({"dtype":"U8","shape":4,"data_offsets":[0,4]})"),
             names_tensor && Contains("\"shape\" must be an array"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[-4],"data_offsets":[0,4]})"),
             names_tensor && Contains("non-negative integers") && Contains("number -4"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[4.0],"data_offsets":[0,4]})"),
             names_tensor && Contains("non-negative integers") && Contains("number 4.0"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":["4"],"data_offsets":[0,4]})"),
             names_tensor && Contains("non-negative integers") && Contains("string \"4\""));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[99999999999999999999999],"data_offsets":[0,4]})"),
             names_tensor && Contains("non-negative integers"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[9223372036854775808],"data_offsets":[0,4]})"),
             names_tensor && Contains("non-negative integers"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[1,1,1,1,1,1,1,1,4],"data_offsets":[0,4]})"),
             names_tensor && Contains("9 dimensions"));
  CHECK_THAT(bad(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]})"),
             names_tensor && Contains("overflows"));
  CHECK_THAT(bad(R"({"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]})"),
             names_tensor && Contains("overflows"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[[4]],"data_offsets":[0,4]})"),
             Contains(path) && Contains("nests deeper") && Contains("\"t.w\""));

  CHECK_THAT(bad(R"({"dtype":"U8","shape":[4],"data_offsets":"0-4"})"),
             names_tensor && Contains("\"data_offsets\" must be an array [begin, end]"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[4],"data_offsets":[0,2,4]})"),
             names_tensor && Contains("\"data_offsets\" must be an array [begin, end]") &&
                 Contains("3 elements"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[4],"data_offsets":[-1,3]})"),
             names_tensor && Contains("two non-negative integers"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[4],"data_offsets":[0,4.5]})"),
             names_tensor && Contains("two non-negative integers"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[0],"data_offsets":[4,0]})"),
             names_tensor && Contains("[4, 0] has begin after end"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[8],"data_offsets":[0,8]})"),
             names_tensor && Contains("run past the data region of 4 bytes"));
  CHECK_THAT(bad(R"({"dtype":"F32","shape":[2],"data_offsets":[0,4]})"),
             names_tensor && Contains("span 4 bytes") && Contains("needs 8"));
  CHECK_THAT(bad(R"({"dtype":"U8","shape":[4],"data_offsets":[0,18446744073709551615]})"),
             names_tensor && Contains("run past the data region"));
}

TEST_CASE("safetensors reader requires the tensors to tile the data region",
          "[io][safetensors][errors]") {
  TempDir dir("kept-io-st");
  const std::string path = (dir / "bad.safetensors").string();
  CHECK_THAT(
      open_error(
          dir,
          craft(
              R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
              "abcd")),
      Contains(path) && Contains("tensor \"b\"") && Contains("overlap tensor \"a\""));
  CHECK_THAT(
      open_error(
          dir,
          craft(
              R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"z":{"dtype":"U8","shape":[0],"data_offsets":[2,2]}})",
              "abcd")),
      Contains(path) && Contains("tensor \"z\"") && Contains("overlap"));
  CHECK_THAT(
      open_error(
          dir,
          craft(
              R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[3,4]}})",
              "abcd")),
      Contains(path) && Contains("tensor \"b\"") && Contains("gap of 1 unused bytes"));
  CHECK_THAT(
      open_error(dir, craft(R"({"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})", "abcd")),
      Contains(path) && Contains("tensor \"b\"") && Contains("gap of 2"));
  CHECK_THAT(
      open_error(dir, craft(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "abcd")),
      Contains(path) && Contains("header") && Contains("2 trailing bytes"));
  CHECK_THAT(open_error(dir, craft("{}", "x")), Contains(path) && Contains("1 trailing bytes"));
}

TEST_CASE("safetensors reader validates __metadata__", "[io][safetensors][errors]") {
  TempDir dir("kept-io-st");
  const std::string path = (dir / "bad.safetensors").string();
  CHECK_THAT(open_error(dir, craft(R"({"__metadata__":["a"]})")),
             Contains(path) && Contains("header") &&
                 Contains("\"__metadata__\" must be an object of string to string") &&
                 Contains("an array of 1 elements"));
  CHECK_THAT(
      open_error(dir, craft(R"({"__metadata__":{"format":1}})")),
      Contains(path) && Contains("key \"format\" must map to a string") && Contains("number 1"));
  CHECK_THAT(open_error(dir, craft(R"({"__metadata__":{"format":null}})")),
             Contains(path) && Contains("key \"format\"") && Contains("null"));
  CHECK_THAT(open_error(dir, craft(R"({"__metadata__":{"nested":{"a":"b"}}})")),
             Contains(path) && Contains("key \"nested\"") && Contains("an object with 1 keys"));
}

TEST_CASE("safetensors reader names a missing tensor and a missing file",
          "[io][safetensors][errors]") {
  TempDir dir("kept-io-st");
  std::vector<NamedTensor> tensors = {{"present", patterned_tensor(DType::F32, {2}, 7, 3)}};
  write_safetensors(dir / "t.safetensors", tensors);
  SafetensorsFile file(dir / "t.safetensors");
  CHECK_FALSE(file.contains("absent"));
  CHECK_THAT(error_of([&] { file.tensor("absent"); }),
             Contains((dir / "t.safetensors").string()) && Contains("tensor \"absent\" not found"));
  CHECK_THAT(
      error_of([&] { SafetensorsFile missing(dir / "nope.safetensors"); }),
      Contains((dir / "nope.safetensors").string()) && Contains("No such file or directory"));
  CHECK_THAT(error_of([&] { SafetensorsFile directory(dir.path()); }),
             Contains(dir.path().string()) && Contains("not a regular file"));
}

TEST_CASE("safetensors writer rejects bad input, naming the file and tensor",
          "[io][safetensors][errors]") {
  TempDir dir("kept-io-st");
  const std::string path = (dir / "out.safetensors").string();
  auto write = [&](std::vector<NamedTensor> tensors, SafetensorsMetadata metadata = {}) {
    return error_of([&] { write_safetensors(dir / "out.safetensors", tensors, metadata); });
  };
  Tensor t = patterned_tensor(DType::F32, {2}, 7, 3);
  CHECK_THAT(write({{"a", t}, {"b", t}, {"a", t}}),
             Contains(path) && Contains("tensor \"a\"") && Contains("given twice"));
  CHECK_THAT(write({{"__metadata__", t}}), Contains(path) && Contains("reserved"));
  CHECK_THAT(write({{"undefined", Tensor()}}),
             Contains(path) && Contains("tensor \"undefined\"") && Contains("undefined"));
  CHECK_THAT(write({{std::string("bad\xff"), t}}), Contains(path) && Contains("not valid UTF-8"));
  CHECK_THAT(write({{"a", t}}, {{"k", std::string("\xc3")}}),
             Contains(path) && Contains("metadata value") && Contains("not valid UTF-8"));
  CHECK_FALSE(std::filesystem::exists(dir / "out.safetensors"));
  CHECK(std::filesystem::is_empty(dir.path()));  // no temporary files left behind
}

TEST_CASE("safetensors header parser only ever throws kept::Error on mutated input",
          "[io][safetensors][errors]") {
  // A cheap in-process complement to the libFuzzer target in tests/fuzz.
  std::vector<NamedTensor> tensors = {{"a", patterned_tensor(DType::F32, {2, 2}, 7, 3)},
                                      {"b", patterned_tensor(DType::BF16, {3}, 7, 3)}};
  TempDir dir("kept-io-st");
  write_safetensors(dir / "seed.safetensors", tensors, {{"format", "pt"}});
  const std::string seed = read_file(dir / "seed.safetensors");
  std::mt19937 random(1234);
  int accepted = 0;
  for (int round = 0; round < 3000; ++round) {
    std::vector<char> input(seed.begin(), seed.end());
    int edits = 1 + static_cast<int>(random() % 4);
    for (int e = 0; e < edits; ++e) {
      const auto at = static_cast<std::ptrdiff_t>(random() % input.size());
      switch (random() % 3) {
        case 0:
          input[at] = static_cast<char>(random());
          break;
        case 1:
          input.erase(
              input.begin() + at,
              input.begin() + std::min<std::ptrdiff_t>(at + 1 + random() % 3, std::ssize(input)));
          break;
        default:
          input.insert(input.begin() + at, "{}[],:\"0123456789 -"[random() % 19]);
          break;
      }
      if (input.empty()) input.push_back('x');
    }
    try {
      SafetensorsHeader header =
          parse_safetensors_header(std::as_bytes(std::span(input.data(), input.size())), "mutated");
      std::uint64_t covered = 0;
      for (const auto& entry : header.tensors)
        covered += entry.end - entry.begin;
      REQUIRE(covered == header.data_bytes);
      ++accepted;
    } catch (const kept::Error& error) {
      REQUIRE_THAT(error.what(), Contains("mutated"));
    }
  }
  CHECK(accepted > 0);  // some mutations (e.g. inside the data) stay valid
}
