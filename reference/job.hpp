// reference/job.hpp: a training job, as a JSON file (`kept train JOB.json`).
//
// clang-format off
//   {
//     "objective": "xkd-logit",              // xkd-logit | xkd-logit-mse | xkd-hidden | ce | norm-only
//     "device": "cpu",                       // cpu (fp32) | cuda (bf16 weights and activations,
//                                            //   fp32 master weights unless memory.master_weights
//                                            //   is "none";
//                                            //   the GPU, or its host emulation in a
//                                            //   KEPT_CUDA_EMULATION build)
//     "student": "runs/converted",           // checkpoint to train, or "init" to start from scratch:
//     "init": {"config": "config.json", "seed": 0, "std": 0.02},
//     "teacher": "models/orion",             // frozen; needed by the xkd objectives and norm-only
//     "tokenizer": "models/orion/tokenizer.model",  // default: the student's, then the teacher's
//     "data": {"train": "corpus.txt", "held_out_fraction": 0.05, "seq_len": 256, "seed": 0},
//     "batch_size": 8,
//     "grad_accum": 1,
//     "steps": 1000,
//     "optimizer": {"lr": 3e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
//                   "decay_norms": false, "decay_biases": false,
//                   "min_8bit_size": 4096},    // int8 states: for parameters of at least this size
//     "memory": {                            // each field optional: unset = `kept plan`'s choice
//       "activation_checkpointing": false,   // keep layer inputs only, recompute in backward
//       "teacher": "resident",               // resident | streamed | offline
//       "teacher_logits": "runs/logits",     // offline: what `kept teacher-logits` wrote
//       "optimizer_states": "fp32",          // fp32 | bf16 | int8 (blockwise, kept/train/adamw.hpp)
//       "master_weights": "fp32",            // fp32 | none (cuda: bf16 weights, stochastic rounding)
//       "states_on": "device",               // device | host
//       "gradients": "buffer"},              // buffer | none (each layer's update inside backward)
//     "model_config": "shapes.json",         // HF config.json of the student's shapes, for
//                                            //   `kept plan` and `kept train --synthetic` when the
//                                            //   checkpoints are not at hand (relative paths:
//                                            //   from the job file's directory)
//     "schedule": {"warmup_steps": 50, "min_lr": 3e-5},
//     "clip_grad_norm": 1.0,
//     "temperature": 1.0,                    // xkd-logit
//     "centre_teacher": false,               // xkd-hidden: compare with centred teacher states
//     "norm_only": {"loss": "opm-l2", "init": "random", "seed": 0},
//     "eval": {"every": 100, "max_batches": 16},
//     "checkpoint": {"every": 200, "keep": 2},
//     "log_every": 1,
//     "output": "runs/xkd-logit",
//     "output_dtype": "bf16"                 // dtype of the final HF checkpoint (default: the student's)
//   }
// clang-format on
// Unknown fields are errors (a misspelt "weight_decay" must not silently train without decay),
// and every error names the job file and the field. Command-line flags override fields.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace kept::cli {

enum class Objective { XkdLogit, XkdLogitMse, XkdHidden, CrossEntropy, NormOnly };
const char* objective_name(Objective objective);
bool needs_teacher(Objective objective);

struct TrainJob {
  std::filesystem::path file;  // where the job came from (errors name it)
  Objective objective = Objective::XkdLogit;
  std::string device = "cpu";  // "cpu" or "cuda"
  std::string student;         // checkpoint directory; empty when init_config is set
  std::string init_config;     // "init": {"config": ...}
  std::uint64_t init_seed = 0;
  double init_std = 0.02;
  std::string teacher;
  std::string tokenizer;
  std::string train_data;
  double held_out_fraction = 0.05;
  std::int64_t seq_len = 256;
  std::uint64_t data_seed = 0;
  std::int64_t batch_size = 8;
  std::int64_t grad_accum = 1;
  // Data parallel over several ranks (mpirun): 0 replicated states, 1 optimizer states sharded,
  // 2 gradients reduce-scattered too, 3 weights sharded too (reference/trainer_run.hpp,
  // kept/train/zero.hpp). Unset: the planner's choice (reference/plan.hpp).
  std::optional<std::int64_t> zero_stage;
  std::int64_t steps = 100;
  double lr = 3e-4, beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8, weight_decay = 0.1;
  bool decay_norms = false, decay_biases = false;
  std::int64_t min_8bit_size = 4096;
  // "memory": unset fields (nullopt, "") are chosen by the planner (reference/plan.hpp).
  std::optional<bool> activation_checkpointing;
  std::string memory_teacher;    // resident | streamed | offline
  std::string teacher_logits;    // offline: the directory `kept teacher-logits` wrote
  std::string optimizer_states;  // fp32 | bf16 | int8
  std::string master_weights;    // fp32 | none
  std::string states_on;         // device | host
  std::string gradients;         // buffer | none
  std::string model_config;      // resolved against the job file's directory
  std::int64_t warmup_steps = 0;
  double min_lr = 0.0;
  double clip_grad_norm = 1.0;  // 0 = off
  double temperature = 1.0;
  bool centre_teacher = false;
  std::string norm_only_loss = "opm-l2";  // opm-l2 | xkd-logit
  std::string norm_only_init = "copy";    // copy (keep the student's) | random
  std::uint64_t norm_only_seed = 0;
  std::int64_t eval_every = 0;  // 0 = only at the end
  std::int64_t eval_max_batches = 16;
  std::int64_t checkpoint_every = 0;  // 0 = only the final model
  std::int64_t checkpoint_keep = 2;
  std::int64_t log_every = 1;
  std::string output = "runs/job";
  std::string output_dtype;  // f32 | bf16 | f16; empty: the student's

  // The job as canonical JSON (sorted keys, every field): what the config hash is taken of.
  nlohmann::json to_json() const;
};

// Sets json[a][b][c] = value for "a.b.c=value" (`--set`); the value is JSON when it parses as
// JSON, else a string.
void apply_job_override(nlohmann::json& json, const std::string& assignment);
// Reads and validates a job file.
TrainJob read_job(const std::filesystem::path& path);
// Parses a job from JSON (`where` names its source in errors).
TrainJob parse_job(const nlohmann::json& json, const std::string& where);
// Checks cross-field constraints (teacher present when needed, positive sizes, ...).
void validate_job(const TrainJob& job);

}  // namespace kept::cli
