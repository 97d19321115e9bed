// reference/teacher_logits_run.hpp: `kept teacher-logits` as a template over the backend, and
// what the trainer shares with it to find the same positions.
//
// The file must hold, for the n-th position the trainer will ever score, the teacher's top-k at
// that position. So this command builds its DataLoader exactly as train_on does
// (make_training_loader below: same tokenizer, documents, DataConfig) and draws the job's
// steps x grad_accum batches with next_batch(), in order; micro-batch m is positions
// [m B L, (m + 1) B L), row-major [batch, seq] (kept/io/teacher_logits.hpp). The file's
// data_identity is the loader's fingerprint and seed, and its tokenizer_hash the tokenizer
// model's bytes, so a trainer with another corpus, packing, seed or tokenizer is refused at open
// (offline_teacher_header gives the trainer the header to expect).
//
// Per micro-batch: the teacher's forward (inference) on the backend, then its LM head over token
// chunks of kLogitRows rows into one [rows, vocab] buffer, downloaded, and the top-k + tail
// extracted on the host in float64 (teacher_top_k). The host extraction is O(vocab) per position:
// fine at the demo's scale and on the CPU; at the 14B job's scale (84608-entry vocabulary, 123M
// positions) a device top-k kernel is the next step.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <type_traits>
#include <vector>

#include "corpus.hpp"
#include "job.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/teacher_logits.hpp"
#include "kept/train/loader.hpp"
#include "kept/xkd/chunked_logits.hpp"
#include "models.hpp"
#include "progress.hpp"

namespace kept::cli {

struct TeacherLogitsOptions {
  std::string job;
  std::int64_t k = 32;
  std::string output;  // default: the job's memory.teacher_logits, else <output>/teacher-logits
  std::string device;  // default: the job's device
  std::int64_t positions_per_shard = 1 << 20;
  bool force = false;
};

struct TeacherLogitsSummary {
  std::filesystem::path directory;
  std::int64_t positions = 0, shards = 0, bytes = 0;
  double mean_tail_mass = 0, max_tail_mass = 0;
  double seconds = 0;
};

// The student's vocabulary size as train_on reads it (the loader refuses tokens beyond it).
inline std::int64_t job_student_vocab(const TrainJob& job) {
  return read_hf_config(job.student.empty() ? std::filesystem::path(job.init_config)
                                            : std::filesystem::path(job.student) / "config.json")
      .vocab_size;
}

// The training DataLoader of `job`, built as train_on builds it.
inline DataLoader make_training_loader(const TrainJob& job, const Tokenizer& tokenizer,
                                       std::int64_t student_vocab) {
  std::vector<TokenDocument> documents;
  for (const std::string& text : read_documents(job.train_data)) {
    TokenDocument ids = tokenizer.encode(text);
    if (!ids.empty()) documents.push_back(std::move(ids));
  }
  KEPT_CHECK(!documents.empty(), job.train_data, ": no document gives any token");
  DataConfig data;
  data.seq_len = job.seq_len;
  data.batch_size = job.batch_size;
  data.eos_id = tokenizer.eos_id();
  data.seed = job.data_seed;
  data.held_out_fraction = job.held_out_fraction;
  data.vocab_size = static_cast<std::int32_t>(student_vocab);
  return DataLoader(std::move(documents), data);
}

// What an offline-teacher file for this job, loader and tokenizer must say (the trainer passes
// it to TeacherLogitsReader::open; k from the file's own index or the job).
inline TeacherLogitsHeader offline_teacher_header(const TrainJob& job, const DataLoader& loader,
                                                  const Tokenizer& tokenizer, std::int64_t k,
                                                  std::int64_t vocab_size) {
  return {k, vocab_size, job.temperature, file_fingerprint(tokenizer.path()),
          teacher_data_identity(loader.fingerprint(), job.data_seed)};
}

inline std::filesystem::path teacher_logits_directory(const TrainJob& job,
                                                      const TeacherLogitsOptions& options) {
  if (!options.output.empty()) return options.output;
  if (!job.teacher_logits.empty()) return job.teacher_logits;
  return std::filesystem::path(job.output) / "teacher-logits";
}

template <class B>
TeacherLogitsSummary precompute_teacher_logits(B& backend, const TrainJob& job,
                                               const TeacherLogitsOptions& options) {
  using Act = typename B::Activation;
  using Stat = typename B::Stat;
  constexpr std::int64_t kLogitRows = 256;
  const auto start = std::chrono::steady_clock::now();
  KEPT_CHECK(!job.teacher.empty(), job.file.string(),
             ": teacher-logits needs a \"teacher\" in the job");
  KEPT_CHECK(options.k >= 1, "--k must be >= 1, got ", options.k);
  LoadedModelOn<B> teacher = load_model(backend, job.teacher);
  const std::int64_t vocab = teacher.config.vocab_size;
  KEPT_CHECK(options.k <= vocab, "--k ", options.k, " is larger than the teacher's vocabulary (",
             vocab, ")");
  const Tokenizer tokenizer = find_tokenizer(job.tokenizer, {job.student, job.teacher});
  const std::int64_t student_vocab = job_student_vocab(job);
  tokenizer.check_fits(student_vocab,
                       job.student.empty() ? job.init_config : job.student + "/config.json");
  DataLoader loader = make_training_loader(job, tokenizer, student_vocab);
  const std::filesystem::path directory = teacher_logits_directory(job, options);
  TeacherLogitsWriter writer(directory,
                             offline_teacher_header(job, loader, tokenizer, options.k, vocab),
                             options.positions_per_shard, options.force, job.teacher);

  const std::int64_t micro_batches = job.steps * job.grad_accum;
  const std::int64_t per_batch = job.batch_size * job.seq_len;
  std::fprintf(stderr,
               "teacher-logits: %lld micro-batches x %lld positions, top-%lld of %lld ids at "
               "T = %g, %lld B a position: %s into %s\n",
               static_cast<long long>(micro_batches), static_cast<long long>(per_batch),
               static_cast<long long>(options.k), static_cast<long long>(vocab), job.temperature,
               static_cast<long long>(teacher_record_bytes(options.k)),
               format_bytes(static_cast<std::uint64_t>(micro_batches * per_batch *
                                                       teacher_record_bytes(options.k)))
                   .c_str(),
               directory.c_str());
  ProgressLine progress("teacher-logits");
  Tensor logits;
  with_decoder(teacher.model, [&](auto& model) {
    typename std::remove_reference_t<decltype(model)>::Activations acts;
    for (std::int64_t m = 0; m < micro_batches; ++m) {
      const Batch batch = loader.next_batch();
      model.forward(backend, batch.inputs, batch.batch, batch.seq, acts, ForwardMode::Inference);
      const auto hidden = as_matrix<const Act>(acts.hidden);
      for (std::int64_t r0 = 0; r0 < hidden.rows; r0 += kLogitRows) {
        const std::int64_t rows = std::min(kLogitRows, hidden.rows - r0);
        if (!logits.defined() || logits.numel() < kLogitRows * vocab)
          backend.ensure(logits, B::Precision::stat, {kLogitRows * vocab});
        xkd::detail::head_slice_forward(
            backend, model.lm_head, hidden.block(r0, 0, rows, hidden.cols), 0,
            MatrixView<Stat>(logits.template data<Stat>(), rows, vocab));
        const Tensor host = backend.download(logits);
        SparseTeacherRows top;
        append_teacher_top_k(host.template data<Stat>(), rows, vocab, job.temperature, options.k,
                             top);
        writer.append(top.view());
      }
      char detail[96];
      std::snprintf(detail, sizeof detail, "batch %lld/%lld", static_cast<long long>(m + 1),
                    static_cast<long long>(micro_batches));
      progress.update(static_cast<double>(m + 1) / static_cast<double>(micro_batches), detail);
    }
  });
  progress.finish();
  writer.finish();
  TeacherLogitsSummary summary;
  summary.directory = directory;
  summary.positions = writer.positions();
  summary.shards =
      (summary.positions + options.positions_per_shard - 1) / options.positions_per_shard;
  summary.bytes = summary.positions * teacher_record_bytes(options.k);
  summary.mean_tail_mass = writer.mean_tail_mass();
  summary.max_tail_mass = writer.max_tail_mass();
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return summary;
}

// The "cuda" device: defined beside the other CUDA runs (cuda_commands.cpp), or the clear error
// of cuda_unavailable.cpp.
TeacherLogitsSummary run_teacher_logits_cuda(const TrainJob& job,
                                             const TeacherLogitsOptions& options);

}  // namespace kept::cli
