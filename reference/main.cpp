// kept: convert LayerNorm decoders to Llama checkpoints (NPM + OPM), distil them (XKD), and
// verify the numerics along the way. `kept --help` lists the subcommands.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <new>

#include "commands.hpp"
#include "kept/backend/cpu/blas_core.hpp"
#include "kept/core/error.hpp"

int main(int argc, char** argv) {
  kept::cpu::use_openblas_kernels_for_this_cpu(argv);
  CLI::App app{
      "kept: LayerNorm-to-Llama conversion (NPM, OPM) and cross-architecture distillation (XKD)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "kept 0.1.0");
  kept::cli::register_init(app);
  kept::cli::register_forward(app);
  kept::cli::register_inspect(app);
  kept::cli::register_convert(app);
  kept::cli::register_opm(app);
  kept::cli::register_train(app);
  kept::cli::register_eval(app);
  kept::cli::register_tokenizer(app);
  kept::cli::register_demo(app);
  kept::cli::register_plan(app);
  kept::cli::register_teacher_logits(app);
  kept::cli::register_compare(app);
  kept::cli::register_interpolate(app);
  kept::cli::register_chain(app);
  kept::cli::register_experiments(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  } catch (const kept::Error& error) {
    std::fprintf(stderr, "kept: error: %s\n", error.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "kept: error: out of memory\n");
    return 1;
  } catch (const std::exception& error) {  // a library's own type: escape it like kept::Error
    std::fprintf(stderr, "kept: error: %s\n", kept::escape_for_message(error.what()).c_str());
    return 1;
  }
  return 0;
}
