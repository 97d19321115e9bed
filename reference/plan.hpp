// reference/plan.hpp: the memory and time planner behind `kept plan` and the defaults of a job's
// "memory" fields.
//
// For a job (its model shapes, objective, batch) and a target (a GPU of a known kind, or the
// CPU), the planner lists every buffer a training step holds, the way the trainer allocates
// them (reference/trainer_run.hpp and the layers it drives), and projects the step time from
// per-op rates. It then enumerates the memory strategies (job field "memory", reference/job.hpp):
//
// clang-format off
//   activation_checkpointing  keep only each layer's input; recompute the layer in backward
//   teacher                   resident | streamed (layer by layer from pinned host memory,
//                             the next layer prefetched) | offline (top-k log-probs from a file)
//   optimizer_states          fp32 | bf16 | int8 (AdamW's m and v; int8 = blockwise, kept/core/dynamic_code.hpp)
//   master_weights            fp32 | none (bf16 weights, the update rounded stochastically)
//   states_on                 device | host (the states streamed through the device each step)
//   gradients                 buffer | none (each layer's update inside backward)
// clang-format on
//
// and picks, among the plans that fit and run within 25% of the fastest of them, the one with the
// fewest approximations (int8 or bf16 states, no master weights, the offline teacher's top-k
// change the numbers; checkpointing, streaming, host states and per-layer updates do not),
// fastest among those. Strategies kept train cannot run yet are
// planned, marked, and never chosen as a job's default.
//
// Time model (stated, not measured, until bench/RESULTS.md has GPU figures): GEMMs at a fixed
// fraction of the dense bf16 peak, attention at a lower one, memory-bound ops (norms, RoPE,
// SwiGLU, residual adds, the optimizer, the softmax over logits) at a fraction of HBM bandwidth,
// host transfers at a fraction of the PCIe link. Streamed teacher layers overlap the teacher's
// compute; the slower of the two counts. MFU = model FLOPs / (time x peak), model FLOPs = student
// 6N + teacher 2N (when it runs) + causal attention, recompute excluded.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "job.hpp"
#include "kept/model/config.hpp"

namespace kept::cli {

// A training target: a GPU kind (peaks from the vendors' data sheets) or the CPU.
struct TargetSpec {
  std::string name;         // "h100-80g"
  std::string description;  // "NVIDIA H100 SXM 80 GB"
  double memory_bytes = 0;  // what the device reports as total
  double peak_flops = 0;    // dense bf16 (fp32 for the CPU), per second
  double memory_bandwidth = 0;
  double host_link = 0;  // host <-> device bytes per second (PCIe), 0 for the CPU
  bool cpu = false;
};

// The known GPU kinds; throws naming the unknown one and the list.
const TargetSpec& gpu_spec(const std::string& name);
std::string gpu_names();
// The CPU this runs on: its memory from /proc/meminfo, a stated fp32 rate.
TargetSpec cpu_spec();

// One strategy, every field decided.
struct Strategy {
  bool checkpointing = false;
  std::string teacher = "resident";  // resident | streamed | offline | none (no teacher)
  std::string states = "fp32";       // fp32 | bf16 | int8
  bool master = true;                // fp32 master weights (CUDA; the CPU's weights are their own)
  bool states_on_host = false;
  bool gradient_buffer = true;

  std::string describe() const;
  // How many approximations it makes (0 = the reference numbers).
  int approximations() const;
  // Which choices kept train cannot run for this job (empty: it can).
  std::vector<std::string> not_runnable(const struct PlanJob& job) const;
};

// What the planner reads of a job.
struct PlanJob {
  ModelConfig student, teacher;
  bool has_teacher = false;
  Objective objective = Objective::XkdLogit;
  std::int64_t batch = 1, seq = 1, grad_accum = 1, steps = 1;
  std::int64_t min_8bit_size = 4096;
  std::int64_t token_chunk =
      256;  // the logit objectives' token chunk (kept/xkd/chunked_logits.hpp)
  std::int64_t offline_k = 32;
  bool cuda = false;      // bf16 activations and weights, fp32 gradients
  bool emulated = false;  // the CUDA backend's host emulation (no cuBLASLt workspace)
  // false: the objective sets its gradients without the student's backward (norm-only
  // "opm-l2"), so no layer can be updated inside backward (gradients "none")
  bool student_backward = true;
  std::string source;  // where the shapes came from
  std::int64_t tokens_per_step() const { return batch * seq * grad_accum; }
};

// The shapes of `job`: "model_config" when set, else the student's (or init) config; the
// teacher's config.json when the checkpoint is at hand, else the student's shapes as an
// Orion-style LayerNorm decoder.
PlanJob plan_job(const TrainJob& job, bool emulated);

struct MemoryTerm {
  std::string name;
  double bytes = 0;
  bool host = false;  // pinned host memory (streamed teacher, host states) rather than device
  std::string detail;
};

struct Plan {
  Strategy strategy;
  std::vector<MemoryTerm> terms;
  double device_bytes = 0;   // predicted peak of kept's device allocations during a step
  double host_bytes = 0;     // pinned host memory the plan needs
  double device_budget = 0;  // what the target leaves for kept (total less the runtime's reserve)
  bool fits = false;
  std::vector<std::string> not_runnable;
  // Time.
  double step_seconds = 0, model_flops_per_step = 0, mfu = 0, job_hours = 0;
  double peak_flops = 0;                // the target's, for MFU
  double offline_precompute_hours = 0;  // teacher offline: the one-time pass over the data
  double total_seconds_per_step = 0;    // step_seconds + the precompute spread over the steps
  std::vector<std::pair<std::string, double>> time_terms;  // seconds per step
};

// Everything one strategy costs on one target.
Plan estimate(const PlanJob& job, const Strategy& strategy, const TargetSpec& target,
              double host_memory_bytes);

// Every valid strategy for the job, estimated.
std::vector<Plan> all_plans(const PlanJob& job, const TargetSpec& target, double host_memory_bytes);

// The best plan: fits, within 25% of the fastest that fits (wall time per step, the offline
// teacher's precompute included), fewest approximations, then fastest;
// among runnable plans only when `runnable_only`. Null when none fits.
const Plan* choose_plan(const std::vector<Plan>& plans, bool runnable_only);

// The strategy a job runs with: its "memory" fields, the rest from the best runnable plan that
// keeps them (or the reference strategy when none fits: the trainer's own checks then refuse).
// The offline teacher is a default only when the job names its file (memory.teacher_logits).
Strategy resolve_strategy(const TrainJob& job, const PlanJob& plan_job, const TargetSpec& target,
                          double host_memory_bytes);

// A table for people (kept plan) and the same as JSON (kept plan --json).
std::string format_plan_report(const PlanJob& job, const TargetSpec& target, double host_memory,
                               const std::vector<Plan>& plans, const Plan* chosen,
                               const Plan* chosen_runnable, const Plan* job_plan);
nlohmann::json plan_json(const Plan& plan);

}  // namespace kept::cli
