// The SentencePiece model reader, the tokenizer.json builder and message escaping. The
// end-to-end id parity against SentencePiece and transformers is in
// tests/python/test_hf_tokenizer.py; these check the pieces on hand-made protobuf bytes.
#include <catch2/catch.hpp>

#include <cstring>
#include <string>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/io/hf_tokenizer.hpp"
#include "kept/io/sentencepiece_model.hpp"

namespace {

// Protobuf wire-format writers, independent of the reader under test.
std::string varint(std::uint64_t value) {
  std::string out;
  do {
    std::uint8_t byte = value & 0x7f;
    value >>= 7;
    if (value) byte |= 0x80;
    out += static_cast<char>(byte);
  } while (value);
  return out;
}
std::string key(int field, int wire) {
  return varint(static_cast<std::uint64_t>(field) << 3 | wire);
}
std::string bytes_field(int field, const std::string& bytes) {
  return key(field, 2) + varint(bytes.size()) + bytes;
}
std::string varint_field(int field, std::uint64_t value) {
  return key(field, 0) + varint(value);
}
std::string piece(const std::string& text, float score, int type) {
  std::string fixed(4, '\0');
  std::memcpy(fixed.data(), &score, 4);
  return bytes_field(1, bytes_field(1, text) + key(2, 5) + fixed + varint_field(3, type));
}

// unk, bos, eos (control), then a, b, ab, abc, c with BPE scores -id.
std::string tiny_model(bool add_dummy_prefix) {
  std::string model = piece("<unk>", 0, 2) + piece("<s>", 0, 3) + piece("</s>", 0, 3) +
                      piece("ab", -3, 1) + piece("abc", -4, 1) + piece("bc", -5, 1) +
                      piece("a", -6, 1) + piece("b", -7, 1) + piece("c", -8, 1);
  model +=
      bytes_field(2, varint_field(3, 2) + varint_field(35, 0) + varint_field(43, 0xffffffffull));
  model += bytes_field(3, bytes_field(1, "identity") + varint_field(3, add_dummy_prefix ? 1 : 0) +
                              varint_field(4, 0));
  return model;
}

}  // namespace

TEST_CASE("escape_for_message keeps UTF-8 and escapes control and invalid bytes") {
  CHECK(kept::escape_for_message("plain ascii") == "plain ascii");
  CHECK(kept::escape_for_message("한국어 路径") == "한국어 路径");
  CHECK(kept::escape_for_message("a\nb\tc\x1b[31m") == "a\\nb\\tc\\x1b[31m");
  CHECK(kept::escape_for_message(std::string("\xff\xfe", 2)) == "\\xff\\xfe");
  CHECK(kept::escape_for_message("\xc3(") == "\\xc3(");                  // truncated sequence
  CHECK(kept::escape_for_message("\xed\xa0\x80") == "\\xed\\xa0\\x80");  // a surrogate
  CHECK(kept::escape_for_message("\xc0\xaf") == "\\xc0\\xaf");           // overlong
  const std::string once = kept::escape_for_message("x\x01\xff");
  CHECK(kept::escape_for_message(once) == once);
  try {
    kept::fail("file.json: bad byte \x01 and \xff");
    FAIL("no throw");
  } catch (const kept::Error& error) {
    CHECK(std::string(error.what()) == "file.json: bad byte \\x01 and \\xff");
  }
}

TEST_CASE("read SentencePiece model fields from protobuf bytes") {
  const kept::SentencePieceModel model =
      kept::parse_sentencepiece_model(tiny_model(false), "t.model");
  REQUIRE(model.size() == 9);
  CHECK(model.pieces[4].piece == "abc");
  CHECK(model.pieces[4].score == -4.0f);
  CHECK(model.pieces[1].type == kept::SentencePiece::Type::Control);
  CHECK(model.kind == kept::SentencePieceModel::Kind::Bpe);
  CHECK(model.pad_id == -1);
  CHECK(model.bos_id == 1);  // proto default
  CHECK(model.normalizer_name == "identity");
  CHECK_FALSE(model.add_dummy_prefix);
  CHECK_FALSE(model.remove_extra_whitespaces);
  CHECK(model.escape_whitespaces);  // absent: proto default
  CHECK(kept::llama_tokenizer_mismatch(model).empty());
  CHECK_FALSE(kept::llama_tokenizer_mismatch(kept::parse_sentencepiece_model(tiny_model(true), "t"))
                  .empty());
}

TEST_CASE("a truncated or foreign tokenizer.model is an error naming the file") {
  const std::string full = tiny_model(false);
  for (std::size_t cut : {std::size_t{1}, std::size_t{7}, full.size() / 2, full.size() - 1}) {
    CAPTURE(cut);
    CHECK_THROWS_WITH(kept::parse_sentencepiece_model(full.substr(0, cut), "dir/tokenizer.model"),
                      Catch::Contains("dir/tokenizer.model"));
  }
  CHECK_THROWS_WITH(kept::parse_sentencepiece_model("{\"json\": true}", "x.model"),
                    Catch::Contains("x.model"));
}

TEST_CASE("tokenizer.json merges are every split of every piece, ranked by the piece's score") {
  const kept::SentencePieceModel model = kept::parse_sentencepiece_model(tiny_model(false), "t");
  const nlohmann::json tokenizer = kept::build_tokenizer_json(model, "t", false, false);
  std::vector<std::pair<std::string, std::string>> merges;
  for (const auto& merge : tokenizer["model"]["merges"])
    merges.emplace_back(merge[0].get<std::string>(), merge[1].get<std::string>());
  // ab (score -3), then abc's two splits (-4) in the order of their left piece's id (ab = 3
  // before a = 6), then bc (-5).
  const std::vector<std::pair<std::string, std::string>> want = {
      {"a", "b"}, {"ab", "c"}, {"a", "bc"}, {"b", "c"}};
  CHECK(merges == want);
  CHECK(tokenizer["model"]["vocab"]["abc"] == 4);
  CHECK(tokenizer["added_tokens"].size() == 3);
  CHECK(tokenizer["normalizer"]["normalizers"].size() == 1);  // the whitespace escape only
}

TEST_CASE("a unigram SentencePiece model is refused by the tokenizer.json builder") {
  std::string model = piece("<unk>", 0, 2) + piece("<s>", 0, 3) + piece("</s>", 0, 3) +
                      piece("a", -1, 1) + bytes_field(2, varint_field(3, 1));
  const kept::SentencePieceModel parsed = kept::parse_sentencepiece_model(model, "u.model");
  CHECK_THROWS_WITH(kept::build_tokenizer_json(parsed, "u.model", false, false),
                    Catch::Contains("u.model") && Catch::Contains("unigram"));
}
