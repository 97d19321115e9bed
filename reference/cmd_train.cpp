// kept train JOB.json [--resume] [--force] [--set field=value ...] [--steps N] [--output DIR]
//                     [--device cpu|cuda]
//
// Runs a training job (reference/job.hpp documents the file). Flags override the job's fields;
// --set reaches any field by its dotted path ("optimizer.lr=1e-4", "data.seq_len=512").
//
// `mpirun -np N kept train JOB.json`: data parallel over N processes (reference/trainer.hpp,
// TrainOptions::communicator). A kept launched by mpirun (its environment says so) starts MPI
// here; rank 0 prints and writes, the other ranks are quiet.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kept/io/json.hpp"
#include "plan.hpp"
#include "trainer.hpp"
#ifdef KEPT_WITH_MPI
#include "kept/dist/mpi_communicator.hpp"
#endif

namespace kept::cli {
namespace {

// The variable an MPI launcher sets in every process it starts (Open MPI, then PMI/PMIx ones),
// or null when kept was started on its own.
const char* mpi_launcher_variable() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(name)) return name;
  return nullptr;
}

struct Options {
  std::string job;
  std::vector<std::string> overrides;
  std::int64_t steps = 0;
  std::string output;
  std::string device;
  TrainOptions train;
};

}  // namespace

void register_train(CLI::App& app) {
  auto [command, options] = add_command<Options>(
      app, "train", "Run a training job: XKD, uptraining, pretraining, norm-only");
  add_existing_file(command, "job", options->job, "Job file (JSON; see reference/job.hpp)");
  command->add_flag("--resume", options->train.resume,
                    "Continue from the newest checkpoint in the output directory");
  command->add_flag("--force", options->train.force,
                    "Start over, replacing a run in the output directory");
  command->add_option("--set", options->overrides,
                      "Override a job field: field.path=value (repeatable)");
  command->add_option("--steps", options->steps, "Override \"steps\"")->check(CLI::PositiveNumber);
  command->add_option("--output", options->output, "Override \"output\"");
  command->add_option("--device", options->device, "Override \"device\": cpu or cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  command
      ->add_option(
          "--gpu", options->train.gpu,
          "Plan for this GPU kind and cap kept's device memory at its budget: " + gpu_names())
      ->check([](const std::string& name) {
        try {
          (void)gpu_spec(name);
          return std::string();
        } catch (const Error& error) {
          return std::string(error.what());
        }
      });
  command->add_flag("--nccl", options->train.nccl,
                    "On a GPU, run the collectives through NCCL even as one process (a check of "
                    "the NCCL path; mpirun -np N on GPUs uses NCCL anyway)");
  command->add_flag("--synthetic", options->train.synthetic,
                    "Random weights and tokens of the job's shapes, no files: time --steps steps "
                    "(default 5) and project the job's hours");
  command->callback([options] {
    const std::string text = detail::read_text_file(options->job, 16ull << 20);
    nlohmann::json json = detail::parse_json_strict(text, options->job, 16);
    for (const std::string& assignment : options->overrides)
      apply_job_override(json, assignment);
    // A synthetic run times --steps steps and projects the job's own step count.
    if (options->steps && options->train.synthetic)
      options->train.synthetic_steps = options->steps;
    else if (options->steps)
      json["steps"] = options->steps;
    if (!options->output.empty()) json["output"] = options->output;
    if (!options->device.empty()) json["device"] = options->device;
    const TrainJob job = parse_job(json, options->job);
    TrainOptions train = options->train;
#ifdef KEPT_WITH_MPI
    // An exception leaving this scope skips MPI_Finalize (MpiSession): mpirun then ends every
    // rank, so an error seen by one rank never leaves the others waiting.
    std::optional<MpiSession> mpi;
    std::unique_ptr<MpiCommunicator> communicator;
    if (mpi_launcher_variable()) {
      mpi.emplace();
      communicator = std::make_unique<MpiCommunicator>();
      train.communicator = communicator.get();
      if (communicator->rank() != 0) train.quiet = true;
      if (communicator->rank() == 0 && communicator->size() > 1)
        std::fprintf(stderr, "data parallel: %d ranks (MPI)\n", communicator->size());
    }
#else
    if (const char* variable = mpi_launcher_variable())
      fail("kept train was started by an MPI launcher (", variable,
           " is set), but this kept was built without MPI; install Open MPI "
           "(scripts/install_deps.sh) and build again, or run kept train without mpirun");
#endif
    const TrainResult result = run_training(job, train);
    if (options->train.synthetic || (train.communicator && train.communicator->rank() != 0)) return;
    std::printf("trained %lld steps, %lld tokens in %.1f s (%.0f tokens/s); final loss %.5f\n",
                static_cast<long long>(result.steps), static_cast<long long>(result.tokens),
                result.seconds, result.tokens_per_second, result.final_loss);
    if (result.eval.tokens) {
      std::printf("held-out: perplexity %.3f", result.eval.student_perplexity);
      if (result.eval.has_teacher)
        std::printf(" (teacher %.3f), KL %.5f, top-1 agreement %.2f%%",
                    result.eval.teacher_perplexity, result.eval.kl, 100 * result.eval.agreement);
      std::printf(" on %lld tokens\n", static_cast<long long>(result.eval.tokens));
    }
    std::printf("model: %s\nmetrics: %s/metrics.jsonl\nplot: %s/loss.png\n",
                result.final_model.c_str(), job.output.c_str(), job.output.c_str());
  });
}

}  // namespace kept::cli
