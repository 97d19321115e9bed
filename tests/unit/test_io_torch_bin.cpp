// PyTorch .bin checkpoints: the zip reader, the restricted pickle VM and the checkpoint readers,
// against real torch.save outputs (tests/data/torch_bin, made by
// tests/python/make_torch_bin_fixtures.py; expected.json holds torch's own values), crafted
// archives and malicious pickles.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/tensor.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/torch_checkpoint.hpp"
#include "kept/io/torch_pickle.hpp"
#include "kept/io/zip.hpp"
#include "support/errors.hpp"
#include "support/files.hpp"

using namespace kept;
using namespace kept::test;
using Catch::Contains;
using Catch::StartsWith;

namespace {

const std::filesystem::path kFixtures = std::filesystem::path(KEPT_TEST_DATA_DIR) / "torch_bin";
// The file the malicious pickles' payloads would create (see the fixture script).
const std::filesystem::path kMarker = "/tmp/kept-pwned-torch-bin";

const nlohmann::json& expected() {
  static const nlohmann::json json = [] {
    std::ifstream in(kFixtures / "expected.json");
    REQUIRE(in.good());
    return nlohmann::json::parse(in);
  }();
  return json;
}

std::string hex_of(const Tensor& tensor) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string text;
  for (std::byte b : tensor.bytes()) {
    text += kHex[static_cast<unsigned>(b) >> 4];
    text += kHex[static_cast<unsigned>(b) & 15u];
  }
  return text;
}

double element(const Tensor& t, std::int64_t i) {
  switch (t.dtype()) {
    case DType::F32:
    case DType::BF16:
    case DType::F16:
      return detail::load_as_float(t.raw(), t.dtype(), i);
    case DType::F64:
      return static_cast<const double*>(t.raw())[i];
    case DType::I64:
      return static_cast<double>(static_cast<const std::int64_t*>(t.raw())[i]);
    case DType::I32:
      return static_cast<const std::int32_t*>(t.raw())[i];
    case DType::I16:
      return static_cast<const std::int16_t*>(t.raw())[i];
    case DType::I8:
      return static_cast<const std::int8_t*>(t.raw())[i];
    case DType::U8:
    case DType::Bool:
      return static_cast<const std::uint8_t*>(t.raw())[i];
  }
  return 0;
}

// Compares one loaded tensor with torch's description of it.
void check_tensor(const Tensor& tensor, const nlohmann::json& want) {
  INFO("tensor " << want["name"].get<std::string>());
  CHECK(dtype_name(tensor.dtype()) == want["dtype"].get<std::string>());
  CHECK(tensor.shape().to_vector() == want["shape"].get<std::vector<std::int64_t>>());
  CHECK(hex_of(tensor) == want["hex"].get<std::string>());  // bit-exact
  if (!want["sum"].is_null()) {
    double sum = 0;
    for (std::int64_t i = 0; i < tensor.numel(); ++i)
      sum += element(tensor, i);
    const double torch_sum = want["sum"].get<double>();
    CHECK(sum == Approx(torch_sum).epsilon(1e-12).margin(1e-9));
  }
  // Always usable with typed access: aligned for its element type.
  CHECK(reinterpret_cast<std::uintptr_t>(tensor.raw()) % dtype_size(tensor.dtype()) == 0);
}

}  // namespace

TEST_CASE("zip: CRC-32 and the ZIP64 and stored-entry rules", "[io][torch_bin]") {
  const char* digits = "123456789";
  CHECK(crc32(std::as_bytes(std::span(digits, 9))) == 0xCBF43926u);
  CHECK(crc32({}) == 0u);

  // Python's zipfile accepted zip64.bin's ZIP64 structures; kept reads the same entries as from
  // the plain archive torch wrote.
  auto plain_bytes = read_file_bytes(kFixtures / "views.bin");
  auto zip64_bytes = read_file_bytes(kFixtures / "zip64.bin");
  ZipReader plain(plain_bytes, "views.bin");
  ZipReader zip64(zip64_bytes, "zip64.bin");
  REQUIRE(plain.entries().size() == zip64.entries().size());
  for (std::size_t i = 0; i < plain.entries().size(); ++i) {
    const ZipEntry& a = plain.entries()[i];
    const ZipEntry& b = zip64.entries()[i];
    CHECK(b.name.substr(b.name.find('/')) == a.name.substr(a.name.find('/')));
    CHECK(a.size == b.size);
    auto da = plain.data(a, true);
    auto db = zip64.data(b, true);
    CHECK(std::equal(da.begin(), da.end(), db.begin(), db.end()));
    CHECK(b.data_offset % 64 == 0);  // torch pads records to 64 bytes; so does the writer
  }
  CHECK(zip64.contains("zip64/data.pkl"));
  CHECK_THAT(error_of([&] { (void)zip64.data("zip64/nope", false); }),
             Contains("zip entry 'zip64/nope' not found"));

  // ZipFile maps the file.
  ZipFile file(kFixtures / "views.bin");
  CHECK(file.bytes().size() == plain_bytes.size());
  CHECK(file.reader().entries().size() == plain.entries().size());
}

TEST_CASE("zip: corrupt directories are refused with the file and entry named", "[io][torch_bin]") {
  const auto original = read_file_bytes(kFixtures / "views.bin");
  const std::size_t size = original.size();
  auto put32 = [](std::vector<std::byte>& bytes, std::size_t at, std::uint32_t value) {
    for (int i = 0; i < 4; ++i)
      bytes[at + static_cast<std::size_t>(i)] = static_cast<std::byte>((value >> (8 * i)) & 0xff);
  };
  auto get32 = [](const std::vector<std::byte>& bytes, std::size_t at) {
    return detail::zip_u32(bytes.data() + at);
  };
  // torch.save always ends with a zip64 end record and locator, then the classic end record
  // (no comment); the zip64 record is authoritative.
  const std::size_t eocd = size - 22;
  REQUIRE(get32(original, eocd) == 0x06054b50u);
  const std::size_t locator = eocd - 20;
  REQUIRE(get32(original, locator) == 0x07064b50u);
  const std::size_t record = get32(original, locator + 8);
  REQUIRE(get32(original, record) == 0x06064b50u);
  const std::size_t cd = get32(original, record + 48);

  SECTION("central directory offset off by one") {
    auto bytes = original;
    put32(bytes, record + 48, static_cast<std::uint32_t>(cd - 1));
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }),
               StartsWith("f.bin: ") && Contains("bad signature"));
  }
  SECTION("central directory past the end") {
    auto bytes = original;
    put32(bytes, record + 40, 0x7fffffffu);
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }), Contains("runs outside the file"));
  }
  SECTION("more entries than the directory can hold") {
    auto bytes = original;
    put32(bytes, record + 24, 0x10000000u);
    put32(bytes, record + 32, 0x10000000u);
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }),
               Contains("entries, more than a central directory"));
  }
  SECTION("entry counts that disagree (a multi-disk archive)") {
    auto bytes = original;
    put32(bytes, record + 24, 1);
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }), Contains("multi-disk"));
  }
  SECTION("without the zip64 locator, the classic record serves") {
    auto bytes = original;
    put32(bytes, locator, 0);
    CHECK(ZipReader(bytes, "f.bin").entries().size() == ZipReader(original, "f").entries().size());
    put32(bytes, eocd + 16, 0xffffffffu);
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }), Contains("no zip64 locator"));
  }
  SECTION("a zip64 locator that points nowhere") {
    auto bytes = original;
    put32(bytes, locator + 8, 0x7ffffff0u);
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }),
               StartsWith("f.bin: ") && Contains("zip64 end-of-central-directory locator"));
  }
  SECTION("a local header that names another entry") {
    auto bytes = original;
    bytes[30] = std::byte{'X'};  // first letter of the first local header's name
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }),
               Contains("zip entry 'views/data.pkl'") && Contains("names a different entry"));
  }
  SECTION("an entry whose data runs into the central directory") {
    auto bytes = original;
    put32(bytes, cd + 20, 0x00100000u);  // compressed size of the first entry
    put32(bytes, cd + 24, 0x00100000u);
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }),
               Contains("zip entry 'views/data.pkl'") && Contains("runs past the start"));
  }
  SECTION("a stored entry whose sizes disagree") {
    auto bytes = original;
    put32(bytes, cd + 20, get32(bytes, cd + 20) + 1);
    CHECK_THAT(error_of([&] { ZipReader(bytes, "f.bin"); }), Contains("stored entry has"));
  }
  SECTION("a zip64 extra field too short for the saturated sizes") {
    auto bytes = read_file_bytes(kFixtures / "zip64.bin");
    const std::size_t z_locator = bytes.size() - 22 - 20;
    const std::size_t z_cd = get32(bytes, get32(bytes, z_locator + 8) + 48);
    const std::size_t name_length = detail::zip_u16(bytes.data() + z_cd + 28);
    // Shrink the first entry's zip64 field (id 1, 24 bytes) to 8 bytes: the size fits, the
    // compressed size and offset do not.
    const std::size_t field = z_cd + 46 + name_length;
    REQUIRE(detail::zip_u16(bytes.data() + field) == 1);
    bytes[field + 2] = std::byte{8};
    CHECK_THAT(error_of([&] { ZipReader(bytes, "z.bin"); }),
               Contains("zip entry 'zip64/data.pkl'") && Contains("too short"));
  }
  SECTION("every truncation fails cleanly") {
    for (std::size_t cut = 0; cut < size; cut += 7) {
      std::span<const std::byte> prefix(original.data(), cut);
      CHECK_THROWS_AS(ZipReader(prefix, "f.bin"), kept::Error);
    }
  }
}

TEST_CASE("torch .bin: every real torch.save fixture loads bit-exact", "[io][torch_bin]") {
  for (const auto& [file_name, tensors] : expected()["files"].items()) {
    INFO("file " << file_name);
    const std::filesystem::path path = kFixtures / file_name;
    TorchCheckpointFile file(path);
    CHECK(file.path() == path);
    REQUIRE(file.size() == tensors.size());
    std::vector<std::string> names;
    for (const auto& want : tensors)
      names.push_back(want["name"].get<std::string>());
    CHECK(file.names() == names);  // the state dict's order
    for (const auto& want : tensors) {
      const std::string name = want["name"].get<std::string>();
      REQUIRE(file.contains(name));
      check_tensor(file.tensor(name), want);
    }

    // Storage sharing: contiguous views of one torch storage are zero-copy views of the one
    // mapping, at the same relative element offsets; non-contiguous ones are copies.
    const auto file_bytes = std::filesystem::file_size(path);
    const bool aligned = file_name != "unaligned.bin";
    for (const auto& a : tensors) {
      const Tensor& ta = file.tensor(a["name"].get<std::string>());
      if (ta.numel() == 0) continue;
      const bool mapped = ta.storage()->bytes() == file_bytes;
      if (!a["contiguous"].get<bool>()) {
        CHECK_FALSE(mapped);
        continue;
      }
      if (aligned) CHECK(mapped);
      for (const auto& b : tensors) {
        const Tensor& tb = file.tensor(b["name"].get<std::string>());
        if (&a == &b || tb.numel() == 0 || !b["contiguous"].get<bool>() || !aligned) continue;
        if (a["storage_group"] != b["storage_group"]) continue;
        INFO("tensors " << a["name"] << " and " << b["name"] << " share a torch storage");
        CHECK(ta.storage() == tb.storage());
        const auto element = static_cast<std::ptrdiff_t>(dtype_size(ta.dtype()));
        CHECK(static_cast<const char*>(tb.raw()) - static_cast<const char*>(ta.raw()) ==
              (b["storage_offset"].get<std::ptrdiff_t>() -
               a["storage_offset"].get<std::ptrdiff_t>()) *
                  element);
      }
    }
  }
}

TEST_CASE("torch .bin: views, transposes and strided slices match their base", "[io][torch_bin]") {
  TorchCheckpointFile file(kFixtures / "views.bin");
  const Tensor& base = file.tensor("base");  // [4, 6] = arange(24) / 4
  const Tensor& transposed = file.tensor("transposed");
  const Tensor& column = file.tensor("column");
  const Tensor& rows = file.tensor("rows");
  REQUIRE(transposed.shape() == Shape({6, 4}));
  for (int i = 0; i < 4; ++i) {
    for (int j = 0; j < 6; ++j) {
      CHECK(base.data<float>()[i * 6 + j] == static_cast<float>(i * 6 + j) / 4);
      CHECK(transposed.data<float>()[j * 4 + i] == base.data<float>()[i * 6 + j]);
    }
    CHECK(column.data<float>()[i] == base.data<float>()[i * 6 + 2]);
  }
  CHECK(rows.data<float>() == base.data<float>() + 6);  // zero-copy, shared
  const Tensor& permuted = file.tensor("permuted");     // arange(24).reshape(2,3,4).permute(2,0,1)
  REQUIRE(permuted.shape() == Shape({4, 2, 3}));
  for (int k = 0; k < 4; ++k)
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j)
        CHECK(permuted.data<float>()[(k * 2 + i) * 3 + j] ==
              static_cast<float>(i * 12 + j * 4 + k));

  // The mapping is private: writing through a view changes this process's copy (and so the
  // views sharing it), never the file; tensors outlive the file object.
  Tensor kept_rows = rows;
  {
    TorchCheckpointFile again(kFixtures / "views.bin");
    Tensor base_again = again.tensor("base");
    base_again.data<float>()[6] = 1234.5f;
    CHECK(again.tensor("rows").data<float>()[0] == 1234.5f);
  }
  CHECK(kept_rows.data<float>()[0] == 1.5f);
  TorchCheckpointFile fresh(kFixtures / "views.bin");
  CHECK(fresh.tensor("rows").data<float>()[0] == 1.5f);

  CHECK_THAT(error_of([&] { (void)file.tensor("nope"); }),
             StartsWith((kFixtures / "views.bin").string() + ": tensor \"nope\" not found"));
}

TEST_CASE("torch .bin: malicious and broken files raise kept::Error naming the file",
          "[io][torch_bin]") {
  std::error_code ignored;
  std::filesystem::remove(kMarker, ignored);
  REQUIRE_FALSE(std::filesystem::exists(kMarker));
  std::size_t count = 0;
  for (const auto& [file_name, needles] : expected()["errors"].items()) {
    INFO("file " << file_name);
    const std::filesystem::path path = kFixtures / file_name;
    const std::string message = error_of([&] { TorchCheckpointFile file(path); });
    CHECK_THAT(message, StartsWith(path.string() + ": "));
    for (const auto& needle : needles)
      CHECK_THAT(message, Contains(needle.get<std::string>()));
    ++count;
  }
  CHECK(count >= 20);
  // No payload ran: the marker the os.system / eval / Popen pickles would create is absent.
  CHECK_FALSE(std::filesystem::exists(kMarker));

  const std::string evil = error_of([] { TorchCheckpointFile(kFixtures / "evil_os_system.bin"); });
  CHECK(evil == (kFixtures / "evil_os_system.bin").string() +
                    ": pickle asks for 'os system', which is not a tensor-rebuilding function; "
                    "refusing to load (kept never executes code from a checkpoint)");
}

TEST_CASE("torch .bin: checkpoint directories, single and sharded", "[io][torch_bin]") {
  for (const std::string layout : {"single", "sharded"}) {
    INFO("layout " << layout);
    const nlohmann::json& want = expected()["dirs"][layout];
    CheckpointReader reader = CheckpointReader::open(kFixtures / layout);
    CHECK(reader.directory() == kFixtures / layout);
    CHECK(reader.sharded() == (layout == "sharded"));
    CHECK(reader.files() == want["files"].get<std::vector<std::string>>());
    std::vector<std::string> names;
    for (const auto& tensor : want["tensors"])
      names.push_back(tensor["name"].get<std::string>());
    CHECK(reader.names() == names);
    CHECK(reader.size() == names.size());
    for (const auto& tensor : want["tensors"]) {
      const std::string name = tensor["name"].get<std::string>();
      REQUIRE(reader.contains(name));
      check_tensor(reader.tensor(name), tensor);
      if (want.contains("file_of")) CHECK(reader.file_of(name) == want["file_of"][name]);
    }
    CHECK_FALSE(reader.contains("nope"));
    CHECK_THAT(error_of([&] { (void)reader.tensor("nope"); }),
               StartsWith((kFixtures / layout).string() + ": tensor \"nope\" not found"));
  }
}

TEST_CASE("torch .bin: bad checkpoint directories are refused up front", "[io][torch_bin]") {
  TempDir dir("kept-io-bin");
  const auto shards = kFixtures / "sharded";
  const std::string shard1 = "pytorch_model-00001-of-00002.bin";
  const std::string shard2 = "pytorch_model-00002-of-00002.bin";
  auto write_index = [&](const nlohmann::json& weight_map) {
    std::ofstream(dir / "pytorch_model.bin.index.json")
        << nlohmann::json{{"weight_map", weight_map}};
  };
  auto index = nlohmann::json::parse(std::ifstream(shards / "pytorch_model.bin.index.json"));

  CHECK_THAT(error_of([&] { CheckpointReader::open(dir / "missing"); }),
             Contains("does not exist"));
  CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }),
             Contains("no pytorch_model.bin or pytorch_model.bin.index.json"));

  std::filesystem::copy_file(shards / shard1, dir / shard1);
  std::filesystem::copy_file(shards / shard2, dir / shard2);
  SECTION("both layouts") {
    write_index(index["weight_map"]);
    std::filesystem::copy_file(kFixtures / "single" / "pytorch_model.bin",
                               dir / "pytorch_model.bin");
    CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }), Contains("ambiguous"));
  }
  SECTION("an index that maps a tensor to the wrong shard") {
    auto map = index["weight_map"];
    map["model.embed_tokens.weight"] = shard2;
    write_index(map);
    CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }),
               StartsWith((dir / shard1).string()) &&
                   Contains("\"model.embed_tokens.weight\", which pytorch_model.bin.index.json "
                            "maps to " +
                            shard2 + " (a tensor in two shards)"));
  }
  SECTION("an index that lists a tensor no shard holds") {
    auto map = index["weight_map"];
    map["extra.weight"] = shard2;
    write_index(map);
    CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }),
               StartsWith((dir / shard2).string()) && Contains("\"extra.weight\" is missing"));
  }
  SECTION("an index that misses a tensor") {
    auto map = index["weight_map"];
    map.erase("model.norm.weight");
    write_index(map);
    CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }),
               Contains("\"model.norm.weight\", which pytorch_model.bin.index.json does not list"));
  }
  SECTION("an index that points outside the directory") {
    auto map = index["weight_map"];
    map["lm_head.weight"] = "../" + shard2;
    write_index(map);
    CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }),
               Contains("must be a plain file name"));
  }
  SECTION("a shard that is malicious") {
    std::filesystem::remove(dir / shard2);
    std::filesystem::copy_file(kFixtures / "evil_os_system.bin", dir / shard2);
    write_index(index["weight_map"]);
    CHECK_THAT(error_of([&] { CheckpointReader::open(dir.path()); }),
               StartsWith((dir / shard2).string()) && Contains("'os system'"));
  }
}

namespace {

// data.pkl of a fixture.
std::vector<std::byte> fixture_pickle(const std::string& file_name) {
  const auto bytes = read_file_bytes(kFixtures / file_name);
  ZipReader zip(bytes, file_name);
  auto pickle = zip.data(file_name.substr(0, file_name.size() - 4) + "/data.pkl", true);
  return {pickle.begin(), pickle.end()};
}

std::vector<std::byte> as_bytes(const std::string& text) {
  std::vector<std::byte> bytes(text.size());
  std::memcpy(bytes.data(), text.data(), text.size());
  return bytes;
}

std::string pickle_error(const std::string& text) {
  return error_of([&] { (void)parse_torch_pickle(as_bytes(text), "p.pkl"); });
}

}  // namespace

TEST_CASE("torch pickle: the VM's rules and limits", "[io][torch_bin]") {
  const auto pickle = fixture_pickle("views.bin");
  TorchPickle parsed = parse_torch_pickle(pickle, "views.bin");
  REQUIRE(parsed.tensors.size() == 10);
  CHECK(parsed.storages.size() == 5);  // base, hidden, cube, half, other
  CHECK(parsed.tensors[0].contiguous());
  CHECK_FALSE(parsed.tensors[3].contiguous());  // transposed
  CHECK(parsed.tensors[1].storage_offset == 6);

  // Materialising without an owner copies; the values match the zero-copy load.
  TorchCheckpointFile file(kFixtures / "views.bin");
  std::vector<float> values(24);
  for (int i = 0; i < 24; ++i)
    values[static_cast<std::size_t>(i)] = static_cast<float>(i) / 4;
  Tensor copy =
      materialize_torch_tensor(parsed.tensors[3], std::as_bytes(std::span(values)), nullptr, "x");
  CHECK(hex_of(copy) == hex_of(file.tensor("transposed")));
  CHECK_THAT(error_of([&] {
               (void)materialize_torch_tensor(
                   parsed.tensors[3], std::as_bytes(std::span(values)).first(40), nullptr, "x");
             }),
             Contains("reaches element"));

  // Pickles written with helpers (hex escapes and NULs in literals are error-prone).
  auto str = [](const std::string& text) {
    std::string out = "X";
    for (int i = 0; i < 4; ++i)
      out += static_cast<char>((text.size() >> (8 * i)) & 0xff);
    return out + text;
  };
  auto int1 = [](int value) { return std::string("K") + static_cast<char>(value); };
  const std::string proto = "\x80\x02";
  const std::string float_storage = "ctorch\nFloatStorage\n";
  auto storage = [&](int numel) {
    return "(" + str("storage") + float_storage + str("0") + str("cpu") + int1(numel) + "tQ";
  };
  // _rebuild_tensor (the v1 signature): a [2] view of a 2-element storage.
  const std::string tensor = "ctorch._utils\n_rebuild_tensor\n(" + storage(2) + int1(0) + int1(2) +
                             "\x85" + int1(1) + "\x85" + "tR";

  CHECK_NOTHROW(parse_torch_pickle(as_bytes(proto + "}(" + str("a") + tensor + "u."), "p.pkl"));
  CHECK_THAT(pickle_error(proto + "}(" + str("a") + tensor + str("a") + tensor + "u."),
             Contains("tensor \"a\": appears twice"));
  CHECK_THAT(pickle_error(proto + storage(2) + storage(3) + "."),
             Contains("described twice differently"));
  CHECK_THAT(pickle_error(proto + "h\x05."), Contains("memo entry 5 was never stored"));
  CHECK_THAT(pickle_error(proto + "](" + int1(1) + "a."), Contains("stack underflow"));
  CHECK_THAT(pickle_error("\x80\x06}."), Contains("protocol 6"));
  CHECK_THAT(pickle_error(proto + "\x8a\x09" + std::string(9, '\x01') + "."),
             Contains("does not fit in 64 bits"));
  CHECK_THAT(pickle_error(proto + "]q" + std::string(1, '\0') + "h" + std::string(1, '\0') + "a."),
             Contains("a list, not a state dict"));  // a list holding itself: no leak, no loop
  CHECK_THAT(pickle_error(std::string(5000, '(')), Contains("MARKs nest deeper"));
  CHECK_THAT(pickle_error(proto + "}(" + str("a") + int1(1) + "u."), Contains("is an int"));
  CHECK_THAT(pickle_error(proto + "}(" + int1(1) + int1(1) + "u."),
             Contains("not a string tensor name"));
  CHECK_THAT(pickle_error(proto + "}"), Contains("truncated"));
  CHECK_THAT(pickle_error(proto + "}(."), Contains("MARK(s) still open"));
  CHECK_THAT(pickle_error(proto + "}(" + int1(1) + "u."), Contains("odd number"));
  CHECK_THAT(pickle_error(proto + "\x95\xff" + std::string(7, '\0') + "}."), Contains("FRAME"));
  CHECK_THAT(pickle_error(proto + "cos\nsystem"), Contains("no terminating newline"));
  CHECK_THAT(pickle_error(proto + int1(1) + ")R."), Contains("REDUCE calls an int"));
  CHECK_THAT(pickle_error(proto + int1(1) + "Q."), Contains("BINPERSID expects a tuple"));
  CHECK_THAT(pickle_error(proto + "\x8c\x02os\x8c\x06system\x93."),
             Contains("pickle asks for 'os system'"));
  CHECK_THAT(pickle_error(proto + "\x81."), Contains("0x81"));  // NEWOBJ
  CHECK_THAT(
      pickle_error(proto + "ctorch._utils\n_rebuild_tensor_v2\n(" + storage(2) + int1(0) + int1(2) +
                   "\x85" + int1(1) + "\x85" + "\x89" + "}" + str("hook") + int1(1) + "stR."),
      Contains("backward_hooks must be an empty OrderedDict"));
  CHECK_THAT(pickle_error(proto + "}(" + str("a") + "ctorch._utils\n_rebuild_tensor\n(" +
                          storage(2) + int1(1) + int1(2) + "\x85" + int1(1) + "\x85" + "tRu."),
             Contains("tensor \"a\": its view") && Contains("reaches element 2"));
}

TEST_CASE("torch pickle: truncated, bit-flipped and random input never crashes",
          "[io][torch_bin]") {
  const auto pickle = fixture_pickle("views.bin");
  for (std::size_t cut = 0; cut < pickle.size(); ++cut) {
    std::span<const std::byte> prefix(pickle.data(), cut);
    CHECK_THROWS_AS(parse_torch_pickle(prefix, "p"), kept::Error);
  }
  // Bit flips of the pickle, and of the whole archive read without a mapping (copies).
  const auto archive = read_file_bytes(kFixtures / "views.bin");
  std::mt19937 random(12345);
  for (int round = 0; round < 3000; ++round) {
    auto bytes = round % 2 ? pickle : archive;
    const int flips = 1 + static_cast<int>(random() % 3);
    for (int f = 0; f < flips; ++f)
      bytes[random() % bytes.size()] ^= static_cast<std::byte>(1u << (random() % 8));
    try {
      if (round % 2) {
        (void)parse_torch_pickle(bytes, "p");
      } else {
        (void)read_torch_archive(bytes, nullptr, "a.bin");
      }
    } catch (const kept::Error&) {
    }
  }
  for (int round = 0; round < 2000; ++round) {
    std::vector<std::byte> bytes(2 + random() % 64);
    bytes[0] = std::byte{0x80};
    bytes[1] = std::byte{0x02};
    for (std::size_t i = 2; i < bytes.size(); ++i) {
      // Mostly opcodes kept accepts, so the VM gets past the first byte.
      static constexpr char kOps[] = "(}])tsuaeJKMNqhrjbQR.\x85\x86\x87\x88\x89\x94\x8a";
      bytes[i] = random() % 4 ? static_cast<std::byte>(kOps[random() % (sizeof kOps - 1)])
                              : static_cast<std::byte>(random() % 256);
    }
    try {
      (void)parse_torch_pickle(bytes, "p");
    } catch (const kept::Error&) {
    }
  }
}
