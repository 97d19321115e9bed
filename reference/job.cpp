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
template <class T>
constexpr bool is_optional = false;
template <class T>
constexpr bool is_optional<std::optional<T>> = true;

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
    if constexpr (is_optional<T>) {
      typename T::value_type value{};
      get(key, value);
      target = value;
    } else if constexpr (std::is_same_v<T, bool>) {
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

// Writes fields with the interface Fields reads them with.
class JsonWriter {
 public:
  explicit JsonWriter(nlohmann::json& object) : object_(object) {}
  template <class T>
  void get(const char* key, const T& value) {
    object_[key] = value;
  }
  template <class T>
  void get(const char* key, const std::optional<T>& value) {
    object_[key] = value ? nlohmann::json(*value) : nlohmann::json();
  }
  template <class Write>
  void object(const char* key, Write&& write) {
    nlohmann::json nested = nlohmann::json::object();
    JsonWriter writer(nested);
    write(writer);
    object_[key] = std::move(nested);
  }

 private:
  nlohmann::json& object_;
};

// Every field of a job but "objective", in one list for reading (`io` a Fields) and writing
// (a JsonWriter).
template <class Job, class IO>
void job_fields(Job& job, IO& io) {
  io.get("device", job.device);
  io.get("student", job.student);
  io.object("init", [&](auto& init) {
    init.get("config", job.init_config);
    init.get("seed", job.init_seed);
    init.get("std", job.init_std);
  });
  io.get("teacher", job.teacher);
  io.get("tokenizer", job.tokenizer);
  io.object("data", [&](auto& data) {
    data.get("train", job.train_data);
    data.get("held_out_fraction", job.held_out_fraction);
    data.get("seq_len", job.seq_len);
    data.get("seed", job.data_seed);
  });
  io.get("batch_size", job.batch_size);
  io.get("grad_accum", job.grad_accum);
  io.get("zero_stage", job.zero_stage);
  io.get("steps", job.steps);
  io.object("optimizer", [&](auto& optimizer) {
    optimizer.get("lr", job.lr);
    optimizer.get("beta1", job.beta1);
    optimizer.get("beta2", job.beta2);
    optimizer.get("eps", job.adam_eps);
    optimizer.get("weight_decay", job.weight_decay);
    optimizer.get("decay_norms", job.decay_norms);
    optimizer.get("decay_biases", job.decay_biases);
    optimizer.get("min_8bit_size", job.min_8bit_size);
  });
  io.object("memory", [&](auto& memory) {
    memory.get("activation_checkpointing", job.activation_checkpointing);
    memory.get("teacher", job.memory_teacher);
    memory.get("teacher_logits", job.teacher_logits);
    memory.get("optimizer_states", job.optimizer_states);
    memory.get("master_weights", job.master_weights);
    memory.get("states_on", job.states_on);
    memory.get("gradients", job.gradients);
  });
  io.get("model_config", job.model_config);
  io.object("schedule", [&](auto& schedule) {
    schedule.get("warmup_steps", job.warmup_steps);
    schedule.get("min_lr", job.min_lr);
  });
  io.get("clip_grad_norm", job.clip_grad_norm);
  io.get("temperature", job.temperature);
  io.get("centre_teacher", job.centre_teacher);
  io.object("norm_only", [&](auto& norm_only) {
    norm_only.get("loss", job.norm_only_loss);
    norm_only.get("init", job.norm_only_init);
    norm_only.get("seed", job.norm_only_seed);
  });
  io.object("eval", [&](auto& eval) {
    eval.get("every", job.eval_every);
    eval.get("max_batches", job.eval_max_batches);
  });
  io.object("checkpoint", [&](auto& checkpoint) {
    checkpoint.get("every", job.checkpoint_every);
    checkpoint.get("keep", job.checkpoint_keep);
  });
  io.get("log_every", job.log_every);
  io.get("output", job.output);
  io.get("output_dtype", job.output_dtype);
}

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
  if (const auto optimizer = json.find("optimizer");
      optimizer != json.end() && optimizer->is_object())
    for (const auto& [old_name, new_name] :
         {std::pair{"moment_bits", "memory.optimizer_states (\"fp32\", \"bf16\" or \"int8\")"},
          std::pair{"master_weights", "memory.master_weights (\"fp32\" or \"none\")"}})
      KEPT_CHECK(!optimizer->contains(old_name), where, ": field \"optimizer.", old_name,
                 "\" has moved to ", new_name);
  job_fields(job, fields);
  KEPT_CHECK(job.device == "cpu" || job.device == "cuda", where,
             ": field \"device\": unknown device \"", job.device, "\" (cpu, cuda)");
  fields.refuse_unknown();
  return job;
}

// Sets json[a][b][c] = value for "a.b.c=value"; the value is JSON when it parses as JSON,
// else a string.
void apply_job_override(nlohmann::json& json, const std::string& assignment) {
  const std::size_t equals = assignment.find('=');
  KEPT_CHECK(equals != std::string::npos && equals > 0, "--set ", assignment,
             ": expected field=value");
  const std::string path = assignment.substr(0, equals), text = assignment.substr(equals + 1);
  nlohmann::json* node = &json;
  std::size_t start = 0;
  while (true) {
    const std::size_t dot = path.find('.', start);
    const std::string key =
        path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    KEPT_CHECK(!key.empty(), "--set ", assignment, ": empty field name");
    if (!node->is_object()) *node = nlohmann::json::object();
    node = &(*node)[key];
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  nlohmann::json value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  *node = value.is_discarded() ? nlohmann::json(text) : value;
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
  auto one_of = [&](const std::string& value, const char* field,
                    std::initializer_list<const char*> allowed) {
    if (value.empty()) return;
    std::string list;
    for (const char* option : allowed) {
      if (value == option) return;
      list += (list.empty() ? "" : ", ") + std::string(option);
    }
    fail(where, ": field \"", field, "\" must be one of ", list, ", got \"", value, "\"");
  };
  one_of(job.memory_teacher, "memory.teacher", {"resident", "streamed", "offline"});
  one_of(job.optimizer_states, "memory.optimizer_states", {"fp32", "bf16", "int8"});
  one_of(job.master_weights, "memory.master_weights", {"fp32", "none"});
  one_of(job.states_on, "memory.states_on", {"device", "host"});
  one_of(job.gradients, "memory.gradients", {"buffer", "none"});
  KEPT_CHECK(!job.zero_stage || (*job.zero_stage >= 0 && *job.zero_stage <= 3), where,
             ": field \"zero_stage\" must be 0, 1, 2 or 3, got ", job.zero_stage.value_or(0));
  KEPT_CHECK(job.zero_stage.value_or(0) < 2 || job.gradients != "buffer", where, ": zero_stage ",
             job.zero_stage.value_or(0),
             " shards the gradients by reducing each layer's as the backward leaves "
             "it, which needs memory.gradients \"none\" (the job sets \"buffer\"); use "
             "zero_stage 1 to keep a gradient buffer");
  KEPT_CHECK(job.memory_teacher.empty() || needs_teacher(job.objective), where,
             ": field \"memory.teacher\" is set, but objective \"", objective_name(job.objective),
             "\" has no teacher");
  KEPT_CHECK(job.memory_teacher != "offline" || job.objective == Objective::XkdLogit, where,
             ": memory.teacher \"offline\" stores the teacher's top-k log-probs, which only the "
             "xkd-logit objective reads; objective \"",
             objective_name(job.objective), "\" needs the teacher itself");
  KEPT_CHECK(job.memory_teacher != "streamed" ||
                 !(job.objective == Objective::NormOnly && job.norm_only_loss == "opm-l2"),
             where,
             ": memory.teacher \"streamed\" cannot serve norm_only.loss \"opm-l2\", which reads "
             "every teacher norm at once; keep the teacher resident");
  KEPT_CHECK(job.memory_teacher != "offline" || !job.teacher_logits.empty(), where,
             ": memory.teacher \"offline\" needs \"memory.teacher_logits\", the directory "
             "`kept teacher-logits` wrote");
  KEPT_CHECK(job.min_8bit_size >= 0, where,
             ": field \"optimizer.min_8bit_size\" must be >= 0, got ", job.min_8bit_size);
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
  nlohmann::json json = nlohmann::json::object();
  JsonWriter writer(json);
  writer.get("objective", std::string(objective_name(objective)));
  job_fields(*this, writer);
  return json;
}

}  // namespace kept::cli
