// reference/plan.hpp: the memory and time planner behind `kept plan` and the defaults of a job's
// "memory" fields and "zero_stage".
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
//   zero_stage (N ranks)      0 replicated | 1 optimizer states sharded | 2 gradients too
//                             (needs gradients none) | 3 the layers' weights too (gradients
//                             none, grad_accum a multiple of N)
// clang-format on
//
// and picks, among the plans that fit and run within 25% of the fastest of them, the one with the
// fewest approximations (int8 or bf16 states, no master weights, the offline teacher's top-k
// change the numbers; checkpointing, streaming, host states, per-layer updates and the ZeRO
// stage do not), fastest among those. Strategies kept train cannot run yet are planned, marked,
// and never chosen as a job's default.
//
// Time model (stated, not measured, until bench/RESULTS.md has GPU figures): GEMMs at a fixed
// fraction of the dense bf16 peak, attention at a lower one, memory-bound ops (norms, RoPE,
// SwiGLU, residual adds, the optimizer, the softmax over logits) at a fraction of HBM bandwidth,
// host transfers at a fraction of the PCIe link. Streamed teacher layers overlap the teacher's
// compute; the slower of the two counts. MFU = model FLOPs / (time x peak), model FLOPs = student
// 6N + teacher 2N (when it runs) + causal attention, recompute excluded.
//
// Many ranks (PlanJob::ranks = N, `kept plan --gpus N`; docs/scaling.md): the global batch stays
// batch x grad_accum sequences, micro-batch m runs on rank m mod N, so a rank computes
// ceil(grad_accum / N) micro-batches and the step is the slowest rank's. Every figure of a plan
// is per rank (the frozen teacher is replicated on every rank); MFU is over the N devices. With
// E the arena's elements (padded slots), f = (N - 1) / N and w the bytes of a weight (2 on cuda,
// 4 on the CPU), a rank sends per step:
//   stage 0  gradient all-reduce 2 f 4 E (whole buffer at the end, or each layer's inside backward
//            with gradients none)
//   stage 1  gradient reduce-scatter f 4 E (likewise), weight all-gather f w E (likewise: at the
//            end, or each layer's right after its update inside backward)
//   stage 2  as stage 1 (it is stage 1 with gradients none: kept train runs them alike)
//   stage 3  gradient reduce-scatter f 4 E, per-layer weight all-gather f w E_layer per layer per
//            forward micro-batch and once per layer in backward (but the last two, still there
//            from the last forward), the parts outside the layers (embedding, final norm, LM
//            head; held whole) all-gathered at the end. The per-layer gathers are not prefetched
//            (kept/train/zero.hpp): they never hide
// Time of a collective = calls x latency + bytes / bus bandwidth of the link (Interconnect).
// Overlap, on a GPU (collectives on a second stream, kept/dist/nccl_communicator.cuh): a
// collective issued inside the layer walk for layer l hides behind the compute on the next layer
// up to that layer's compute time; one layer's (the last of the walk) and every end-of-step
// collective are exposed. The CPU's MPI communicator blocks: nothing hides there.
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
  // Between ranks: "nvlink" or "ib" for a GPU, "shm" (MPI on one host) for the CPU; empty: the
  // default for the rank count (interconnect()).
  std::string interconnect;
};

// The link between ranks, as the planner charges it.
struct Interconnect {
  std::string name;          // "nvlink"
  std::string description;   // "NVLink 4 via NVSwitch (450 GB/s a direction)"
  double bus_bandwidth = 0;  // bytes per second a rank sends over it (nccl-tests' busbw)
  double latency = 0;        // seconds a collective call costs beyond its bytes
  // kept's collectives send every piece point to point, to each peer alike, so of a rank's bytes
  // the share bound for other nodes crosses this link and the rest stays inside the node at
  // node_bandwidth (InfiniBand between nodes of 8 GPUs: (N - 8) / (N - 1) crosses).
  double remote_fraction = 1, node_bandwidth = 0;
  // Seconds to send `bytes` (per rank) in `calls` collective calls.
  double seconds(double bytes, double calls) const;
};

// The link `target` uses between `ranks` ranks: target.interconnect, or by default NVLink up to
// 8 GPUs (one node) and InfiniBand above (nodes of 8; asked for with 8 or fewer GPUs, one GPU a
// node), shared memory for the CPU. Throws naming a link the target has not.
Interconnect interconnect(const TargetSpec& target, std::int64_t ranks);
// The names --interconnect takes.
std::string interconnect_names();

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
  // ZeRO stage over several ranks (job field "zero_stage", kept/train/zero.hpp): 0 replicated,
  // 1 optimizer states sharded, 2 gradients too (gradient_buffer false), 3 weights too.
  int zero_stage = 0;

  // Names the stage when there are several ranks or it is above 0.
  std::string describe(std::int64_t ranks = 1) const;
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
  // Data-parallel ranks (mpirun -np N, kept plan --gpus N): micro-batch m on rank m mod N.
  std::int64_t ranks = 1;
  // The global batch, whatever the ranks.
  std::int64_t tokens_per_step() const { return batch * seq * grad_accum; }
  // The micro-batches the busiest rank runs: ceil(grad_accum / ranks).
  std::int64_t micro_batches_per_rank() const { return (grad_accum + ranks - 1) / ranks; }
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

// One collective a rank takes part in each step.
struct Collective {
  std::string name;  // "gradient all-reduce", "gradient reduce-scatter", "weight all-gather", ...
  double bytes = 0;  // sent per rank per step
  double calls = 0;  // collective calls per step (each pays the link's latency)
  double seconds = 0;
  double hidden_seconds = 0;  // of `seconds`, behind compute on a second stream
  bool per_layer = false;     // issued inside the layer walk, else at the end of the step
};

struct Plan {
  Strategy strategy;
  std::int64_t ranks = 1;
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
  // Between ranks (ranks > 1): the link, each collective, and their totals per rank per step.
  Interconnect link;
  std::vector<Collective> collectives;
  double communication_bytes = 0, communication_seconds = 0, hidden_seconds = 0;
};

// Everything one strategy costs on one target.
Plan estimate(const PlanJob& job, const Strategy& strategy, const TargetSpec& target,
              double host_memory_bytes);

// Every valid strategy for the job, estimated: stages 0-3 when job.ranks > 1, 0 alone otherwise;
// stages 2 and 3 only without a gradient buffer.
std::vector<Plan> all_plans(const PlanJob& job, const TargetSpec& target, double host_memory_bytes);

// The best plan: fits, within 25% of the fastest that fits (wall time per step, the offline
// teacher's precompute included), fewest approximations, then fastest;
// among runnable plans only when `runnable_only`. Null when none fits.
const Plan* choose_plan(const std::vector<Plan>& plans, bool runnable_only);

// Whether `s` keeps what `job` sets: its "memory" fields and its "zero_stage" (compared only with
// several ranks, since one rank enumerates stage 0 alone), never stage 2 or 3 with a gradient
// buffer, and the offline teacher only when the job names its file (memory.teacher_logits).
bool keeps_job_fields(const TrainJob& job, const PlanJob& plan_job, const Strategy& s);

// The strategy a job runs with: its "memory" fields and "zero_stage", the rest from the best
// runnable plan that keeps them (or the reference strategy with the job's own choices when none
// fits: the trainer's own checks then refuse). On one rank the job's stage is set on the result.
Strategy resolve_strategy(const TrainJob& job, const PlanJob& plan_job, const TargetSpec& target,
                          double host_memory_bytes);

// A table for people (kept plan) and the same as JSON (kept plan --json).
std::string format_plan_report(const PlanJob& job, const TargetSpec& target, double host_memory,
                               const std::vector<Plan>& plans, const Plan* chosen,
                               const Plan* chosen_runnable, const Plan* job_plan);
nlohmann::json plan_json(const Plan& plan);
// The stages side by side (several ranks): per stage its best plan, one line each.
std::string format_stage_table(const PlanJob& job, const std::vector<Plan>& plans);

}  // namespace kept::cli
