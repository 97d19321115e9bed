// reference/eval_run.hpp: `kept eval`'s scoring as a template over the backend (cmd_eval.cpp runs
// it on the CPU, cuda_commands.cpp on the CUDA backend).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "corpus.hpp"
#include "evaluate.hpp"
#include "models.hpp"

namespace kept::cli {

struct EvalOptions {
  std::string model, teacher, data, tokenizer, json, plot, device = "cpu";
  std::int64_t seq_len = 256, batch_size = 4, max_batches = 1 << 30;
};

// Loads the model (and teacher) onto `backend` and scores every token of options.data once.
template <class B>
EvalReport score(B& backend, const EvalOptions& options) {
  LoadedModelOn<B> model = load_model(backend, options.model);
  std::optional<LoadedModelOn<B>> teacher;
  if (!options.teacher.empty()) {
    teacher.emplace(load_model(backend, options.teacher));
    KEPT_CHECK(teacher->config.vocab_size == model.config.vocab_size, options.teacher,
               ": the teacher's vocabulary has ", teacher->config.vocab_size,
               " entries, the model's (", options.model, ") ", model.config.vocab_size);
  }
  const Tokenizer tokenizer = find_tokenizer(options.tokenizer, {options.model, options.teacher});
  tokenizer.check_fits(model.config.vocab_size, options.model + "/config.json");
  auto documents = std::make_shared<std::vector<TokenDocument>>();
  for (const std::string& text : read_documents(options.data)) {
    TokenDocument ids = tokenizer.encode(text);
    if (!ids.empty()) documents->push_back(std::move(ids));
  }
  KEPT_CHECK(!documents->empty(), options.data, ": no document gives any token");
  std::vector<std::size_t> all(documents->size());
  for (std::size_t i = 0; i < all.size(); ++i)
    all[i] = i;
  const std::vector<Batch> batches =
      evaluation_batches(documents, all, tokenizer.eos_id(), options.seq_len, options.batch_size);

  return with_decoder(model.model, [&](auto& student) {
    using Student = std::remove_reference_t<decltype(student)>;
    if (!teacher)
      return evaluate(backend, student, static_cast<Student*>(nullptr), batches,
                      options.max_batches);
    return with_decoder(teacher->model, [&](auto& t) {
      return evaluate(backend, student, &t, batches, options.max_batches);
    });
  });
}

// The CUDA backend's run (cuda_commands.cpp; without a CUDA build, a clear error).
EvalReport score_on_cuda(const EvalOptions& options);

}  // namespace kept::cli
