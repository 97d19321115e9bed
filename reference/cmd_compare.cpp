// kept compare RUN_DIR [RUN_DIR...] --out curves.png [--metric train_loss] [--labels a,b,c]
//              [--json]
//
// Several `kept train` runs side by side: one chart with every run's curve of a metric (log y
// when every value is positive) and a table against the first run, the reference:
//
//   run | steps | first | final | mean of the last 20 | last-20 mean vs the reference |
//   worst per-step |value - reference| / reference's first value (over the steps both logged)
//
// The metric is RECORD-TYPE_FIELD of the runs' metrics.jsonl (reference/train_metrics.hpp,
// written by reference/trainer_run.hpp): train_loss (the default), train_grad_norm, train_lr,
// eval_perplexity, eval_kl, eval_top1_agreement, ...
//
// --json prints the table as one JSON object:
//   {"metric": "train_loss", "out": "curves.png", "reference": LABEL,
//    "runs": [{"label", "directory", "metrics", "steps" (points logged), "last_step", "first",
//              "final", "tail_mean", "tail_points" (min(20, steps)),
//              "tail_vs_reference" (tail_mean / the reference's - 1; null for the reference),
//              "worst_step_difference" (null for the reference, or without shared steps),
//              "shared_steps"}]}
//
// Every input is read and checked before the PNG is written, and write_png renames a complete
// file into place, so a bad input never leaves a half-written or stale-looking chart.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "kept/core/error.hpp"
#include "kept/io/json.hpp"
#include "plot.hpp"

namespace kept::cli {
namespace {

namespace fs = std::filesystem;

// The last 20 steps: the end of a run is noisy step to step, and one step's value says little
// about where a curve settled.
constexpr std::size_t kTailPoints = 20;

struct Options {
  std::vector<std::string> runs;
  std::string out;
  std::string metric = "train_loss";
  std::string labels;
  bool json = false;
};

struct Metric {
  std::string type, field;  // "train_loss": records of type "train", their field "loss"
};

Metric parse_metric(const std::string& name) {
  const std::size_t split = name.find('_');
  KEPT_CHECK(split != std::string::npos && split > 0 && split + 1 < name.size(),
             "kept compare --metric ", detail::quote_json(name),
             ": expected RECORD-TYPE_FIELD of metrics.jsonl, e.g. train_loss, train_grad_norm, "
             "eval_perplexity, eval_kl");
  return {name.substr(0, split), name.substr(split + 1)};
}

struct Run {
  std::string label;
  fs::path directory, metrics;
  std::vector<std::int64_t> steps;
  std::vector<double> values;
};

// The run's name in the chart and the table: its directory's name ("runs/int8/" -> "int8").
std::string directory_label(const fs::path& directory) {
  fs::path path = fs::absolute(directory).lexically_normal();
  if (path.filename().empty()) path = path.parent_path();
  return path.filename().string();
}

// Reads one run's series. A record is checked only as far as this command relies on it: every
// line a JSON object with a string "type", and every record of the metric's type an integer step
// (strictly increasing: the trainer logs each step once, also across a resume) and a numeric
// field. A last line without its newline is a write cut short by a kill or still under way
// (MetricsLog drops it on resume too), so it is skipped with a note instead of failing.
Run read_run(const std::string& argument, const Metric& metric, const std::string& metric_name) {
  Run run;
  run.directory = argument;
  std::error_code error;
  KEPT_CHECK(fs::exists(run.directory, error), argument,
             ": no such run directory (expected the output directory of `kept train`)");
  KEPT_CHECK(fs::is_directory(run.directory, error), argument,
             ": not a directory (expected the output directory of `kept train`, which holds "
             "metrics.jsonl)");
  run.metrics = run.directory / "metrics.jsonl";
  KEPT_CHECK(fs::is_regular_file(run.metrics, error), run.metrics.string(), ": not found (is ",
             argument, " the output directory of `kept train`?)");
  run.label = directory_label(run.directory);

  std::ifstream in(run.metrics, std::ios::binary);
  KEPT_CHECK(in.good(), run.metrics.string(), ": cannot open");
  std::string line;
  std::int64_t number = 0;
  bool any_record_of_type = false;
  while (std::getline(in, line)) {
    ++number;
    const bool unterminated = in.eof();
    const std::string where = run.metrics.string() + ":" + std::to_string(number);
    if (line.empty() && !unterminated) fail(where, ": empty line (expected one JSON object)");
    if (line.empty()) break;
    nlohmann::json record;
    try {
      record = detail::parse_json_strict(line, where, 8);
    } catch (const Error&) {
      if (!unterminated) throw;
      std::fprintf(stderr, "kept compare: %s: skipping an unfinished last line\n",
                   escape_for_message(where).c_str());
      break;
    }
    KEPT_CHECK(record.is_object(), where, ": expected a JSON object, found ",
               detail::describe_json(record));
    KEPT_CHECK(record.contains("type") && record["type"].is_string(), where,
               ": the record has no string field \"type\"");
    if (record["type"].get<std::string>() != metric.type) continue;
    any_record_of_type = true;
    KEPT_CHECK(record.contains("step") && record["step"].is_number_integer(), where, ": the ",
               metric.type, " record has no integer field \"step\"");
    KEPT_CHECK(record.contains(metric.field) && record[metric.field].is_number(), where, ": the ",
               metric.type, " record has no numeric field ", detail::quote_json(metric.field),
               " (for --metric ", metric_name, ")");
    const std::int64_t step = record["step"].get<std::int64_t>();
    KEPT_CHECK(run.steps.empty() || step > run.steps.back(), where, ": step ", step, " after step ",
               run.steps.empty() ? 0 : run.steps.back(),
               " (steps must increase; was this file concatenated from several runs?)");
    run.steps.push_back(step);
    run.values.push_back(record[metric.field].get<double>());
  }
  KEPT_CHECK(!in.bad(), run.metrics.string(), ": read failed");
  KEPT_CHECK(any_record_of_type, run.metrics.string(), ": no \"", metric.type,
             "\" records (for --metric ", metric_name, ")");
  return run;
}

std::vector<std::string> split_labels(const std::string& text) {
  std::vector<std::string> labels;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    labels.push_back(text.substr(start, comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return labels;
}

struct Row {
  std::size_t steps = 0;
  std::int64_t last_step = 0;
  double first = 0, final = 0, tail_mean = 0;
  std::size_t tail_points = 0;
  std::optional<double> tail_vs_reference, worst_step_difference;
  std::size_t shared_steps = 0;
};

double tail_mean(const Run& run, std::size_t points) {
  double sum = 0;
  for (std::size_t i = run.values.size() - points; i < run.values.size(); ++i)
    sum += run.values[i];
  return sum / static_cast<double>(points);
}

Row summarise(const Run& run, const Run* reference) {
  Row row;
  row.steps = run.values.size();
  row.last_step = run.steps.back();
  row.first = run.values.front();
  row.final = run.values.back();
  row.tail_points = std::min(kTailPoints, run.values.size());
  row.tail_mean = tail_mean(run, row.tail_points);
  if (!reference) return row;
  // The reference's tail over as many points as this run's, so two runs of different lengths
  // are compared over the same number of steps.
  row.tail_vs_reference =
      row.tail_mean / tail_mean(*reference, std::min(row.tail_points, reference->values.size())) -
      1;
  // The per-step difference is taken against the reference's first value, not the same step's:
  // a loss that falls towards zero (KL to the teacher) makes a per-step ratio noise.
  std::map<std::int64_t, double> by_step;
  for (std::size_t i = 0; i < reference->steps.size(); ++i)
    by_step.emplace(reference->steps[i], reference->values[i]);
  double worst = 0;
  for (std::size_t i = 0; i < run.steps.size(); ++i) {
    const auto found = by_step.find(run.steps[i]);
    if (found == by_step.end()) continue;
    ++row.shared_steps;
    worst = std::max(worst,
                     std::abs(run.values[i] - found->second) / std::abs(reference->values.front()));
  }
  if (row.shared_steps > 0) row.worst_step_difference = worst;
  return row;
}

nlohmann::json optional_json(const std::optional<double>& value) {
  return value ? nlohmann::json(*value) : nlohmann::json();
}

void run_compare(const Options& options) {
  const Metric metric = parse_metric(options.metric);
  std::vector<std::string> labels;
  if (!options.labels.empty()) {
    labels = split_labels(options.labels);
    KEPT_CHECK(labels.size() == options.runs.size(), "kept compare --labels ",
               detail::quote_json(options.labels), ": ", labels.size(), " label(s) for ",
               options.runs.size(), " run(s)");
  }
  std::vector<Run> runs;
  for (std::size_t i = 0; i < options.runs.size(); ++i) {
    runs.push_back(read_run(options.runs[i], metric, options.metric));
    if (!labels.empty()) runs.back().label = labels[i];
  }

  std::vector<Row> rows;
  for (std::size_t i = 0; i < runs.size(); ++i)
    rows.push_back(summarise(runs[i], i == 0 ? nullptr : &runs[0]));

  // A log axis drops values <= 0 (a learning rate at step 0, a KL of exactly 0); then the whole
  // chart goes linear rather than silently losing points.
  bool positive = true;
  for (const Run& run : runs)
    for (double value : run.values)
      positive = positive && value > 0;
  Chart chart{metric.type == "train" && metric.field == "loss" ? std::string("training loss")
                                                               : metric.type + " " + metric.field,
              "step",
              metric.field,
              positive,
              {}};
  for (const Run& run : runs)
    chart.series.push_back({run.label, std::vector<double>(run.steps.begin(), run.steps.end()),
                            run.values, metric.type != "train"});
  write_png(options.out, {chart});

  if (options.json) {
    nlohmann::json out{{"metric", options.metric},
                       {"out", options.out},
                       {"reference", runs[0].label},
                       {"runs", nlohmann::json::array()}};
    for (std::size_t i = 0; i < runs.size(); ++i) {
      const Row& row = rows[i];
      out["runs"].push_back({{"label", runs[i].label},
                             {"directory", runs[i].directory.string()},
                             {"metrics", runs[i].metrics.string()},
                             {"steps", row.steps},
                             {"last_step", row.last_step},
                             {"first", row.first},
                             {"final", row.final},
                             {"tail_mean", row.tail_mean},
                             {"tail_points", row.tail_points},
                             {"tail_vs_reference", optional_json(row.tail_vs_reference)},
                             {"worst_step_difference", optional_json(row.worst_step_difference)},
                             {"shared_steps", row.shared_steps}});
    }
    std::printf("%s\n", out.dump(2, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    return;
  }

  std::size_t width = 3;
  for (const Run& run : runs)
    width = std::max(width, escape_for_message(run.label).size());
  std::printf("%s of %zu run(s); reference: %s\n", options.metric.c_str(), runs.size(),
              escape_for_message(runs[0].label).c_str());
  std::printf("| %-*s | %6s | %12s | %12s | %12s | %14s | %17s |\n", static_cast<int>(width), "run",
              "steps", "first", "final", "last-20 mean", "vs reference", "worst |diff|/ref0");
  std::printf("|%s|%s|%s|%s|%s|%s|%s|\n", std::string(width + 2, '-').c_str(),
              std::string(8, '-').c_str(), std::string(14, '-').c_str(),
              std::string(14, '-').c_str(), std::string(14, '-').c_str(),
              std::string(16, '-').c_str(), std::string(19, '-').c_str());
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const Row& row = rows[i];
    char relative[32] = "-", worst[32] = "-";
    if (row.tail_vs_reference)
      std::snprintf(relative, sizeof relative, "%+.3f%%", 100 * *row.tail_vs_reference);
    if (row.worst_step_difference)
      std::snprintf(worst, sizeof worst, "%.3e", *row.worst_step_difference);
    std::printf("| %-*s | %6zu | %12.6g | %12.6g | %12.6g | %14s | %17s |\n",
                static_cast<int>(width), escape_for_message(runs[i].label).c_str(), row.steps,
                row.first, row.final, row.tail_mean, relative, worst);
  }
  std::printf("chart: %s\n", options.out.c_str());
}

}  // namespace

void register_compare(CLI::App& app) {
  auto [command, options] = add_command<Options>(
      app, "compare", "Compare the training curves of several runs: one chart and a table");
  command
      ->add_option("runs", options->runs,
                   "Output directories of `kept train` (each holds metrics.jsonl); the first is "
                   "the reference")
      ->required();
  command->add_option("--out", options->out, "The chart to write (PNG)")->required();
  command
      ->add_option("--metric", options->metric,
                   "RECORD-TYPE_FIELD of metrics.jsonl: train_loss, train_grad_norm, "
                   "eval_perplexity, eval_kl, ...")
      ->capture_default_str();
  command->add_option("--labels", options->labels,
                      "Comma-separated names of the runs (default: their directory names)");
  command->add_flag("--json", options->json, "Print the table as JSON for scripts");
  command->callback([options] { run_compare(*options); });
}

}  // namespace kept::cli
