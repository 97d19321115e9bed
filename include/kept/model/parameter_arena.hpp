// kept/model/parameter_arena.hpp: every parameter of a model in one flat buffer per role.
//
// One contiguous buffer each for the values (Param), the gradients (Grad), and, for the
// optimizer, the fp32 master weights (Master, only when the backend's Param type differs and the
// layout asks for them) and AdamW's two moments (Master; or, for 8-bit moments, one byte buffer
// each and one fp32 absmax buffer each with an entry per kQuantBlock elements); each
// Parameter's value and grad become named views into them at
// the parameter's offset (HF names and shapes unchanged, so loading, saving and checkpoints see
// no difference). What that buys: zero_grad is one fill; an optimizer, an all-reduce or a
// ZeRO shard works on contiguous ranges; fused projections can read neighbouring views. The
// layout is llm.c's malloc_and_point_parameters with names kept.
//
// Layout: parameters in visiting (checkpoint) order, each slot starting at a multiple of
// kArenaAlignment elements (one 8-bit quantisation block, kQuantBlock = 256: 1 KiB of fp32,
// enough for any vector load and for sharding on slot boundaries); the padding is zero and stays
// zero (no op writes it). The same offsets index every buffer, so slot i of the moments belongs
// to slot i of the values, and a slot's absmax entries start at offset / kQuantBlock.
//
// Adopting a model copies each value into the arena once (through the backend's download and
// upload, the only cross-space copy the contract has). Gradients start at zero; a frozen
// parameter keeps its slot but its `grad` stays undefined, as the layers expect.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "kept/core/dynamic_code.hpp"
#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/layers/parameter.hpp"

namespace kept {

inline constexpr std::int64_t kArenaAlignment = kQuantBlock;  // elements

// Which optimizer buffers an arena holds besides the values and gradients.
struct ArenaLayout {
  bool optimizer_state = true;     // AdamW's moments (and master weights, below)
  bool master_weights = true;      // fp32 masters, where the backend's Param is not its Master
  bool quantized_moments = false;  // 8-bit moments (codes + absmax) instead of Master ones
  bool bf16_moments = false;       // bf16 moments instead of Master ones
  // false: no gradient for every parameter at once (memory.gradients "none"). The parameters
  // outside the decoder layers keep their own gradient slots; every layer's gradients share one
  // layer-sized region, which the trainer consumes (updates, then zeroes) after each layer's
  // backward. Needs a model with `layers`.
  bool gradient_buffer = true;
  // false: the arena does not take in the values of the decoder layers' parameters (ZeRO stage
  // 3, kept/train/zero.hpp: each rank keeps its shard of them and gathers a layer when it runs).
  // Their slots keep their offsets, so every other buffer and the shards' cut are as before;
  // values() then holds only the parameters outside the layers, at value offsets of their own,
  // and the layers' parameters keep whatever value they had. Needs a model with `layers`.
  bool layer_values = true;
};

struct ArenaSlot {
  std::string name;
  Shape shape;
  std::int64_t offset = 0;  // elements from the start of every buffer
  std::int64_t count = 0;
};

class ParameterArena {
 public:
  ParameterArena() = default;

  // Lays out every parameter of `model`, allocates the buffers in `backend` and points the
  // parameters at them, with the optimizer buffers `layout` names.
  template <class Backend, class Model>
  ParameterArena(Backend& backend, Model& model, ArenaLayout layout = {}) {
    using Precision = typename Backend::Precision;
    std::vector<Parameter*> params;
    model.visit_parameters([&](Parameter& p) { params.push_back(&p); });
    for (Parameter* p : params) {
      KEPT_CHECK(index_.emplace(p->name, slots_.size()).second,
                 "parameter arena: two parameters are named ", p->name);
      slots_.push_back({p->name, p->value.shape(), total_, p->value.numel()});
      total_ += aligned(p->value.numel());
    }
    // Which slots belong to a layer, each one's place from its layer's first slot, and the
    // widest layer's span (for per-layer gradients and for values left to the layers).
    std::map<std::string, std::int64_t, std::less<>> in_layer;
    std::int64_t span = 0;
    if (!layout.gradient_buffer || !layout.layer_values) {
      if constexpr (!requires { model.layers.size(); })
        KEPT_CHECK(false,
                   "parameter arena: per-layer gradients or values need a model with layers");
      else
        for (std::size_t l = 0; l < model.layers.size(); ++l) {
          std::int64_t first = -1;
          model.layers[l].visit([&](Parameter& p) {
            const ArenaSlot& slot = slots_[index_.at(p.name)];
            if (first < 0) first = slot.offset;
            span = std::max(span, slot.offset + aligned(slot.count) - first);
            in_layer[p.name] = slot.offset - first;
          });
        }
    }
    // The parameters outside the layers one after another from 0; returns the elements taken.
    auto pack_outside = [&](std::vector<std::int64_t>& offsets) {
      std::int64_t total = 0;
      offsets.assign(slots_.size(), -1);
      for (std::size_t i = 0; i < slots_.size(); ++i) {
        if (in_layer.count(slots_[i].name)) continue;
        offsets[i] = total;
        total += aligned(slots_[i].count);
      }
      return total;
    };
    // The values first, each parameter's own allocation released as it moves in, so that
    // setting up holds at most the weights twice, not the weights twice plus every other buffer.
    std::int64_t value_total = total_;
    if (layout.layer_values) {
      value_offsets_.resize(slots_.size());
      for (std::size_t i = 0; i < slots_.size(); ++i)
        value_offsets_[i] = slots_[i].offset;
    } else {
      value_total = pack_outside(value_offsets_);
    }
    values_ = backend.zeros(Precision::param, {value_total});
    for (std::size_t i = 0; i < params.size(); ++i) {
      Parameter& p = *params[i];
      KEPT_CHECK(p.value.dtype() == Precision::param, "parameter arena: ", p.name, " is ",
                 dtype_name(p.value.dtype()), ", the backend's parameters are ",
                 dtype_name(Precision::param));
      if (value_offsets_[i] < 0) continue;  // a layer's, left where it is
      Tensor value = value_view(i);
      backend.upload(backend.download(p.value), value);
      p.value = value;
    }
    std::int64_t grad_total = total_;
    if (layout.gradient_buffer) {
      grad_offsets_.resize(slots_.size());
      for (std::size_t i = 0; i < slots_.size(); ++i)
        grad_offsets_[i] = slots_[i].offset;
    } else {
      // Every layer's gradients in one shared span after the rest.
      grad_total = pack_outside(grad_offsets_);
      for (std::size_t i = 0; i < slots_.size(); ++i)
        if (auto found = in_layer.find(slots_[i].name); found != in_layer.end())
          grad_offsets_[i] = grad_total + found->second;
      grad_total += span;
      shared_layer_grads_ = true;
    }
    holds_layer_values_ = layout.layer_values;
    grads_ = backend.zeros(Precision::grad, {grad_total});
    if (layout.optimizer_state) {
      if (Precision::separate_master && layout.master_weights)
        master_ = backend.zeros(Precision::master, {total_});
      if (layout.quantized_moments) {
        exp_avg_ = backend.zeros(DType::U8, {total_});
        exp_avg_sq_ = backend.zeros(DType::U8, {total_});
        exp_avg_absmax_ = backend.zeros(DType::F32, {total_ / kQuantBlock});
        exp_avg_sq_absmax_ = backend.zeros(DType::F32, {total_ / kQuantBlock});
      } else {
        const DType moment = layout.bf16_moments ? DType::BF16 : Precision::master;
        exp_avg_ = backend.zeros(moment, {total_});
        exp_avg_sq_ = backend.zeros(moment, {total_});
      }
    }
    for (std::size_t i = 0; i < params.size(); ++i)
      params[i]->grad = params[i]->trainable ? grad_view(i) : Tensor();
  }

  const std::vector<ArenaSlot>& slots() const { return slots_; }
  std::int64_t elements() const { return total_; }  // per buffer, padding included
  const ArenaSlot* find(std::string_view name) const {
    auto found = index_.find(name);
    return found == index_.end() ? nullptr : &slots_[found->second];
  }

  // Every value in the slots' layout; without the layers' values (ArenaLayout::layer_values
  // false) only those outside the layers, packed: then not indexed by slot offsets.
  const Tensor& values() const { return values_; }
  bool holds_layer_values() const { return holds_layer_values_; }
  const Tensor& grads() const { return grads_; }
  bool has_optimizer_state() const { return exp_avg_.defined(); }
  bool has_master() const { return master_.defined(); }
  bool has_quantized_moments() const { return exp_avg_absmax_.defined(); }

  // Views of one slot in each buffer (undefined when that buffer was not allocated). The moments
  // are Master, or U8 codes when quantised; an absmax view has one F32 per kQuantBlock elements.
  Tensor master(const ArenaSlot& slot) const { return view(master_, slot); }
  Tensor exp_avg(const ArenaSlot& slot) const { return view(exp_avg_, slot); }
  Tensor exp_avg_sq(const ArenaSlot& slot) const { return view(exp_avg_sq_, slot); }
  Tensor exp_avg_absmax(const ArenaSlot& slot) const { return absmax_view(exp_avg_absmax_, slot); }
  Tensor exp_avg_sq_absmax(const ArenaSlot& slot) const {
    return absmax_view(exp_avg_sq_absmax_, slot);
  }

  // Zeroes every gradient with one fill and points each trainable parameter's grad at its slot
  // again (a parameter unfrozen since the last call gets its view back; a frozen one none).
  template <class Backend, class Model>
  void zero_grad(Backend& backend, Model& model) {
    std::size_t count = 0;
    model.visit_parameters([&](Parameter& p) {
      KEPT_CHECK(count < slots_.size() && slots_[count].name == p.name,
                 "parameter arena: the model's parameters changed since the arena was built (",
                 p.name, ")");
      ++count;
    });
    KEPT_CHECK(count == slots_.size(),
               "parameter arena: the model's parameters changed since the "
               "arena was built (",
               count, " parameters, the arena has ", slots_.size(), ")");
    backend.fill_zero(grads_);
    std::size_t i = 0;
    model.visit_parameters([&](Parameter& p) {
      p.grad = p.trainable ? grad_view(i) : Tensor();
      ++i;
    });
  }
  // Whether the layers' gradients share one region (ArenaLayout::gradient_buffer false).
  bool shared_layer_gradients() const { return shared_layer_grads_; }
  std::int64_t gradient_elements() const { return grads_.numel(); }

 private:
  static Tensor view(const Tensor& buffer, const ArenaSlot& slot) {
    if (!buffer.defined()) return Tensor();
    return Tensor::from_storage(buffer.dtype(), slot.shape, buffer.storage(),
                                static_cast<std::size_t>(slot.offset) * dtype_size(buffer.dtype()));
  }
  static Tensor absmax_view(const Tensor& buffer, const ArenaSlot& slot) {
    if (!buffer.defined()) return Tensor();
    return Tensor::from_storage(
        DType::F32, {quant_blocks(slot.count)}, buffer.storage(),
        static_cast<std::size_t>(slot.offset / kQuantBlock) * sizeof(float));
  }

  static std::int64_t aligned(std::int64_t count) {
    return (count + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
  }
  Tensor value_view(std::size_t i) const {
    ArenaSlot slot = slots_[i];
    slot.offset = value_offsets_[i];
    return view(values_, slot);
  }
  Tensor grad_view(std::size_t i) const {
    ArenaSlot slot = slots_[i];
    slot.offset = grad_offsets_[i];
    return view(grads_, slot);
  }

  std::vector<ArenaSlot> slots_;
  std::vector<std::int64_t> value_offsets_;  // each slot's place in values_ (-1: not there)
  std::vector<std::int64_t> grad_offsets_;   // each slot's place in the gradient buffer
  bool shared_layer_grads_ = false;
  bool holds_layer_values_ = true;
  std::map<std::string, std::size_t, std::less<>> index_;
  std::int64_t total_ = 0;
  Tensor values_, grads_, master_, exp_avg_, exp_avg_sq_, exp_avg_absmax_, exp_avg_sq_absmax_;
};

}  // namespace kept
