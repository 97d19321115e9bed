// reference/train_setup.hpp: what the trainer checks and prepares before the first step: the
// output config, student/teacher compatibility, the resume identity, the output directory.
#pragma once

#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

#include "job.hpp"
#include "kept/model/config.hpp"
#include "trainer.hpp"

namespace kept::cli {

// The trained model's config: the student's, with the output dtype the job asks for.
ModelConfig output_config(const ModelConfig& student, const std::string& dtype);

// Refuses (naming the job file and the field) a student and teacher the objective cannot
// compare: vocabularies for the logit objectives, hidden size and depth for the hidden-state
// ones, a LayerNorm teacher and an RMSNorm student for opm-l2.
void check_compatible(const TrainJob& job, const ModelConfig& student, const ModelConfig& teacher);

// What a checkpoint's config_hash covers: the job less the fields a resumed run may change,
// namely the learning-rate schedule (the advice after a non-finite loss is to resume with a
// lower rate), the step budget, where the run lives, and bookkeeping (logging, evaluation and
// checkpoint cadence, the final dtype), and the memory plan's placement choices (checkpointing,
// where the teacher and the states live), which change no number. The model,
// the data order and the update rule (the optimizer state's format included) stay in.
nlohmann::json resume_identity(const TrainJob& job);

// Refuses to overwrite a run unless resuming or forced.
void check_output(const std::filesystem::path& output, const TrainOptions& options);

// Prepares the output directory, once the job's inputs have loaded: with --force, a failed start
// must not have destroyed the run it would replace.
void prepare_output(const std::filesystem::path& output, const TrainOptions& options);

}  // namespace kept::cli
