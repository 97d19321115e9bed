// reference/corpus.hpp: text files -> token ids, for calibration, training and evaluation.
//
// A file ending in .jsonl is JSON Lines with a "text" field per record; anything else is plain
// text with documents separated by blank lines (kept/train/data.hpp validates both: UTF-8,
// non-empty). Documents are tokenized with the model's SentencePiece tokenizer and joined with
// EOS after each, the same packing the trainer uses.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "kept/train/data.hpp"
#include "tokenizer.hpp"

namespace kept::cli {

inline std::vector<std::string> read_documents(const std::filesystem::path& path) {
  if (path.extension() == ".jsonl") return read_jsonl_documents(path);
  return read_plain_text_documents(path);
}

// All documents, tokenized, each followed by EOS, until `max_tokens` (0 = all).
inline std::vector<std::int32_t> tokenize_documents(const std::vector<std::string>& documents,
                                                    const Tokenizer& tokenizer,
                                                    std::int64_t max_tokens = 0) {
  std::vector<std::int32_t> stream;
  for (const std::string& document : documents) {
    const std::vector<std::int32_t> ids = tokenizer.encode(document);
    stream.insert(stream.end(), ids.begin(), ids.end());
    stream.push_back(tokenizer.eos_id());
    if (max_tokens > 0 && static_cast<std::int64_t>(stream.size()) >= max_tokens) {
      stream.resize(static_cast<std::size_t>(max_tokens));
      break;
    }
  }
  return stream;
}

}  // namespace kept::cli
