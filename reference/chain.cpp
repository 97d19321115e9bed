#include "chain.hpp"

#include <cstdio>
#include <set>

#include "interpolate.hpp"
#include "job.hpp"
#include "kept/convert/resize.hpp"
#include "kept/core/error.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/json.hpp"
#include "trainer.hpp"

namespace kept::cli {

namespace fs = std::filesystem;

namespace {

// The fields the chain sets for every anchor's run.
constexpr const char* kChainSetFields[] = {"objective", "teacher", "student",
                                           "output",    "steps",   "init"};

fs::path anchor_directory(const ChainJob& job, const ChainAnchor& anchor) {
  return job.output / anchor.name;
}

// The kept train job of anchor k: the shared fields, then what the chain sets.
nlohmann::json anchor_job(const ChainJob& job, std::size_t k, const fs::path& parent) {
  const ChainAnchor& anchor = job.anchors[k];
  nlohmann::json json = job.train;
  const fs::path directory = anchor_directory(job, anchor);
  json["objective"] = "xkd-logit";
  json["teacher"] = parent.string();
  json["student"] = (directory / "init").string();
  json["output"] = (directory / "run").string();
  json["steps"] = anchor.steps;
  return json;
}

bool finished(const fs::path& run) {
  std::error_code error;
  return fs::is_regular_file(run / "final" / "config.json", error);
}

}  // namespace

ChainJob read_chain_job(const fs::path& path) {
  const std::string where = path.string();
  const nlohmann::json json =
      detail::parse_json_strict(detail::read_text_file(path, 16ull << 20), where, 16);
  KEPT_CHECK(json.is_object(), where, ": a chain job is a JSON object");
  for (const auto& [key, value] : json.items())
    KEPT_CHECK(key == "teacher" || key == "output" || key == "anchors" || key == "train", where,
               ": unknown field \"", key, "\" (a chain job has teacher, output, anchors, train)");
  ChainJob job;
  job.file = path;
  // Paths as kept train reads them: relative to the working directory.
  auto resolve = [&](const char* key) {
    auto found = json.find(key);
    KEPT_CHECK(found != json.end() && found->is_string() && !found->get<std::string>().empty(),
               where, ": field \"", key, "\" must be a non-empty path");
    return fs::path(found->get<std::string>());
  };
  job.teacher = resolve("teacher");
  job.output = resolve("output");
  const fs::path teacher_config = job.teacher / "config.json";
  std::error_code error;
  KEPT_CHECK(fs::is_regular_file(teacher_config, error), where, ": teacher ", job.teacher.string(),
             " has no config.json");
  const nlohmann::json teacher_json = detail::parse_json_strict(
      detail::read_text_file(teacher_config, kMaxConfigFileBytes), teacher_config.string(), 64);
  job.teacher_config = parse_hf_config(teacher_json, teacher_config.string());
  KEPT_CHECK(job.teacher_config.architecture == Architecture::Llama, where, ": teacher ",
             job.teacher.string(), " is ", architecture_name(job.teacher_config.architecture),
             "; the chain distils Llama models (convert it first: kept convert)");

  job.train = json.value("train", nlohmann::json::object());
  KEPT_CHECK(job.train.is_object(), where, ": field \"train\" must be an object");
  for (const char* key : kChainSetFields)
    KEPT_CHECK(!job.train.contains(key), where, ": field \"train.", key,
               "\" is set by the chain for every anchor; leave it out");

  auto anchors = json.find("anchors");
  KEPT_CHECK(anchors != json.end() && anchors->is_array() && !anchors->empty(), where,
             ": field \"anchors\" must be a non-empty array");
  std::set<std::string> names;
  double previous = parameter_count(job.teacher_config);
  std::string previous_name = "the teacher";
  for (std::size_t k = 0; k < anchors->size(); ++k) {
    const nlohmann::json& entry = (*anchors)[k];
    const std::string at = where + ": anchors[" + std::to_string(k) + "]";
    KEPT_CHECK(entry.is_object(), at, " must be an object");
    for (const auto& [key, value] : entry.items())
      KEPT_CHECK(key == "name" || key == "config" || key == "steps", at, ": unknown field \"", key,
                 "\" (an anchor has name, config, steps)");
    ChainAnchor anchor;
    KEPT_CHECK(entry.contains("name") && entry["name"].is_string(), at,
               ": \"name\" must be a string");
    anchor.name = entry["name"].get<std::string>();
    KEPT_CHECK(detail::is_plain_file_name(anchor.name) && anchor.name != "chain.json", at,
               ": name \"", anchor.name, "\" must be a plain directory name");
    KEPT_CHECK(names.insert(anchor.name).second, at, ": name \"", anchor.name, "\" is used twice");
    KEPT_CHECK(entry.contains("steps") && entry["steps"].is_number_integer() &&
                   entry["steps"].get<std::int64_t>() >= 1,
               at, ": \"steps\" must be a positive integer");
    anchor.steps = entry["steps"].get<std::int64_t>();
    anchor.config_fields = entry.value("config", nlohmann::json::object());
    KEPT_CHECK(anchor.config_fields.is_object(), at,
               ": \"config\" must be an object of HF config "
               "fields");
    nlohmann::json config_json = teacher_json;
    for (const auto& [key, value] : anchor.config_fields.items())
      config_json[key] = value;
    // The teacher's head_dim follows from its hidden size and heads unless stated.
    if (!anchor.config_fields.contains("head_dim")) config_json.erase("head_dim");
    anchor.config = parse_hf_config(config_json, at + ".config");
    check_resizable(job.teacher_config, "the teacher", anchor.config, at + ".config");
    const double parameters = parameter_count(anchor.config);
    KEPT_CHECK(parameters < previous, at, ": ", anchor.name, " has ",
               static_cast<long long>(parameters), " parameters, not fewer than ", previous_name,
               "'s ", static_cast<long long>(previous),
               "; a chain's anchors get smaller, largest first");
    previous = parameters;
    previous_name = anchor.name;
    job.anchors.push_back(std::move(anchor));
  }
  // Every anchor's run must be a valid kept train job (checked now, before any work).
  for (std::size_t k = 0; k < job.anchors.size(); ++k) {
    const fs::path parent =
        k == 0 ? job.teacher : anchor_directory(job, job.anchors[k - 1]) / "run" / "final";
    const TrainJob train =
        parse_job(anchor_job(job, k, parent), where + " (anchor " + job.anchors[k].name + ")");
    (void)train;
  }
  return job;
}

std::vector<ChainAnchorResult> run_chain(const ChainJob& job, const ChainOptions& options) {
  std::error_code error;
  const bool exists = fs::exists(job.output / "chain.json", error) ||
                      fs::exists(anchor_directory(job, job.anchors.front()), error);
  if (exists && !options.resume && !options.force)
    fail(job.output.string(),
         ": holds a chain already; pass --resume to continue it, or --force to start over");
  if (options.force && !options.resume) {
    for (const ChainAnchor& anchor : job.anchors)
      fs::remove_all(anchor_directory(job, anchor), error);
    fs::remove(job.output / "chain.json", error);
  }
  fs::create_directories(job.output, error);
  KEPT_CHECK(!error, job.output.string(),
             ": cannot create the output directory: ", error.message());

  std::vector<ChainAnchorResult> results;
  fs::path parent = job.teacher;
  nlohmann::json summary{{"teacher", job.teacher.string()},
                         {"teacher_parameters", parameter_count(job.teacher_config)},
                         {"anchors", nlohmann::json::array()}};
  for (std::size_t k = 0; k < job.anchors.size(); ++k) {
    const ChainAnchor& anchor = job.anchors[k];
    const fs::path directory = anchor_directory(job, anchor);
    ChainAnchorResult result;
    result.name = anchor.name;
    result.parameters = parameter_count(anchor.config);
    result.model = directory / "run" / "final";
    if (!options.quiet)
      std::fprintf(stderr, "chain: anchor %zu/%zu %s (%.0f parameters) from %s\n", k + 1,
                   job.anchors.size(), anchor.name.c_str(), result.parameters, parent.c_str());
    nlohmann::json train_json = anchor_job(job, k, parent);
    const fs::path job_file = directory / "train.json";
    if (finished(directory / "run") && options.resume) {
      result.skipped = true;
      if (!options.quiet)
        std::fprintf(stderr, "chain: %s finished before; kept as it is\n", anchor.name.c_str());
    } else {
      if (!fs::is_regular_file(directory / "init" / "config.json", error)) {
        InterpolationRequest init;
        init.anchors = {parent};
        init.target = anchor.config;
        init.target.dtype = job.teacher_config.dtype;
        init.output = directory / "init";
        init.force = true;  // an init without its config.json is an interrupted one
        init.quiet = options.quiet;
        interpolate_checkpoints(init);
      }
      write_file_atomically(job_file, train_json.dump(2) + "\n");
      TrainOptions train_options;
      train_options.resume = options.resume;
      train_options.force = options.force && !options.resume;
      train_options.quiet = options.quiet;
      const TrainJob train = parse_job(train_json, job_file.string());
      const TrainResult trained = run_training(train, train_options);
      result.perplexity = trained.eval.student_perplexity;
      result.kl_to_parent = trained.eval.kl;
    }
    summary["anchors"].push_back({{"name", anchor.name},
                                  {"parameters", result.parameters},
                                  {"config", anchor.config_fields},
                                  {"steps", anchor.steps},
                                  {"teacher", parent.string()},
                                  {"model", result.model.string()},
                                  {"perplexity", result.perplexity},
                                  {"kl_to_teacher", result.kl_to_parent},
                                  {"resumed_finished", result.skipped}});
    write_file_atomically(job.output / "chain.json", summary.dump(2) + "\n");
    results.push_back(result);
    parent = result.model;
  }
  return results;
}

}  // namespace kept::cli
