// reference/commands.hpp: the subcommands of `kept`, one source file each.
//
// Each register_* adds its subcommand to the app and binds a callback; main() runs the
// parser, and any kept::Error escaping a callback becomes one "kept: error: ..." line on
// stderr and exit status 1.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <filesystem>

namespace kept::cli {

void register_init(CLI::App& app);
void register_forward(CLI::App& app);
void register_inspect(CLI::App& app);
void register_convert(CLI::App& app);
void register_opm(CLI::App& app);
void register_train(CLI::App& app);
void register_eval(CLI::App& app);
void register_tokenizer(CLI::App& app);
void register_demo(CLI::App& app);

// Trains a byte-fallback SentencePiece BPE tokenizer on `corpus` into `output`/tokenizer.model.
void train_tokenizer(const std::filesystem::path& corpus, std::int64_t vocab_size,
                     const std::filesystem::path& output, double character_coverage = 0.9995);

}  // namespace kept::cli
