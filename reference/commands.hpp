// reference/commands.hpp: the subcommands of `kept`, one source file each.
//
// Each register_* adds its subcommand to the app and binds a callback; main() runs the
// parser, and any kept::Error escaping a callback becomes one "kept: error: ..." line on
// stderr and exit status 1.
#pragma once

#include <CLI/CLI.hpp>

namespace kept::cli {

void register_init(CLI::App& app);
void register_forward(CLI::App& app);
void register_inspect(CLI::App& app);

}  // namespace kept::cli
