// The MPI communicator (kept/dist/mpi_communicator.hpp), run by ctest under mpirun -np 2 and
// -np 3 (tests/mpi/CMakeLists.txt).
//
// Each rank computes every rank's contribution from a seeded formula, so each checks its
// result against a reference of its own: the rank-ordered fp32 sum (bit for bit) and the
// float64 sum (within the fp32 rounding bound).
//
// A plain main with counted checks (mpi_checks.hpp), so that every rank keeps making the same
// collective calls.
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/dist/communicator.hpp"
#include "kept/dist/mpi_communicator.hpp"
#include "kept/dist/shard_layout.hpp"
#include "mpi_checks.hpp"

namespace {

constexpr std::int64_t kArena = 256;  // kArenaAlignment (kept/model/parameter_arena.hpp)

using Checks = kept::test::MpiChecks;

std::uint64_t mix(std::uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t draw(std::uint64_t seed, std::uint64_t a, std::uint64_t b) {
  return mix(mix(mix(seed) ^ a) ^ b);
}

// Rank `rank`'s value at element i in case `seed`: both signs, magnitudes from 2^-12 to 2^12 and
// full 24-bit mantissas, so that adding in another order rounds differently.
float contribution(std::uint64_t seed, int rank, std::int64_t i) {
  const std::uint64_t x =
      draw(seed, static_cast<std::uint64_t>(rank), static_cast<std::uint64_t>(i));
  const float mantissa = 1.0f + static_cast<float>(x & 0x7fffffu) / 8388608.0f;  // exact
  const int exponent = static_cast<int>((x >> 23) % 25) - 12;
  const float value = std::ldexp(mantissa, exponent);
  return (x >> 40) & 1u ? -value : value;
}

float ordered_sum(std::uint64_t seed, int ranks, std::int64_t i) {
  float sum = contribution(seed, 0, i);
  for (int rank = 1; rank < ranks; ++rank)
    sum += contribution(seed, rank, i);
  return sum;
}

bool same_bits(float a, float b) {
  return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b);
}

std::string describe(const kept::ShardLayout& layout) {
  return kept::detail::concat(layout.elements(), " elements over ", layout.ranks(),
                              " ranks, alignment ", layout.alignment());
}

std::vector<float> own_contributions(std::uint64_t seed, int rank, std::int64_t count) {
  std::vector<float> data(static_cast<std::size_t>(count));
  for (std::int64_t i = 0; i < count; ++i)
    data[static_cast<std::size_t>(i)] = contribution(seed, rank, i);
  return data;
}

void test_all_reduce(kept::Communicator& comm, Checks& checks, std::uint64_t seed,
                     std::int64_t count) {
  const int ranks = comm.size();
  std::vector<float> data = own_contributions(seed, comm.rank(), count);
  comm.all_reduce_sum(data.data(), count);
  std::int64_t differing = 0, outside_bound = 0;
  for (std::int64_t i = 0; i < count; ++i) {
    const float got = data[static_cast<std::size_t>(i)];
    if (!same_bits(got, ordered_sum(seed, ranks, i))) ++differing;
    // Recursive summation: |fp32 sum - exact| <= (N - 1) u sum |x| + O(u^2), u = 2^-24.
    double exact = 0.0, magnitude = 0.0;
    for (int rank = 0; rank < ranks; ++rank) {
      exact += contribution(seed, rank, i);
      magnitude += std::fabs(contribution(seed, rank, i));
    }
    if (std::fabs(got - exact) > ranks * std::ldexp(1.0, -24) * magnitude) ++outside_bound;
  }
  checks.expect(differing == 0,
                kept::detail::concat("all_reduce_sum of ", count, " floats: ", differing,
                                     " elements differ from the rank-ordered fp32 sum"));
  checks.expect(outside_bound == 0,
                kept::detail::concat("all_reduce_sum of ", count, " floats: ", outside_bound,
                                     " elements outside the fp32 bound around the float64 sum"));
}

// The test's own power: from 3 ranks on, another order (here the reverse) rounds differently
// somewhere, so an implementation summing in MPI's order would be caught. With 2 ranks every
// order gives the same bits.
void test_orders_differ(const kept::Communicator& comm, Checks& checks) {
  if (comm.size() < 3) return;
  std::int64_t differing = 0;
  for (std::int64_t i = 0; i < 4096; ++i) {
    float reverse = contribution(1, comm.size() - 1, i);
    for (int rank = comm.size() - 2; rank >= 0; --rank)
      reverse += contribution(1, rank, i);
    differing += same_bits(reverse, ordered_sum(1, comm.size(), i)) ? 0 : 1;
  }
  checks.expect(differing > 0, "the reference cannot tell rank order from reverse order");
}

void test_reduce_scatter(kept::Communicator& comm, Checks& checks, std::uint64_t seed,
                         const kept::ShardLayout& layout) {
  const int rank = comm.rank();
  std::vector<float> data = own_contributions(seed, rank, layout.elements());
  comm.reduce_scatter_sum(data.data(), layout);
  std::int64_t wrong_shard = 0, touched_outside = 0;
  for (std::int64_t i = 0; i < layout.elements(); ++i) {
    const float got = data[static_cast<std::size_t>(i)];
    if (i >= layout.offset(rank) && i < layout.end(rank))
      wrong_shard += same_bits(got, ordered_sum(seed, comm.size(), i)) ? 0 : 1;
    else
      touched_outside += same_bits(got, contribution(seed, rank, i)) ? 0 : 1;
  }
  checks.expect(wrong_shard == 0,
                kept::detail::concat("reduce_scatter_sum, ", describe(layout), ": ", wrong_shard,
                                     " elements of the own shard differ from the ordered sum"));
  checks.expect(touched_outside == 0,
                kept::detail::concat("reduce_scatter_sum, ", describe(layout), ": ",
                                     touched_outside, " elements outside the own shard changed"));
}

// Every rank holds only its own shard of the truth (the rest is this rank's garbage); after
// the all-gather every rank holds all of it.
template <class T, class Truth>
void check_all_gather(kept::Communicator& comm, Checks& checks, const kept::ShardLayout& layout,
                      Truth truth, const char* type) {
  const int rank = comm.rank();
  std::vector<T> data(static_cast<std::size_t>(layout.elements()));
  for (std::int64_t i = 0; i < layout.elements(); ++i) {
    const bool own = i >= layout.offset(rank) && i < layout.end(rank);
    data[static_cast<std::size_t>(i)] = own ? truth(i) : static_cast<T>(0x5a ^ rank);
  }
  comm.all_gather(data.data(), layout);
  std::int64_t wrong = 0;
  for (std::int64_t i = 0; i < layout.elements(); ++i) {
    const T expected = truth(i);
    wrong += std::memcmp(&data[static_cast<std::size_t>(i)], &expected, sizeof(T)) == 0 ? 0 : 1;
  }
  checks.expect(wrong == 0, kept::detail::concat("all_gather of ", type, ", ", describe(layout),
                                                 ": ", wrong, " elements wrong"));
}

void test_all_gather(kept::Communicator& comm, Checks& checks, std::uint64_t seed,
                     const kept::ShardLayout& layout) {
  check_all_gather<float>(
      comm, checks, layout, [&](std::int64_t i) { return contribution(seed, 7, i); }, "fp32");
  // bf16 weights travel as 2-byte elements.
  check_all_gather<std::uint16_t>(
      comm, checks, layout,
      [&](std::int64_t i) {
        return static_cast<std::uint16_t>(draw(seed, 8, static_cast<std::uint64_t>(i)));
      },
      "2-byte elements");
  // Odd element sizes through the byte interface: pieces then split elements.
  const int rank = comm.rank();
  const std::int64_t width = 3;
  std::vector<unsigned char> bytes(static_cast<std::size_t>(layout.elements() * width));
  auto truth = [&](std::int64_t b) {
    return static_cast<unsigned char>(draw(seed, 9, static_cast<std::uint64_t>(b)));
  };
  for (std::int64_t b = 0; b < layout.elements() * width; ++b) {
    const bool own = b >= layout.offset(rank) * width && b < layout.end(rank) * width;
    bytes[static_cast<std::size_t>(b)] = own ? truth(b) : static_cast<unsigned char>(0xa5 ^ rank);
  }
  comm.all_gather_bytes(bytes.data(), layout, static_cast<std::size_t>(width));
  std::int64_t wrong = 0;
  for (std::int64_t b = 0; b < layout.elements() * width; ++b)
    wrong += bytes[static_cast<std::size_t>(b)] == truth(b) ? 0 : 1;
  checks.expect(wrong == 0, kept::detail::concat("all_gather of 3-byte elements, ",
                                                 describe(layout), ": ", wrong, " bytes wrong"));
}

void test_broadcast(kept::Communicator& comm, Checks& checks, std::uint64_t seed,
                    std::int64_t count) {
  for (int root = 0; root < comm.size(); ++root) {
    std::vector<float> data(static_cast<std::size_t>(count));
    for (std::int64_t i = 0; i < count; ++i)
      data[static_cast<std::size_t>(i)] = contribution(seed, comm.rank(), i);
    comm.broadcast(data.data(), count, root);
    std::int64_t wrong = 0;
    for (std::int64_t i = 0; i < count; ++i)
      wrong += same_bits(data[static_cast<std::size_t>(i)], contribution(seed, root, i)) ? 0 : 1;
    checks.expect(wrong == 0, kept::detail::concat("broadcast of ", count, " floats from rank ",
                                                   root, ": ", wrong, " elements wrong"));
  }
}

// A barrier holds every rank until the last arrives: rank 0 arrives late, the others must
// wait for it (a no-op barrier would let them through at once).
void test_barrier(kept::Communicator& comm, Checks& checks) {
  using Clock = std::chrono::steady_clock;
  comm.barrier();
  const auto start = Clock::now();
  if (comm.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  comm.barrier();
  const auto waited =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  checks.expect(waited >= 250,
                kept::detail::concat("barrier let rank ", comm.rank(), " through after ", waited,
                                     " ms, before rank 0 arrived (300 ms)"));
}

void test_agree_on(kept::Communicator& comm, Checks& checks) {
  const int ranks = comm.size();
  try {
    comm.agree_on("the job config", 0x1234);
    checks.expect(true, "");
  } catch (const kept::Error& error) {
    checks.expect(false, std::string("agree_on with equal hashes threw: ") + error.what());
  }
  // The last rank differs (and, from 3 ranks on, rank 1 too, with another hash).
  auto hash_of = [](int rank, int ranks) -> std::uint64_t {
    if (rank == ranks - 1) return 0xbeefull;
    if (rank == 1) return 0xcafeull;
    return 0x1234ull;
  };
  std::string message;
  try {
    comm.agree_on("the job config", hash_of(comm.rank(), ranks));
  } catch (const kept::Error& error) {
    message = error.what();
  }
  checks.expect(!message.empty(), "agree_on with a differing hash did not throw on this rank");
  if (message.empty()) return;
  auto has = [&](const std::string& part) { return message.find(part) != std::string::npos; };
  const std::string last = kept::detail::concat("rank ", ranks - 1, " has 0x000000000000beef");
  checks.expect(has("the job config") && has("rank 0 has 0x0000000000001234") && has(last) &&
                    (ranks < 3 || has("rank 1 has 0x000000000000cafe")),
                "agree_on's message lacks what, a rank or a hash: " + message);
  checks.expect(ranks < 4 || !has("rank 2 has"), "agree_on names an agreeing rank: " + message);
}

// Bad arguments fail on the calling rank before any message (every rank makes the same bad
// call here, so nobody is left waiting), and MPI error codes become kept::Errors naming the
// call and the rank.
void test_errors(kept::Communicator& comm, Checks& checks) {
  auto throws = [](auto&& call) {
    try {
      call();
    } catch (const kept::Error&) {
      return true;
    }
    return false;
  };
  std::vector<float> data(8);
  checks.expect(throws([&] {
                  comm.reduce_scatter_sum(data.data(), kept::ShardLayout(8, comm.size() + 1, 1));
                }),
                "a layout for another rank count did not throw");
  checks.expect(throws([&] { comm.broadcast(data.data(), 8, comm.size()); }),
                "a root outside the ranks did not throw");
  checks.expect(throws([&] { comm.all_reduce_sum(data.data(), -1); }),
                "a negative count did not throw");
  std::string message;
  try {
    kept::detail::mpi_check(MPI_ERR_COUNT, "MPI_Isend", "reduce_scatter_sum", comm.rank(),
                            comm.size());
  } catch (const kept::Error& error) {
    message = error.what();
  }
  const std::string expected = kept::detail::concat(
      "MPI: MPI_Isend in reduce_scatter_sum failed on rank ", comm.rank(), " of ", comm.size());
  checks.expect(message.rfind(expected, 0) == 0, "mpi_check's message: " + message);
}

void test_communicator(kept::Communicator& comm, Checks& checks) {
  const int ranks = comm.size();
  std::uint64_t seed = 100;
  for (std::int64_t count : {0, 1, 2, 3, 5, 1000, 4099})
    test_all_reduce(comm, checks, ++seed, count);
  const std::vector<kept::ShardLayout> layouts{
      {5 * kArena, ranks, kArena},       // 3 ranks: 2, 2, 1 blocks
      {5 * kArena - 17, ranks, kArena},  // an uneven last shard
      {kArena - 3, ranks, kArena},       // one block: empty shards after rank 0
      {0, ranks, kArena},                // nothing
      {7, ranks, 1},
      {ranks - 1, ranks, 1},  // fewer elements than ranks
  };
  for (const kept::ShardLayout& layout : layouts) {
    test_reduce_scatter(comm, checks, ++seed, layout);
    test_all_gather(comm, checks, ++seed, layout);
  }
  for (std::int64_t count : {0, 1, 1000})
    test_broadcast(comm, checks, ++seed, count);
  test_barrier(comm, checks);
  test_agree_on(comm, checks);
  test_errors(comm, checks);
}

int run() {
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  Checks checks;
  checks.rank = world_rank;
  {
    kept::MpiCommunicator comm;
    checks.context = "default pieces";
    test_orders_differ(comm, checks);
    test_communicator(comm, checks);
    // A buffer over several default pieces (16 MiB = 4 Mi floats a message).
    test_all_reduce(comm, checks, 1, (std::int64_t{9} << 20) + 3);
  }
  // Tiny pieces: every collective goes in many rounds, the way a buffer above INT_MAX
  // elements does with the default; 5 bytes split the 2- and 3-byte elements of all_gather.
  for (std::int64_t piece_bytes : {4, 5, 12}) {
    kept::MpiCommunicator comm(MPI_COMM_WORLD, piece_bytes);
    checks.context = kept::detail::concat(piece_bytes, "-byte pieces");
    test_communicator(comm, checks);
  }
  return checks.finish("test_communicator");
}

}  // namespace

int main(int argc, char** argv) {
  return kept::test::run_under_mpi(&argc, &argv, "test_communicator", run);
}
