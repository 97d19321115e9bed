// kept/dist/local_communicator.hpp: the communicator of a job without MPI, one rank.
//
// A sum over one rank is that rank's values and the one shard is the whole buffer, so every
// collective leaves the data as it is; the arguments are still checked as a multi-rank job
// would check them, so that code tested on one process does not break on two.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kept/core/error.hpp"
#include "kept/dist/communicator.hpp"
#include "kept/dist/shard_layout.hpp"

namespace kept {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }

  void all_reduce_sum(float*, std::int64_t count) override { check_count(count, "all_reduce_sum"); }
  void reduce_scatter_sum(float*, const ShardLayout& layout) override {
    check_layout(layout, "reduce_scatter_sum");
  }
  void all_gather_bytes(void*, const ShardLayout& layout, std::size_t element_bytes) override {
    check_layout(layout, "all_gather");
    KEPT_CHECK(element_bytes > 0, "all_gather on rank 0: element size is 0 bytes");
  }
  void broadcast_bytes(void*, std::int64_t bytes, int root) override {
    check_count(bytes, "broadcast");
    check_root(root, "broadcast");
  }
  void barrier() override {}
};

}  // namespace kept
