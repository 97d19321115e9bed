// reference/experiments.hpp: what the experiments of `kept experiments` share
// (reference/cmd_experiments.cpp: the command, the shared setup and the OPM experiments;
// reference/experiments_xkd.cpp: the distillation experiments).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "demo.hpp"

namespace kept::cli::experiments {

// What every experiment starts from (built once in <output>/shared).
struct Shared {
  std::filesystem::path corpus, tokenizer, teacher, paper;
  ModelConfig teacher_config;
  TrainJob base;
  std::int64_t seeds = 3;
  std::int64_t vocab = 2000;
};

struct Spread {
  double mean = 0, sd = 0;  // sample standard deviation (0 for one value)
};
Spread spread(const std::vector<double>& values);
// "mean ± sd" with `digits` decimals.
std::string with_spread(const Spread& s, int digits);

// XKD (or cross-entropy uptraining) of `student` for `steps` steps with data seed `seed`,
// evaluating every `eval_every` steps (0: at the end only), into `output`. The teacher is
// `teacher` (the shared one when empty); `job` starts from the shared base job unless given.
TrainResult distil(const Shared& shared, Objective objective, const std::filesystem::path& student,
                   std::int64_t steps, std::uint64_t seed, std::int64_t eval_every,
                   const std::filesystem::path& output, const TrainJob* job = nullptr,
                   const std::filesystem::path& teacher = {});

// The shared corpus's training documents (not the held-out ones), in corpus order.
std::vector<std::string> training_documents(const Shared& shared);
// Those documents as text in `path` (one blank line between documents), about 512 KB of them:
// more than the largest calibration set takes, and saves tokenizing the whole corpus.
std::filesystem::path in_domain_text(const Shared& shared, const std::filesystem::path& path);
// The C headers directly under /usr/include (valid UTF-8 only), sorted by name: another domain
// than the corpus. Each header is one document; at most `bytes` of them. Empty when there are
// none.
std::vector<std::string> c_headers(std::size_t bytes);

// Writes `dir`/table.md (the table, then the verdict) and table.json (with "verdict" added),
// and prints both.
void write_tables(const std::filesystem::path& dir, const std::string& md, nlohmann::json json,
                  const std::string& verdict);

// The experiments (each writes table.md, table.json and a PNG into `dir`).
void estimator(const Shared& shared, const DemoRun& demo, const std::filesystem::path& dir);
void weight_decay(const Shared& shared, const DemoRun& demo, const std::filesystem::path& dir);
void objectives(const Shared& shared, const DemoRun& demo, const std::filesystem::path& dir);
void two_domains(const Shared& shared, const DemoRun& demo, const std::filesystem::path& dir);
void context_length(const Shared& shared, const DemoRun& demo, const std::filesystem::path& dir);

}  // namespace kept::cli::experiments
