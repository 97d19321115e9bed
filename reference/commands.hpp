// reference/commands.hpp: the subcommands of `kept`, one source file each.
//
// Each register_* adds its subcommand to the app and binds a callback; main() runs the
// parser, and any kept::Error escaping a callback becomes one "kept: error: ..." line on
// stderr and exit status 1.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>

namespace kept::cli {

// A subcommand and the options its callback will read (shared: the callback outlives
// register_*). Use: auto [command, options] = add_command<Options>(app, "eval", "...");
template <class Options>
std::pair<CLI::App*, std::shared_ptr<Options>> add_command(CLI::App& app, const std::string& name,
                                                           const std::string& description) {
  return {app.add_subcommand(name, description), std::make_shared<Options>()};
}

enum class Need { Required, Optional };

// An input the command reads: a positional argument or an option that must name an existing
// directory (a checkpoint) or file (a job, a config, text); CLI11 reports a missing one by name.
template <class T>
CLI::Option* add_existing(CLI::App* command, const std::string& name, T& variable,
                          const std::string& help, const CLI::Validator& exists, Need need) {
  CLI::Option* option = command->add_option(name, variable, help);
  if (need == Need::Required) option->required();
  return option->check(exists);
}
template <class T>
CLI::Option* add_existing_directory(CLI::App* command, const std::string& name, T& variable,
                                    const std::string& help, Need need = Need::Required) {
  return add_existing(command, name, variable, help, CLI::ExistingDirectory, need);
}
template <class T>
CLI::Option* add_existing_file(CLI::App* command, const std::string& name, T& variable,
                               const std::string& help, Need need = Need::Required) {
  return add_existing(command, name, variable, help, CLI::ExistingFile, need);
}

// A positive count with its default shown in --help.
template <class T>
CLI::Option* add_positive(CLI::App* command, const std::string& name, T& variable,
                          const std::string& help) {
  return command->add_option(name, variable, help)
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
}

void register_init(CLI::App& app);
void register_forward(CLI::App& app);
void register_inspect(CLI::App& app);
void register_convert(CLI::App& app);
void register_opm(CLI::App& app);
void register_train(CLI::App& app);
void register_eval(CLI::App& app);
void register_tokenizer(CLI::App& app);
void register_demo(CLI::App& app);
void register_plan(CLI::App& app);
void register_teacher_logits(CLI::App& app);
void register_compare(CLI::App& app);
void register_interpolate(CLI::App& app);
void register_chain(CLI::App& app);
void register_experiments(CLI::App& app);

// Trains a byte-fallback SentencePiece BPE tokenizer on `corpus` into `output`/tokenizer.model.
void train_tokenizer(const std::filesystem::path& corpus, std::int64_t vocab_size,
                     const std::filesystem::path& output, double character_coverage = 0.9995);

}  // namespace kept::cli
