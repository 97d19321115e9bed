// kept eval MODEL --data FILE [--teacher T] [--seq-len N] [--json out.json] [--plot out.png]
//           [--device cpu|cuda]
//
// Scores a model on text: perplexity, and against a teacher KL(teacher || model) and top-1
// agreement, plus perplexity as a function of context length (positions 0, 1, 2-3, 4-7, ...),
// the measurement of the report's Figure 4. Every token of the file is scored once.
#include <cstdio>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "eval_run.hpp"
#include "kept/io/atomic_file.hpp"
#include "plot.hpp"

namespace kept::cli {
namespace {

using Options = EvalOptions;

void run(const Options& options) {
  Cpu cpu;
  const EvalReport report = options.device == "cuda" ? score_on_cuda(options) : score(cpu, options);

  std::printf("%s on %s: %lld tokens\n", options.model.c_str(), options.data.c_str(),
              static_cast<long long>(report.tokens));
  std::printf("  perplexity        %.4f\n", report.student_perplexity);
  if (report.has_teacher) {
    std::printf("  teacher           %.4f (%s)\n", report.teacher_perplexity,
                options.teacher.c_str());
    std::printf("  KL(teacher||model) %.5f nats/token\n", report.kl);
    std::printf("  top-1 agreement   %.2f%%\n", 100 * report.agreement);
  }
  std::printf("  perplexity by context length (positions):\n");
  for (std::size_t k = 0; k < report.bucket_start.size(); ++k) {
    const std::int64_t start = report.bucket_start[k],
                       end = std::min(options.seq_len, start ? 2 * start : 1) - 1;
    std::printf("    %5lld-%-5lld %10.4f", static_cast<long long>(start),
                static_cast<long long>(end), report.student_perplexity_by_context[k]);
    if (report.has_teacher)
      std::printf("   teacher %10.4f", report.teacher_perplexity_by_context[k]);
    std::printf("\n");
  }
  if (!options.json.empty()) {
    nlohmann::json json{{"model", options.model},
                        {"data", options.data},
                        {"tokens", report.tokens},
                        {"perplexity", report.student_perplexity},
                        {"context_bucket_start", report.bucket_start},
                        {"perplexity_by_context", report.student_perplexity_by_context}};
    if (report.has_teacher) {
      json["teacher"] = options.teacher;
      json["teacher_perplexity"] = report.teacher_perplexity;
      json["kl"] = report.kl;
      json["top1_agreement"] = report.agreement;
      json["teacher_perplexity_by_context"] = report.teacher_perplexity_by_context;
    }
    write_file_atomically(options.json, json.dump(2) + "\n");
  }
  if (!options.plot.empty()) {
    Chart chart{"perplexity by context length",
                "position in the sequence (bucket start)",
                "perplexity",
                true,
                {}};
    std::vector<double> x(report.bucket_start.begin(), report.bucket_start.end());
    for (double& value : x)
      value = std::max(value, 0.5);
    chart.series.push_back({"model", x, report.student_perplexity_by_context, true});
    if (report.has_teacher)
      chart.series.push_back({"teacher", x, report.teacher_perplexity_by_context, true});
    write_png(options.plot, {chart});
  }
}

}  // namespace

void register_eval(CLI::App& app) {
  auto [command, options] = add_command<Options>(
      app, "eval", "Perplexity, KL to a teacher, top-1 agreement, by context length");
  add_existing_directory(command, "model", options->model, "Checkpoint directory");
  add_existing_file(command, "--data", options->data, "Text to score (plain text or JSONL)");
  add_existing_directory(command, "--teacher", options->teacher,
                         "Teacher checkpoint for KL and agreement", Need::Optional);
  add_existing_file(command, "--tokenizer", options->tokenizer,
                    "SentencePiece model (default: the model's)", Need::Optional);
  add_positive(command, "--seq-len", options->seq_len, "Sequence length");
  add_positive(command, "--batch-size", options->batch_size, "Sequences per batch");
  command->add_option("--max-batches", options->max_batches, "Stop after this many batches")
      ->check(CLI::PositiveNumber);
  command->add_option("--json", options->json, "Write the results as JSON");
  command->add_option("--plot", options->plot, "Write perplexity by context length as a PNG");
  command->add_option("--device", options->device, "cpu (fp32) or cuda (bf16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  command->callback([options] { run(*options); });
}

}  // namespace kept::cli
