// kept/dist/shard_layout.hpp: which contiguous range of a buffer each rank owns.
//
// ZeRO (reduce-scatter the gradients, each rank updates its shard, all-gather the weights) and
// the communicator's reduce-scatter and all-gather (kept/dist/communicator.hpp) cut one buffer
// of E elements into N contiguous shards, one per rank. Pure arithmetic, no MPI, so that every
// rank, the tests and a planner compute the same cut.
//
// The math. Let A be the alignment (elements) and B = ceil(E / A) the number of aligned blocks,
// the last one possibly partial. Blocks are dealt out as evenly as whole blocks allow: with
// q = B / N and r = B % N, ranks 0 .. r-1 get q + 1 blocks and ranks r .. N-1 get q, in rank
// order. Rank k's first block is
//     first(k) = k q + min(k, r),
// its shard is [offset(k), offset(k + 1)) with offset(k) = min(first(k) A, E), so
//   - every boundary is a multiple of A, or E itself: a shard never splits an aligned block, so
//     with A = kArenaAlignment (kept/model/parameter_arena.hpp) a shard never splits an arena
//     slot's alignment unit (a quantisation block of the 8-bit moments, a vector load);
//   - shard sizes differ by at most one block, and the shard holding the partial last block is
//     shorter by A - (E mod A) elements (uneven last shard);
//   - when N > B, ranks B .. N-1 own empty shards (count 0, offset E): legal, every collective
//     still involves them;
//   - the shards tile [0, E) in rank order with no gap or overlap, so the owner of element e is
//     the rank whose range holds it: block b = e / A belongs to rank b / (q + 1) when
//     b < r (q + 1), else to r + (b - r (q + 1)) / q.
//
// A window. layout.window(F, C) is the same cut seen through the elements [F, F + C) only,
// renumbered from 0: rank k's shard is [offset(k) - F, end(k) - F) clipped to [0, C). ZeRO uses
// it to reduce-scatter a buffer that holds one window of the arena (a layer's gradients) so that
// each element still goes to the rank that owns it in the whole arena. A window's boundaries
// need not be aligned (they are where the window clips), and alignment() and blocks() stay those
// of the whole cut.
// Balanced whole blocks (rather than ceil(B / N) blocks each, with the remainder on the last
// rank) keep the largest shard, which bounds a ZeRO step's time and the optimizer-state memory
// per rank, at ceil(B / N) blocks while no rank but the trailing ones goes empty.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kept/core/error.hpp"

namespace kept {

class ShardLayout {
 public:
  ShardLayout() = default;  // zero elements on one rank
  ShardLayout(std::int64_t elements, int ranks, std::int64_t alignment)
      : elements_(elements), ranks_(ranks), alignment_(alignment) {
    KEPT_CHECK(elements >= 0, "ShardLayout: element count ", elements, " is negative");
    KEPT_CHECK(ranks >= 1, "ShardLayout: rank count ", ranks, " is not positive");
    KEPT_CHECK(alignment >= 1, "ShardLayout: alignment ", alignment, " is not positive");
    blocks_ = elements / alignment + (elements % alignment != 0 ? 1 : 0);
    base_blocks_ = blocks_ / ranks;
    extra_ranks_ = blocks_ % ranks;
  }

  std::int64_t elements() const { return window_count_ < 0 ? elements_ : window_count_; }
  int ranks() const { return ranks_; }
  std::int64_t alignment() const { return alignment_; }
  std::int64_t blocks() const { return blocks_; }

  // The first element of `rank`'s shard (E for an empty shard at the end).
  std::int64_t offset(int rank) const {
    check_rank(rank);
    return boundary(rank);
  }
  // One past the last element of `rank`'s shard.
  std::int64_t end(int rank) const {
    check_rank(rank);
    return boundary(rank + 1);
  }
  std::int64_t count(int rank) const { return end(rank) - offset(rank); }
  // The size of the largest shard: what a per-shard buffer must hold.
  std::int64_t max_count() const {
    std::int64_t largest = 0;
    for (int rank = 0; rank < ranks_; ++rank)
      largest = std::max(largest, count(rank));
    return largest;
  }

  // This cut restricted to elements [first, first + count), renumbered from 0 (see A window).
  ShardLayout window(std::int64_t first, std::int64_t count) const {
    KEPT_CHECK(first >= 0 && count >= 0 && first + count <= elements(), "ShardLayout: window [",
               first, ", ", first + count, ") is outside [0, ", elements(), ")");
    ShardLayout windowed = *this;
    windowed.window_first_ = window_first_ + first;
    windowed.window_count_ = count;
    return windowed;
  }

  // The rank whose shard holds `element` (0 <= element < elements()).
  int owner(std::int64_t element) const {
    KEPT_CHECK(element >= 0 && element < elements(), "ShardLayout: element ", element,
               " is outside [0, ", elements(), ")");
    element += window_first_;
    const std::int64_t block = element / alignment_;
    const std::int64_t wide = extra_ranks_ * (base_blocks_ + 1);  // blocks of ranks 0 .. r-1
    if (block < wide) return static_cast<int>(block / (base_blocks_ + 1));
    // block < B, so q > 0 here: had q been 0, every block would sit in the wide ranks.
    return static_cast<int>(extra_ranks_ + (block - wide) / base_blocks_);
  }

  friend bool operator==(const ShardLayout&, const ShardLayout&) = default;

 private:
  void check_rank(int rank) const {
    KEPT_CHECK(rank >= 0 && rank < ranks_, "ShardLayout: rank ", rank, " is outside [0, ", ranks_,
               ")");
  }
  // offset(k) for 0 <= k <= N; first(k) <= B, and first(k) A is only formed when below E (no
  // overflow near the top of int64).
  std::int64_t boundary(int rank) const {
    const std::int64_t first = rank * base_blocks_ + std::min<std::int64_t>(rank, extra_ranks_);
    const std::int64_t whole = first >= blocks_ ? elements_ : first * alignment_;
    if (window_count_ < 0) return whole;
    return std::clamp<std::int64_t>(whole - window_first_, 0, window_count_);
  }

  std::int64_t elements_ = 0;
  int ranks_ = 1;
  std::int64_t alignment_ = 1;
  std::int64_t blocks_ = 0;
  std::int64_t base_blocks_ = 0;    // q
  std::int64_t extra_ranks_ = 0;    // r: ranks with q + 1 blocks
  std::int64_t window_first_ = 0;   // a window's first element in the whole cut
  std::int64_t window_count_ = -1;  // a window's length; -1: the whole cut
};

}  // namespace kept
