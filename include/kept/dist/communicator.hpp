// kept/dist/communicator.hpp: the collectives data parallelism and ZeRO need, over arena ranges.
//
// One interface, several carriers: MPI between CPU processes (kept/dist/mpi_communicator.hpp),
// a single process (kept/dist/local_communicator.hpp), NCCL between GPUs later. It speaks in raw
// pointers and element counts, so the flat parameter arena (kept/model/parameter_arena.hpp)
// hands over a buffer or a contiguous range of one (a layer's gradients, a ZeRO shard) as is.
// The pointers are in the memory the implementation works on: host memory for MPI and Local.
// No MPI header here: code that only holds a Communicator& builds without MPI.
//
// What each call takes:
//   - sums are fp32 (gradients), in place;
//   - all-gather and broadcast are byte copies of elements of any size (bf16 weights, fp32
//     masters, a hash), since nothing is added;
//   - reduce-scatter and all-gather cut the buffer by a ShardLayout (kept/dist/shard_layout.hpp)
//     that every rank builds with the same arguments; a shard may be empty.
// Every rank must make the same calls in the same order with the same sizes (as in MPI).
//
// Deterministic sums. Every implementation adds each element in rank order, in fp32:
//     sum = ((x_0 + x_1) + x_2) + ... + x_{N-1},
// and every rank ends with those same bits. Why: data-parallel replicas stay identical only if
// each applies its update to the same bits of the summed gradient, and a checkpoint resumed on
// another machine or another MPI must continue the same run. A library's own reduction picks
// its order (ring, tree, recursive halving) by message size, rank count and version, and each
// order rounds differently, so results would depend on the MPI implementation and on how the
// arena was cut into messages. The sum depends only on N and on the values. (With N = 2 every
// order gives the same bits, fp32 addition being commutative; from N = 3 on orders differ.)
// How, and the cost: reduce-scatter sends each shard's N contributions to its owner, which adds
// them in rank order; all-reduce is that reduce-scatter followed by an all-gather of the summed
// shards. Per rank that moves 2 (N - 1) / N of the buffer, the same volume as a ring
// all-reduce, and does (N - 1) / N of the buffer's additions; the price is all-to-all traffic
// (every rank talks to every other, where a ring only talks to its neighbours: more latency per
// step on large jobs across machines) and a receive buffer of N pieces at the shard's owner.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/dist/shard_layout.hpp"

namespace kept {

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;

  // data[0, count) becomes the rank-ordered sum of every rank's data[0, count), the same bits
  // on every rank.
  virtual void all_reduce_sum(float* data, std::int64_t count) = 0;
  // data holds layout.elements() floats on every rank. On return this rank's shard
  // [layout.offset(rank), layout.end(rank)) holds the rank-ordered sum of every rank's values
  // there; the rest of data is untouched (it still holds this rank's own contribution).
  virtual void reduce_scatter_sum(float* data, const ShardLayout& layout) = 0;
  // data holds layout.elements() elements of element_bytes bytes each. On return every rank's
  // data holds, in each shard, that shard's owner's bytes (what this rank held outside its own
  // shard is overwritten).
  virtual void all_gather_bytes(void* data, const ShardLayout& layout,
                                std::size_t element_bytes) = 0;
  // data[0, bytes) on every rank becomes root's.
  virtual void broadcast_bytes(void* data, std::int64_t bytes, int root) = 0;
  // Returns once every rank has entered it.
  virtual void barrier() = 0;

  template <class T>
  void all_gather(T* data, const ShardLayout& layout) {
    static_assert(std::is_trivially_copyable_v<T>, "all_gather copies bytes");
    all_gather_bytes(data, layout, sizeof(T));
  }
  template <class T>
  void broadcast(T* data, std::int64_t count, int root) {
    static_assert(std::is_trivially_copyable_v<T>, "broadcast copies bytes");
    check_count(count, "broadcast");
    broadcast_bytes(data, count * static_cast<std::int64_t>(sizeof(T)), root);
  }

  // `value` (a host scalar: a step's loss) summed over the ranks in rank order, in double; the
  // same bits on every rank. Collective.
  double sum_in_rank_order(double value) {
    const int ranks = size();
    std::vector<double> values(static_cast<std::size_t>(ranks), 0.0);
    values[static_cast<std::size_t>(rank())] = value;
    all_gather(values.data(), ShardLayout(ranks, ranks, 1));
    double sum = 0;
    for (double v : values)
      sum += v;
    return sum;
  }

  // Checks that every rank got the same job: each rank passes its hash of `what` (a config, a
  // data set's fingerprint, an arena layout, kept/core/hash.hpp); when any differs from rank
  // 0's, every rank throws the same kept::Error naming `what`, the differing ranks and their
  // hashes next to rank 0's. Collective. This host-memory version fits MPI and Local; a
  // communicator over device memory overrides it.
  virtual void agree_on(const std::string& what, std::uint64_t hash) {
    const int ranks = size();
    const ShardLayout one_each(ranks, ranks, 1);
    std::vector<std::uint64_t> hashes(static_cast<std::size_t>(ranks), 0);
    hashes[static_cast<std::size_t>(rank())] = hash;
    all_gather(hashes.data(), one_each);
    std::string differing;
    for (int other = 1; other < ranks; ++other) {
      if (hashes[static_cast<std::size_t>(other)] == hashes[0]) continue;
      differing += detail::concat(differing.empty() ? "" : ", ", "rank ", other, " has ",
                                  hex(hashes[static_cast<std::size_t>(other)]));
    }
    KEPT_CHECK(differing.empty(), "ranks disagree on ", what, " (", ranks,
               " ranks, raised on rank ", rank(), "): rank 0 has ", hex(hashes[0]),
               "; differing: ", differing);
  }

 protected:
  // Argument checks every implementation makes before communicating, so that a bad call fails
  // on the rank that made it instead of leaving the others waiting for mismatched messages.
  void check_count(std::int64_t count, const char* operation) const {
    KEPT_CHECK(count >= 0, operation, " on rank ", rank(), ": count ", count, " is negative");
  }
  void check_layout(const ShardLayout& layout, const char* operation) const {
    KEPT_CHECK(layout.ranks() == size(), operation, " on rank ", rank(), ": the layout is for ",
               layout.ranks(), " ranks, the communicator has ", size());
  }
  void check_root(int root, const char* operation) const {
    KEPT_CHECK(root >= 0 && root < size(), operation, " on rank ", rank(), ": root ", root,
               " is outside [0, ", size(), ")");
  }

 private:
  static std::string hex(std::uint64_t value) {
    char text[19];
    std::snprintf(text, sizeof text, "0x%016llx", static_cast<unsigned long long>(value));
    return text;
  }
};

}  // namespace kept
