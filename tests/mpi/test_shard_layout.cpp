// ShardLayout (kept/dist/shard_layout.hpp) against its definition, and LocalCommunicator
// (kept/dist/local_communicator.hpp). No MPI: this program builds everywhere.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/dist/local_communicator.hpp"
#include "kept/dist/shard_layout.hpp"

namespace {

// kArenaAlignment (kept/model/parameter_arena.hpp), spelled out so this test does not build the
// model headers.
constexpr std::int64_t kArena = 256;

std::vector<std::int64_t> counts(const kept::ShardLayout& layout) {
  std::vector<std::int64_t> out;
  for (int rank = 0; rank < layout.ranks(); ++rank)
    out.push_back(layout.count(rank));
  return out;
}

}  // namespace

TEST_CASE("ShardLayout: the worked cases", "[dist]") {
  using V = std::vector<std::int64_t>;
  // 3 ranks over 5 aligned blocks: 2, 2, 1 blocks.
  const kept::ShardLayout five(5 * kArena, 3, kArena);
  CHECK(five.blocks() == 5);
  CHECK(counts(five) == V{512, 512, 256});
  CHECK(five.offset(1) == 512);
  CHECK(five.offset(2) == 1024);
  CHECK(five.max_count() == 512);
  // The partial last block shortens the last shard.
  CHECK(counts(kept::ShardLayout(5 * kArena - 17, 3, kArena)) == V{512, 512, 239});
  // 3 ranks over one block: ranks 1 and 2 own empty shards at the end.
  const kept::ShardLayout one(kArena - 3, 3, kArena);
  CHECK(counts(one) == V{253, 0, 0});
  CHECK(one.offset(1) == 253);
  CHECK(one.offset(2) == 253);
  CHECK(one.end(2) == 253);
  // Balanced whole blocks: 5 ranks over 7 blocks are 2, 2, 1, 1, 1 (ceil(7 / 5) = 2 blocks
  // each would give 2, 2, 2, 1, 0).
  CHECK(counts(kept::ShardLayout(7, 4, 1)) == V{2, 2, 2, 1});
  CHECK(counts(kept::ShardLayout(7, 5, 1)) == V{2, 2, 1, 1, 1});
  // Nothing to cut.
  CHECK(counts(kept::ShardLayout(0, 3, kArena)) == V{0, 0, 0});
  CHECK(kept::ShardLayout(0, 3, kArena).max_count() == 0);
  CHECK(counts(kept::ShardLayout()) == V{0});
}

TEST_CASE("ShardLayout: tiles, aligns and balances every small case", "[dist]") {
  for (std::int64_t alignment = 1; alignment <= 5; ++alignment) {
    for (int ranks = 1; ranks <= 7; ++ranks) {
      for (std::int64_t elements = 0; elements <= 40; ++elements) {
        INFO("elements " << elements << ", ranks " << ranks << ", alignment " << alignment);
        const kept::ShardLayout layout(elements, ranks, alignment);
        const std::int64_t blocks = (elements + alignment - 1) / alignment;
        REQUIRE(layout.blocks() == blocks);
        REQUIRE(layout.offset(0) == 0);
        REQUIRE(layout.end(ranks - 1) == elements);
        std::int64_t fewest = blocks, most = 0, largest = 0;
        bool seen_empty = false;
        for (int rank = 0; rank < ranks; ++rank) {
          if (rank + 1 < ranks) REQUIRE(layout.end(rank) == layout.offset(rank + 1));
          REQUIRE(layout.count(rank) >= 0);
          // Boundaries are block boundaries, or the end.
          REQUIRE((layout.offset(rank) % alignment == 0 || layout.offset(rank) == elements));
          const std::int64_t rank_blocks = (layout.count(rank) + alignment - 1) / alignment;
          fewest = std::min(fewest, rank_blocks);
          most = std::max(most, rank_blocks);
          largest = std::max(largest, layout.count(rank));
          // Empty shards only at the end, and only when there are fewer blocks than ranks.
          if (layout.count(rank) == 0) {
            seen_empty = true;
            REQUIRE(ranks > blocks);
          } else {
            REQUIRE_FALSE(seen_empty);
          }
          for (std::int64_t e = layout.offset(rank); e < layout.end(rank); ++e)
            REQUIRE(layout.owner(e) == rank);
        }
        REQUIRE(most - fewest <= 1);
        REQUIRE(most == (blocks + ranks - 1) / ranks);
        REQUIRE(layout.max_count() == largest);
      }
    }
  }
}

TEST_CASE("ShardLayout: arena-sized counts do not overflow", "[dist]") {
  const std::int64_t elements = (std::int64_t{1} << 62) + 5;
  const kept::ShardLayout layout(elements, 7, kArena);
  CHECK(layout.end(6) == elements);
  std::int64_t total = 0;
  for (int rank = 0; rank < 7; ++rank) {
    CHECK(layout.offset(rank) % kArena == 0);
    total += layout.count(rank);
  }
  CHECK(total == elements);
  CHECK(layout.owner(elements - 1) == 6);
  CHECK(layout.owner(0) == 0);
  CHECK(layout.owner(layout.offset(3)) == 3);
  CHECK(layout.owner(layout.offset(3) - 1) == 2);
}

TEST_CASE("ShardLayout: a window sends each element to its owner in the whole cut", "[dist]") {
  for (std::int64_t elements : {0, 1, 255, 256, 1000, 4097}) {
    for (int ranks : {1, 2, 3, 5}) {
      const kept::ShardLayout whole(elements, ranks, 64);
      for (std::int64_t first = 0; first <= elements; first += 37) {
        for (std::int64_t count :
             {std::int64_t{0}, std::int64_t{1}, std::int64_t{100}, elements - first}) {
          if (first + count > elements) continue;
          INFO(elements << " elements, " << ranks << " ranks, window [" << first << ", +" << count
                        << ")");
          const kept::ShardLayout window = whole.window(first, count);
          REQUIRE(window.elements() == count);
          // The windowed shards tile [0, count) in rank order...
          std::int64_t next = 0;
          for (int rank = 0; rank < ranks; ++rank) {
            REQUIRE(window.offset(rank) == next);
            next = window.end(rank);
            REQUIRE(window.count(rank) >= 0);
          }
          REQUIRE(next == count);
          // ... and element e of the window belongs to whoever owns first + e in the whole cut.
          for (std::int64_t e = 0; e < count; ++e) {
            const int owner = whole.owner(first + e);
            REQUIRE(window.owner(e) == owner);
            REQUIRE(window.offset(owner) <= e);
            REQUIRE(e < window.end(owner));
          }
          // A window of a window is the window of the whole.
          if (count >= 2)
            REQUIRE(window.window(1, count - 2) == whole.window(first + 1, count - 2));
        }
      }
    }
  }
  const kept::ShardLayout layout(10, 2, 4);
  CHECK_THROWS_WITH(layout.window(8, 3), "ShardLayout: window [8, 11) is outside [0, 10)");
  CHECK(layout.window(0, 10).offset(1) == layout.offset(1));
}

TEST_CASE("ShardLayout: bad arguments are errors", "[dist]") {
  CHECK_THROWS_AS(kept::ShardLayout(-1, 2, 1), kept::Error);
  CHECK_THROWS_AS(kept::ShardLayout(10, 0, 1), kept::Error);
  CHECK_THROWS_AS(kept::ShardLayout(10, 2, 0), kept::Error);
  const kept::ShardLayout layout(10, 2, 4);
  CHECK_THROWS_WITH(layout.offset(2), "ShardLayout: rank 2 is outside [0, 2)");
  CHECK_THROWS_AS(layout.count(-1), kept::Error);
  CHECK_THROWS_WITH(layout.owner(10), "ShardLayout: element 10 is outside [0, 10)");
  CHECK_THROWS_AS(layout.owner(-1), kept::Error);
}

TEST_CASE("LocalCommunicator: one rank, data unchanged, arguments checked", "[dist]") {
  kept::LocalCommunicator comm;
  kept::Communicator& any = comm;
  CHECK(any.rank() == 0);
  CHECK(any.size() == 1);
  std::vector<float> values{1.5f, -2.0f, 3.25f};
  const std::vector<float> before = values;
  any.all_reduce_sum(values.data(), 3);
  any.reduce_scatter_sum(values.data(), kept::ShardLayout(3, 1, kArena));
  any.all_gather(values.data(), kept::ShardLayout(3, 1, kArena));
  any.broadcast(values.data(), 3, 0);
  any.barrier();
  any.all_reduce_sum(nullptr, 0);
  CHECK(values == before);
  CHECK_NOTHROW(any.agree_on("the job", 42));
  CHECK_THROWS_WITH(any.reduce_scatter_sum(values.data(), kept::ShardLayout(3, 2, 1)),
                    "reduce_scatter_sum on rank 0: the layout is for 2 ranks, the communicator "
                    "has 1");
  CHECK_THROWS_AS(any.broadcast(values.data(), 3, 1), kept::Error);
  CHECK_THROWS_AS(any.all_reduce_sum(values.data(), -1), kept::Error);
}
