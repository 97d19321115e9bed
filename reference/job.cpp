#include "job.hpp"

#include <set>

#include "kept/core/enum_names.hpp"
#include "kept/core/error.hpp"
#include "kept/io/json.hpp"

namespace kept::cli {

namespace {
constexpr EnumName<Objective> kObjectiveNames[] = {{Objective::XkdLogit, "xkd-logit"},
                                                   {Objective::XkdLogitMse, "xkd-logit-mse"},
                                                   {Objective::XkdHidden, "xkd-hidden"},
                                                   {Objective::CrossEntropy, "ce"},
                                                   {Objective::NormOnly, "norm-only"}};
}  // namespace

const char* objective_name(Objective objective) {
  return enum_name(kObjectiveNames, objective).data();  // the table's literals end in '\0'
}

bool needs_teacher(Objective objective) {
  return objective != Objective::CrossEntropy;
}

namespace {

// Reads the fields of one JSON object, refusing unknown ones.
class Fields {
 public:
  Fields(const nlohmann::json& object, std::string where)
      : object_(object), where_(std::move(where)) {
    KEPT_CHECK(object.is_object(), where_, ": expected a JSON object, got ",
               detail::describe_json(object));
  }
  // Call after reading every known field.
  void refuse_unknown() const {
    for (const auto& [key, value] : object_.items())
      KEPT_CHECK(read_.count(key), where_, ": unknown field \"", key, "\"");
  }

  template <class T>
  void get(const char* key, T& target) {
    read_.insert(key);
    auto found = object_.find(key);
    if (found == object_.end() || found->is_null()) return;
    const std::string field = where_ + ": field \"" + key + "\"";
    if constexpr (std::is_same_v<T, bool>) {
      KEPT_CHECK(found->is_boolean(), field, " must be true or false, got ",
                 detail::describe_json(*found));
      target = found->get<bool>();
    } else if constexpr (std::is_same_v<T, std::string>) {
      KEPT_CHECK(found->is_string(), field, " must be a string, got ",
                 detail::describe_json(*found));
      target = found->get<std::string>();
    } else if constexpr (std::is_floating_point_v<T>) {
      KEPT_CHECK(found->is_number(), field, " must be a number, got ",
                 detail::describe_json(*found));
      target = found->get<T>();
    } else {
      KEPT_CHECK(found->is_number_integer(), field, " must be an integer, got ",
                 detail::describe_json(*found));
      if constexpr (std::is_unsigned_v<T>)
        KEPT_CHECK(found->is_number_unsigned(), field, " must be >= 0, got ", found->dump());
      target = found->get<T>();
    }
  }
  // A nested object, read by `read` when present.
  template <class Read>
  void object(const char* key, Read&& read) {
    read_.insert(key);
    auto found = object_.find(key);
    if (found == object_.end() || found->is_null()) return;
    Fields nested(*found, where_ + ": \"" + key + "\"");
    read(nested);
    nested.refuse_unknown();
  }
  bool has(const char* key) const { return object_.contains(key); }
  const std::string& where() const { return where_; }

 private:
  const nlohmann::json& object_;
  std::string where_;
  std::set<std::string> read_;
};

}  // namespace

TrainJob parse_job(const nlohmann::json& json, const std::string& where) {
  TrainJob job;
  job.file = where;
  Fields fields(json, where);
  std::string objective = objective_name(job.objective);
  fields.get("objective", objective);
  const std::optional<Objective> parsed = parse_enum(kObjectiveNames, objective);
  KEPT_CHECK(parsed, where, ": field \"objective\": unknown objective \"", objective, "\" (",
             enum_name_list(kObjectiveNames), ")");
  job.objective = *parsed;
  fields.get("device", job.device);
  KEPT_CHECK(job.device == "cpu" || job.device == "cuda", where,
             ": field \"device\": unknown device \"", job.device, "\" (cpu, cuda)");
  fields.get("student", job.student);
  fields.object("init", [&](Fields& init) {
    init.get("config", job.init_config);
    init.get("seed", job.init_seed);
    init.get("std", job.init_std);
  });
  fields.get("teacher", job.teacher);
  fields.get("tokenizer", job.tokenizer);
  fields.object("data", [&](Fields& data) {
    data.get("train", job.train_data);
    data.get("held_out_fraction", job.held_out_fraction);
    data.get("seq_len", job.seq_len);
    data.get("seed", job.data_seed);
  });
  fields.get("batch_size", job.batch_size);
  fields.get("grad_accum", job.grad_accum);
  fields.get("steps", job.steps);
  fields.object("optimizer", [&](Fields& optimizer) {
    optimizer.get("lr", job.lr);
    optimizer.get("beta1", job.beta1);
    optimizer.get("beta2", job.beta2);
    optimizer.get("eps", job.adam_eps);
    optimizer.get("weight_decay", job.weight_decay);
    optimizer.get("decay_norms", job.decay_norms);
    optimizer.get("decay_biases", job.decay_biases);
  });
  fields.object("schedule", [&](Fields& schedule) {
    schedule.get("warmup_steps", job.warmup_steps);
    schedule.get("min_lr", job.min_lr);
  });
  fields.get("clip_grad_norm", job.clip_grad_norm);
  fields.get("temperature", job.temperature);
  fields.get("centre_teacher", job.centre_teacher);
  fields.object("norm_only", [&](Fields& norm_only) {
    norm_only.get("loss", job.norm_only_loss);
    norm_only.get("init", job.norm_only_init);
    norm_only.get("seed", job.norm_only_seed);
  });
  fields.object("eval", [&](Fields& eval) {
    eval.get("every", job.eval_every);
    eval.get("max_batches", job.eval_max_batches);
  });
  fields.object("checkpoint", [&](Fields& checkpoint) {
    checkpoint.get("every", job.checkpoint_every);
    checkpoint.get("keep", job.checkpoint_keep);
  });
  fields.get("log_every", job.log_every);
  fields.get("output", job.output);
  fields.get("output_dtype", job.output_dtype);
  fields.refuse_unknown();
  return job;
}

TrainJob read_job(const std::filesystem::path& path) {
  const std::string text = detail::read_text_file(path, 16ull << 20);
  return parse_job(detail::parse_json_strict(text, path.string(), 16), path.string());
}

void validate_job(const TrainJob& job) {
  const std::string where = job.file.string();
  auto positive = [&](std::int64_t value, const char* field) {
    KEPT_CHECK(value > 0, where, ": field \"", field, "\" must be positive, got ", value);
  };
  KEPT_CHECK(job.student.empty() != job.init_config.empty(), where,
             ": give exactly one of \"student\" (a checkpoint to train) and \"init\" (a config to "
             "start from)");
  KEPT_CHECK(!needs_teacher(job.objective) || !job.teacher.empty(), where, ": objective \"",
             objective_name(job.objective), "\" needs a \"teacher\" checkpoint");
  KEPT_CHECK(!job.train_data.empty(), where,
             ": field \"data.train\" (the training text) is required");
  positive(job.seq_len, "data.seq_len");
  positive(job.batch_size, "batch_size");
  positive(job.grad_accum, "grad_accum");
  positive(job.steps, "steps");
  positive(job.log_every, "log_every");
  KEPT_CHECK(job.held_out_fraction >= 0 && job.held_out_fraction < 1, where,
             ": field \"data.held_out_fraction\" must be in [0, 1), got ", job.held_out_fraction);
  KEPT_CHECK(job.lr > 0, where, ": field \"optimizer.lr\" must be positive, got ", job.lr);
  KEPT_CHECK(job.min_lr >= 0 && job.min_lr <= job.lr, where,
             ": field \"schedule.min_lr\" must be in [0, lr], got ", job.min_lr);
  KEPT_CHECK(job.warmup_steps >= 0 && job.warmup_steps <= job.steps, where,
             ": field \"schedule.warmup_steps\" must be in [0, steps], got ", job.warmup_steps);
  KEPT_CHECK(job.temperature > 0, where, ": field \"temperature\" must be positive, got ",
             job.temperature);
  KEPT_CHECK(job.clip_grad_norm >= 0, where, ": field \"clip_grad_norm\" must be >= 0, got ",
             job.clip_grad_norm);
  KEPT_CHECK(job.norm_only_loss == "opm-l2" || job.norm_only_loss == "xkd-logit", where,
             ": field \"norm_only.loss\" must be \"opm-l2\" or \"xkd-logit\", got \"",
             job.norm_only_loss, "\"");
  KEPT_CHECK(job.norm_only_init == "copy" || job.norm_only_init == "random", where,
             ": field \"norm_only.init\" must be \"copy\" or \"random\", got \"",
             job.norm_only_init, "\"");
  KEPT_CHECK(job.output_dtype.empty() || job.output_dtype == "f32" || job.output_dtype == "bf16" ||
                 job.output_dtype == "f16",
             where, ": field \"output_dtype\" must be f32, bf16 or f16, got \"", job.output_dtype,
             "\"");
  KEPT_CHECK(job.eval_every >= 0 && job.checkpoint_every >= 0 && job.checkpoint_keep >= 0 &&
                 job.eval_max_batches > 0,
             where, ": eval/checkpoint intervals must be >= 0 and eval.max_batches positive");
}

nlohmann::json TrainJob::to_json() const {
  return {
      {"objective", objective_name(objective)},
      {"device", device},
      {"student", student},
      {"init", {{"config", init_config}, {"seed", init_seed}, {"std", init_std}}},
      {"teacher", teacher},
      {"tokenizer", tokenizer},
      {"data",
       {{"train", train_data},
        {"held_out_fraction", held_out_fraction},
        {"seq_len", seq_len},
        {"seed", data_seed}}},
      {"batch_size", batch_size},
      {"grad_accum", grad_accum},
      {"steps", steps},
      {"optimizer",
       {{"lr", lr},
        {"beta1", beta1},
        {"beta2", beta2},
        {"eps", adam_eps},
        {"weight_decay", weight_decay},
        {"decay_norms", decay_norms},
        {"decay_biases", decay_biases}}},
      {"schedule", {{"warmup_steps", warmup_steps}, {"min_lr", min_lr}}},
      {"clip_grad_norm", clip_grad_norm},
      {"temperature", temperature},
      {"centre_teacher", centre_teacher},
      {"norm_only", {{"loss", norm_only_loss}, {"init", norm_only_init}, {"seed", norm_only_seed}}},
      {"eval", {{"every", eval_every}, {"max_batches", eval_max_batches}}},
      {"checkpoint", {{"every", checkpoint_every}, {"keep", checkpoint_keep}}},
      {"log_every", log_every},
      {"output", output},
      {"output_dtype", output_dtype}};
}

}  // namespace kept::cli
