// kept/train/zero.hpp: ZeRO over the parameter arena: which elements a rank owns, and the
// owned optimizer states gathered whole for a checkpoint.
//
// Data parallel training over N ranks (reference/trainer_run.hpp) with the job field
// "zero_stage":
//   0  every rank holds the whole optimizer state; the gradients are all-reduced and every rank
//      applies the same update.
//   1  the optimizer state exists only for the rank's shard of the arena; the gradients are
//      reduce-scattered (each rank receives the sum of its shard only), each rank updates its
//      shard of the weights, and the weights are all-gathered.
//   2  stage 1 with the gradients sharded in time: the layer-major backward (memory.gradients
//      "none") reduce-scatters each layer's gradients as the walk leaves the layer, so no rank
//      ever holds more than one layer's gradients besides those outside the layers.
//   3  stage 2 with the decoder layers' weights sharded too (ShardedLayerWeights, below): each
//      rank keeps its shard of them, and a layer is all-gathered into one of two layer-sized
//      regions each time it runs (every forward, and once for the layer-major backward); after
//      its update the rank writes its owned part back to its shard. The embedding, final norm
//      and LM head stay whole on every rank, as at stage 2 (they are used at both ends of the
//      step).
// The shard is the rank's ShardLayout range of the arena (kept/dist/shard_layout.hpp) with the
// arena's alignment, so a shard boundary never splits a slot's quantisation block; a parameter
// may straddle shards, and each owner updates its part.
//
// Bits. The reduce-scatter adds each element in rank order exactly as the all-reduce does
// (kept/dist/communicator.hpp), the update is elementwise with the rounding bits indexed by the
// element's place in its parameter (kept/train/adamw.hpp), and the all-gather copies bytes, so
// the weights after a step are those of stage 0, bit for bit, as long as the clipping
// coefficient is the same. It can differ in the last bits when clipping triggers: the global norm
// is summed from the owners' shards (each shard's squares in double, then the ranks' partial sums
// in rank order) instead of parameter by parameter.
//
// Stage 3 gives the same bits as stage 2: a gathered layer is the bytes every owner holds, the
// forward and backward read it as they read the arena, and the update is the same elementwise
// update of the owned part.
//
// Checkpoints hold the whole state in stage 0's format (AdamW::state_tensors), so a run resumes
// on any rank count and any stage: gather_optimizer_state assembles it on the writing rank (the
// others hold one parameter's pieces at a time), and AdamW::load_state keeps each rank's owned
// ranges.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/dist/communicator.hpp"
#include "kept/dist/shard_layout.hpp"
#include "kept/model/parameter_arena.hpp"
#include "kept/train/adamw.hpp"

namespace kept {

class ZeroShards {
 public:
  ZeroShards(const ParameterArena& arena, int rank, int ranks)
      : arena_(&arena), layout_(arena.elements(), ranks, kArenaAlignment), rank_(rank) {}

  const ShardLayout& layout() const { return layout_; }
  // This rank's arena elements [first(), end()).
  std::int64_t first() const { return layout_.offset(rank_); }
  std::int64_t end() const { return layout_.end(rank_); }

  // The part of `slot` that `rank` owns, relative to the slot's first element.
  AdamW::OwnedRange owned(const ArenaSlot& slot, int rank) const {
    const std::int64_t lo = std::max(slot.offset, layout_.offset(rank));
    const std::int64_t hi = std::min(slot.offset + slot.count, layout_.end(rank));
    if (hi <= lo) return {};
    return {lo - slot.offset, hi - lo};
  }
  AdamW::OwnedRange owned(const ArenaSlot& slot) const { return owned(slot, rank_); }

  // Every slot's owned range on this rank (for AdamW::shard_states; empty ones left out).
  std::map<std::string, AdamW::OwnedRange, std::less<>> owned_ranges() const {
    std::map<std::string, AdamW::OwnedRange, std::less<>> ranges;
    for (const ArenaSlot& slot : arena_->slots())
      if (const AdamW::OwnedRange range = owned(slot); range.count > 0)
        ranges.emplace(slot.name, range);
    return ranges;
  }

  // The arena's cut restricted to [first, first + count) and moved to start at 0: how to
  // reduce-scatter a buffer that holds only that window of the arena (one layer's gradients).
  ShardLayout window(std::int64_t first, std::int64_t count) const {
    return layout_.window(first, count);
  }

 private:
  const ParameterArena* arena_;
  ShardLayout layout_;
  int rank_;
};

// The whole optimizer state, in AdamW::state_tensors' format, from every rank's owned pieces.
// Collective: every rank calls it; rank `root` gets the result and the others an empty list, or
// every rank gets it when root is -1. Each state tensor of each parameter travels as 4-byte cells
// (the moments and masters; one fp32 per kQuantBlock for the absmax) in one all-gather over the
// parameter's window of the shards' cut, so no rank ever holds more than one parameter's cells
// besides what it keeps (a 14B model's whole state is about 145 GB: only the writer keeps it).
template <class Backend>
std::vector<NamedTensor> gather_optimizer_state(Backend& backend, Communicator& comm,
                                                const ParameterArena& arena, const AdamW& optimizer,
                                                std::span<Parameter* const> params, int root = -1) {
  KEPT_CHECK(optimizer.sharded(), "gather_optimizer_state: the optimizer's states are not sharded");
  const ZeroShards shards(arena, comm.rank(), comm.size());
  std::map<std::string, NamedTensor, std::less<>> local;
  std::vector<NamedTensor> out;
  for (NamedTensor& named : optimizer.state_tensors(backend)) {
    if (named.name.starts_with("adamw."))
      out.push_back(std::move(named));
    else
      local.emplace(named.name, std::move(named));
  }
  // Each parameter's step count over the ranks: 0 where a rank keeps no state; the owners agree.
  const int ranks = comm.size();
  const auto count = static_cast<std::int64_t>(params.size());
  std::vector<std::int64_t> steps(static_cast<std::size_t>(ranks * count), 0);
  for (std::int64_t i = 0; i < count; ++i)
    if (auto found = local.find("step/" + params[static_cast<std::size_t>(i)]->name);
        found != local.end())
      steps[static_cast<std::size_t>(comm.rank() * count + i)] =
          found->second.tensor.template data<std::int64_t>()[0];
  comm.all_gather(steps.data(),
                  ShardLayout(ranks * count, ranks, std::max<std::int64_t>(count, 1)));
  std::vector<std::int64_t> step_of(static_cast<std::size_t>(count), 0);
  for (int r = 0; r < ranks; ++r)
    for (std::int64_t i = 0; i < count; ++i)
      step_of[static_cast<std::size_t>(i)] = std::max(
          step_of[static_cast<std::size_t>(i)], steps[static_cast<std::size_t>(r * count + i)]);

  const std::int64_t elements = arena.elements();
  const ShardLayout block_layout(elements / kQuantBlock, ranks, 1);  // the same cut, in blocks
  const bool keep = root < 0 || comm.rank() == root;
  std::vector<unsigned char> cells;
  // One kind of state (`prefix`), parameter by parameter: this rank's piece into 4-byte cells at
  // its place in the parameter, one all-gather over the parameter's window of the cut, then, on
  // a rank that keeps the result, the whole tensor of dtype dtype_of(p) read back out (none: the
  // parameter has no such state; the same answer on every rank). The transient is one
  // parameter's cells, not the arena's.
  auto gather = [&](const std::string& prefix, bool per_block, auto dtype_of) {
    const std::int64_t per = per_block ? kQuantBlock : 1;
    for (std::int64_t i = 0; i < count; ++i) {
      const Parameter& p = *params[static_cast<std::size_t>(i)];
      const std::optional<DType> dtype = dtype_of(p);
      if (step_of[static_cast<std::size_t>(i)] == 0 || !dtype) continue;
      const ArenaSlot* slot = arena.find(p.name);
      KEPT_CHECK(slot, "gather_optimizer_state: ", p.name, " is not in the parameter arena");
      const std::int64_t cell_count = per_block ? quant_blocks(slot->count) : slot->count;
      const std::size_t size = dtype_size(*dtype);
      KEPT_CHECK(size <= 4, "gather_optimizer_state: ", prefix, p.name, " is ", dtype_name(*dtype),
                 ", wider than the 4-byte cells");
      cells.assign(static_cast<std::size_t>(cell_count) * 4, 0);
      if (auto found = local.find(prefix + p.name); found != local.end()) {
        const Tensor& piece = found->second.tensor;
        KEPT_CHECK(piece.dtype() == *dtype, "gather_optimizer_state: ", found->first, " is ",
                   dtype_name(piece.dtype()), ", expected ", dtype_name(*dtype));
        const std::int64_t first = shards.owned(*slot).first / per;
        const auto* bytes = static_cast<const unsigned char*>(piece.raw());
        for (std::int64_t e = 0; e < piece.numel(); ++e)
          std::memcpy(&cells[static_cast<std::size_t>(first + e) * 4],
                      bytes + static_cast<std::size_t>(e) * size, size);
      }
      comm.all_gather_bytes(cells.data(),
                            per_block ? block_layout.window(slot->offset / per, cell_count)
                                      : shards.window(slot->offset, slot->count),
                            4);
      if (!keep) continue;
      Tensor whole =
          Tensor::empty(*dtype, per_block ? Shape{quant_blocks(p.value.numel())} : p.value.shape());
      auto* bytes = static_cast<unsigned char*>(whole.raw());
      for (std::int64_t e = 0; e < whole.numel(); ++e)
        std::memcpy(bytes + static_cast<std::size_t>(e) * size,
                    &cells[static_cast<std::size_t>(e) * 4], size);
      out.push_back({prefix + p.name, std::move(whole)});
    }
  };
  auto moment = [&](const Parameter& p) -> std::optional<DType> {
    return optimizer.template moment_dtype<Backend>(p);
  };
  auto absmax = [&](const Parameter& p) -> std::optional<DType> {
    if (optimizer.quantizes(p)) return DType::F32;
    return std::nullopt;
  };
  gather("exp_avg/", false, moment);
  gather("exp_avg_sq/", false, moment);
  // The kinds no parameter has are skipped on every rank alike (the configuration decides).
  if (std::any_of(params.begin(), params.end(),
                  [&](const Parameter* p) { return optimizer.quantizes(*p); })) {
    gather("exp_avg_absmax/", true, absmax);
    gather("exp_avg_sq_absmax/", true, absmax);
  }
  if (optimizer.template keeps_master<Backend>())
    gather("master/", false,
           [](const Parameter&) -> std::optional<DType> { return Backend::Precision::master; });
  if (!keep) return {};
  for (std::int64_t i = 0; i < count; ++i)
    if (step_of[static_cast<std::size_t>(i)] > 0)
      out.push_back({"step/" + params[static_cast<std::size_t>(i)]->name,
                     detail::train_scalar_i64(step_of[static_cast<std::size_t>(i)])});
  return out;
}

// ZeRO stage 3: the decoder layers' weights sharded over the ranks, a layer gathered whole when it
// runs. Set up from a model whose layers' parameters still hold their own whole values (the arena
// built with ArenaLayout::layer_values false, after any checkpoint was loaded into them): each
// rank copies its owned elements of the layers (its shard of the arena's cut, restricted to the
// layers' span) into `shard`, then every layer's parameters become views into region l % 2 of two
// layer-sized regions and their own allocations are released. So a rank holds its shard, two
// layers, and the parameters outside the layers, instead of the whole model.
//
// bring(l) (the decoder's before-layer hook, forward and backward) makes layer l's region hold its
// weights: this rank's part copied in from the shard, then one all-gather over the layer's window
// of the cut, unless the region holds layer l already (the last two layers of a forward are still
// there when the backward starts). After the optimizer updated the owned part in the region,
// store(l) copies it back to the shard and marks the region stale: the other owners' parts of the
// layer changed on their ranks. A layer that is not in its region still has its views (shapes and
// names stay right for the optimizer and the checkpoint code), but they show whatever that region
// holds: only code that brought the layer may read its weights, and gather_whole() gives the
// writer real whole copies for a checkpoint or the final model.
//
// Every rank must bring the same layers in the same order (the gathers are collective): the
// trainer runs the same number of micro-batches on every rank at this stage. The gathers are
// synchronous with the compute (no prefetch of the next layer yet), so on GPUs they are exposed.
template <class Backend>
class ShardedLayerWeights {
  using Param = typename Backend::Param;
  static_assert(std::is_same_v<Param, typename Backend::Activation>,
                "ShardedLayerWeights copies weights with Backend::copy (Activation)");

 public:
  template <class Model>
  ShardedLayerWeights(Backend& backend, Communicator& comm, const ParameterArena& arena,
                      Model& model)
      : backend_(&backend), comm_(&comm), shards_(arena, comm.rank(), comm.size()) {
    KEPT_CHECK(!arena.holds_layer_values(),
               "ZeRO stage 3: the parameter arena holds the layers' values; build it with "
               "ArenaLayout::layer_values false");
    KEPT_CHECK(!model.layers.empty(), "ZeRO stage 3: the model has no layers");
    std::int64_t widest = 0;
    for (std::size_t l = 0; l < model.layers.size(); ++l) {
      Window window;
      model.layers[l].visit([&](Parameter& p) {
        const ArenaSlot* slot = arena.find(p.name);
        KEPT_CHECK(slot, "ZeRO stage 3: ", p.name, " is not in the parameter arena");
        KEPT_CHECK(p.value.dtype() == dtype_of_v<Param> && p.value.numel() == slot->count,
                   "ZeRO stage 3: ", p.name, " holds ", p.value.numel(), " ",
                   dtype_name(p.value.dtype()), " values, its slot ", slot->count, " ",
                   dtype_name(dtype_of_v<Param>));
        if (window.params.empty()) window.first = slot->offset;
        window.span = slot->offset + aligned(slot->count) - window.first;
        window.params.push_back(&p);
        window.slots.push_back(slot);
      });
      KEPT_CHECK(window.first >= (layers_.empty() ? 0 : layers_.back().first + layers_.back().span),
                 "ZeRO stage 3: layer ", l, "'s parameters do not follow layer ", l - 1,
                 "'s in the arena");
      widest = std::max(widest, window.span);
      layers_.push_back(std::move(window));
    }
    const std::int64_t layers_first = layers_.front().first;
    const std::int64_t layers_end = layers_.back().first + layers_.back().span;
    shard_first_ = std::max(shards_.first(), layers_first);
    shard_end_ = std::max(shard_first_, std::min(shards_.end(), layers_end));
    shard_ =
        backend.zeros(dtype_of_v<Param>, {std::max<std::int64_t>(1, shard_end_ - shard_first_)});
    for (Tensor& region : regions_)
      region = backend.zeros(dtype_of_v<Param>, {widest});
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      const Window& window = layers_[l];
      for (std::size_t k = 0; k < window.params.size(); ++k) {
        Parameter& p = *window.params[k];
        const ArenaSlot& slot = *window.slots[k];
        const AdamW::OwnedRange owned = shards_.owned(slot);
        if (owned.count > 0)
          backend.copy(p.value.template data<Param>() + owned.first,
                       shard_data() + (slot.offset + owned.first - shard_first_), owned.count);
      }
      bind(l);
    }
  }

  std::size_t layers() const { return layers_.size(); }
  // Elements of this rank's shard of the layers (what it keeps between uses).
  std::int64_t shard_elements() const { return shard_end_ - shard_first_; }
  // Gathers so far, for tests and progress.
  std::int64_t gathers() const { return gathers_; }

  // Layer l's whole weights into its region (collective unless the region holds them already).
  void bring(std::size_t l) {
    KEPT_CHECK(l < layers_.size(), "ZeRO stage 3: no layer ", l);
    if (resident_[l % 2] == static_cast<std::int64_t>(l)) return;
    const Window& window = layers_[l];
    Param* region = regions_[l % 2].template data<Param>();
    own_part(window, [&](std::int64_t in_window, std::int64_t in_shard, std::int64_t count) {
      backend_->copy(shard_data() + in_shard, region + in_window, count);
    });
    comm_->all_gather_bytes(region, shards_.window(window.first, window.span), sizeof(Param));
    resident_[l % 2] = static_cast<std::int64_t>(l);
    ++gathers_;
  }

  // After the optimizer updated this rank's owned part of layer l in its region: back to the
  // shard, and the region no longer counts as holding the layer.
  void store(std::size_t l) {
    KEPT_CHECK(l < layers_.size() && resident_[l % 2] == static_cast<std::int64_t>(l),
               "ZeRO stage 3: layer ", l, " was updated without being brought");
    const Param* region = regions_[l % 2].template data<Param>();
    own_part(layers_[l], [&](std::int64_t in_window, std::int64_t in_shard, std::int64_t count) {
      backend_->copy(region + in_window, shard_data() + in_shard, count);
    });
    resident_[l % 2] = -1;
  }

  // Every layer gathered, and on a rank that `keep`s them, each parameter given its own whole
  // copy (for writing a checkpoint or the model: the writer holds the layers' weights once more
  // until release()). Collective.
  void gather_whole(bool keep) {
    for (std::size_t l = 0; l < layers_.size(); ++l) {
      bring(l);
      if (!keep) continue;
      for (Parameter* p : layers_[l].params) {
        Tensor copy = backend_->zeros(p->value.dtype(), p->value.shape());
        backend_->copy(p->value.template data<Param>(), copy.template data<Param>(),
                       p->value.numel());
        p->value = std::move(copy);
      }
    }
  }
  // The layers' parameters back to views of their regions (after gather_whole).
  void release() {
    for (std::size_t l = 0; l < layers_.size(); ++l)
      bind(l);
  }

 private:
  struct Window {
    std::int64_t first = 0, span = 0;  // arena elements of the layer's slots, padding included
    std::vector<Parameter*> params;
    std::vector<const ArenaSlot*> slots;
  };

  static std::int64_t aligned(std::int64_t count) {
    return (count + kArenaAlignment - 1) / kArenaAlignment * kArenaAlignment;
  }
  Param* shard_data() { return shard_.template data<Param>(); }
  // Layer l's parameters as views of its region (l % 2), each at its offset in the layer's window.
  void bind(std::size_t l) {
    const Window& window = layers_[l];
    for (std::size_t k = 0; k < window.params.size(); ++k)
      window.params[k]->value = Tensor::from_storage(
          dtype_of_v<Param>, window.slots[k]->shape, regions_[l % 2].storage(),
          static_cast<std::size_t>(window.slots[k]->offset - window.first) * sizeof(Param));
  }
  // This rank's owned elements of `window`: f(offset in the window, offset in the shard, count).
  template <class F>
  void own_part(const Window& window, F&& f) const {
    const std::int64_t lo = std::max(window.first, shard_first_);
    const std::int64_t hi = std::min(window.first + window.span, shard_end_);
    if (hi > lo) f(lo - window.first, lo - shard_first_, hi - lo);
  }

  Backend* backend_;
  Communicator* comm_;
  ZeroShards shards_;
  std::vector<Window> layers_;
  std::int64_t shard_first_ = 0, shard_end_ = 0;  // the arena elements this rank keeps
  Tensor shard_;
  Tensor regions_[2];
  std::int64_t resident_[2] = {-1, -1};
  std::int64_t gathers_ = 0;
};

}  // namespace kept
