// kept/train/adamw.hpp: AdamW with decoupled weight decay, gradient clipping and helpers.
//
// The update (Loshchilov & Hutter, "Decoupled Weight Decay Regularization"), written exactly as
// torch.optim.AdamW's single-tensor path computes it (torch/optim/adam.py, _single_tensor_adam
// with decoupled_weight_decay=True; the path torch takes for CPU tensors), so that a run here
// matches a torch run to rounding. Per parameter p with gradient g, in fp32, with the scalars
// computed in double the way Python computes them and then rounded once to fp32:
//
//   t   += 1                                         (per parameter, like torch's state["step"])
//   p    = p * f32(1 - lr * wd)                      only when this parameter decays and wd != 0
//   m    = fma(f32(1 - b1), g - m, m)                torch: exp_avg.lerp_(g, 1 - b1)
//   v    = v * f32(b2);  v = fma(f32(1 - b2) * g, g, v)   torch: mul_(b2).addcmul_(g, g, 1 - b2)
//   bc1  = 1 - b1^t,  bc2 = 1 - b2^t                 (double, std::pow like Python's **)
//   step = lr / bc1                                  (double)
//   den  = sqrt(v) / f32(bc2^0.5) + f32(eps)          torch: (v.sqrt() / bc2_sqrt).add_(eps)
//   p    = p + (f32(-step) * m) / den                torch: p.addcdiv_(m, den, value=-step)
//
// The fused multiply-adds are deliberate: torch's CPU lerp and addcmul kernels compile to FMAs
// (measured against torch 2.x: with plain mul+add ~25% of lerp results differ by an ulp, with
// FMA none do), and std::fma is exactly specified by IEEE 754, so the result is also the same
// on every compiler and platform. For |1 - b1| >= 0.5 torch's lerp switches to the other form,
// fma(w - 1, g - m, g), reproduced here. What cannot be reproduced is torch's CPU sqrt, which
// is not always correctly rounded (measured with torch 2.15: 1 ulp off on ~20% of elements,
// small tensors included). That changes `den` by an ulp, which the parameter almost never sees
// (the update is far below the parameter's own ulp): the reference trajectories in
// tests/data/train_reference.json match to the bit, and the moments always do. kept's sqrt is
// the correctly rounded std::sqrt, so kept itself is deterministic to the bit everywhere.
//
// Parameter groups. Weight decay applies by role: by default Weight and Embedding decay, Bias,
// NormWeight and NormBias do not (the usual GPT/Llama recipe; decaying a norm gain pulls it
// towards 0, which is not a prior anyone wants). DecayRoles changes the flags, or a predicate
// overrides them per parameter. A decayed and an undecayed parameter see the same lr, so the two
// groups are just one weight-decay bit per parameter.
//
// Frozen parameters (trainable == false, or no gradient allocated) are skipped entirely: no
// state is created for them and their step count does not advance, exactly as torch skips a
// parameter whose .grad is None. That is why the step count is per parameter: a parameter
// unfrozen half-way starts its own bias correction at t = 1 (the Appendix-A pilot freezes all
// but the norm weights).
//
// Compact states (for models whose fp32 states do not fit; the 14B plan in the README):
//  - master_weights = false, on a backend whose parameters are bf16 (CpuBf16, Cuda): no fp32
//    master copy; the fp32 update of each element is rounded to bf16 stochastically (rounding up
//    with probability (x - down) / ulp, so the expected value is the fp32 update and small steps
//    are not lost to round-to-nearest). The random bits are a counter-based hash of
//    (parameter name, its step, element index): a resumed run draws the same bits, and the CPU
//    and the GPU agree to the bit. Saves 4 bytes a parameter.
//  - moment_bits = 16: m and v stored in bf16 (4 bytes a parameter for both instead of 8), each
//    rounded stochastically after its update (bits from kept::moment_rounding_key, so resumes and
//    backends agree): round-to-nearest would freeze v, whose per-step change (1 - b2 = 0.1% of
//    it) is below half a bf16 ulp (0.4%); stochastic rounding keeps it right on average. All
//    parameters, small ones included. Not torch-exact.
//  - moment_bits = 8: m and v as 8-bit blockwise codes (kept/core/dynamic_code.hpp: a dynamic-
//    tree code, one fp32 absmax per 256 elements, 2.03 bytes a parameter for both instead of
//    8), for parameters of at least min_8bit_size elements; smaller ones (norms, biases) keep
//    fp32 moments, as bitsandbytes does. Not torch-exact: each step requantises m and v.
//  - states_on_host: the moments, absmax and masters live in host memory (memory.states_on
//    "host" in a job); a backend with its own memory gets each parameter's state copied into a
//    staging area, host_state_chunk elements at a time, updated there by the same
//    Backend::adamw_update, and copied back. The copies are exact and the rounding bits are
//    indexed by the element's place in its parameter (AdamWScalars::first_element), so the run
//    is bit-identical to states in the backend's memory; the device holds two chunks' state
//    instead of the model's (update_staged double-buffers them), and each step moves the state
//    across the link once each way, the two directions overlapping (what `kept plan` charges).
//    On a host backend it only keeps the state out of the arena.
// With the defaults (fp32 moments, masters where the parameters are bf16) nothing changes.
//
// Sharded states (ZeRO stage >= 1, kept/train/zero.hpp): shard_states() gives, per parameter,
// the range [first, first + count) of its elements this optimizer owns (first a multiple of
// kQuantBlock, so an owned range never splits a quantisation block). State then exists only for
// that range (1-D tensors of `count` elements), step() updates only those elements of the value
// (the rounding bits indexed by the element's place in the whole parameter, so a sharded update
// is the unsharded one bit for bit), and a parameter of which nothing is owned gets no state.
// state_tensors() exports the pieces; zero.hpp gathers them into the whole-parameter format
// below, and load_state() takes that whole format and keeps the owned ranges, so a checkpoint
// resumes on any rank count.
//
// State, per parameter and keyed by its name: exp_avg (m) and exp_avg_sq (v) as fp32 tensors of
// the parameter's shape (or U8 codes plus F32 absmax) and its step count. state_tensors()
// exports it, with the optimizer's own counter and hyper-parameters, as NamedTensors for a
// safetensors file:
//   "adamw.steps_taken"   I64 [1]   calls to step() so far
//   "adamw.beta1" / "adamw.beta2" / "adamw.eps"   F64 [1]   checked on load: m and v mean
//                                                           nothing under other betas
//   "exp_avg/<name>", "exp_avg_sq/<name>"   F32, the parameter's shape (U8 when 8-bit, BF16
//                                           when 16-bit)
//   "exp_avg_absmax/<name>", "exp_avg_sq_absmax/<name>"   F32 [ceil(numel / 256)], 8-bit only
//   "step/<name>"         I64 [1]
//   "master/<name>"       F32, only where fp32 master weights of bf16 parameters are kept
//                         (CpuBf16, Cuda with master_weights; the value is round(master))
// The moments and master weights live in the backend's memory (its Master type) and cross to the
// host through Backend::download/upload; the per-range update is Backend::adamw_update.
// load_state() copies everything back, so the continued run is bit-identical to one that never
// stopped. lr and weight decay are not checked: a schedule changes lr every step anyway.
//
// clip_grad_norm follows torch.nn.utils.clip_grad_norm_ (scale = max_norm / (norm + 1e-6),
// applied only when below 1) but accumulates the squares in double in parameter order: the
// same total on every run and every thread count, and no fp32 overflow for large gradients.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kept/backend/backend.hpp"
#include "kept/core/dynamic_code.hpp"
#include "kept/core/error.hpp"
#include "kept/core/hash.hpp"
#include "kept/core/random.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/safetensors.hpp"
#include "kept/layers/parameter.hpp"
#include "kept/model/parameter_arena.hpp"

namespace kept {

// Which roles get weight decay (the defaults: matrices and embeddings, not norms or biases).
struct DecayRoles {
  bool weight = true;
  bool bias = false;
  bool norm_weight = false;
  bool norm_bias = false;
  bool embedding = true;

  bool decays(ParamRole role) const {
    switch (role) {
      case ParamRole::Weight:
        return weight;
      case ParamRole::Bias:
        return bias;
      case ParamRole::NormWeight:
        return norm_weight;
      case ParamRole::NormBias:
        return norm_bias;
      case ParamRole::Embedding:
        return embedding;
    }
    return false;
  }
};

// torch.optim.AdamW's defaults.
struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  DecayRoles decay{};
  // When set, decides per parameter instead of `decay` (e.g. "no decay on the LM head").
  std::function<bool(const Parameter&)> decay_predicate{};
  // Compact states (top comment). master_weights only matters where the backend's parameters
  // are not its optimizer type (bf16 parameters).
  bool master_weights = true;
  int moment_bits = 32;  // 32, 16 (bf16) or 8
  std::int64_t min_8bit_size = 4096;
  bool states_on_host = false;
  // Elements per staged copy; a multiple of kQuantBlock so 8-bit blocks are never split.
  std::int64_t host_state_chunk = std::int64_t{1} << 24;
};

// The parameters of anything with visit_parameters (a Decoder, a layer), in visiting order.
template <class Model>
std::vector<Parameter*> parameters_of(Model& model) {
  std::vector<Parameter*> params;
  model.visit_parameters([&](Parameter& p) { params.push_back(&p); });
  return params;
}

namespace detail {

// The optimizer's tensors must have the dtype the backend's precision policy gives them.
inline void train_require(const Parameter& p, const Tensor& tensor, DType dtype, const char* what,
                          const char* context) {
  KEPT_CHECK(tensor.dtype() == dtype, context, ": parameter ", p.name, ": ", what, " is ",
             dtype_name(tensor.dtype()), ", expected ", dtype_name(dtype));
  KEPT_CHECK(tensor.shape() == p.value.shape(), context, ": parameter ", p.name, ": ", what,
             " has shape ", tensor.shape(), ", the parameter ", p.value.shape());
}

inline Tensor train_scalar_i64(std::int64_t value) {
  Tensor t = Tensor::empty(DType::I64, {1});
  t.data<std::int64_t>()[0] = value;
  return t;
}
inline Tensor train_scalar_f64(double value) {
  Tensor t = Tensor::empty(DType::F64, {1});
  t.data<double>()[0] = value;
  return t;
}

}  // namespace detail

class AdamW {
 public:
  explicit AdamW(AdamWConfig config = {}) : config_(std::move(config)) {
    KEPT_CHECK(config_.beta1 >= 0 && config_.beta1 < 1, "AdamW: beta1 must be in [0, 1), got ",
               config_.beta1);
    KEPT_CHECK(config_.beta2 >= 0 && config_.beta2 < 1, "AdamW: beta2 must be in [0, 1), got ",
               config_.beta2);
    KEPT_CHECK(config_.eps >= 0, "AdamW: eps must be >= 0, got ", config_.eps);
    KEPT_CHECK(config_.weight_decay >= 0, "AdamW: weight_decay must be >= 0, got ",
               config_.weight_decay);
    KEPT_CHECK(config_.moment_bits == 32 || config_.moment_bits == 16 || config_.moment_bits == 8,
               "AdamW: moment_bits must be 32, 16 or 8, got ", config_.moment_bits);
    KEPT_CHECK(config_.min_8bit_size >= 0, "AdamW: min_8bit_size must be >= 0, got ",
               config_.min_8bit_size);
    KEPT_CHECK(config_.host_state_chunk > 0 && config_.host_state_chunk % kQuantBlock == 0,
               "AdamW: host_state_chunk must be a positive multiple of ", kQuantBlock, ", got ",
               config_.host_state_chunk);
  }

  const AdamWConfig& config() const { return config_; }
  // Keeps the moments (and master weights) in the arena's buffers, at each parameter's slot,
  // instead of one allocation per parameter. The arena must outlive the optimizer's use of it.
  // Parameters whose state does not fit the arena's buffers (fp32 moments of a small parameter
  // next to an 8-bit arena, masters the arena has none of) get their own allocations.
  void use_arena(const ParameterArena* arena) {
    if (config_.states_on_host) return;  // the state lives in host memory, not in the arena
    KEPT_CHECK(!arena || arena->has_optimizer_state(),
               "AdamW: the parameter arena was built without optimizer state");
    arena_ = arena;
  }
  // The arena layout that holds this optimizer's state.
  ArenaLayout arena_layout() const {
    return {.optimizer_state = !config_.states_on_host,
            .master_weights = config_.master_weights,
            .quantized_moments = config_.moment_bits == 8,
            .bf16_moments = config_.moment_bits == 16};
  }
  // Whether parameter `p`'s moments are 8-bit.
  bool quantizes(const Parameter& p) const {
    return config_.moment_bits == 8 && p.value.numel() >= config_.min_8bit_size;
  }
  // The dtype of p's m and v on `Backend`: 8-bit codes, bf16, or the backend's master dtype.
  template <class Backend>
  DType moment_dtype(const Parameter& p) const {
    return quantizes(p)                ? DType::U8
           : config_.moment_bits == 16 ? DType::BF16
                                       : Backend::Precision::master;
  }
  // Elements [first, first + count) of a parameter (Sharded states, above).
  struct OwnedRange {
    std::int64_t first = 0, count = 0;
  };
  // Keeps state for, and updates, only the ranges `owned` names (a parameter it does not name:
  // nothing). Before the first step or load; not with an arena (its buffers are whole-model).
  void shard_states(std::map<std::string, OwnedRange, std::less<>> owned) {
    KEPT_CHECK(states_.empty(), "AdamW: shard_states() must come before the first step or load");
    KEPT_CHECK(!arena_, "AdamW: sharded states live outside the parameter arena");
    for (const auto& [name, range] : owned)
      KEPT_CHECK(range.first >= 0 && range.count >= 0 && range.first % kQuantBlock == 0,
                 "AdamW: owned range [", range.first, ", +", range.count, ") of ", name,
                 " does not start on a multiple of ", kQuantBlock);
    owned_ = std::move(owned);
    sharded_ = true;
  }
  bool sharded() const { return sharded_; }
  // The elements of `p` this optimizer owns: all of them unless sharded.
  OwnedRange owned_range(const Parameter& p) const {
    if (!sharded_) return {0, p.value.numel()};
    auto found = owned_.find(p.name);
    if (found == owned_.end()) return {};
    KEPT_CHECK(found->second.first + found->second.count <= p.value.numel(), "AdamW: owned range [",
               found->second.first, ", +", found->second.count, ") of ", p.name, " exceeds its ",
               p.value.numel(), " elements");
    return found->second;
  }
  // Whether `Backend`'s parameters get fp32 master copies under this configuration.
  template <class Backend>
  bool keeps_master() const {
    return Backend::Precision::separate_master && config_.master_weights;
  }
  // The trainer sets the scheduled rate before each step.
  void set_lr(double lr) { config_.lr = lr; }
  double lr() const { return config_.lr; }
  // Calls to step() so far (including steps where every parameter was frozen).
  std::int64_t steps_taken() const { return steps_taken_; }

  bool decays(const Parameter& p) const {
    return config_.decay_predicate ? config_.decay_predicate(p) : config_.decay.decays(p.role);
  }

  // One update of every parameter that has a gradient, at the current lr(). The scalars are
  // formed here, on the host, as torch forms them; the backend applies them to each parameter's
  // range (Backend::adamw_update), with fp32 master weights where its policy keeps them.
  template <class Backend>
  void step(Backend& backend, std::span<Parameter* const> params) {
    step_parameters(backend, params);
    ++steps_taken_;
  }
  // The update of some parameters within an optimizer step that step() completes: a model
  // updated layer by layer inside backward (memory.gradients "none") calls this per layer and
  // step() for the rest, so each parameter's update and the step count are those of one step().
  template <class Backend>
  void step_parameters(Backend& backend, std::span<Parameter* const> params) {
    using Precision = typename Backend::Precision;
    using Grad = typename Backend::Grad;
    using Master = typename Backend::Master;
    check_unique_names(params, "AdamW step");
    const double lr = config_.lr, b1 = config_.beta1, b2 = config_.beta2;
    // Scalars as torch forms them: Python doubles, rounded to fp32 when they meet the tensor.
    AdamWScalars scalars;
    scalars.one_minus_beta1 = static_cast<float>(1.0 - b1);
    scalars.small_weight =
        std::fabs(scalars.one_minus_beta1) < 0.5f;  // torch: is_lerp_weight_small
    scalars.beta2 = static_cast<float>(b2);
    scalars.one_minus_beta2 = static_cast<float>(1.0 - b2);
    scalars.eps = static_cast<float>(config_.eps);
    for (Parameter* p : params) {
      KEPT_CHECK(p != nullptr, "AdamW step: null parameter pointer");
      if (!p->has_grad()) continue;
      const OwnedRange owned = owned_range(*p);
      if (owned.count == 0) continue;
      detail::train_require(*p, p->value, Precision::param, "value", "AdamW step");
      detail::train_require(*p, p->grad, Precision::grad, "gradient", "AdamW step");
      State& state = state_for(backend, *p);
      state.step += 1;
      const double t = static_cast<double>(state.step);
      const double bias_correction1 = 1.0 - std::pow(b1, t);
      const double bias_correction2 = 1.0 - std::pow(b2, t);
      scalars.bias_correction2_sqrt = static_cast<float>(std::pow(bias_correction2, 0.5));
      scalars.neg_step = static_cast<float>(-(lr / bias_correction1));
      scalars.decay = config_.weight_decay != 0 && decays(*p);
      scalars.decay_keep = static_cast<float>(1.0 - lr * config_.weight_decay);
      scalars.rounding_key = Random::hash(fnv1a(p->name) ^ static_cast<std::uint64_t>(state.step));
      scalars.first_element = static_cast<std::uint64_t>(owned.first);
      if (stages<Backend>()) {
        update_staged(backend, *p, state, owned, scalars);
        continue;
      }
      Master* master = state.master.defined() ? state.master.template data<Master>() : nullptr;
      backend.adamw_update(p->value.template data<typename Backend::Param>() + owned.first, master,
                           p->grad.template data<Grad>() + owned.first, moments_of<Master>(state),
                           owned.count, scalars);
    }
  }

  // Per-parameter state, for tests and diagnostics; null / 0 before the parameter's first step.
  const Tensor* exp_avg(std::string_view name) const {
    auto found = states_.find(name);
    return found == states_.end() ? nullptr : &found->second.exp_avg;
  }
  const Tensor* exp_avg_sq(std::string_view name) const {
    auto found = states_.find(name);
    return found == states_.end() ? nullptr : &found->second.exp_avg_sq;
  }
  std::int64_t parameter_step(std::string_view name) const {
    auto found = states_.find(name);
    return found == states_.end() ? 0 : found->second.step;
  }

  // The whole state (see the top comment for the names), downloaded to host copies.
  template <class Backend>
  std::vector<NamedTensor> state_tensors(Backend& backend) const {
    std::vector<NamedTensor> out;
    out.push_back({"adamw.steps_taken", detail::train_scalar_i64(steps_taken_)});
    out.push_back({"adamw.beta1", detail::train_scalar_f64(config_.beta1)});
    out.push_back({"adamw.beta2", detail::train_scalar_f64(config_.beta2)});
    out.push_back({"adamw.eps", detail::train_scalar_f64(config_.eps)});
    auto host = [&](const Tensor& t) {
      return t.space() == MemorySpace::Host ? t.clone() : backend.download(t);
    };
    for (const auto& [name, state] : states_) {
      out.push_back({"exp_avg/" + name, host(state.exp_avg)});
      out.push_back({"exp_avg_sq/" + name, host(state.exp_avg_sq)});
      if (state.exp_avg_absmax.defined()) {
        out.push_back({"exp_avg_absmax/" + name, host(state.exp_avg_absmax)});
        out.push_back({"exp_avg_sq_absmax/" + name, host(state.exp_avg_sq_absmax)});
      }
      if (state.master.defined()) out.push_back({"master/" + name, host(state.master)});
      out.push_back({"step/" + name, detail::train_scalar_i64(state.step)});
    }
    return out;
  }

  // Replaces the state with `state` (from state_tensors(), possibly through a file). `params` are
  // the model's parameters: every state entry must name one of them and match its shape. A
  // parameter without state simply has not stepped yet (it was frozen), as in torch.
  // `where` prefixes error messages (e.g. the file name). On error the optimizer is unchanged.
  template <class Backend>
  void load_state(Backend& backend, std::span<const NamedTensor> state,
                  std::span<Parameter* const> params, std::string_view where = "optimizer state") {
    constexpr DType kMaster = Backend::Precision::master;
    check_unique_names(params, std::string(where));
    std::map<std::string, const Parameter*, std::less<>> by_name;
    for (const Parameter* p : params)
      by_name.emplace(p->name, p);
    std::map<std::string, const Tensor*, std::less<>> entries;
    for (const NamedTensor& named : state)
      KEPT_CHECK(entries.emplace(named.name, &named.tensor).second, where, ": tensor ", named.name,
                 " given twice");

    auto take = [&](const std::string& name) -> const Tensor& {
      auto found = entries.find(name);
      KEPT_CHECK(found != entries.end(), where, ": missing ", name);
      const Tensor& tensor = *found->second;
      entries.erase(found);
      KEPT_CHECK(tensor.defined() && tensor.space() == MemorySpace::Host, where, ": ", name,
                 " must be a host tensor");
      return tensor;
    };
    auto scalar_i = [&](const std::string& name) {
      const Tensor& t = take(name);
      KEPT_CHECK(t.dtype() == DType::I64 && t.numel() == 1, where, ": ", name,
                 " must be one I64, got ", dtype_name(t.dtype()), " ", t.shape());
      return t.data<std::int64_t>()[0];
    };
    auto scalar_f = [&](const std::string& name, double expected) {
      const Tensor& t = take(name);
      KEPT_CHECK(t.dtype() == DType::F64 && t.numel() == 1, where, ": ", name,
                 " must be one F64, got ", dtype_name(t.dtype()), " ", t.shape());
      const double saved = t.data<double>()[0];
      KEPT_CHECK(saved == expected, where, ": ", name, " is ", saved,
                 " in the saved state but the optimizer is configured with ", expected,
                 "; the moments are only meaningful under the hyper-parameters they were "
                 "accumulated with");
    };

    const std::int64_t steps = scalar_i("adamw.steps_taken");
    KEPT_CHECK(steps >= 0, where, ": adamw.steps_taken is negative (", steps, ")");
    scalar_f("adamw.beta1", config_.beta1);
    scalar_f("adamw.beta2", config_.beta2);
    scalar_f("adamw.eps", config_.eps);

    // Collect the parameter names that have state, from any of the three entries.
    std::set<std::string, std::less<>> names;
    for (const auto& [name, tensor] : entries) {
      (void)tensor;
      std::string_view key = name;
      bool known = false;
      for (std::string_view prefix : {"exp_avg/", "exp_avg_sq/", "exp_avg_absmax/",
                                      "exp_avg_sq_absmax/", "step/", "master/"}) {
        if (key.starts_with(prefix)) {
          names.emplace(key.substr(prefix.size()));
          known = true;
          break;
        }
      }
      KEPT_CHECK(known, where, ": unexpected tensor ", name,
                 " (not exp_avg/, exp_avg_sq/, their _absmax/, master/ or step/ of a parameter)");
    }
    // Validate everything first; only then write (into the arena's slots when there is one),
    // so a bad file leaves the optimizer as it was.
    struct Entry {
      const Parameter* param = nullptr;
      const Tensor *exp_avg = nullptr, *exp_avg_sq = nullptr, *master = nullptr;
      const Tensor *exp_avg_absmax = nullptr, *exp_avg_sq_absmax = nullptr;
      std::int64_t step = 0;
    };
    std::vector<Entry> checked;
    for (const std::string& name : names) {
      auto param = by_name.find(name);
      KEPT_CHECK(param != by_name.end(), where, ": state for parameter ", name,
                 ", which the model does not have");
      const Parameter& p = *param->second;
      const Shape& shape = p.value.shape();
      const bool quantized = quantizes(p);
      auto tensor = [&](const std::string& key, DType dtype, const Shape& expected) {
        const Tensor& t = take(key);
        KEPT_CHECK(t.dtype() == dtype, where, ": ", key, " is ", dtype_name(t.dtype()),
                   ", expected ", dtype_name(dtype),
                   key.starts_with("exp_avg")
                       ? " (the state was saved with other optimizer_states than configured)"
                       : "");
        KEPT_CHECK(t.shape() == expected, where, ": ", key, " has shape ", t.shape(), ", expected ",
                   expected, " for parameter ", name);
        return &t;
      };
      const DType moments = moment_dtype<Backend>(p);
      Entry entry{&p, tensor("exp_avg/" + name, moments, shape),
                  tensor("exp_avg_sq/" + name, moments, shape)};
      if (quantized) {
        const Shape blocks{quant_blocks(p.value.numel())};
        entry.exp_avg_absmax = tensor("exp_avg_absmax/" + name, DType::F32, blocks);
        entry.exp_avg_sq_absmax = tensor("exp_avg_sq_absmax/" + name, DType::F32, blocks);
      }
      if (keeps_master<Backend>()) entry.master = tensor("master/" + name, kMaster, shape);
      entry.step = scalar_i("step/" + name);
      KEPT_CHECK(entry.step >= 1, where, ": step/", name, " is ", entry.step, ", expected >= 1");
      checked.push_back(entry);
    }
    if (!entries.empty()) {
      const std::string& name = entries.begin()->first;
      KEPT_CHECK(false, where, ": unexpected tensor ", name,
                 name.starts_with("master/")
                     ? " (master weights, but this optimizer keeps none: the state was saved "
                       "with master_weights and is loaded without)"
                 : name.find("absmax/") != std::string::npos
                     ? " (8-bit moments, but this optimizer's are 32-bit for this parameter)"
                     : "");
    }
    std::map<std::string, State, std::less<>> loaded;
    for (const Entry& entry : checked) {
      // Sharded: the owned range of each whole tensor (and the absmax blocks it spans).
      const OwnedRange owned = owned_range(*entry.param);
      if (owned.count == 0) continue;
      auto part = [&](const Tensor* whole, std::int64_t per) {
        return sharded_ ? host_range(*whole, owned.first / per, (owned.count + per - 1) / per)
                        : *whole;
      };
      State s = empty_state(backend, *entry.param);
      assign(backend, part(entry.exp_avg, 1), s.exp_avg);
      assign(backend, part(entry.exp_avg_sq, 1), s.exp_avg_sq);
      if (entry.exp_avg_absmax) {
        assign(backend, part(entry.exp_avg_absmax, kQuantBlock), s.exp_avg_absmax);
        assign(backend, part(entry.exp_avg_sq_absmax, kQuantBlock), s.exp_avg_sq_absmax);
      }
      if (entry.master) assign(backend, part(entry.master, 1), s.master);
      s.step = entry.step;
      loaded.emplace(entry.param->name, std::move(s));
    }
    states_ = std::move(loaded);
    steps_taken_ = steps;
  }

 private:
  struct State {
    Tensor exp_avg;                            // Master, or U8 codes when 8-bit
    Tensor exp_avg_sq;                         // likewise
    Tensor exp_avg_absmax, exp_avg_sq_absmax;  // F32 per kQuantBlock elements; 8-bit only
    Tensor master;  // fp32 copy of a bf16 parameter; undefined when the value is its own master
    std::int64_t step = 0;
  };

  // The shape of p's state tensors: the parameter's, or its owned range's when sharded.
  Shape state_shape(const Parameter& p) const {
    return sharded_ ? Shape{owned_range(p).count} : p.value.shape();
  }

  // Zeroed state tensors for parameter `p` (the master not yet filled).
  template <class Backend>
  State empty_state(Backend& backend, const Parameter& p) {
    constexpr DType kMaster = Backend::Precision::master;
    const Shape shape = state_shape(p);
    State s;
    if (quantizes(p)) {
      KEPT_CHECK(kMaster == DType::F32, "AdamW: 8-bit moments need fp32 optimizer math; ",
                 Backend::name(), " keeps ", dtype_name(kMaster));
      const Shape blocks{quant_blocks(shape.numel())};
      s.exp_avg = fresh_state(backend, p.name, DType::U8, shape, &ParameterArena::exp_avg);
      s.exp_avg_sq = fresh_state(backend, p.name, DType::U8, shape, &ParameterArena::exp_avg_sq);
      s.exp_avg_absmax =
          fresh_state(backend, p.name, DType::F32, blocks, &ParameterArena::exp_avg_absmax);
      s.exp_avg_sq_absmax =
          fresh_state(backend, p.name, DType::F32, blocks, &ParameterArena::exp_avg_sq_absmax);
    } else {
      const DType moment = moment_dtype<Backend>(p);
      KEPT_CHECK(moment != DType::BF16 || kMaster == DType::F32,
                 "AdamW: bf16 moments need fp32 optimizer math; ", Backend::name(), " keeps ",
                 dtype_name(kMaster));
      s.exp_avg = fresh_state(backend, p.name, moment, shape, &ParameterArena::exp_avg);
      s.exp_avg_sq = fresh_state(backend, p.name, moment, shape, &ParameterArena::exp_avg_sq);
    }
    if (keeps_master<Backend>())
      s.master = fresh_state(backend, p.name, kMaster, shape, &ParameterArena::master);
    return s;
  }

  template <class Backend>
  State& state_for(Backend& backend, const Parameter& p) {
    auto found = states_.find(p.name);
    if (found != states_.end()) {
      KEPT_CHECK(found->second.exp_avg.shape() == state_shape(p), "AdamW step: parameter ", p.name,
                 " has shape ", p.value.shape(), " but its optimizer state has shape ",
                 found->second.exp_avg.shape());
      return found->second;
    }
    State s = empty_state(backend, p);
    // The master starts as the parameter's value (its owned range), widened exactly.
    if (s.master.defined()) {
      const Tensor value = backend.download(p.value);
      const OwnedRange owned = owned_range(p);
      assign(backend, sharded_ ? host_range(value, owned.first, owned.count) : value, s.master);
    }
    return states_.emplace(p.name, std::move(s)).first->second;
  }

  // State is keyed by name, so two parameters with one name would silently share moments.
  static void check_unique_names(std::span<Parameter* const> params, const std::string& context) {
    std::set<std::string_view> seen;
    for (const Parameter* p : params) {
      KEPT_CHECK(p != nullptr, context, ": null parameter pointer");
      KEPT_CHECK(seen.insert(p->name).second, context, ": two parameters are named ", p->name);
    }
  }

  // Whether states in host memory are staged through the backend's memory for the update.
  template <class Backend>
  bool stages() const {
    return config_.states_on_host && Backend::space != MemorySpace::Host;
  }

  // The pointers Backend::adamw_update takes for a state's moments, `offset` elements in.
  template <class Master>
  static AdamWMoments<Master> moments_of(State& state, std::int64_t offset = 0) {
    AdamWMoments<Master> moments;
    if (state.exp_avg_absmax.defined()) {
      const std::int64_t block = offset / kQuantBlock;
      moments.exp_avg_codes = state.exp_avg.template data<std::uint8_t>() + offset;
      moments.exp_avg_sq_codes = state.exp_avg_sq.template data<std::uint8_t>() + offset;
      moments.exp_avg_absmax = state.exp_avg_absmax.template data<float>() + block;
      moments.exp_avg_sq_absmax = state.exp_avg_sq_absmax.template data<float>() + block;
    } else if (state.exp_avg.dtype() == DType::BF16) {
      moments.exp_avg_bf16 = state.exp_avg.template data<bf16>() + offset;
      moments.exp_avg_sq_bf16 = state.exp_avg_sq.template data<bf16>() + offset;
    } else {
      moments.exp_avg = state.exp_avg.template data<Master>() + offset;
      moments.exp_avg_sq = state.exp_avg_sq.template data<Master>() + offset;
    }
    return moments;
  }

  // A host state's elements [first, first + count) (its absmax: the blocks they span), and the
  // same range's place in a staging buffer.
  static Tensor host_range(const Tensor& host, std::int64_t first, std::int64_t count) {
    const auto size = static_cast<std::int64_t>(dtype_size(host.dtype()));
    const auto offset =
        static_cast<std::size_t>(static_cast<const char*>(host.raw()) -
                                 static_cast<const char*>(host.storage()->data()) + first * size);
    return Tensor::from_storage(host.dtype(), Shape{count}, host.storage(), offset);
  }
  static Tensor staging_range(const Tensor& staging, DType dtype, std::int64_t count) {
    return Tensor::from_storage(dtype, Shape{count}, staging.storage());
  }

  // One parameter's update with its state in host memory, chunk by chunk through two sets of
  // staging buffers: while chunk k is updated in one set (and then copied back, which waits for
  // that update), chunk k + 1 is already on its way into the other (Backend::upload_behind, a
  // second stream on CUDA, ordered after the update of chunk k - 1 that last used that set).
  // Uploads and downloads overlap on the link (PCIe is full duplex); on the CPU it is all
  // synchronous. A parameter of one chunk needs only the first set.
  template <class Backend>
  void update_staged(Backend& backend, Parameter& p, State& state, OwnedRange owned,
                     AdamWScalars scalars) {
    using Master = typename Backend::Master;
    const std::int64_t numel = owned.count;
    const std::int64_t chunk = std::min(numel, config_.host_state_chunk);
    // The parts of the state this parameter has: its host tensor, its staging buffer's index,
    // and the elements a state element covers (1, or kQuantBlock for an absmax).
    struct Part {
      Tensor* host;
      int index;
      std::int64_t per;
    };
    std::vector<Part> parts = {{&state.exp_avg, 0, 1}, {&state.exp_avg_sq, 1, 1}};
    if (state.exp_avg_absmax.defined()) {
      parts.push_back({&state.exp_avg_absmax, 2, kQuantBlock});
      parts.push_back({&state.exp_avg_sq_absmax, 3, kQuantBlock});
    }
    if (state.master.defined()) parts.push_back({&state.master, 4, 1});
    const int sets = numel > chunk ? 2 : 1;
    for (int set = 0; set < sets; ++set)
      for (const Part& part : parts) {
        Tensor& staging = staging_[set][part.index];
        const std::int64_t bytes = (chunk + part.per - 1) / part.per *
                                   static_cast<std::int64_t>(dtype_size(part.host->dtype()));
        if (!staging.defined() || staging.numel() < bytes) {
          staging = Tensor();  // released before the larger one is taken
          staging = backend.zeros(DType::U8, Shape{bytes});
        }
      }
    // Queues chunk `first`'s state into staging set `set`: (host range, staging range) a part.
    auto stage = [&](std::int64_t first, int set) {
      const std::int64_t count = std::min(chunk, numel - first);
      std::vector<std::pair<Tensor, Tensor>> ranges;
      for (const Part& part : parts) {
        const std::int64_t n = (count + part.per - 1) / part.per;
        Tensor host = host_range(*part.host, first / part.per, n);
        Tensor staging = staging_range(staging_[set][part.index], part.host->dtype(), n);
        backend.upload_behind(host, staging);
        ranges.emplace_back(std::move(host), std::move(staging));
      }
      return ranges;
    };
    auto ranges = stage(0, 0);
    State staged;  // views of the staging buffers, in the layout moments_of reads
    for (std::int64_t first = 0, k = 0; first < numel; first += chunk, ++k) {
      backend.await_uploads();  // chunk k is in place before its update runs
      const std::int64_t next = first + chunk;
      auto next_ranges = next < numel ? stage(next, static_cast<int>((k + 1) % 2))
                                      : std::vector<std::pair<Tensor, Tensor>>{};
      staged.exp_avg = ranges[0].second;
      staged.exp_avg_sq = ranges[1].second;
      staged.exp_avg_absmax = state.exp_avg_absmax.defined() ? ranges[2].second : Tensor();
      staged.exp_avg_sq_absmax = state.exp_avg_absmax.defined() ? ranges[3].second : Tensor();
      staged.master = state.master.defined() ? ranges.back().second : Tensor();
      scalars.first_element = static_cast<std::uint64_t>(owned.first + first);
      Master* master = staged.master.defined() ? staged.master.template data<Master>() : nullptr;
      backend.adamw_update(p.value.template data<typename Backend::Param>() + owned.first + first,
                           master,
                           p.grad.template data<typename Backend::Grad>() + owned.first + first,
                           moments_of<Master>(staged), std::min(chunk, numel - first), scalars);
      for (auto& [host, staging] : ranges)
        backend.download_into(staging, host);
      ranges = std::move(next_ranges);
    }
  }

  // Copies a host tensor into a state tensor, converting to its dtype (upload, or a host copy
  // for a state kept in host memory).
  template <class Backend>
  static void assign(Backend& backend, const Tensor& host, Tensor& state) {
    if (state.space() != MemorySpace::Host) return backend.upload(host, state);
    KEPT_CHECK(host.shape() == state.shape(), "AdamW: state of shape ", state.shape(),
               " given a tensor of shape ", host.shape());
    const Tensor converted = host.dtype() == state.dtype() ? host : host.to(state.dtype());
    if (converted.nbytes()) std::memcpy(state.raw(), converted.raw(), converted.nbytes());
  }

  // A zeroed state tensor for parameter `name`: host memory when the states live there, else
  // its slot in the arena's buffer `which` when the arena has that buffer in `dtype`, else a new
  // allocation.
  template <class Backend>
  Tensor fresh_state(Backend& backend, std::string_view name, DType dtype, const Shape& shape,
                     Tensor (ParameterArena::*which)(const ArenaSlot&) const) {
    if (config_.states_on_host) return backend.host_zeros(dtype, shape);
    if (arena_) {
      const ArenaSlot* slot = arena_->find(name);
      KEPT_CHECK(slot, "AdamW: parameter ", name, " is not in the parameter arena");
      Tensor view = (arena_->*which)(*slot);
      if (view.defined() && view.dtype() == dtype) {
        backend.fill_zero(view);
        return view;
      }
    }
    return backend.zeros(dtype, shape);
  }

  AdamWConfig config_;
  const ParameterArena* arena_ = nullptr;
  bool sharded_ = false;
  std::map<std::string, OwnedRange, std::less<>> owned_;
  std::map<std::string, State, std::less<>> states_;
  std::int64_t steps_taken_ = 0;
  // Backend memory the staged updates go through (states_on_host): two sets of m, v, their
  // absmax and the master.
  Tensor staging_[2][5];
};

// Multiplies every gradient by `factor` (e.g. 1/accumulation_steps after accumulating).
template <class Backend>
void scale_gradients(Backend& backend, std::span<Parameter* const> params, float factor) {
  for (Parameter* p : params) {
    if (!p->has_grad()) continue;
    detail::train_require(*p, p->grad, Backend::Precision::grad, "gradient", "scale_gradients");
    backend.scale_grad(p->grad.template data<typename Backend::Grad>(), p->grad.numel(), factor);
  }
}

// Whether every gradient element is finite (NaN/inf guard before a step). Frozen parameters
// are not looked at.
template <class Backend>
bool all_finite(Backend& backend, std::span<Parameter* const> params) {
  for (Parameter* p : params) {
    if (!p->has_grad()) continue;
    detail::train_require(*p, p->grad, Backend::Precision::grad, "gradient", "all_finite");
    if (!backend.grad_finite(p->grad.template data<typename Backend::Grad>(), p->grad.numel()))
      return false;
  }
  return true;
}

// The global L2 norm of all gradients (frozen parameters excluded), accumulated in double in
// parameter order; when finite and above max_norm, every gradient is scaled by
// f32(max_norm / (norm + 1e-6)). Returns the norm before clipping. A non-finite norm leaves the
// gradients untouched: the caller should skip the step (see all_finite).
template <class Backend>
double clip_grad_norm(Backend& backend, std::span<Parameter* const> params, double max_norm) {
  using Grad = typename Backend::Grad;
  KEPT_CHECK(max_norm > 0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  double sum = 0;
  for (Parameter* p : params) {
    if (!p->has_grad()) continue;
    detail::train_require(*p, p->grad, Backend::Precision::grad, "gradient", "clip_grad_norm");
    sum += backend.grad_sum_squares(p->grad.template data<Grad>(), p->grad.numel());
  }
  const double total = std::sqrt(sum);
  if (!std::isfinite(total)) return total;
  const double coefficient = max_norm / (total + 1e-6);
  if (coefficient < 1.0) scale_gradients(backend, params, static_cast<float>(coefficient));
  return total;
}

// Whether every element of a host F32 tensor is finite (for values, losses, activations).
inline bool all_finite(const Tensor& tensor) {
  KEPT_CHECK(tensor.space() == MemorySpace::Host && tensor.dtype() == DType::F32,
             "all_finite: expected a host F32 tensor, got ", dtype_name(tensor.dtype()), " in ",
             memory_space_name(tensor.space()), " memory");
  for (float x : tensor.span<const float>())
    if (!std::isfinite(x)) return false;
  return true;
}

}  // namespace kept
