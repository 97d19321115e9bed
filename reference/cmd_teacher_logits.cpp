// kept teacher-logits JOB.json [--k K] [--output DIR] [--device cpu|cuda]
//                   [--positions-per-shard N] [--force]
//
// The offline teacher (memory.teacher "offline"): runs the job's teacher once over every
// position the job's training will see, in the trainer's order, and stores its top-k log-probs
// and tail mass per position in a sharded, checksummed directory (kept/io/teacher_logits.hpp);
// the student's KL then comes from that file (kept/xkd/sparse_kl.hpp) and the teacher need not
// be in memory during training. reference/teacher_logits_run.hpp has the run itself.
#include <cstdio>
#include <memory>
#include <string>

#include "commands.hpp"
#include "kept/backend/cpu.hpp"
#include "teacher_logits_run.hpp"

namespace kept::cli {
namespace {

using Options = TeacherLogitsOptions;

void run(const Options& options) {
  const TrainJob job = read_job(options.job);
  const std::string device = options.device.empty() ? job.device : options.device;
  TeacherLogitsSummary summary;
  if (device == "cuda") {
    summary = run_teacher_logits_cuda(job, options);
  } else {
    Cpu cpu;
    summary = precompute_teacher_logits(cpu, job, options);
  }
  std::printf("%s: %lld positions, top-%lld + tail, %lld shard(s), %s (%lld B a position), %s\n",
              summary.directory.c_str(), static_cast<long long>(summary.positions),
              static_cast<long long>(options.k), static_cast<long long>(summary.shards),
              format_bytes(static_cast<std::uint64_t>(summary.bytes)).c_str(),
              static_cast<long long>(teacher_record_bytes(options.k)),
              format_duration(summary.seconds).c_str());
  // The tail is what the sparse KL sees only as one bucket; a large r means a loose objective
  // (kept/xkd/sparse_kl.hpp: KL_dense - KL_sparse = r KL(tail || tail)): raise --k then.
  std::printf("  tail mass outside the top-%lld: mean %.4f, max %.4f\n",
              static_cast<long long>(options.k), summary.mean_tail_mass, summary.max_tail_mass);
}

}  // namespace

void register_teacher_logits(CLI::App& app) {
  auto [command, options] = add_command<Options>(
      app, "teacher-logits",
      "Precompute the teacher's top-k log-probs + tail mass for every training position of a job "
      "(the offline teacher)");
  add_existing_file(command, "job", options->job, "Training job (JSON)");
  add_positive(command, "--k", options->k, "Log-probs kept per position");
  command->add_option("--output", options->output,
                      "Output directory (default: the job's memory.teacher_logits, else "
                      "<output>/teacher-logits)");
  command->add_option("--device", options->device, "cpu (fp32) or cuda (bf16); default: the job's")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  add_positive(command, "--positions-per-shard", options->positions_per_shard,
               "Positions per shard file");
  command->add_flag("--force", options->force, "Replace an existing teacher-logits directory");
  command->callback([options] { run(*options); });
}

}  // namespace kept::cli
