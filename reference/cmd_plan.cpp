// kept plan JOB.json [--gpu h100-80g|h200-141g|a100-80g|a100-40g] [--gpus N] [--host-memory GB]
//                    [--set field=value ...] [--device cpu|cuda] [--json]
//
// The memory and time arithmetic of a training job on a target (reference/plan.hpp): every
// buffer a step holds, the plan that fits with the fewest approximations, its projected step
// time, MFU and hours, and, when nothing fits, by how much and what would.
#include <cstdio>
#include <string>
#include <vector>

#include "commands.hpp"
#include "kept/io/json.hpp"
#include "plan.hpp"
#include "trainer.hpp"

namespace kept::cli {
namespace {

struct Options {
  std::string job;
  std::string gpu;
  std::int64_t gpus = 1;
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
  add_positive(command, "--gpus", options->gpus, "Number of GPUs (data parallel)");
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
    KEPT_CHECK(options->gpus == 1, "kept plan --gpus ", options->gpus,
               ": plans over several GPUs come with data parallelism and ZeRO sharding, which "
               "kept does not have yet; plan for one GPU");
    KEPT_CHECK(options->gpu.empty() || job.device == "cuda", options->job,
               ": --gpu plans a cuda job, and this job's device is \"", job.device,
               "\" (pass --device cuda)");
    const TargetSpec target = job.device == "cuda"
                                  ? gpu_spec(options->gpu.empty() ? "h100-80g" : options->gpu)
                                  : cpu_spec();
    const double host_memory =
        options->host_memory_gb > 0 ? options->host_memory_gb * 1e9 : cpu_spec().memory_bytes;
    const PlanJob plan_input = plan_job(job, cuda_emulated());
    const std::vector<Plan> plans = all_plans(plan_input, target, host_memory);
    const Plan* chosen = choose_plan(plans, false);
    const Plan* runnable = choose_plan(plans, true);
    // The job's own memory fields, where it sets any: that strategy's plan.
    const bool job_sets = job.activation_checkpointing || !job.memory_teacher.empty() ||
                          !job.optimizer_states.empty() || !job.master_weights.empty() ||
                          !job.states_on.empty() || !job.gradients.empty();
    std::optional<Plan> job_plan;
    if (job_sets)
      job_plan = estimate(plan_input, resolve_strategy(job, plan_input, target, host_memory),
                          target, host_memory);
    if (options->json) {
      nlohmann::json out{{"target", target.name},
                         {"target_memory_bytes", target.memory_bytes},
                         {"host_memory_bytes", host_memory},
                         {"tokens_per_step", plan_input.tokens_per_step()},
                         {"steps", plan_input.steps},
                         {"fits", chosen != nullptr}};
      out["plan"] = chosen ? plan_json(*chosen) : nlohmann::json();
      out["runnable_plan"] = runnable ? plan_json(*runnable) : nlohmann::json();
      if (job_plan) out["job_plan"] = plan_json(*job_plan);
      nlohmann::json all = nlohmann::json::array();
      for (const Plan& plan : plans)
        all.push_back(plan_json(plan));
      out["all"] = std::move(all);
      std::printf("%s\n", out.dump(2).c_str());
      return;
    }
    std::printf("%s", format_plan_report(plan_input, target, host_memory, plans, chosen, runnable,
                                         job_plan ? &*job_plan : nullptr)
                          .c_str());
  });
}

}  // namespace kept::cli
