// kept tokenizer --input corpus.txt --vocab-size 2000 --output DIR
//
// Trains a SentencePiece BPE tokenizer with byte fallback (any UTF-8 text, Korean and Chinese
// included, tokenizes without <unk>), with Orion's special ids: unk 0, bos 1, eos 2.
// Writes DIR/tokenizer.model.
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "commands.hpp"
#include "corpus.hpp"
#include "kept/io/atomic_file.hpp"

namespace kept::cli {

void train_tokenizer(const std::filesystem::path& corpus, std::int64_t vocab_size,
                     const std::filesystem::path& output, double character_coverage) {
  // Validate the corpus with kept's readers (UTF-8, non-empty) and hand SentencePiece one
  // sentence per line, the input format it expects.
  const std::vector<std::string> documents = read_documents(corpus);
  std::error_code error;
  std::filesystem::create_directories(output, error);
  KEPT_CHECK(!error, output.string(), ": cannot create: ", error.message());
  const std::filesystem::path lines = output / ".tokenizer-input.txt";
  {
    std::string text;
    for (const std::string& document : documents) {
      for (char c : document)
        text += c == '\r' ? '\n' : c;
      text += '\n';
    }
    write_file_atomically(lines, text);
  }
  const std::filesystem::path prefix = output / ".tokenizer-training";
  const std::string arguments =
      "--input=" + lines.string() + " --model_prefix=" + prefix.string() +
      " --vocab_size=" + std::to_string(vocab_size) +
      " --model_type=bpe --byte_fallback=true --character_coverage=" +
      std::to_string(character_coverage) +
      " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --max_sentence_length=65536"
      " --minloglevel=2 --num_threads=2 --input_sentence_size=300000"
      " --shuffle_input_sentence=true";
  const auto status = sentencepiece::SentencePieceTrainer::Train(arguments);
  std::filesystem::remove(lines, error);
  KEPT_CHECK(status.ok(), corpus.string(), ": SentencePiece training failed: ", status.ToString());
  std::filesystem::rename(prefix.string() + ".model", output / "tokenizer.model", error);
  KEPT_CHECK(!error, (output / "tokenizer.model").string(),
             ": cannot move the trained model into place: ", error.message());
  std::filesystem::remove(prefix.string() + ".vocab", error);
}

void register_tokenizer(CLI::App& app) {
  struct Options {
    std::string input, output;
    std::int64_t vocab_size = 2000;
    double character_coverage = 0.9995;
  };
  auto options = std::make_shared<Options>();
  CLI::App* command =
      app.add_subcommand("tokenizer", "Train a byte-fallback SentencePiece BPE tokenizer");
  command->add_option("--input", options->input, "Training text (plain text or JSONL)")
      ->required()
      ->check(CLI::ExistingFile);
  command->add_option("--output", options->output, "Directory for tokenizer.model")->required();
  command->add_option("--vocab-size", options->vocab_size, "Vocabulary size")
      ->check(CLI::Range(260, 1 << 20))
      ->capture_default_str();
  command
      ->add_option(
          "--character-coverage", options->character_coverage,
          "Fraction of characters that get pieces of their own; the rest fall back to bytes "
          "(lower it for text with many distinct characters, e.g. Chinese, at small vocabularies)")
      ->check(CLI::Range(0.5, 1.0))
      ->capture_default_str();
  command->callback([options] {
    train_tokenizer(options->input, options->vocab_size, options->output,
                    options->character_coverage);
    std::printf("wrote %s/tokenizer.model (%lld pieces)\n", options->output.c_str(),
                static_cast<long long>(options->vocab_size));
  });
}

}  // namespace kept::cli
