// reference/chain.hpp: `kept chain JOB.json`, the anchors of Chain-based Distillation: from a
// teacher checkpoint, a chain of Llama models of decreasing size, each initialised as the
// previous one mapped to its shape (kept/convert/resize.hpp) and distilled from it with
// XKD-logit (stepwise: the teacher of anchor k is anchor k - 1). Each anchor is an ordinary
// `kept train` run whose final model is a complete HF checkpoint.
//
// The job:
//   {
//     "teacher": "runs/teacher",            a Llama checkpoint with its tokenizer
//     "output": "runs/chain",
//     "anchors": [                           largest first, each smaller than the one before
//       {"name": "a1", "config": {"hidden_size": 96, "num_attention_heads": 6,
//                                 "intermediate_size": 256, "num_hidden_layers": 3},
//        "steps": 200},
//       ...
//     ],
//     "train": { kept train job fields shared by every anchor: data, batch_size, optimizer,
//                schedule, eval, checkpoint, ... (not objective, teacher, student, output,
//                steps: the chain sets those) }
//   }
// An anchor's "config" holds the HF config fields that differ from the teacher's config.json;
// the vocabulary and head size stay. The output: <output>/<name>/init (the mapped start),
// <output>/<name>/run (the training run: metrics.jsonl, loss.png, checkpoints, final/) and
// <output>/chain.json (every anchor's size and final evaluation against its own teacher).
// Resumable like `kept train`: --resume skips the anchors whose run has its final model and
// resumes the first unfinished one from its newest checkpoint.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/model/config.hpp"

namespace kept::cli {

struct ChainAnchor {
  std::string name;
  ModelConfig config;
  nlohmann::json config_fields;  // as the job gave them
  std::int64_t steps = 0;
};

struct ChainJob {
  std::filesystem::path file;
  std::filesystem::path teacher, output;
  ModelConfig teacher_config;
  std::vector<ChainAnchor> anchors;
  nlohmann::json train;  // the shared kept train fields
};

struct ChainOptions {
  bool resume = false, force = false, quiet = false;
};

struct ChainAnchorResult {
  std::string name;
  std::filesystem::path model;  // <output>/<name>/run/final
  double parameters = 0;
  double perplexity = 0, kl_to_parent = 0;  // held-out, at the end of its run
  bool skipped = false;                     // finished before (--resume)
};

// Reads and checks a chain job (every anchor's shape and the shared train fields) without
// touching the output.
ChainJob read_chain_job(const std::filesystem::path& path);
std::vector<ChainAnchorResult> run_chain(const ChainJob& job, const ChainOptions& options);

}  // namespace kept::cli
