// kept demo: the whole KEPT story on a laptop CPU in minutes, from Debian's own text.
//
//   1. a corpus: the King James Bible (bible-kjv), the fortune files (fortunes, with the
//      Chinese fortunes-zh, ANSI escapes stripped);
//   2. a byte-fallback SentencePiece tokenizer trained on it;
//   3. a tiny Orion-architecture teacher (LayerNorm with bias) pretrained with weight decay;
//   4. the teacher converted to Llama three ways (OPM paper, calibrated, exact);
//   5. the paper-mode student trained at one token budget by uptraining (cross-entropy),
//      XKD-hidden (the report's Eq. 1) and XKD-logit (KL to the teacher);
//   6. a table shaped like the report's Table 3 on held-out text: perplexity, KL to the teacher
//      and top-1 agreement, then where the checkpoints and plots are.
// Every step is the same code a user runs (`kept tokenizer`, `kept train`, `kept convert`,
// `kept eval`); the demo only chooses sizes that fit the time budget.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "calibration.hpp"
#include "commands.hpp"
#include "corpus.hpp"
#include "demo.hpp"
#include "kept/convert/convert.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/io/hf_tokenizer.hpp"
#include "kept/train/data.hpp"
#include "models.hpp"
#include "progress.hpp"
#include "trainer.hpp"

namespace kept::cli {
namespace {

namespace fs = std::filesystem;

// ---- corpus ------------------------------------------------------------------------------------

// The Bible, one document per chapter ("Ge1:1 In the beginning ..." lines from `bible`).
std::vector<std::string> bible_chapters() {
  std::vector<std::string> chapters;
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(
      ::popen("bible -f gen1:1-rev22:21 </dev/null 2>/dev/null", "r"), ::pclose);
  if (!pipe) return chapters;
  std::string current_chapter, document;
  char line[8192];
  while (std::fgets(line, sizeof line, pipe.get())) {
    std::string text(line);
    while (!text.empty() && (text.back() == '\n' || text.back() == '\r'))
      text.pop_back();
    const std::size_t space = text.find(' ');
    if (space == std::string::npos) continue;
    const std::string reference = text.substr(0, space);  // "Ge1:1"
    const std::string chapter = reference.substr(0, reference.find(':'));
    if (chapter != current_chapter && !document.empty()) {
      chapters.push_back(document);
      document.clear();
    }
    current_chapter = chapter;
    document += (document.empty() ? "" : " ") + text.substr(space + 1);
  }
  if (!document.empty()) chapters.push_back(document);
  return chapters;
}

// Every fortune of /usr/share/games/fortunes (files of fortunes separated by "%" lines), one
// document each; ANSI colour escapes and other control characters removed, invalid UTF-8 skipped.
std::vector<std::string> fortunes() {
  std::vector<std::string> documents;
  const fs::path directory = "/usr/share/games/fortunes";
  std::error_code error;
  if (!fs::is_directory(directory, error)) return documents;
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(directory, error))
    if (entry.is_regular_file() && entry.path().extension().empty()) files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  for (const fs::path& file : files) {
    std::ifstream in(file, std::ios::binary);
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    text = strip_ansi_escapes(text);
    std::string fortune;
    auto flush = [&] {
      std::string clean;
      for (char c : fortune)
        if (static_cast<unsigned char>(c) >= 0x20 || c == '\n' || c == '\t') clean += c;
      while (!clean.empty() && (clean.back() == '\n' || clean.back() == ' '))
        clean.pop_back();
      // Blank lines inside a fortune would split it into several documents.
      std::string joined;
      for (std::size_t i = 0; i < clean.size(); ++i)
        if (!(clean[i] == '\n' && i + 1 < clean.size() && clean[i + 1] == '\n')) joined += clean[i];
      if (!joined.empty() && !find_invalid_utf8(joined)) documents.push_back(joined);
      fortune.clear();
    };
    std::size_t start = 0;
    while (start < text.size()) {
      std::size_t end = text.find('\n', start);
      if (end == std::string::npos) end = text.size();
      const std::string line = text.substr(start, end - start);
      if (line == "%")
        flush();
      else
        fortune += line + "\n";
      start = end + 1;
    }
    flush();
  }
  return documents;
}

}  // namespace

fs::path build_corpus(const fs::path& output) {
  std::vector<std::string> documents = bible_chapters();
  const std::size_t bible = documents.size();
  for (std::string& fortune : fortunes())
    documents.push_back(std::move(fortune));
  KEPT_CHECK(documents.size() > 100,
             "demo: no corpus found: install the Debian packages bible-kjv, bible-kjv-text, "
             "fortunes and fortunes-zh (scripts/install_deps.sh does), or pass --corpus FILE");
  std::string text;
  for (const std::string& document : documents)
    text += document + "\n\n";
  const fs::path path = output / "corpus.txt";
  write_file_atomically(path, text);
  std::printf("corpus: %zu documents (%zu Bible chapters, %zu fortunes), %s -> %s\n",
              documents.size(), bible, documents.size() - bible, format_bytes(text.size()).c_str(),
              path.c_str());
  return path;
}

DemoRun::DemoRun(const DemoOptions& options)
    : out_(options.output), scale_(options.scale), start_(std::chrono::steady_clock::now()) {
  std::error_code error;
  if (fs::exists(out_, error) && !fs::is_empty(out_, error)) {
    KEPT_CHECK(options.force, out_.string(),
               ": exists and is not empty; pass --force to replace the demo's outputs");
    fs::remove_all(out_, error);
    KEPT_CHECK(!error, out_.string(), ": cannot remove: ", error.message());
  }
  fs::create_directories(out_, error);
  KEPT_CHECK(!error, out_.string(), ": cannot create: ", error.message());
}

std::int64_t DemoRun::steps(std::int64_t base) const {
  return std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(base) * scale_));
}

double DemoRun::elapsed_seconds() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void DemoRun::stage(const std::string& what) const {
  std::printf("\n[%s] %s\n", format_duration(elapsed_seconds()).c_str(), what.c_str());
  std::fflush(stdout);
}

TrainJob demo_base_job(const fs::path& corpus, const fs::path& tokenizer) {
  TrainJob base;
  base.tokenizer = tokenizer.string();
  base.train_data = corpus.string();
  base.held_out_fraction = 0.02;
  base.seq_len = 128;
  base.batch_size = 16;
  base.eval_max_batches = 8;
  base.log_every = 10;
  base.output_dtype = "f32";
  return base;
}

fs::path demo_tokenizer(const fs::path& corpus, const fs::path& out, std::int64_t vocab) {
  // The rarest 2% of character occurrences (mostly rare Chinese characters) fall back to
  // bytes, so the pieces go to frequent characters and merges.
  train_tokenizer(corpus, vocab, out / "tokenizer", 0.98);
  return out / "tokenizer" / "tokenizer.model";
}

ModelConfig demo_orion_config(std::int64_t vocab) {
  // Orion's architecture (LayerNorm with bias everywhere, no attention or MLP biases, untied
  // head), at toy size.
  ModelConfig config = ModelConfig::decoder(Architecture::Orion, vocab, 128, 352, 4, 4);
  config.max_position_embeddings = 512;
  config.rope_theta = 10000;
  config.norm_eps = 1e-5;
  config.dtype = DType::F32;
  return config;
}

TrainResult pretrain_demo_teacher(const TrainJob& base, const ModelConfig& config,
                                  const fs::path& directory, std::int64_t steps,
                                  double weight_decay, bool quiet, bool decay_everything) {
  fs::create_directories(directory);
  write_hf_config(directory / "config-init.json", config);
  TrainJob pretrain = base;
  pretrain.file = directory / "pretrain.job";
  pretrain.objective = Objective::CrossEntropy;
  pretrain.init_config = (directory / "config-init.json").string();
  pretrain.init_seed = 1;
  pretrain.steps = steps;
  pretrain.lr = 3e-3;
  pretrain.min_lr = 3e-4;
  pretrain.warmup_steps = std::min<std::int64_t>(50, pretrain.steps);
  pretrain.weight_decay = weight_decay;
  pretrain.decay_norms = pretrain.decay_biases = decay_everything;
  pretrain.output = directory.string();
  TrainOptions options;
  options.quiet = quiet;
  return run_training(pretrain, options);
}

fs::path convert_demo_teacher(const fs::path& teacher, const ModelConfig& teacher_config,
                              const fs::path& tokenizer, OpmMode mode,
                              const CalibrationData* calibration, const fs::path& destination) {
  const CheckpointReader teacher_reader = CheckpointReader::open(teacher);
  ConversionOptions conversion;
  conversion.mode = mode;
  if (mode == OpmMode::Calibrated) {
    KEPT_CHECK(calibration, "demo: calibrated conversion without calibration data");
    conversion.calibrated_norm_weights =
        calibrated_weights(calibrate_source(teacher_reader, teacher_config, *calibration));
  }
  AtomicDirectory directory(destination, true);
  convert_checkpoint(teacher_reader, teacher_config, directory.path(), conversion);
  write_hf_tokenizer(read_tokenizer_source(tokenizer), directory.path(),
                     tokenizer_options_for(llama_config_for(teacher_config, conversion)));
  directory.commit();
  return destination;
}

namespace {

// The non-empty documents, tokenized (the trainer drops empty ones too).
std::shared_ptr<std::vector<TokenDocument>> tokenize_nonempty(const std::vector<std::string>& texts,
                                                              const Tokenizer& tokens) {
  auto documents = std::make_shared<std::vector<TokenDocument>>();
  for (const std::string& text : texts) {
    TokenDocument ids = tokens.encode(text);
    if (!ids.empty()) documents->push_back(std::move(ids));
  }
  return documents;
}

}  // namespace

DemoEvaluator::DemoEvaluator(const fs::path& corpus, const fs::path& tokenizer, const TrainJob& job,
                             const fs::path& teacher)
    : teacher_(load_model(cpu_, teacher)) {
  const Tokenizer tokens(tokenizer);
  const auto documents = tokenize_nonempty(read_documents(corpus), tokens);
  const DocumentSplit split =
      split_documents(documents->size(), job.held_out_fraction, job.data_seed);
  held_out_ =
      evaluation_batches(documents, split.held_out, tokens.eos_id(), job.seq_len, job.batch_size);
}

DemoEvaluator::DemoEvaluator(const std::vector<std::string>& texts, const fs::path& tokenizer,
                             std::int64_t seq_len, std::int64_t batch, const fs::path& teacher)
    : teacher_(load_model(cpu_, teacher)) {
  const Tokenizer tokens(tokenizer);
  const auto documents = tokenize_nonempty(texts, tokens);
  std::vector<std::size_t> all(documents->size());
  for (std::size_t i = 0; i < all.size(); ++i)
    all[i] = i;
  held_out_ = evaluation_batches(documents, all, tokens.eos_id(), seq_len, batch);
  KEPT_CHECK(!held_out_.empty(), "demo: no evaluation text (", texts.size(), " documents)");
}

EvalReport DemoEvaluator::score(const fs::path& model_dir) {
  LoadedModel model = load_model(cpu_, model_dir);
  return with_decoder(model.model, [&](auto& student) {
    return with_decoder(teacher_.model,
                        [&](auto& t) { return evaluate(cpu_, student, &t, held_out_, 16); });
  });
}

std::string fixed(double value, int digits) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", digits, value);
  return text;
}

std::vector<EvalPoint> eval_curve(const fs::path& run) {
  std::vector<EvalPoint> curve;
  std::ifstream in(run / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    const nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_object() && record.value("type", "") == "eval" && record.contains("kl") &&
        record.contains("step"))
      curve.push_back({record["step"].get<double>(), record["kl"].get<double>()});
  }
  return curve;
}

namespace {

// ---- the pipeline ------------------------------------------------------------------------------

struct Row {
  std::string label;
  EvalReport report;
};

void run(const DemoOptions& options) {
  const DemoRun demo(options);
  const fs::path& out = demo.out();
  auto steps = [&](std::int64_t base) { return demo.steps(base); };
  auto stage = [&](const std::string& what) { demo.stage(what); };

  stage("1/6 corpus");
  const fs::path corpus = options.corpus.empty() ? build_corpus(out) : fs::path(options.corpus);

  stage("2/6 tokenizer (SentencePiece BPE, byte fallback, 2000 pieces)");
  const fs::path tokenizer = demo_tokenizer(corpus, out, 2000);
  const ModelConfig teacher_config = demo_orion_config(2000);

  const TrainJob base = demo_base_job(corpus, tokenizer);
  const std::int64_t seq_len = base.seq_len, batch = base.batch_size;

  stage("3/6 teacher: pretraining a " + std::to_string(teacher_config.num_layers) +
        "-layer Orion (LayerNorm) model");
  const TrainResult teacher_run =
      pretrain_demo_teacher(base, teacher_config, out / "teacher", steps(1500), 0.1, false);
  const fs::path teacher = teacher_run.final_model;
  std::printf("teacher: %lld steps, %lld tokens, %.0f tokens/s, held-out perplexity %.2f\n",
              static_cast<long long>(teacher_run.steps), static_cast<long long>(teacher_run.tokens),
              teacher_run.tokens_per_second, teacher_run.eval.student_perplexity);

  stage("4/6 conversion to Llama: OPM paper, calibrated, exact");
  const CalibrationData calibration = load_calibration(
      corpus, teacher, teacher_config, {.max_tokens = 16384, .seq_len = seq_len, .batch = 8});
  auto convert = [&](OpmMode mode, const std::string& name) {
    const fs::path destination =
        convert_demo_teacher(teacher, teacher_config, tokenizer, mode, &calibration, out / name);
    std::printf("  %-10s -> %s\n", opm_mode_name(mode), destination.c_str());
    return destination;
  };
  const fs::path paper = convert(OpmMode::Paper, "llama-paper");
  const fs::path calibrated = convert(OpmMode::Calibrated, "llama-calibrated");
  const fs::path exact = convert(OpmMode::Exact, "llama-exact");

  stage("5/6 recovery at one token budget: uptraining, XKD-hidden, XKD-logit");
  auto train_student = [&](Objective objective, const std::string& name) {
    TrainJob job = base;
    job.file = out / (name + ".job");
    job.objective = objective;
    job.student = paper.string();
    job.teacher = teacher.string();
    job.steps = steps(300);
    job.lr = 1e-3;
    job.min_lr = 1e-4;
    job.warmup_steps = std::min<std::int64_t>(10, job.steps);
    job.weight_decay = 0.0;
    job.eval_every = std::max<std::int64_t>(1, job.steps / 6);  // a recovery curve in loss.png
    job.output = (out / name).string();
    std::printf("  %s: %lld steps of %lld x %lld tokens\n", objective_name(objective),
                static_cast<long long>(job.steps), static_cast<long long>(batch),
                static_cast<long long>(seq_len));
    std::fflush(stdout);
    return run_training(job).final_model;
  };
  const fs::path uptrained = train_student(Objective::CrossEntropy, "paper+ut");
  const fs::path xkd_hidden = train_student(Objective::XkdHidden, "paper+xkd-hidden");
  const fs::path xkd_logit = train_student(Objective::XkdLogit, "paper+xkd-logit");

  stage("6/6 held-out evaluation");
  DemoEvaluator evaluator(corpus, tokenizer, base, teacher);
  std::vector<Row> rows;
  auto score = [&](const std::string& label, const fs::path& model_dir) {
    rows.push_back({label, evaluator.score(model_dir)});
  };
  score("Orion teacher (LayerNorm)", teacher);
  score("OPM only, paper (w = g)", paper);
  score("OPM only, calibrated (w = w*)", calibrated);
  score("OPM only, exact (centred)", exact);
  score("OPM + UT (cross-entropy)", uptrained);
  score("OPM + XKD-hidden (Eq. 1)", xkd_hidden);
  score("OPM + XKD-logit (KL)", xkd_logit);

  const double elapsed = demo.elapsed_seconds();
  std::printf(
      "\nKEPT on a toy Orion: held-out text, %lld tokens (uniform guess: perplexity 2000)\n",
      static_cast<long long>(rows.front().report.tokens));
  std::printf("| %-31s | %10s | %13s | %15s |\n", "model", "perplexity", "KL to teacher",
              "top-1 agreement");
  std::printf("|%s|%s|%s|%s|\n", std::string(33, '-').c_str(), std::string(12, '-').c_str(),
              std::string(15, '-').c_str(), std::string(17, '-').c_str());
  nlohmann::json table = nlohmann::json::array();
  for (const Row& row : rows) {
    std::printf("| %-31s | %10.3f | %13.4f | %14.2f%% |\n", row.label.c_str(),
                row.report.student_perplexity, row.report.kl, 100 * row.report.agreement);
    table.push_back({{"model", row.label},
                     {"perplexity", row.report.student_perplexity},
                     {"kl_to_teacher", row.report.kl},
                     {"top1_agreement", row.report.agreement}});
  }
  write_file_atomically(out / "table.json", table.dump(2) + "\n");
  std::printf(
      "\n(UT, XKD-hidden and XKD-logit each trained the paper-mode student for the same %lld "
      "tokens.)\n",
      static_cast<long long>(steps(300) * batch * seq_len));
  std::printf("demo finished in %s. Outputs in %s:\n", format_duration(elapsed).c_str(),
              out.c_str());
  std::printf(
      "  teacher/final, llama-{paper,calibrated,exact}, paper+{ut,xkd-hidden,xkd-logit}/final  HF "
      "checkpoints\n");
  std::printf("  */loss.png, */metrics.jsonl  training curves\n");
  std::printf("  table.json  the table above; corpus.txt, tokenizer/tokenizer.model\n");
}

}  // namespace

void register_demo(CLI::App& app) {
  auto [command, options] = add_command<DemoOptions>(
      app, "demo", "The whole KEPT pipeline on a toy model, from Debian's own text");
  command->add_option("--output", options->output,
                      "Where everything goes (default: runs/demo, with --cbd runs/demo-cbd)");
  add_existing_file(command, "--corpus", options->corpus,
                    "Use this text instead of the Debian corpora", Need::Optional);
  add_positive(command, "--scale", options->scale,
               "Multiply every step count (0.1 for a quick look)");
  command->add_flag("--force", options->force, "Replace an existing output directory");
  command->add_flag("--cbd", options->cbd,
                    "Chain-based Distillation instead: anchors, interpolated initialisation of "
                    "two sizes between them, against nearest-anchor, random and teacher-mapped "
                    "starts");
  command->callback([options] {
    DemoOptions chosen = *options;
    if (chosen.output.empty()) chosen.output = chosen.cbd ? "runs/demo-cbd" : "runs/demo";
    if (chosen.cbd)
      run_cbd_demo(chosen);
    else
      run(chosen);
  });
}

}  // namespace kept::cli
