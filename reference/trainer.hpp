// reference/trainer.hpp: the reference trainer behind `kept train` and `kept demo`.
//
// One optimizer step: grad_accum micro-batches of packed text; for each, the frozen teacher's
// forward (no gradients), the student's forward and the objective's gradient, backpropagated
// through the student; then global-norm clipping, the scheduled learning rate and AdamW.
//   xkd-logit      T^2 KL(p_teacher || p_student) per token, chunked over tokens and vocabulary
//   xkd-logit-mse  mean squared error of the raw logits
//   xkd-hidden     the report's Eq. 1 over the L+1 residual-stream slots (the LM head and final
//                  norm get no gradient from it, so they are frozen rather than decayed)
//   ce             next-token cross-entropy: the uptraining baseline, and pretraining
//   norm-only      every parameter frozen but the norm weights (the Appendix-A pilot); its loss
//                  is "opm-l2", OPM's own objective sum_sites ||LN_teacher(x) - RMS_w(x)||^2 on the
//                  teacher's pre-norm activations, or "xkd-logit"
// Runs are resumable bit for bit (on the CPU, and on one GPU): checkpoints hold the fp32
// parameters, AdamW's moments, the data loader's position and the step; every reduction in kept is
// ordered, so a run killed at any moment and resumed from its last checkpoint repeats the same
// losses.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "evaluate.hpp"
#include "job.hpp"
#include "kept/dist/communicator.hpp"

namespace kept::cli {

struct TrainOptions {
  bool resume = false;  // continue from the newest checkpoint in the output directory
  bool force = false;   // start over even if the output directory has a run in it
  bool quiet = false;   // no per-step lines (the demo prints its own)
  // `--gpu NAME`: plan for that GPU kind and cap kept's device memory at its budget
  // (reference/plan.hpp), so a larger GPU behaves like the smaller one.
  std::string gpu;
  double device_memory_bytes = 0;  // the device's total memory (set by run_training_cuda)
  // `--synthetic`: random weights and tokens of the job's shapes, `synthetic_steps` timed steps,
  // nothing read or written but the job file (reference/trainer_run.hpp, run_synthetic).
  bool synthetic = false;
  std::int64_t synthetic_steps = 5;
  // Data parallel (`mpirun -np N kept train`, cmd_train.cpp): the ranks' communicator; null for
  // one process. Each rank runs whole micro-batches of every step (micro-batch m on rank
  // m mod N), the gradients are summed over the ranks in rank order before the update, and
  // rank 0 alone evaluates and writes (metrics, checkpoints, the final model).
  Communicator* communicator = nullptr;
  // The communicator for the arena's buffers (gradients, weights) when they live on a GPU: NCCL,
  // bootstrapped over `communicator` (run_training_cuda); null: `communicator` itself (CPU, or
  // the CUDA emulator's host memory). When set, the collectives run even on one rank.
  Communicator* buffer_communicator = nullptr;
  // `--nccl`: on a GPU, run the collectives through NCCL even as one process (a check of the NCCL
  // path on one GPU, scripts/device.sh); `mpirun -np N` on GPUs uses NCCL anyway.
  bool nccl = false;
};

struct TrainResult {
  std::int64_t steps = 0;
  std::int64_t tokens = 0;
  double seconds = 0;
  double final_loss = 0;
  double tokens_per_second = 0;
  EvalReport eval;                    // held-out evaluation at the end
  std::filesystem::path final_model;  // HF checkpoint
};

// Runs the job on its "device": the CPU (fp32), or the CUDA backend (bf16; a GPU, or its host
// emulation in a KEPT_CUDA_EMULATION build, which says so on its first line).
TrainResult run_training(const TrainJob& job, const TrainOptions& options = {});

// Whether "cuda" is the host emulation (a KEPT_CUDA_EMULATION build).
bool cuda_emulated();
// Whether `mpirun -np N kept train` can run on "cuda": the emulation (MPI stands in for NCCL),
// or a GPU build with NCCL. Empty when it can; else why not.
std::string cuda_data_parallel_unavailable();

// The "cuda" device (trainer_cuda.cpp; without a CUDA build, a clear error).
TrainResult run_training_cuda(const TrainJob& job, const TrainOptions& options);

}  // namespace kept::cli
