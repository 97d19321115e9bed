#include "train_setup.hpp"

#include "kept/core/error.hpp"

namespace kept::cli {

namespace fs = std::filesystem;

ModelConfig output_config(const ModelConfig& student, const std::string& dtype) {
  ModelConfig config = student;
  if (dtype == "f32") config.dtype = DType::F32;
  if (dtype == "bf16") config.dtype = DType::BF16;
  if (dtype == "f16") config.dtype = DType::F16;
  return config;
}

void check_compatible(const TrainJob& job, const ModelConfig& student, const ModelConfig& teacher) {
  const std::string where = job.file.string();
  const bool logits = job.objective == Objective::XkdLogit ||
                      job.objective == Objective::XkdLogitMse ||
                      (job.objective == Objective::NormOnly && job.norm_only_loss == "xkd-logit");
  if (logits)
    KEPT_CHECK(student.vocab_size == teacher.vocab_size, where, ": objective \"",
               objective_name(job.objective),
               "\" compares logits, but the student's vocabulary has ", student.vocab_size,
               " entries and the teacher's ", teacher.vocab_size);
  if (job.objective == Objective::XkdHidden || job.objective == Objective::NormOnly) {
    KEPT_CHECK(student.hidden_size == teacher.hidden_size, where, ": objective \"",
               objective_name(job.objective),
               "\" compares hidden states, but the student's hidden size is ", student.hidden_size,
               " and the teacher's ", teacher.hidden_size);
    KEPT_CHECK(student.num_layers == teacher.num_layers, where, ": objective \"",
               objective_name(job.objective), "\" compares layer by layer, but the student has ",
               student.num_layers, " layers and the teacher ", teacher.num_layers);
  }
  if (job.objective == Objective::NormOnly && job.norm_only_loss == "opm-l2")
    KEPT_CHECK(
        teacher.norm_kind() == NormKind::LayerNorm && student.norm_kind() == NormKind::RmsNorm,
        where,
        ": norm-only with loss \"opm-l2\" fits RMSNorm weights to a LayerNorm teacher; the teacher "
        "is ",
        architecture_name(teacher.architecture), " and the student ",
        architecture_name(student.architecture));
}

nlohmann::json resume_identity(const TrainJob& job) {
  nlohmann::json json = job.to_json();
  json["optimizer"].erase("lr");
  // The ZeRO stage only says where the states live: checkpoints hold them whole.
  for (const char* key : {"schedule", "steps", "output", "log_every", "eval", "checkpoint",
                          "output_dtype", "model_config", "zero_stage"})
    json.erase(key);
  // Where bytes live is not what is computed: a run may resume on another GPU with another
  // plan. The optimizer's state format stays (the checkpoint holds it).
  for (const char* key : {"activation_checkpointing", "teacher", "teacher_logits", "states_on"})
    json["memory"].erase(key);
  return json;
}

void check_output(const fs::path& output, const TrainOptions& options) {
  std::error_code error;
  const bool has_run =
      fs::exists(output / "metrics.jsonl", error) || fs::exists(output / "checkpoints", error);
  if (has_run && !options.resume && !options.force)
    fail(output.string(),
         ": holds a training run already; pass --resume to continue it, or --force to start over");
}

void prepare_output(const fs::path& output, const TrainOptions& options) {
  check_output(output, options);
  std::error_code error;
  if (options.force && !options.resume) {
    for (const char* name : {"checkpoints", "metrics.jsonl", "final", "loss.png", "summary.json"})
      fs::remove_all(output / name, error);
  }
  fs::create_directories(output, error);
  KEPT_CHECK(!error, output.string(), ": cannot create the output directory: ", error.message());
}

}  // namespace kept::cli
