// reference/tokenizer.hpp: SentencePiece, the tokenizer Orion ships (tokenizer.model), and the
// one `kept tokenizer` trains for the demo (BPE with byte fallback, so any UTF-8 text, Korean
// and Chinese included, tokenizes without <unk>).
#pragma once

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "kept/core/error.hpp"

namespace kept::cli {

class Tokenizer {
 public:
  explicit Tokenizer(const std::filesystem::path& model_file) : path_(model_file) {
    std::error_code error;
    KEPT_CHECK(std::filesystem::is_regular_file(model_file, error), model_file.string(),
               ": tokenizer model not found (a SentencePiece tokenizer.model is needed)");
    const auto status = processor_.Load(model_file.string());
    KEPT_CHECK(status.ok(), model_file.string(),
               ": not a SentencePiece model: ", status.ToString());
  }

  std::vector<std::int32_t> encode(std::string_view text) const {
    std::vector<int> ids;
    const auto status = processor_.Encode(text, &ids);
    KEPT_CHECK(status.ok(), path_.string(), ": cannot tokenize: ", status.ToString());
    return {ids.begin(), ids.end()};
  }
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string text;
    const auto status = processor_.Decode(std::vector<int>(ids.begin(), ids.end()), &text);
    KEPT_CHECK(status.ok(), path_.string(), ": cannot detokenize: ", status.ToString());
    return text;
  }

  std::int64_t vocab_size() const { return processor_.GetPieceSize(); }
  std::int32_t bos_id() const { return processor_.bos_id(); }
  std::int32_t eos_id() const { return processor_.eos_id(); }
  const std::filesystem::path& path() const { return path_; }

  // Checks that every id the tokenizer can produce is a row of the model's embedding.
  void check_fits(std::int64_t model_vocab_size, const std::string& model_where) const {
    KEPT_CHECK(vocab_size() <= model_vocab_size, path_.string(), ": the tokenizer has ",
               vocab_size(), " pieces but ", model_where, " has a vocabulary of ", model_vocab_size,
               "; they do not belong together");
  }

 private:
  std::filesystem::path path_;
  sentencepiece::SentencePieceProcessor processor_;
};

}  // namespace kept::cli
