// reference/demo.hpp: what `kept demo` and `kept demo --cbd` (reference/demo_cbd.cpp) share.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "evaluate.hpp"
#include "job.hpp"
#include "kept/train/loader.hpp"
#include "models.hpp"

namespace kept::cli {

struct DemoOptions {
  std::string output;  // default: runs/demo, or runs/demo-cbd with --cbd
  std::string corpus;  // default: built from Debian packages
  double scale = 1.0;  // multiplies every step count
  bool force = false;
  bool cbd = false;  // Chain-based Distillation instead of KEPT
};

// corpus.txt in `output` from the Debian corpora (one document per Bible chapter and fortune).
std::filesystem::path build_corpus(const std::filesystem::path& output);

// Empties `output` (with --force) or refuses a non-empty one, and creates it.
void prepare_demo_output(const std::filesystem::path& output, bool force);

// Held-out scores against a teacher on the documents a demo's training runs set aside (the same
// corpus, tokenizer, seed and fraction as `job`; empty documents dropped, as the trainer does).
class DemoEvaluator {
 public:
  DemoEvaluator(const std::filesystem::path& corpus, const std::filesystem::path& tokenizer,
                const TrainJob& job, const std::filesystem::path& teacher);
  // Perplexity, KL to the teacher and top-1 agreement of the checkpoint in `model`.
  EvalReport score(const std::filesystem::path& model);

 private:
  Cpu cpu_;
  std::vector<Batch> held_out_;
  LoadedModel teacher_;
};

// Chain-based Distillation at demo scale: a Llama teacher, three anchors, two targets between
// them, four initialisations each, the same training budget (reference/demo_cbd.cpp).
void run_cbd_demo(const DemoOptions& options);

}  // namespace kept::cli
