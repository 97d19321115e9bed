// kept chain JOB.json: the anchors of Chain-based Distillation, distilled stepwise from a teacher
// (reference/chain.hpp has the job format).
#include <cstdio>
#include <string>

#include "chain.hpp"
#include "commands.hpp"

namespace kept::cli {

void register_chain(CLI::App& app) {
  struct Options {
    std::string job;
    bool resume = false, force = false, quiet = false;
  };
  auto [command, options] = add_command<Options>(
      app, "chain",
      "Distil a chain of smaller Llama anchors from a teacher, each from the previous one");
  add_existing_file(command, "job", options->job, "Chain job (JSON; see reference/chain.hpp)");
  command->add_flag("--resume", options->resume,
                    "Skip finished anchors and resume the first unfinished one");
  command->add_flag("--force", options->force, "Start over in an output that holds a chain");
  command->add_flag("--quiet", options->quiet, "No per-step lines");
  command->callback([options] {
    const ChainJob job = read_chain_job(options->job);
    const auto results = run_chain(
        job, {.resume = options->resume, .force = options->force, .quiet = options->quiet});
    std::printf("%-16s %14s %12s %14s  %s\n", "anchor", "parameters", "perplexity", "KL to teacher",
                "model");
    for (const ChainAnchorResult& result : results)
      std::printf("%-16s %14.0f %12s %14s  %s\n", result.name.c_str(), result.parameters,
                  result.skipped ? "(before)" : std::to_string(result.perplexity).c_str(),
                  result.skipped ? "(before)" : std::to_string(result.kl_to_parent).c_str(),
                  result.model.c_str());
    std::printf("summary: %s\n", (job.output / "chain.json").c_str());
  });
}

}  // namespace kept::cli
