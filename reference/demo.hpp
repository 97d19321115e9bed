// reference/demo.hpp: what `kept demo` and `kept demo --cbd` (reference/demo_cbd.cpp) share.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "calibration.hpp"
#include "evaluate.hpp"
#include "job.hpp"
#include "kept/convert/convert.hpp"
#include "kept/train/loader.hpp"
#include "models.hpp"
#include "trainer.hpp"

namespace kept::cli {

struct DemoOptions {
  std::string output;  // default: runs/demo, or runs/demo-cbd with --cbd
  std::string corpus;  // default: built from Debian packages
  double scale = 1.0;  // multiplies every step count
  bool force = false;
  bool cbd = false;  // Chain-based Distillation instead of KEPT
};

// A demo's output directory (emptied with --force, else refused when not empty), its clock and
// its step counts.
class DemoRun {
 public:
  explicit DemoRun(const DemoOptions& options);
  const std::filesystem::path& out() const { return out_; }
  // `base` steps times --scale, at least 1.
  std::int64_t steps(std::int64_t base) const;
  // Prints "[elapsed] what" as a stage heading.
  void stage(const std::string& what) const;
  double elapsed_seconds() const;

 private:
  std::filesystem::path out_;
  double scale_;
  std::chrono::steady_clock::time_point start_;
};

// The training settings every demo run shares: the corpus and tokenizer, 2% held out, 16
// sequences of 128 tokens a step, evaluation on 8 batches, float32 outputs.
TrainJob demo_base_job(const std::filesystem::path& corpus, const std::filesystem::path& tokenizer);

// A byte-fallback SentencePiece tokenizer of `vocab` pieces on `corpus`, in `out`/tokenizer.
std::filesystem::path demo_tokenizer(const std::filesystem::path& corpus,
                                     const std::filesystem::path& out, std::int64_t vocab);
// The demo's toy Orion (LayerNorm) teacher: 4 layers, hidden 128, 4 heads, intermediate 352.
ModelConfig demo_orion_config(std::int64_t vocab);
// Pretrains a model of `config` from random weights with cross-entropy on `base`'s data into
// `directory` (its final model in `directory`/final).
// `decay_everything` decays the norms' gains and biases too (by default only the matrices and
// the embedding decay).
TrainResult pretrain_demo_teacher(const TrainJob& base, const ModelConfig& config,
                                  const std::filesystem::path& directory, std::int64_t steps,
                                  double weight_decay, bool quiet, bool decay_everything = false);
// The Orion `teacher` converted to Llama with OPM `mode` into `destination` with the tokenizer
// (calibrated mode: w* solved on `calibration`).
std::filesystem::path convert_demo_teacher(const std::filesystem::path& teacher,
                                           const ModelConfig& teacher_config,
                                           const std::filesystem::path& tokenizer, OpmMode mode,
                                           const CalibrationData* calibration,
                                           const std::filesystem::path& destination);

// corpus.txt in `output` from the Debian corpora (one document per Bible chapter and fortune).
std::filesystem::path build_corpus(const std::filesystem::path& output);

// Held-out scores against a teacher on the documents a demo's training runs set aside (the same
// corpus, tokenizer, seed and fraction as `job`; empty documents dropped, as the trainer does).
class DemoEvaluator {
 public:
  DemoEvaluator(const std::filesystem::path& corpus, const std::filesystem::path& tokenizer,
                const TrainJob& job, const std::filesystem::path& teacher);
  // On every one of `documents` (another domain, say), packed into `seq_len` tokens, `batch`
  // sequences at a time.
  DemoEvaluator(const std::vector<std::string>& documents, const std::filesystem::path& tokenizer,
                std::int64_t seq_len, std::int64_t batch, const std::filesystem::path& teacher);
  // Perplexity (overall and by context length), KL to the teacher and top-1 agreement of the
  // checkpoint in `model`, on at most 16 batches.
  EvalReport score(const std::filesystem::path& model);

 private:
  Cpu cpu_;
  std::vector<Batch> held_out_;
  LoadedModel teacher_;
};

// `value` with `digits` decimals.
std::string fixed(double value, int digits);

// A run's held-out evaluations from its metrics.jsonl (lines that do not parse are skipped).
struct EvalPoint {
  double step = 0, kl = 0;
};
std::vector<EvalPoint> eval_curve(const std::filesystem::path& run);

// Chain-based Distillation at demo scale: a Llama teacher, three anchors, two targets between
// them, four initialisations each, the same training budget (reference/demo_cbd.cpp).
void run_cbd_demo(const DemoOptions& options);

}  // namespace kept::cli
