// kept plan JOB.json [--gpu h100-80g|h200-141g|a100-80g|a100-40g] [--gpus N | --ranks N]
//                    [--interconnect nvlink|ib] [--host-memory GB] [--set field=value ...]
//                    [--device cpu|cuda] [--json]
//
// The memory and time arithmetic of a training job on a target (reference/plan.hpp): every
// buffer a step holds, the plan that fits with the fewest approximations, its projected step
// time, MFU and hours, and, when nothing fits, by how much and what would. With N ranks (GPUs,
// or for a cpu job processes of this host: mpirun -np N kept train), per rank, with each ZeRO
// stage's communication and a table of the stages (docs/scaling.md).
#include <cstdio>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kept/io/json.hpp"
#include "plan.hpp"
#include "trainer.hpp"

namespace kept::cli {
namespace {

// Far above any machine kept plans for; it keeps the rank arithmetic in int.
constexpr std::int64_t kMaxRanks = 65536;

struct Options {
  std::string job;
  std::string gpu;
  std::int64_t gpus = 1;
  std::string interconnect;
  double host_memory_gb = 0;
  std::vector<std::string> overrides;
  std::string device;
  bool json = false;
};

}  // namespace

void register_plan(CLI::App& app) {
  auto [command, options] = add_command<Options>(
      app, "plan", "Memory and time plan of a training job on a GPU (or the CPU)");
  add_existing_file(command, "job", options->job, "Job file (JSON; see reference/job.hpp)");
  command->add_option("--gpu", options->gpu,
                      "GPU to plan for: " + gpu_names() +
                          " (default: h100-80g for a cuda job, the CPU "
                          "for a cpu job)");
  command
      ->add_option("--gpus,--ranks", options->gpus,
                   "Data-parallel ranks: GPUs for a cuda job, processes of this host for a cpu "
                   "job (mpirun -np N kept train); the job's batch x grad_accum stays the global "
                   "batch, so grad_accum must be >= N")
      ->check(CLI::Range(std::int64_t{1}, kMaxRanks))
      ->capture_default_str();
  command
      ->add_option("--interconnect", options->interconnect,
                   "Link between the GPUs: nvlink (one node, default up to 8 GPUs) or ib "
                   "(InfiniBand across nodes, default above 8); a cpu job's ranks use shared "
                   "memory")
      ->check(CLI::IsMember({"nvlink", "ib"}));
  command
      ->add_option("--host-memory", options->host_memory_gb,
                   "Host memory in GB for streamed teachers and host states (default: this "
                   "machine's)")
      ->check(CLI::PositiveNumber);
  command->add_option("--set", options->overrides,
                      "Override a job field: field.path=value (repeatable)");
  command->add_option("--device", options->device, "Override \"device\": cpu or cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  command->add_flag("--json", options->json, "Print JSON for scripts instead of the tables");
  command->callback([options] {
    const std::string text = detail::read_text_file(options->job, 16ull << 20);
    nlohmann::json json = detail::parse_json_strict(text, options->job, 16);
    for (const std::string& assignment : options->overrides)
      apply_job_override(json, assignment);
    if (!options->device.empty()) json["device"] = options->device;
    if (!options->gpu.empty() && !json.contains("device")) json["device"] = "cuda";
    const TrainJob job = parse_job(json, options->job);
    validate_job(job);
    KEPT_CHECK(options->gpu.empty() || job.device == "cuda", options->job,
               ": --gpu plans a cuda job, and this job's device is \"", job.device,
               "\" (pass --device cuda)");
    TargetSpec target = job.device == "cuda"
                            ? gpu_spec(options->gpu.empty() ? "h100-80g" : options->gpu)
                            : cpu_spec();
    KEPT_CHECK(options->interconnect.empty() || !target.cpu, "--interconnect ",
               options->interconnect,
               ": a cpu job's ranks are processes of this host and talk "
               "through shared memory; --interconnect plans GPUs");
    target.interconnect = options->interconnect;
    if (options->gpus > 1) interconnect(target, options->gpus);  // refuses a link out of reach
    const double host_memory =
        options->host_memory_gb > 0 ? options->host_memory_gb * 1e9 : cpu_spec().memory_bytes;
    PlanJob plan_input = plan_job(job, cuda_emulated());
    plan_input.ranks = options->gpus;
    const std::vector<Plan> plans = all_plans(plan_input, target, host_memory);
    const Plan* chosen = choose_plan(plans, false);
    const Plan* runnable = choose_plan(plans, true);
    // The job's own memory fields or ZeRO stage, where it sets any: the best plan that keeps
    // them, one kept train can run when there is one (what kept train would pick), else any
    // (what it would cost).
    const bool job_sets = job.activation_checkpointing || !job.memory_teacher.empty() ||
                          !job.optimizer_states.empty() || !job.master_weights.empty() ||
                          !job.states_on.empty() || !job.gradients.empty() ||
                          job.zero_stage.has_value();
    std::optional<Plan> job_plan;
    if (job_sets) {
      std::vector<Plan> kept;
      for (const Plan& plan : plans)
        if (keeps_job_fields(job, plan_input, plan.strategy)) kept.push_back(plan);
      const Plan* best = choose_plan(kept, true);
      if (!best) best = choose_plan(kept, false);
      Strategy strategy;
      if (best) {
        strategy = best->strategy;
        // One rank enumerates stage 0 alone: the job's stage then only says where states live.
        if (job.zero_stage) strategy.zero_stage = static_cast<int>(*job.zero_stage);
      } else {
        strategy = resolve_strategy(job, plan_input, target, host_memory);  // nothing fits
      }
      job_plan = estimate(plan_input, strategy, target, host_memory);
    }
    // Several GPUs: kept train's NCCL path has not run on a GPU yet (reference/trainer.cpp).
    const std::string note =
        plan_input.ranks > 1 && !target.cpu
            ? "kept train's data parallel over NCCL has not run on a GPU yet (issue 11); the "
              "figures over several GPUs are projections of the stated model, not measurements"
            : "";
    if (options->json) {
      nlohmann::json out{{"target", target.name},
                         {"target_memory_bytes", target.memory_bytes},
                         {"host_memory_bytes", host_memory},
                         {"tokens_per_step", plan_input.tokens_per_step()},
                         {"steps", plan_input.steps},
                         {"ranks", plan_input.ranks},
                         {"grad_accum", plan_input.grad_accum},
                         {"micro_batches_per_rank", plan_input.micro_batches_per_rank()},
                         {"fits", chosen != nullptr}};
      if (!note.empty()) out["note"] = note;
      if (plan_input.grad_accum < plan_input.ranks)
        out["error"] = "grad_accum " + std::to_string(plan_input.grad_accum) + " is below the " +
                       std::to_string(plan_input.ranks) +
                       " ranks: kept train needs grad_accum >= N (micro-batch m runs on rank m "
                       "mod N)";
      out["plan"] = chosen ? plan_json(*chosen) : nlohmann::json();
      out["runnable_plan"] = runnable ? plan_json(*runnable) : nlohmann::json();
      if (job_plan) out["job_plan"] = plan_json(*job_plan);
      nlohmann::json all = nlohmann::json::array();
      for (const Plan& plan : plans)
        all.push_back(plan_json(plan));
      out["all"] = std::move(all);
      // Each stage's best plan (fitting, else null), as the text's stage table.
      if (plan_input.ranks > 1) {
        nlohmann::json stages = nlohmann::json::object();
        for (int stage = 0; stage <= 3; ++stage) {
          std::vector<Plan> at_stage;
          for (const Plan& plan : plans)
            if (plan.strategy.zero_stage == stage) at_stage.push_back(plan);
          const Plan* best = choose_plan(at_stage, false);
          stages[std::to_string(stage)] = best ? plan_json(*best) : nlohmann::json();
        }
        out["stages"] = std::move(stages);
      }
      std::printf("%s\n", out.dump(2).c_str());
      return;
    }
    std::printf("%s", format_plan_report(plan_input, target, host_memory, plans, chosen, runnable,
                                         job_plan ? &*job_plan : nullptr)
                          .c_str());
    if (!note.empty()) std::printf("\nnote: %s.\n", note.c_str());
  });
}

}  // namespace kept::cli
