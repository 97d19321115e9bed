// reference/trainer_run.hpp: the training run as a template over the backend: Run (the loop:
// micro-steps, clipping, AdamW, evaluation, checkpoints, the final HF checkpoint) and train_on
// (loading the models onto the backend). trainer.cpp instantiates it for the CPU,
// trainer_cuda.cpp for the CUDA backend (nvcc, or g++ against the host emulation).
#pragma once

#include <type_traits>
#include "trainer.hpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>

#include "corpus.hpp"
#include "kept/core/memory_meter.hpp"
#include "kept/dist/local_communicator.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/hf_tokenizer.hpp"
#include "kept/model/init.hpp"
#include "kept/model/streamed_layers.hpp"
#include "kept/train/adamw.hpp"
#include "kept/train/checkpoint_state.hpp"
#include "kept/train/data.hpp"
#include "kept/train/schedule.hpp"
#include "kept/train/zero.hpp"
#include "kept/xkd/xkd.hpp"
#include "models.hpp"
#include "plan.hpp"
#include "plot.hpp"
#include "progress.hpp"
#include "teacher_logits_run.hpp"
#include "train_metrics.hpp"
#include "train_setup.hpp"

namespace kept::cli {
namespace training {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// The run itself, once the models are loaded: the backend, student and teacher types are
// concrete.
template <class Backend, class Student, class Teacher>
class Run {
  using Act = typename Backend::Activation;

 public:
  Run(const TrainJob& job, const TrainOptions& options, const Plan& plan, Backend& backend,
      Student& student, Teacher* teacher, const ModelConfig& student_config, DataLoader& loader,
      const Tokenizer* tokenizer)
      : job_(job),
        options_(options),
        plan_(plan),
        backend_(backend),
        student_(student),
        teacher_(teacher),
        student_config_(student_config),
        loader_(loader),
        tokenizer_(tokenizer),
        output_(job.output),
        comm_(options.communicator ? options.communicator : &single_process_),
        buffers_(options.buffer_communicator ? options.buffer_communicator : comm_),
        collectives_(comm_->size() > 1 || options.buffer_communicator != nullptr),
        writer_(comm_->rank() == 0) {
    // MPI reads and writes the buffers directly: host memory, or the emulator's (run_training).
    KEPT_CHECK(comm_->size() == 1 || Backend::space == MemorySpace::Host || cuda_emulated() ||
                   options.buffer_communicator,
               "data parallel over MPI needs host memory (device \"cpu\"), or NCCL on GPUs");
    // validate_job and run_training refused the rest with their reasons (the same on every rank).
    KEPT_CHECK(zero_stage_ <= 1 || !plan_.strategy.gradient_buffer, job_.file.string(),
               ": zero_stage ", zero_stage_, " with memory.gradients \"buffer\" cannot run");
    KEPT_CHECK(zero_stage_ != 3 || job_.grad_accum % comm_->size() == 0, job_.file.string(),
               ": zero_stage 3 needs grad_accum (", job_.grad_accum, ") a multiple of the ",
               comm_->size(), " ranks");
  }
  ~Run() {
    if (layer_weights_) student_.set_before_layer({});  // the hook points into this run
  }
  Run(const Run&) = delete;
  Run& operator=(const Run&) = delete;

  TrainResult run() {
    configure_trainable();
    student_.set_activation_checkpointing(plan_.strategy.checkpointing);
    if (teacher_ && plan_.strategy.teacher == "streamed") {
      // Before the student's arena, so the teacher's released layers make room for it.
      streamed_ = StreamedLayers<Backend>(backend_, *teacher_);
      teacher_->set_before_layer(
          [this](std::size_t layer) { streamed_.bring(backend_, *teacher_, layer); });
      if (!options_.quiet)
        std::fprintf(stderr, "teacher: streamed, %zu layers (%.1f MiB) in host memory\n",
                     streamed_.layers(), static_cast<double>(streamed_.host_bytes()) / (1 << 20));
    }
    // Values, gradients and optimizer state in one flat buffer each
    // (kept/model/parameter_arena.hpp).
    AdamWConfig adam;
    adam.beta1 = job_.beta1;
    adam.beta2 = job_.beta2;
    adam.eps = job_.adam_eps;
    adam.weight_decay = job_.weight_decay;
    adam.decay.norm_weight = adam.decay.norm_bias = job_.decay_norms;
    adam.decay.bias = job_.decay_biases;
    const Strategy& strategy = plan_.strategy;
    adam.master_weights = strategy.master;
    adam.moment_bits = strategy.states == "int8" ? 8 : strategy.states == "bf16" ? 16 : 32;
    adam.min_8bit_size = job_.min_8bit_size;
    adam.states_on_host = strategy.states_on_host;
    AdamW optimizer(adam);
    ArenaLayout layout = optimizer.arena_layout();
    layout.gradient_buffer = strategy.gradient_buffer;
    // ZeRO: the optimizer's state only for this rank's shard, outside the arena; at stage 3 the
    // layers' weights as well (shard_layer_weights).
    if (zero_stage_ >= 1) layout.optimizer_state = false;
    if (zero_stage_ == 3) layout.layer_values = false;
    ParameterArena arena(backend_, student_, layout);
    const std::vector<Parameter*> params = parameters_of(student_);
    arena_ = &arena;
    optimizer_ = &optimizer;
    std::int64_t state_elements = arena.elements();
    if (zero_stage_ >= 1) {
      shards_.emplace(arena, comm_->rank(), comm_->size());
      optimizer.shard_states(shards_->owned_ranges());
      state_elements = shards_->end() - shards_->first();
      if (!options_.quiet && comm_->size() > 1)
        std::fprintf(stderr, "ZeRO stage %d: optimizer states%s sharded over %d ranks\n",
                     zero_stage_,
                     zero_stage_ == 3   ? ", gradients and the layers' weights"
                     : zero_stage_ == 2 ? " and gradients"
                                        : "",
                     comm_->size());
    } else {
      optimizer.use_arena(&arena);
    }
    if (!strategy.gradient_buffer) prepare_layer_updates();
    {
      using Precision = typename Backend::Precision;
      const bool master = Precision::separate_master && strategy.master;
      const char* weights = !Precision::separate_master ? "weights are their own masters"
                            : master                    ? "fp32 master weights"
                                     : "bf16 weights rounded stochastically (no masters)";
      const double bytes_per_element =
          (master ? 4.0 : 0.0) + (adam.moment_bits == 8    ? 2.0 + 8.0 / kQuantBlock
                                  : adam.moment_bits == 16 ? 4.0
                                                           : 2.0 * dtype_size(Precision::master));
      std::fprintf(stderr, "optimizer: AdamW, %s, %lld-bit moments: about %.1f MiB of state%s\n",
                   weights, static_cast<long long>(adam.moment_bits),
                   bytes_per_element * static_cast<double>(state_elements) / (1 << 20),
                   !adam.states_on_host ? ""
                   : Backend::space == MemorySpace::Host
                       ? " (in host memory)"
                       : " in host memory, staged through the device in chunks");
    }
    CosineSchedule schedule{job_.lr, job_.warmup_steps, job_.steps, job_.min_lr, 0.0};
    schedule.validate();
    if (options_.synthetic) {
      shard_layer_weights();
      return run_synthetic(optimizer, arena, params, schedule);
    }

    const std::string hash = config_hash(resume_identity(job_).dump());
    TrainerState state;
    state.config_hash = hash;
    state.seeds["data"] = job_.data_seed;
    const fs::path checkpoints = output_ / "checkpoints";
    std::optional<std::int64_t> resumed_step;
    if (options_.resume) {
      if (auto latest = latest_checkpoint(checkpoints)) {
        state = load_checkpoint(backend_, *latest, params, optimizer, hash);
        loader_.restore(state.loader, (*latest / "trainer.json").string());
        resumed_step = state.step;
        std::fprintf(stderr, "resuming %s from %s (step %lld)\n", output_.c_str(), latest->c_str(),
                     static_cast<long long>(state.step));
      } else {
        std::fprintf(stderr, "no checkpoint in %s: starting from step 0\n", checkpoints.c_str());
        resumed_step = 0;
      }
    }
    shard_layer_weights();  // after a checkpoint's weights were loaded whole
    // Rank 0 alone writes: the job, the metrics, checkpoints and the final model (the ranks'
    // weights and states are the same bits, kept/dist/communicator.hpp), and evaluates.
    std::optional<MetricsLog> metrics;
    if (writer_) {
      write_file_atomically(output_ / "job.json", job_.to_json().dump(2) + "\n");
      metrics.emplace(output_ / "metrics.jsonl", resumed_step, job_.steps);
    }
    // At stage 3 every rank evaluates: the student's forward gathers each layer from all.
    const bool evaluates = writer_ || layer_weights_;
    const std::vector<Batch> held_out =
        evaluates ? loader_.held_out_batches() : std::vector<Batch>{};

    ProgressLine progress(objective_name(job_.objective));
    MemoryMeter& meter =
        Backend::space == MemorySpace::Host ? host_memory_meter() : device_memory_meter();
    meter.reset_peak();
    const auto start = Clock::now();
    std::int64_t tokens_this_session = 0;
    double loss = 0;
    std::optional<fs::path> last_checkpoint =
        options_.resume ? latest_checkpoint(checkpoints) : std::nullopt;
    if (state.extra.contains("clip_coefficient"))
      clip_coefficient_ = state.extra["clip_coefficient"].get<double>();
    while (state.step < job_.steps) {
      const double lr = schedule.lr(state.step);
      const StepResult step = train_step(optimizer, arena, params, lr, state.step);
      loss = step.loss;
      const double grad_norm = step.grad_norm;
      const std::int64_t tokens = step.targets;
      if (!step.updated) {
        progress.finish();
        fail("step ", state.step + 1, ": the ", std::isfinite(loss) ? "gradient norm" : "loss",
             " is ", std::isfinite(loss) ? grad_norm : loss, " (objective ",
             objective_name(job_.objective), "); training stopped without saving this step. ",
             last_checkpoint ? "The last good checkpoint is " + last_checkpoint->string() +
                                   "; resume from it (--resume) "
                                   "with a lower learning rate"
             : state.step == 0
                 ? std::string("No update was made before it, so the learning rate is not the "
                               "cause: look for non-finite weights in the student and the teacher")
                 : std::string("No checkpoint was saved before it; lower the learning "
                               "rate and start again"));
      }
      ++state.step;
      state.tokens_seen += tokens;
      tokens_this_session += tokens;

      const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
      const double tokens_per_second =
          static_cast<double>(tokens_this_session) / std::max(elapsed, 1e-9);
      nlohmann::json record{{"type", "train"},
                            {"step", state.step},
                            {"loss", loss},
                            {"loss_exact", format_double(loss)},
                            {"lr", lr},
                            {"grad_norm", grad_norm},
                            {"tokens", state.tokens_seen},
                            {"tokens_per_second", tokens_per_second}};
      if (metrics) metrics->write(record);
      train_steps_.push_back(static_cast<double>(state.step));
      train_losses_.push_back(loss);
      if (!options_.quiet && (state.step % job_.log_every == 0 || state.step == job_.steps)) {
        char detail[160];
        std::snprintf(detail, sizeof detail, "step %lld/%lld  loss %.4f  lr %.2e  %.0f tok/s",
                      static_cast<long long>(state.step), static_cast<long long>(job_.steps), loss,
                      lr, tokens_per_second);
        progress.update(static_cast<double>(state.step) / static_cast<double>(job_.steps), detail);
      }
      if (job_.eval_every > 0 && state.step % job_.eval_every == 0 && state.step < job_.steps &&
          !held_out.empty())
        log_eval(metrics, state.step, evaluate_now(held_out), /*print=*/!options_.quiet);
      if (job_.checkpoint_every > 0 && state.step % job_.checkpoint_every == 0) {
        // ZeRO: every rank's pieces of the optimizer state, gathered whole (collective).
        std::optional<std::vector<NamedTensor>> whole_state;
        if (shards_)
          whole_state =
              gather_optimizer_state(backend_, *comm_, arena, optimizer, params, /*root=*/0);
        if (layer_weights_) layer_weights_->gather_whole(/*keep=*/writer_);
        if (!writer_) {
          if (layer_weights_) layer_weights_->release();
          continue;
        }
        state.loader = loader_.state();
        if (!plan_.strategy.gradient_buffer) state.extra["clip_coefficient"] = clip_coefficient_;
        try {
          last_checkpoint = save_checkpoint(backend_, checkpoints, state, params, optimizer,
                                            static_cast<std::size_t>(job_.checkpoint_keep),
                                            whole_state ? &*whole_state : nullptr);
        } catch (const Error& error) {
          progress.finish();
          const auto newest = latest_checkpoint(checkpoints);
          fail("step ", state.step, ": saving the checkpoint failed: ", error.what(), ". ",
               newest ? "The newest complete checkpoint is " + newest->string() +
                            "; make room and resume from it (--resume)"
                      : std::string("No complete checkpoint exists yet"));
        }
        if (layer_weights_) layer_weights_->release();
      }
    }
    progress.finish();
    // A resumed run that had finished stays as it was.
    if (metrics && tokens_this_session > 0) report_memory(*metrics, meter, state.step);

    TrainResult result;
    result.steps = state.step;
    result.tokens = state.tokens_seen;
    result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    result.final_loss = loss;
    result.tokens_per_second =
        static_cast<double>(tokens_this_session) / std::max(result.seconds, 1e-9);
    result.final_model = output_ / "final";
    if (!held_out.empty()) {
      result.eval = evaluate_now(held_out);
      log_eval(metrics, state.step, result.eval, !options_.quiet && writer_);
    }
    if (layer_weights_) layer_weights_->gather_whole(/*keep=*/writer_);  // for save_pretrained
    if (!writer_) return result;
    const ModelConfig final_config = output_config(student_config_, job_.output_dtype);
    save_pretrained(backend_, student_, final_config, result.final_model, /*force=*/true,
                    [&](const fs::path& directory) {
                      write_hf_tokenizer(read_tokenizer_source(tokenizer_->path()), directory,
                                         tokenizer_options_for(final_config));
                    });
    write_plot();
    return result;
  }

 private:
  // Which parameters an objective trains (the rest keep no gradient and are not decayed).
  void configure_trainable() {
    const bool hidden = job_.objective == Objective::XkdHidden;
    const bool norm_only = job_.objective == Objective::NormOnly;
    Random random(Random::derive(job_.norm_only_seed, "norm_only/init"));
    student_.visit_parameters([&](Parameter& p) {
      const bool norm = p.role == ParamRole::NormWeight || p.role == ParamRole::NormBias;
      p.trainable = true;
      if (norm_only) p.trainable = norm;
      // Eq. 1 never reaches the final norm or the LM head.
      if (hidden && (p.name.starts_with("lm_head.") || p.name.starts_with("model.norm.")))
        p.trainable = false;
      if (norm_only && norm && p.role == ParamRole::NormWeight && job_.norm_only_init == "random") {
        Tensor values = Tensor::empty(DType::F32, p.value.shape());
        for (float& value : values.span<float>())
          value = static_cast<float>(0.5 + random.uniform());
        backend_.upload(values, p.value);
      }
    });
    if (teacher_)
      teacher_->visit_parameters([](Parameter& p) {
        p.trainable = false;
        p.grad = Tensor();
      });
  }

  // A micro-batch's forward and output gradients, kept for its backward: one slot with a
  // gradient buffer, grad_accum slots for a layer-major backward (train_step).
  struct MicroBatch {
    typename Student::Activations acts;
    Tensor d_hidden;
    std::vector<Tensor> d_states;  // xkd-hidden: dL/dh_l for each residual-stream slot
    bool backward = true;          // false: the objective set the gradients itself (opm-l2)
    bool hidden_gradient = true;   // false: only d_states carry gradient
  };

  // One micro-batch's student forward (kept in `slot`), teacher forward and loss; its output
  // gradients go to slot.d_hidden / slot.d_states for backward (micro_backward). `first`: the
  // position of the batch's first token in the training stream (the offline teacher's file is
  // indexed by it, kept/io/teacher_logits.hpp).
  double micro_forward(const Batch& batch, std::int64_t first, MicroBatch& slot) {
    const std::int64_t count = batch.batch * batch.seq;
    const double normalizer = static_cast<double>(batch.target_count() * job_.grad_accum);
    const auto hidden_shape = Shape{count, student_config_.hidden_size};
    const bool opm_l2 = job_.objective == Objective::NormOnly && job_.norm_only_loss == "opm-l2";
    if (opm_l2) {
      // OPM's own objective reads the teacher's norm parameters on the host (validated in
      // train_on: only with device cpu).
      if constexpr (std::is_same_v<Backend, Cpu>) {
        slot.backward = false;  // the objective's gradient is computed directly
        return norm_only_opm_step(batch, normalizer);
      }
    }
    slot.backward = true;

    student_.forward(backend_, batch.inputs, batch.batch, batch.seq, slot.acts,
                     ForwardMode::Training);
    slot.hidden_gradient = job_.objective != Objective::XkdHidden;
    backend_.ensure(slot.d_hidden, Backend::Precision::activation, hidden_shape);
    backend_.fill_zero(slot.d_hidden);
    MatrixView<Act> d_hidden = as_matrix<Act>(slot.d_hidden);
    const auto student_hidden = as_matrix<const Act>(slot.acts.hidden);
    double loss = 0;
    switch (job_.objective) {
      case Objective::CrossEntropy: {
        xkd::CrossEntropyOptions options;
        options.normalizer = normalizer;
        loss = xkd::cross_entropy(backend_, student_.lm_head, student_hidden, batch.targets,
                                  &d_hidden, options)
                   .loss;
        break;
      }
      case Objective::XkdLogit:
      case Objective::NormOnly:
      case Objective::XkdLogitMse: {
        if (plan_.strategy.teacher == "offline") {
          // The teacher's top-k log-probs and tail mass from the file (or, in a synthetic run,
          // made up), and the sparse KL (kept/xkd/sparse_kl.hpp).
          const SparseTeacherRows rows =
              offline_ ? offline_->read(first, count) : synthetic_sparse_rows(count);
          xkd::SparseKlOptions options;
          options.temperature = job_.temperature;
          options.normalizer = static_cast<double>(count * job_.grad_accum);
          loss = xkd::sparse_logit_kl(backend_, rows.view(), student_.lm_head, student_hidden,
                                      &d_hidden, options)
                     .loss;
          break;
        }
        teacher_->forward(backend_, batch.inputs, batch.batch, batch.seq, teacher_acts_,
                          ForwardMode::Inference);
        const auto teacher_hidden = as_matrix<const Act>(teacher_acts_.hidden);
        if (job_.objective == Objective::XkdLogitMse) {
          xkd::LogitMseOptions options;
          options.normalizer = static_cast<double>(count * job_.grad_accum);
          loss = xkd::logit_mse(backend_, teacher_->lm_head, teacher_hidden, student_.lm_head,
                                student_hidden, &d_hidden, options)
                     .loss;
        } else {
          xkd::LogitKlOptions options;
          options.temperature = job_.temperature;
          options.normalizer = static_cast<double>(count * job_.grad_accum);
          loss = xkd::logit_kl(backend_, teacher_->lm_head, teacher_hidden, student_.lm_head,
                               student_hidden, &d_hidden, options)
                     .loss;
        }
        break;
      }
      case Objective::XkdHidden: {
        teacher_->forward(backend_, batch.inputs, batch.batch, batch.seq, teacher_acts_,
                          ForwardMode::Inference,
                          /*keep_states=*/true);
        xkd::HiddenMseOptions options;
        options.centre_teacher = job_.centre_teacher;
        options.normalizer = static_cast<double>(count * job_.grad_accum);
        loss = xkd::hidden_mse(backend_, teacher_acts_.states, slot.acts.states, &slot.d_states,
                               options)
                   .loss;
        break;
      }
    }
    return loss;
  }

  // A synthetic run's stand-in for the offline file: k ids a row holding half the mass.
  SparseTeacherRows synthetic_sparse_rows(std::int64_t count) const {
    const std::int64_t vocab = student_config_.vocab_size;
    const std::int64_t k = std::min<std::int64_t>(32, vocab);
    SparseTeacherRows rows(count, k);
    for (std::int64_t r = 0; r < count; ++r) {
      for (std::int64_t j = 0; j < k; ++j) {
        rows.ids[static_cast<std::size_t>(r * k + j)] =
            static_cast<std::int32_t>((r * 7919 + j) % vocab);
        rows.logprobs[static_cast<std::size_t>(r * k + j)] =
            static_cast<float>(std::log(0.5 / static_cast<double>(k)));
      }
      rows.tail_mass[static_cast<std::size_t>(r)] = 0.5f;
    }
    return rows;
  }

  // OPM's objective on the teacher's own pre-norm activations: per site,
  // sum_t ||LN_teacher(x_t) - RMS_w(x_t)||^2 / normalizer, and its gradient w.r.t. w.
  double norm_only_opm_step(const Batch& batch, double normalizer) {
    std::map<std::string, Parameter*> weights;
    student_.visit_parameters([&](Parameter& p) {
      if (p.role == ParamRole::NormWeight) weights.emplace(p.name, &p);
    });
    std::map<std::string, std::pair<const Parameter*, const Parameter*>> teacher_norms;
    teacher_->visit_parameters([&](Parameter& p) {
      if (p.role == ParamRole::NormWeight)
        teacher_norms[p.name.substr(0, p.name.size() - 7)].first = &p;
      if (p.role == ParamRole::NormBias)
        teacher_norms[p.name.substr(0, p.name.size() - 5)].second = &p;
    });
    const double teacher_eps = teacher_->config().norm_eps, student_eps = student_config_.norm_eps;
    double loss = 0;
    const NormInputObserver<float> observer = [&](const std::string& site,
                                                  MatrixView<const float> x) {
      Parameter* w = weights.at(site + ".weight");
      const auto& [g, b] = teacher_norms.at(site);
      loss += xkd::opm_l2(backend_, x, g->value.data<float>(), b->value.data<float>(),
                          static_cast<float>(teacher_eps), w->value.data<float>(),
                          static_cast<float>(student_eps), w->template grad_data<float>(),
                          normalizer, opm_workspace_);
    };
    teacher_->forward(backend_, batch.inputs, batch.batch, batch.seq, teacher_acts_,
                      ForwardMode::Inference, false, &observer);
    return loss;
  }

  struct StepResult {
    double loss = 0, grad_norm = 0;
    std::int64_t tokens = 0, targets = 0;
    bool updated = false;  // false: the loss or the gradient norm is not finite, nothing applied
  };

  // One optimizer step: the micro-batches, then clipping and AdamW. With a gradient buffer each
  // micro-batch runs forward and backward in turn, and the update waits for every gradient and
  // is skipped when one is not finite. Without one (memory.gradients "none") every micro-batch
  // runs forward first, then one layer-major backward walks the stack (kept/model/decoder.hpp):
  // each layer's gradient is complete for the whole step when the walk leaves it, and the layer
  // is updated there (update_layer); the embedding, final norm and LM head after it. The
  // gradients are the same bit for bit. The global gradient norm is only known once every layer
  // has been updated, so clipping scales this step's gradients by the coefficient of the
  // previous step's norm (torch's max_norm / (norm + 1e-6), when below 1). That is the one place
  // the two differ: with clipping off, or never triggered, the updates are the same bit for bit
  // (tests/python/test_memory_plan.py).
  StepResult train_step(AdamW& optimizer, ParameterArena& arena,
                        const std::vector<Parameter*>& params, double lr, std::int64_t step) {
    StepResult result;
    arena.zero_grad(backend_, student_);
    optimizer.set_lr(lr);
    layer_grad_squares_ = 0;
    current_step_ = step;
    const bool layer_major = !plan_.strategy.gradient_buffer;
    // Data parallel: micro-batch m runs on rank m mod N. A rank reads only its own micro-batches'
    // windows and skips the others' (DataLoader::skip_batch), so every loader stands at the same
    // place after the step; the targets are counted over the ranks.
    const std::int64_t ranks = comm_->size(), rank = comm_->rank();
    const std::int64_t mine = (job_.grad_accum - rank + ranks - 1) / ranks;
    micro_.resize(layer_major ? static_cast<std::size_t>(mine) : 1);
    std::size_t local = 0;
    for (std::int64_t micro = 0; micro < job_.grad_accum; ++micro) {
      result.tokens += job_.batch_size * job_.seq_len;
      if (micro % ranks != rank) {
        loader_.skip_batch();
        continue;
      }
      const std::int64_t first = loader_.state().batches_served * job_.batch_size * job_.seq_len;
      const Batch batch = loader_.next_batch();
      result.targets += batch.target_count();
      MicroBatch& slot = micro_[layer_major ? local++ : 0];
      result.loss += micro_forward(batch, first, slot);
      if (!layer_major) micro_backward(std::span<MicroBatch>(&slot, 1));
    }
    if (layer_major) micro_backward(micro_);
    if (ranks > 1) {
      result.loss = comm_->sum_in_rank_order(result.loss);
      // Counts below 2^53 add exactly in double.
      result.targets =
          static_cast<std::int64_t>(comm_->sum_in_rank_order(static_cast<double>(result.targets)));
    }
    const double clip =
        job_.clip_grad_norm > 0 ? job_.clip_grad_norm : std::numeric_limits<double>::infinity();
    if (!layer_major && !shards_) {
      if (collectives_) sum_gradients_over_ranks(arena.grads());
      result.grad_norm = clip_grad_norm(backend_, params, clip);
      if (!std::isfinite(result.loss) || !std::isfinite(result.grad_norm)) return result;
      optimizer.step(backend_, params);
      result.updated = true;
      return result;
    }
    if (!layer_major) {
      // ZeRO with a gradient buffer: each rank receives the sum of its shard only, clips by the
      // norm summed from the shards, updates its shard and gathers everyone's.
      if (collectives_)
        buffers_->reduce_scatter_sum(Tensor(arena.grads()).template data<float>(),
                                     shards_->layout());
      result.grad_norm = std::sqrt(comm_->sum_in_rank_order(owned_grad_squares(params)));
      if (!std::isfinite(result.loss) || !std::isfinite(result.grad_norm)) return result;
      if (const double coefficient = clip / (result.grad_norm + 1e-6); coefficient < 1.0)
        scale_owned_gradients(params, static_cast<float>(coefficient));
      optimizer.step(backend_, params);
      gather_all_weights();
      result.updated = true;
      return result;
    }
    if (collectives_) reduce_gradients_over_ranks(outside_layers_);
    double squares = layer_grad_squares_;  // the layers' (backward), then these
    if (shards_)
      squares = comm_->sum_in_rank_order(squares + owned_grad_squares(outside_layers_));
    else
      for (Parameter* p : outside_layers_)
        if (p->has_grad())
          squares += backend_.grad_sum_squares(p->grad.template data<typename Backend::Grad>(),
                                               p->grad.numel());
    result.grad_norm = std::sqrt(squares);
    if (!std::isfinite(result.loss) || !std::isfinite(result.grad_norm)) return result;
    if (clip_coefficient_ < 1.0)
      scale_gradients(backend_, std::span<Parameter* const>(outside_layers_),
                      static_cast<float>(clip_coefficient_));
    optimizer.step(backend_, outside_layers_);
    if (shards_) gather_weights(outside_layers_);
    clip_coefficient_ = std::min(1.0, clip / (result.grad_norm + 1e-6));
    result.updated = true;
    return result;
  }

  // Data parallel: a gradient buffer (host memory, fp32) summed over the ranks in rank order,
  // the same bits on every rank.
  void sum_gradients_over_ranks(Tensor grads) {  // a handle: the buffer itself is summed
    buffers_->all_reduce_sum(grads.template data<float>(), grads.numel());
  }
  // The gradients of `params` (memory.gradients "none": a layer's, or those outside the layers)
  // summed over the ranks: all of each with replicated states, each rank's owned part with ZeRO
  // (the arena's cut seen through the parameter's slot, so each element reaches its owner).
  void reduce_gradients_over_ranks(std::span<Parameter* const> params) {
    for (Parameter* p : params) {
      if (!p->has_grad()) continue;
      if (!shards_) {
        sum_gradients_over_ranks(p->grad);
        continue;
      }
      const ArenaSlot* slot = arena_->find(p->name);
      buffers_->reduce_scatter_sum(p->grad.template data<float>(),
                                   shards_->window(slot->offset, slot->count));
    }
  }
  // The squares of this rank's owned part of each gradient (all of it without ZeRO), in
  // parameter order (double).
  double owned_grad_squares(std::span<Parameter* const> params) {
    using Grad = typename Backend::Grad;
    double squares = 0;
    for (Parameter* p : params) {
      if (!p->has_grad()) continue;
      const AdamW::OwnedRange owned = optimizer_->owned_range(*p);
      if (owned.count > 0)
        squares +=
            backend_.grad_sum_squares(p->grad.template data<Grad>() + owned.first, owned.count);
    }
    return squares;
  }
  void scale_owned_gradients(std::span<Parameter* const> params, float factor) {
    using Grad = typename Backend::Grad;
    for (Parameter* p : params) {
      if (!p->has_grad()) continue;
      const AdamW::OwnedRange owned = optimizer_->owned_range(*p);
      if (owned.count > 0)
        backend_.scale_grad(p->grad.template data<Grad>() + owned.first, owned.count, factor);
    }
  }
  // ZeRO: every rank's updated shard of the weights to every rank (bytes, exact).
  void gather_all_weights() {
    if (!collectives_) return;
    KEPT_CHECK(arena_->holds_layer_values(), "ZeRO: the whole-arena weight gather at stage 3");
    const Tensor& values = arena_->values();
    buffers_->all_gather_bytes(const_cast<void*>(values.raw()), shards_->layout(),
                               dtype_size(values.dtype()));
  }
  // The same for `params` only, each through the arena's cut seen through its slot: a layer's
  // weights right after its update inside the layer-major backward (so that on a GPU the gather
  // runs beside the next layer's backward), the rest after theirs. Frozen ones never change.
  void gather_weights(std::span<Parameter* const> params) {
    if (!collectives_) return;
    for (Parameter* p : params) {
      if (!p->has_grad()) continue;
      const ArenaSlot* slot = arena_->find(p->name);
      buffers_->all_gather_bytes(p->value.raw(), shards_->window(slot->offset, slot->count),
                                 dtype_size(p->value.dtype()));
    }
  }

  // The student's backward for micro-batches whose forward micro_forward kept: one at a time
  // with a gradient buffer, all of a step's layer-major without one.
  void micro_backward(std::span<MicroBatch> slots) {
    std::vector<typename Student::Activations*> acts;
    std::vector<const Tensor*> d_hidden;
    std::vector<const std::vector<Tensor>*> d_states;
    static const Tensor no_gradient;
    for (MicroBatch& slot : slots) {
      if (!slot.backward) continue;
      acts.push_back(&slot.acts);
      d_hidden.push_back(slot.hidden_gradient ? &slot.d_hidden : &no_gradient);
      d_states.push_back(slot.d_states.empty() ? nullptr : &slot.d_states);
    }
    if (!acts.empty()) student_.backward(backend_, acts, d_hidden, d_states);
  }

  // ZeRO stage 3: this rank keeps its shard of the layers' weights, and the student's forward and
  // backward gather a layer whenever it runs (kept/train/zero.hpp).
  void shard_layer_weights() {
    if (zero_stage_ != 3) return;
    layer_weights_.emplace(backend_, *buffers_, *arena_, student_);
    student_.set_before_layer([this](std::size_t layer) { layer_weights_->bring(layer); });
    if (!options_.quiet && comm_->size() > 1)
      std::fprintf(stderr,
                   "ZeRO stage 3: %lld of the layers' weights kept here, two layers "
                   "gathered at a time\n",
                   static_cast<long long>(layer_weights_->shard_elements()));
  }

  // memory.gradients "none": the parameters of each layer and of the rest, and the hook that
  // updates a layer as soon as backward has finished it.
  void prepare_layer_updates() {
    layer_params_.assign(student_.layers.size(), {});
    for (std::size_t l = 0; l < student_.layers.size(); ++l)
      student_.layers[l].visit([&](Parameter& p) { layer_params_[l].push_back(&p); });
    outside_layers_.clear();
    student_.embed_tokens.visit([&](Parameter& p) { outside_layers_.push_back(&p); });
    student_.norm.visit([&](Parameter& p) { outside_layers_.push_back(&p); });
    student_.lm_head.visit([&](Parameter& p) { outside_layers_.push_back(&p); });
    student_.set_after_layer_backward([this](std::size_t layer) { update_layer(layer); });
  }

  void update_layer(std::size_t layer) {
    std::vector<Parameter*>& layer_params = layer_params_[layer];
    if (collectives_) reduce_gradients_over_ranks(layer_params);
    const double squares = owned_grad_squares(layer_params);
    KEPT_CHECK(std::isfinite(squares), "step ", current_step_ + 1, ": layer ", layer,
               "'s gradient is not finite. With memory.gradients \"none\" the layers above it "
               "were already updated in this step, so resume from the last checkpoint (--resume) "
               "with a lower learning rate");
    layer_grad_squares_ += squares;
    if (clip_coefficient_ < 1.0)
      scale_gradients(backend_, std::span<Parameter* const>(layer_params),
                      static_cast<float>(clip_coefficient_));
    optimizer_->step_parameters(backend_, std::span<Parameter* const>(layer_params));
    if (layer_weights_)
      layer_weights_->store(layer);  // the next forward gathers it afresh
    else if (shards_)
      gather_weights(layer_params);
    for (Parameter* p : layer_params)
      if (p->has_grad()) backend_.fill_zero(p->grad);  // the next layer's region
  }

  // `kept train --synthetic`: the job's steps on random weights and tokens, timed; nothing is
  // written. Prints the step time (the median after the first, which pays for one-time setup),
  // tokens/s, MFU against the target's peak, the peak memory against the plan, and the hours
  // the job's own step count would take at this rate.
  TrainResult run_synthetic(AdamW& optimizer, ParameterArena& arena,
                            const std::vector<Parameter*>& params, const CosineSchedule& schedule) {
    MemoryMeter& meter =
        Backend::space == MemorySpace::Host ? host_memory_meter() : device_memory_meter();
    meter.reset_peak();
    // The smallest parameter: downloading it waits for the device's queued work.
    const Parameter* smallest = params.front();
    for (const Parameter* p : params)
      if (p->value.numel() < smallest->value.numel()) smallest = p;
    const std::int64_t steps = std::max<std::int64_t>(1, options_.synthetic_steps);
    std::vector<double> seconds;
    TrainResult result;
    const auto start = Clock::now();
    for (std::int64_t step = 0; step < steps; ++step) {
      const auto t0 = Clock::now();
      const StepResult result_of_step =
          train_step(optimizer, arena, params, schedule.lr(step), step);
      const double loss = result_of_step.loss, grad_norm = result_of_step.grad_norm;
      const std::int64_t tokens = result_of_step.tokens;
      (void)backend_.download(smallest->value);
      seconds.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      result.tokens += tokens;
      result.final_loss = loss;
      std::fprintf(stderr, "synthetic step %lld/%lld: %.3f s, loss %.4f, grad norm %.3g\n",
                   static_cast<long long>(step + 1), static_cast<long long>(steps), seconds.back(),
                   loss, grad_norm);
    }
    result.steps = steps;
    result.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    std::vector<double> timed(seconds.size() > 1 ? seconds.begin() + 1 : seconds.begin(),
                              seconds.end());
    std::sort(timed.begin(), timed.end());
    const double step_seconds = timed[timed.size() / 2];
    const double step_tokens =
        static_cast<double>(job_.batch_size * job_.seq_len * job_.grad_accum);
    result.tokens_per_second = step_tokens / step_seconds;
    const double mfu = plan_.model_flops_per_step / (step_seconds * plan_.peak_flops);
    const double hours = step_seconds * static_cast<double>(job_.steps) / 3600.0;
    std::printf(
        "synthetic: %lld steps of %.0f tokens; step %.4g s (median of the %zu after the "
        "first), %.0f tokens/s, MFU %.1f%% of %.4g TFLOP/s\n",
        static_cast<long long>(steps), step_tokens, step_seconds, timed.size(),
        result.tokens_per_second, 100 * mfu, plan_.peak_flops / 1e12);
    std::printf("planned:   step %.4g s, MFU %.1f%%, %.2f h\n", plan_.step_seconds, 100 * plan_.mfu,
                plan_.job_hours);
    const double predicted =
        plan_.device_bytes + (Backend::space == MemorySpace::Host ? plan_.host_bytes : 0.0);
    std::printf("memory:    peak %.1f MiB measured, %.1f MiB planned (%+.1f%%) with %s\n",
                static_cast<double>(meter.peak()) / (1 << 20), predicted / (1 << 20),
                100 * (static_cast<double>(meter.peak()) - predicted) / std::max(predicted, 1.0),
                plan_.strategy.describe().c_str());
    std::printf("projected: %.2f h for the job's %lld steps (%.1fM tokens) at this step time\n",
                hours, static_cast<long long>(job_.steps),
                step_tokens * static_cast<double>(job_.steps) / 1e6);
    return result;
  }

  // The peak of kept's allocations during training against the plan's prediction.
  // `step`: the last step, so that a resume keeps the record with the steps before it
  // (train_metrics.cpp drops records past the resumed step, and those without one).
  void report_memory(MetricsLog& metrics, const MemoryMeter& meter, std::int64_t step) {
    const double measured = static_cast<double>(meter.peak());
    // On a host backend the plan's host terms (a streamed teacher's layers) share the meter.
    const double predicted =
        plan_.device_bytes + (Backend::space == MemorySpace::Host ? plan_.host_bytes : 0.0);
    metrics.write({{"type", "memory"},
                   {"step", step},
                   {"peak_bytes", meter.peak()},
                   {"predicted_bytes", predicted},
                   {"plan", plan_.strategy.describe()}});
    if (!options_.quiet)
      std::fprintf(stderr, "memory: peak %.1f MiB measured, %.1f MiB planned (%+.1f%%)\n",
                   measured / (1 << 20), predicted / (1 << 20),
                   100 * (measured - predicted) / std::max(predicted, 1.0));
  }

  EvalReport evaluate_now(const std::vector<Batch>& held_out) {
    return evaluate(backend_, student_, teacher_, held_out, job_.eval_max_batches);
  }

  // Rank 0 logs; at stage 3 the other ranks evaluated alongside it and log nothing.
  void log_eval(std::optional<MetricsLog>& log, std::int64_t step, const EvalReport& report,
                bool print) {
    if (!log) return;
    MetricsLog& metrics = *log;
    nlohmann::json record{{"type", "eval"},
                          {"step", step},
                          {"tokens", report.tokens},
                          {"perplexity", report.student_perplexity}};
    if (report.has_teacher) {
      record["teacher_perplexity"] = report.teacher_perplexity;
      record["kl"] = report.kl;
      record["top1_agreement"] = report.agreement;
    }
    metrics.write(record);
    eval_steps_.push_back(static_cast<double>(step));
    eval_perplexity_.push_back(report.student_perplexity);
    eval_kl_.push_back(report.kl);
    if (print) {
      if (report.has_teacher)
        std::fprintf(stderr,
                     "\n  eval at step %lld: perplexity %.3f (teacher %.3f), KL %.4f, top-1 "
                     "agreement %.2f%%\n",
                     static_cast<long long>(step), report.student_perplexity,
                     report.teacher_perplexity, report.kl, 100 * report.agreement);
      else
        std::fprintf(stderr, "\n  eval at step %lld: perplexity %.3f\n",
                     static_cast<long long>(step), report.student_perplexity);
    }
  }

  void write_plot() {
    Chart loss{std::string("training loss (") + objective_name(job_.objective) + ")",
               "step",
               "loss",
               true,
               {{"train", train_steps_, train_losses_, false}}};
    // Both panels span the whole run, so an evaluation lines up with the loss above it.
    loss.x_low = 0;
    loss.x_high = static_cast<double>(job_.steps);
    std::vector<Chart> panels{loss};
    if (!eval_steps_.empty()) {
      Chart eval{"held-out evaluation",
                 "step",
                 teacher_ ? "KL(teacher || student)" : "perplexity",
                 true,
                 {},
                 loss.x_low,
                 loss.x_high};
      if (teacher_)
        eval.series.push_back({"KL to the teacher", eval_steps_, eval_kl_, true});
      else
        eval.series.push_back({"perplexity", eval_steps_, eval_perplexity_, true});
      panels.push_back(eval);
    }
    write_png(output_ / "loss.png", panels);
  }

  const TrainJob& job_;
  const TrainOptions& options_;
  const Plan& plan_;
  Backend& backend_;
  Student& student_;
  Teacher* teacher_;
  ModelConfig student_config_;
  DataLoader& loader_;
  const Tokenizer* tokenizer_;  // null in a synthetic run, which saves nothing
  fs::path output_;
  LocalCommunicator single_process_;
  Communicator* comm_;     // options_.communicator, or single_process_: scalars, checkpoints
  Communicator* buffers_;  // the arena's gradients and weights: NCCL on GPUs, else comm_
  bool collectives_;       // several ranks, or a buffer communicator (even on one rank)
  bool writer_;            // rank 0: evaluates and writes
  std::vector<MicroBatch> micro_;
  typename Teacher::Activations teacher_acts_;
  xkd::OpmL2Workspace<Backend> opm_workspace_;
  StreamedLayers<Backend> streamed_;
  TeacherLogitsReader* offline_ = nullptr;
  // memory.gradients "none" (train_step, update_layer).
  std::vector<std::vector<Parameter*>> layer_params_;
  std::vector<Parameter*> outside_layers_;
  AdamW* optimizer_ = nullptr;
  ParameterArena* arena_ = nullptr;
  // ZeRO stage (job field "zero_stage", else the planner's choice; kept/train/zero.hpp);
  // shards_ is set from stage 1 on.
  int zero_stage_ = plan_.strategy.zero_stage;
  std::optional<ZeroShards> shards_;
  std::optional<ShardedLayerWeights<Backend>> layer_weights_;  // ZeRO stage 3
  double layer_grad_squares_ = 0;
  double clip_coefficient_ = 1.0;  // from the previous step's norm
  std::int64_t current_step_ = 0;

 public:
  // The offline teacher's file (memory.teacher "offline"); null in a synthetic run.
  void use_offline_teacher(TeacherLogitsReader* reader) { offline_ = reader; }

 private:
  std::vector<double> train_steps_, train_losses_, eval_steps_, eval_perplexity_, eval_kl_;
};

// The job's memory plan on this target, before anything is loaded: the strategy (the job's
// "memory" fields, the rest the planner's choice), refused when kept train cannot run it or
// when it does not fit; with --gpu, the device's allocations are capped at that GPU's budget.
inline Plan plan_training(const TrainJob& job, const TrainOptions& options, bool cuda) {
  const std::string where = job.file.string();
  KEPT_CHECK(options.gpu.empty() || cuda, where, ": --gpu ", options.gpu,
             " plans and caps a cuda run, and this job's device is \"", job.device,
             "\" (pass --device cuda)");
  PlanJob input = plan_job(job, cuda && cuda_emulated());
  input.ranks = options.communicator ? options.communicator->size() : 1;
  TargetSpec target = cpu_spec();
  if (cuda) {
    target = gpu_spec(options.gpu.empty() ? "h100-80g" : options.gpu);
    if (options.gpu.empty() && options.device_memory_bytes > 0) {
      target.name = "this GPU";
      target.description = "the GPU in use";
      target.memory_bytes = options.device_memory_bytes;
    }
  }
  const double host_memory = cpu_spec().memory_bytes;
  const Strategy strategy = resolve_strategy(job, input, target, host_memory);
  Plan plan = estimate(input, strategy, target, host_memory);
  if (!plan.not_runnable.empty()) {
    std::string missing;
    for (const std::string& what : plan.not_runnable)
      missing += (missing.empty() ? "" : ", ") + what;
    fail(where, ": the memory plan (", strategy.describe(), ") needs ", missing,
         ", which kept train cannot run; `kept plan ", where, "` lists the plans it can");
  }
  char shortfall[160];
  std::snprintf(shortfall, sizeof shortfall, "%.2f GiB predicted for %.2f GiB available",
                plan.device_bytes / (1 << 30), plan.device_budget / (1 << 30));
  KEPT_CHECK(plan.fits, where, ": the job does not fit on ", target.description, ": ", shortfall,
             " with ", strategy.describe(), "; nothing was loaded. `kept plan ", where,
             cuda ? " --gpu " + target.name : std::string(),
             "` shows every buffer and what would fit");
  if (cuda && !options.gpu.empty())
    device_memory_meter().set_cap(static_cast<std::int64_t>(plan.device_budget),
                                  "--gpu " + options.gpu);
  if (!options.quiet)
    std::fprintf(stderr, "memory plan: %s; %.1f MiB planned on %s\n", strategy.describe().c_str(),
                 plan.device_bytes / (1 << 20), target.name.c_str());
  return plan;
}

// Random weights for a synthetic run, drawn on the backend (fill_uniform: uniform with the
// standard deviation of HF's init, 0.02); norm weights 1, biases 0.
template <class B, class Model>
void random_weights(B& backend, Model& model, std::uint64_t seed) {
  const float bound = static_cast<float>(0.02 * std::sqrt(3.0));
  model.visit_parameters([&](Parameter& p) {
    if (p.role == ParamRole::Weight || p.role == ParamRole::Embedding) {
      backend.fill_uniform(p.value.template data<typename B::Param>(), p.value.numel(),
                           Random::derive(seed, p.name), bound);
    } else if (p.role == ParamRole::NormWeight) {
      Tensor ones = Tensor::empty(DType::F32, p.value.shape());
      for (float& one : ones.span<float>())
        one = 1.0f;
      backend.upload(ones, p.value);
    }
  });
}

// `kept train --synthetic`: the job's shapes (its "model_config", else the student's or init
// config), random weights drawn on the backend, random tokens; the teacher, when the objective
// has one, an Orion-style LayerNorm decoder of the same shapes unless its config is at hand.
template <class B>
TrainResult train_synthetic(B& backend, const TrainJob& job, const TrainOptions& options,
                            const Plan& plan) {
  const PlanJob shapes = plan_job(job, B::space == MemorySpace::Cuda && cuda_emulated());
  std::fprintf(stderr, "synthetic: random weights and tokens of %s's shapes; nothing is written\n",
               job.file.string().c_str());
  std::optional<LoadedModelOn<B>> teacher;
  if (shapes.has_teacher) {
    teacher.emplace(LoadedModelOn<B>{"", shapes.teacher, make_decoder(backend, shapes.teacher)});
    with_decoder(teacher->model, [&](auto& model) { random_weights(backend, model, 2); });
  }
  LoadedModelOn<B> student{"", shapes.student, make_decoder(backend, shapes.student)};
  with_decoder(student.model, [&](auto& model) { random_weights(backend, model, 1); });
  // Enough random tokens for every step's batches, in documents of one window each.
  const std::int64_t windows =
      job.batch_size * job.grad_accum * (std::max<std::int64_t>(1, options.synthetic_steps) + 1);
  Random random(Random::derive(job.data_seed, "synthetic/tokens"));
  std::vector<TokenDocument> documents(static_cast<std::size_t>(windows));
  for (TokenDocument& document : documents) {
    document.resize(static_cast<std::size_t>(job.seq_len));
    for (std::int32_t& token : document)
      token = static_cast<std::int32_t>(
          3 + random.below(static_cast<std::uint64_t>(shapes.student.vocab_size - 3)));
  }
  DataConfig data;
  data.seq_len = job.seq_len;
  data.batch_size = job.batch_size;
  data.eos_id = 2;
  data.seed = job.data_seed;
  data.held_out_fraction = 0;
  data.vocab_size = static_cast<std::int32_t>(shapes.student.vocab_size);
  DataLoader loader(std::move(documents), data);
  return with_decoder(student.model, [&](auto& student_model) {
    if (teacher) {
      return with_decoder(teacher->model, [&](auto& teacher_model) {
        Run run(job, options, plan, backend, student_model, &teacher_model, shapes.student, loader,
                nullptr);
        return run.run();
      });
    }
    using StudentType = std::remove_reference_t<decltype(student_model)>;
    Run<B, StudentType, StudentType> run(job, options, plan, backend, student_model, nullptr,
                                         shapes.student, loader, nullptr);
    return run.run();
  });
}

// Loads (or initialises) the models on `backend` and runs the job; run_training has validated it.
template <class B>
TrainResult train_on(B& backend, const TrainJob& job, const TrainOptions& options) {
  constexpr bool on_cpu = std::is_same_v<B, Cpu>;
  KEPT_CHECK(!(job.objective == Objective::NormOnly && job.norm_only_loss == "opm-l2") || on_cpu,
             job.file.string(),
             ": norm_only.loss \"opm-l2\" runs on the CPU only; use device \"cpu\" "
             "or norm_only.loss \"xkd-logit\"");
  const Plan plan = plan_training(job, options, /*cuda=*/B::space == MemorySpace::Cuda);
  if (options.synthetic) return train_synthetic(backend, job, options, plan);
  const bool offline = plan.strategy.teacher == "offline";
  std::optional<LoadedModelOn<B>> teacher;
  if (!job.teacher.empty() && !offline) teacher.emplace(load_model(backend, job.teacher));
  ModelConfig student_config;
  std::optional<LoadedModelOn<B>> student;
  if (!job.student.empty()) {
    student.emplace(load_model(backend, job.student));
    student_config = student->config;
  } else {
    student_config = read_hf_config(job.init_config);
    student.emplace(LoadedModelOn<B>{"", student_config, make_decoder(backend, student_config)});
    with_decoder(student->model, [&](auto& model) {
      init_parameters(backend, model, {.seed = job.init_seed, .std = job.init_std});
    });
  }
  if (teacher) check_compatible(job, student_config, teacher->config);

  const Tokenizer tokenizer = find_tokenizer(job.tokenizer, {job.student, job.teacher});
  tokenizer.check_fits(student_config.vocab_size,
                       job.student.empty() ? job.init_config : job.student + "/config.json");
  // One loader recipe for the trainer and `kept teacher-logits` (reference/teacher_logits_run.hpp).
  DataLoader loader = make_training_loader(job, tokenizer, student_config.vocab_size);
  std::optional<TeacherLogitsReader> offline_logits;
  if (offline) {
    offline_logits.emplace(TeacherLogitsReader::open(
        job.teacher_logits, offline_teacher_header(job, loader, tokenizer, /*k: the file's=*/0,
                                                   student_config.vocab_size)));
    const std::int64_t needed = job.steps * job.grad_accum * job.batch_size * job.seq_len;
    KEPT_CHECK(offline_logits->total_positions() >= needed, job.teacher_logits,
               ": holds the teacher for ", offline_logits->total_positions(),
               " positions, the job needs ", needed,
               " (steps x grad_accum x batch_size x seq_len); run `kept teacher-logits` for "
               "this job again");
    if (!options.quiet)
      std::fprintf(stderr, "teacher: offline, top-%lld log-probs from %s\n",
                   static_cast<long long>(offline_logits->header().k), job.teacher_logits.c_str());
  }
  // Rank 0 alone creates (or, with --force, clears) the output; every rank checked it before
  // (run_training).
  if (!options.communicator || options.communicator->rank() == 0)
    prepare_output(job.output, options);

  return with_decoder(student->model, [&](auto& student_model) {
    if (teacher) {
      return with_decoder(teacher->model, [&](auto& teacher_model) {
        Run run(job, options, plan, backend, student_model, &teacher_model, student_config, loader,
                &tokenizer);
        return run.run();
      });
    }
    using StudentType = std::remove_reference_t<decltype(student_model)>;
    Run<B, StudentType, StudentType> run(job, options, plan, backend, student_model, nullptr,
                                         student_config, loader, &tokenizer);
    if (offline_logits) run.use_offline_teacher(&*offline_logits);
    return run.run();
  });
}

}  // namespace training
}  // namespace kept::cli
