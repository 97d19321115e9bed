// kept tokenizer --input corpus.txt --vocab-size 2000 --output DIR
//
// Trains a SentencePiece BPE tokenizer with byte fallback (any UTF-8 text, Korean and Chinese
// included, tokenizes without <unk>), with Orion's special ids (unk 0, bos 1, eos 2) and
// Orion's normaliser settings: the identity rule, whitespace kept as written (code indentation
// survives; runs of spaces may become pieces of their own), no dummy prefix. Those are also the
// settings transformers 5's LlamaTokenizer reproduces exactly (kept/io/hf_tokenizer.hpp).
// Writes DIR/tokenizer.model and the HF tokenizer files beside it.
#include <sentencepiece_trainer.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "commands.hpp"
#include "corpus.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/hf_tokenizer.hpp"

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
      " --normalization_rule_name=identity --remove_extra_whitespaces=false"
      " --add_dummy_prefix=false --allow_whitespace_only_pieces=true"
      " --minloglevel=2 --num_threads=2 --input_sentence_size=300000"
      " --shuffle_input_sentence=true";
  const auto status = sentencepiece::SentencePieceTrainer::Train(arguments);
  std::filesystem::remove(lines, error);
  KEPT_CHECK(status.ok(), corpus.string(), ": SentencePiece training failed: ", status.ToString());
  std::filesystem::rename(prefix.string() + ".model", output / "tokenizer.model", error);
  KEPT_CHECK(!error, (output / "tokenizer.model").string(),
             ": cannot move the trained model into place: ", error.message());
  std::filesystem::remove(prefix.string() + ".vocab", error);
  write_hf_tokenizer(read_tokenizer_source(output / "tokenizer.model"), output);
}

void register_tokenizer(CLI::App& app) {
  struct Options {
    std::string input, from, output, chat_template;
    std::int64_t vocab_size = 2000;
    double character_coverage = 0.9995;
  };
  auto [command, options] =
      add_command<Options>(app, "tokenizer",
                           "Train a byte-fallback SentencePiece BPE tokenizer, or "
                           "write the HF files of an existing one");
  CLI::Option* input = add_existing_file(command, "--input", options->input,
                                         "Training text (plain text or JSONL)", Need::Optional);
  CLI::Option* from =
      command
          ->add_option("--from", options->from,
                       "An existing SentencePiece tokenizer.model (or its directory, whose "
                       "tokenizer_config.json, special_tokens_map.json, generation_config.json "
                       "and chat template are honoured): write its HF tokenizer files")
          ->check(CLI::ExistingPath);
  input->excludes(from);
  command->add_option("--output", options->output, "Directory for tokenizer.model")->required();
  command->add_option("--chat-template", options->chat_template,
                      "With --from: orion, none, or a Jinja file (default: the source's, if any)");
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
    if (!options->from.empty()) {
      const TokenizerSource source = read_tokenizer_source(options->from);
      HfTokenizerOptions hf;
      choose_chat_template(hf, options->chat_template);
      // Everything is checked before the output directory is touched.
      check_tokenizer_supported(source.model, source.model_file.string());
      std::error_code error;
      std::filesystem::create_directories(options->output, error);
      KEPT_CHECK(!error, options->output, ": cannot create: ", error.message());
      const HfTokenizerReport report = write_hf_tokenizer(source, options->output, hf);
      std::printf("wrote %s: %s, %lld pieces%s\n", options->output.c_str(),
                  report.tokenizer_class.c_str(), static_cast<long long>(report.vocab_size),
                  report.chat_template ? ", chat template" : "");
      if (!report.class_reason.empty())
        std::printf("  not LlamaTokenizer: %s; tokenizer.json keeps the ids exact\n",
                    report.class_reason.c_str());
      return;
    }
    KEPT_CHECK(!options->input.empty(),
               "kept tokenizer: give --input TEXT to train a tokenizer, "
               "or --from MODEL to write the HF files of an existing one");
    train_tokenizer(options->input, options->vocab_size, options->output,
                    options->character_coverage);
    std::printf(
        "wrote %s/tokenizer.model (%lld pieces) and its HF files (tokenizer.json, "
        "tokenizer_config.json, special_tokens_map.json, generation_config.json)\n",
        options->output.c_str(), static_cast<long long>(options->vocab_size));
  });
}

}  // namespace kept::cli
