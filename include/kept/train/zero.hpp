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
//   3  (planned, not run by kept train yet) the weights sharded too, gathered per layer.
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

}  // namespace kept
