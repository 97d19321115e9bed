// The NCCL communicator (kept/dist/nccl_communicator.cuh) on one process: kept_nccl_tests.
//
// One rank (LocalCommunicator bootstrap, one GPU), so every collective's result is its input;
// what runs on the GPU is the plumbing: the bootstrap, every NCCL call with a one-rank
// communicator, the stream/event ordering against the compute stream, argument errors before
// anything is queued, and messages above INT_MAX bytes. The multi-rank arithmetic is tested in
// its pieces: the reduce-scatter's rounds and the all-gather's byte ranges (host arithmetic,
// no GPU); the rank-ordered sum kernel fed N = 3 ranks' contributions is
// tests/emulation/test_rank_ordered_sum.cpp (emulated in CI, on the GPU in kept_cuda_tests).
//
// Without a CUDA device the GPU cases print "SKIPPED: no CUDA device (...)" and pass (ctest
// reports them as Skipped); with KEPT_REQUIRE_CUDA=1 (scripts/device.sh) they fail instead.
#include <catch2/catch.hpp>

#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "kept/backend/cuda/runtime.cuh"
#include "kept/core/error.hpp"
#include "kept/dist/local_communicator.hpp"
#include "kept/dist/nccl_communicator.cuh"
#include "kept/dist/shard_layout.hpp"
#include "support/rank_contributions.hpp"

using kept::test::contributions;
using kept::test::same_bits;

namespace {

// True (and the case should return) when there is no device: a skip, or a failure under
// KEPT_REQUIRE_CUDA=1.
bool no_device() {
  const kept::cuda::DeviceProbe probe = kept::cuda::probe_devices();
  if (probe.count > 0) return false;
  const char* require = std::getenv("KEPT_REQUIRE_CUDA");
  if (require != nullptr && std::string(require) == "1")
    FAIL("no CUDA device (" << probe.describe() << ") and KEPT_REQUIRE_CUDA=1");
  WARN("SKIPPED: no CUDA device (" << probe.describe() << ")");
  return true;
}

#define KEPT_TEST_CUDA(call) REQUIRE((call) == cudaSuccess)

// Device memory for a test, freed on scope exit.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::int64_t count) : count_(count) {
    if (count > 0) KEPT_TEST_CUDA(cudaMalloc(&data_, static_cast<std::size_t>(count) * sizeof(T)));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (data_ != nullptr) (void)cudaFree(data_);
  }
  T* get() const { return data_; }
  void upload(const std::vector<T>& host) const {
    REQUIRE(static_cast<std::int64_t>(host.size()) == count_);
    KEPT_TEST_CUDA(cudaMemcpy(data_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(static_cast<std::size_t>(count_));
    KEPT_TEST_CUDA(cudaMemcpy(host.data(), data_, host.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  T* data_ = nullptr;
  std::int64_t count_ = 0;
};

// A stream of the test's own, standing for the trainer's compute stream.
class Stream {
 public:
  Stream() { KEPT_TEST_CUDA(cudaStreamCreate(&stream_)); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() { (void)cudaStreamDestroy(stream_); }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

__global__ void spin_kernel(long long cycles) {
  const long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

// Keeps `stream` busy for about `milliseconds` (one thread spinning on the SM clock).
void spin(cudaStream_t stream, int milliseconds) {
  int device = 0, khz = 0;
  KEPT_TEST_CUDA(cudaGetDevice(&device));
  KEPT_TEST_CUDA(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device));
  const long long cycles = static_cast<long long>(khz) * milliseconds;
  (void)cudaGetLastError();  // launch reports cudaGetLastError: start from a clean slate
  KEPT_TEST_CUDA(kept::cuda::launch("spin", spin_kernel, dim3(1), dim3(1), 0, stream, cycles));
}

__global__ void byte_pattern_kernel(unsigned char* data, std::int64_t count) {
  kept::cuda::detail::grid_stride(count, [&](std::int64_t i) {
    data[i] = static_cast<unsigned char>((static_cast<std::uint64_t>(i) * 2654435761u) >> 11);
  });
}

unsigned char byte_pattern(std::int64_t i) {
  return static_cast<unsigned char>((static_cast<std::uint64_t>(i) * 2654435761u) >> 11);
}

}  // namespace

// ---- without a GPU -----------------------------------------------------------------------------

TEST_CASE("NCCL and CUDA failures become a kept::Error naming the call, operation and rank",
          "[nccl][errors]") {
  CHECK_THROWS_WITH(
      kept::detail::nccl_check(ncclInvalidArgument, "ncclSend", "reduce_scatter_sum", 1, 3),
      Catch::Contains("NCCL: ncclSend in reduce_scatter_sum failed on rank 1 of 3") &&
          Catch::Contains(ncclGetErrorString(ncclInvalidArgument)));
  CHECK_NOTHROW(kept::detail::nccl_check(ncclSuccess, "ncclSend", "all_gather", 0, 1));
  CHECK_THROWS_WITH(
      kept::detail::nccl_cuda_check(cudaErrorInvalidValue, "cudaEventRecord", "broadcast", 2, 4),
      Catch::Contains("CUDA: cudaEventRecord in broadcast failed on rank 2 of 4") &&
          Catch::Contains("cudaErrorInvalidValue") &&
          Catch::Contains(cudaGetErrorString(cudaErrorInvalidValue)));
}

TEST_CASE("the reduce-scatter's rounds cover every shard once, within staging rows",
          "[nccl][plan]") {
  using Case = std::tuple<std::int64_t, int, std::int64_t, std::int64_t>;
  // {10, 4, 64, ...}: one block, ranks 1..3 own empty shards; {777, 5, 7, 4}: one float a row.
  const std::vector<Case> cases = {{1037, 3, 64, 800},         {1000, 3, 1, 400},
                                   {10, 4, 64, 1 << 20},       {0, 2, 1, 64},
                                   {1 << 20, 8, 256, 1 << 16}, {777, 5, 7, 4}};
  for (const auto& [elements, ranks, alignment, staging] : cases) {
    CAPTURE(elements, ranks, alignment, staging);
    const kept::ShardLayout layout(elements, ranks, alignment);
    const std::int64_t piece = kept::detail::sum_piece_elements(staging, ranks);
    CHECK(piece >= 1);
    CHECK(piece * (ranks - 1) * static_cast<std::int64_t>(sizeof(float)) <=
          std::max<std::int64_t>(staging, sizeof(float) * (ranks - 1)));
    if (piece >= kept::detail::kSumRowAlignment) CHECK(piece % kept::detail::kSumRowAlignment == 0);
    const kept::detail::SumRounds rounds(layout, piece);
    for (int owner = 0; owner < ranks; ++owner) {
      std::int64_t covered = 0;
      const std::int64_t stride = rounds.row_stride(owner);
      CHECK(stride % kept::detail::kSumRowAlignment == 0);
      for (std::int64_t round = 0; round < rounds.rounds(); ++round) {
        const std::int64_t got = rounds.piece(owner, round);
        CHECK(got <= stride);
        if (got > 0) CHECK(rounds.start(round) == covered);  // contiguous, in order
        covered += got;
      }
      CHECK(covered == layout.count(owner));
      // The staging slots of the other ranks are 0 .. N-2, each once, in rank order.
      std::vector<int> slots;
      for (int peer = 0; peer < ranks; ++peer)
        if (peer != owner) slots.push_back(kept::detail::staging_slot(peer, owner));
      for (std::size_t k = 0; k < slots.size(); ++k)
        CHECK(slots[k] == static_cast<int>(k));
    }
  }
  CHECK_THROWS_WITH(kept::detail::sum_piece_elements(0, 2), Catch::Contains("staging_bytes"));
}

TEST_CASE("the all-gather's plan: one ncclAllGather for even shards, exact byte ranges otherwise",
          "[nccl][plan]") {
  const auto even = kept::detail::gather_plan(kept::ShardLayout(1024, 4, 256), 2, "all_gather", 0);
  CHECK(even.even);
  CHECK(even.total_bytes == 2048);
  CHECK(even.offset_bytes == std::vector<std::int64_t>{0, 512, 1024, 1536});
  CHECK(even.count_bytes == std::vector<std::int64_t>{512, 512, 512, 512});
  CHECK(kept::detail::gather_plan(kept::ShardLayout(12, 3, 1), 4, "all_gather", 0).even);
  CHECK(kept::detail::gather_plan(kept::ShardLayout(5, 1, 64), 8, "all_gather", 0).even);

  // Uneven: blocks of 64 dealt 6, 6, 5; the last one partial (1037 = 16 x 64 + 13).
  const auto uneven = kept::detail::gather_plan(kept::ShardLayout(1037, 3, 64), 3, "all_gather", 1);
  CHECK_FALSE(uneven.even);
  CHECK(uneven.total_bytes == 3111);
  CHECK(uneven.offset_bytes == std::vector<std::int64_t>{0, 1152, 2304});
  CHECK(uneven.count_bytes == std::vector<std::int64_t>{1152, 1152, 807});
  // Empty trailing shards: one block for four ranks.
  const auto sparse = kept::detail::gather_plan(kept::ShardLayout(10, 4, 64), 4, "all_gather", 3);
  CHECK_FALSE(sparse.even);
  CHECK(sparse.offset_bytes == std::vector<std::int64_t>{0, 40, 40, 40});
  CHECK(sparse.count_bytes == std::vector<std::int64_t>{40, 0, 0, 0});
  // Tiling: the ranges cover [0, total) in rank order.
  for (const auto& plan : {even, uneven, sparse}) {
    std::int64_t at = 0;
    for (std::size_t k = 0; k < plan.offset_bytes.size(); ++k) {
      CHECK(plan.offset_bytes[k] == at);
      at += plan.count_bytes[k];
    }
    CHECK(at == plan.total_bytes);
  }
  CHECK_THROWS_WITH(
      kept::detail::gather_plan(kept::ShardLayout(INT64_MAX / 2, 2, 1), 4, "all_gather", 1),
      Catch::Contains("all_gather on rank 1") && Catch::Contains("overflow"));
  CHECK_THROWS_WITH(kept::detail::gather_plan(kept::ShardLayout(4, 1, 1), 0, "all_gather", 0),
                    Catch::Contains("element size is 0 bytes"));
}

TEST_CASE("the local rank comes from the launcher's environment", "[nccl][plan]") {
  const char* names[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID",
                         "LOCAL_RANK"};
  std::vector<std::string> saved;
  std::vector<bool> had;
  for (const char* name : names) {
    const char* value = std::getenv(name);
    had.push_back(value != nullptr);
    saved.emplace_back(value != nullptr ? value : "");
    unsetenv(name);
  }
  CHECK(kept::NcclCommunicator::detect_local_rank(7) == 7);
  setenv("LOCAL_RANK", "3", 1);
  CHECK(kept::NcclCommunicator::detect_local_rank() == 3);
  setenv("SLURM_LOCALID", "1", 1);  // Slurm's comes first
  CHECK(kept::NcclCommunicator::detect_local_rank() == 1);
  setenv("SLURM_LOCALID", "x", 1);
  CHECK_THROWS_WITH(kept::NcclCommunicator::detect_local_rank(),
                    Catch::Contains("SLURM_LOCALID") && Catch::Contains("not a local rank"));
  for (std::size_t k = 0; k < saved.size(); ++k) {
    if (had[k])
      setenv(names[k], saved[k].c_str(), 1);
    else
      unsetenv(names[k]);
  }
}

// ---- on the GPU --------------------------------------------------------------------------------

TEST_CASE("one-rank NcclCommunicator: every collective, both sum modes", "[nccl]") {
  if (no_device()) return;
  int version = 0;
  REQUIRE(ncclGetVersion(&version) == ncclSuccess);
  WARN("NCCL " << version << " (headers " << NCCL_VERSION_CODE << ")");
  kept::LocalCommunicator host;
  Stream compute;
  for (const kept::NcclSums sums : {kept::NcclSums::RankOrdered, kept::NcclSums::NcclAllReduce}) {
    CAPTURE(static_cast<int>(sums));
    kept::NcclCommunicator comm(host, 0, compute.get(), {sums, 4096});
    CHECK(comm.rank() == 0);
    CHECK(comm.size() == 1);
    CHECK(comm.device() == 0);
    CHECK(comm.piece_elements() == 1024);
    CHECK(comm.handle() != nullptr);
    CHECK(comm.stream() != nullptr);
    CHECK(comm.compute_stream() == compute.get());

    constexpr std::int64_t kElements = 1037;
    const std::vector<float> values = contributions(7, 0, kElements);
    DeviceBuffer<float> data(kElements);
    data.upload(values);
    comm.all_reduce_sum(data.get(), kElements);
    comm.reduce_scatter_sum(data.get(), kept::ShardLayout(kElements, 1, 64));
    comm.reduce_scatter_sum(data.get(), kept::ShardLayout(kElements, 1, 1));
    comm.all_gather(data.get(), kept::ShardLayout(kElements, 1, 64));
    comm.all_gather(reinterpret_cast<std::uint16_t*>(data.get()),
                    kept::ShardLayout(2 * kElements, 1, 256));
    comm.all_gather_bytes(data.get(), kept::ShardLayout(kElements * 4 / 3, 1, 5), 3);
    comm.broadcast(data.get(), kElements, 0);
    comm.barrier();
    // Zero counts: nothing to move, the streams are still ordered.
    comm.all_reduce_sum(data.get(), 0);
    comm.all_reduce_sum(nullptr, 0);
    comm.all_gather_bytes(nullptr, kept::ShardLayout(0, 1, 1), 2);
    comm.reduce_scatter_sum(nullptr, kept::ShardLayout(0, 1, 64));
    comm.broadcast_bytes(nullptr, 0, 0);
    comm.agree_on("the test's job", 0x1234);
    comm.synchronize();
    KEPT_TEST_CUDA(cudaStreamSynchronize(compute.get()));  // the contract: then read on the host
    CHECK(same_bits(data.download(), values));
  }
}

TEST_CASE("collectives are ordered after and before the caller's compute stream",
          "[nccl][streams]") {
  if (no_device()) return;
  kept::LocalCommunicator host;
  Stream compute;
  kept::NcclCommunicator comm(host, 0, compute.get());
  DeviceBuffer<float> data(64);
  KEPT_TEST_CUDA(cudaMemset(data.get(), 0, 64 * sizeof(float)));
  cudaEvent_t marker = nullptr;
  KEPT_TEST_CUDA(cudaEventCreateWithFlags(&marker, cudaEventDisableTiming));

  SECTION("the collective waits for work queued on the compute stream before the call") {
    spin(compute.get(), 300);
    comm.all_reduce_sum(data.get(), 64);
    KEPT_TEST_CUDA(cudaEventRecord(marker, comm.stream()));
    CHECK(cudaEventQuery(marker) == cudaErrorNotReady);
    comm.broadcast(data.get(), 64, 0);  // and a real NCCL call behind it
    KEPT_TEST_CUDA(cudaStreamSynchronize(compute.get()));
    comm.synchronize();
    CHECK(cudaEventQuery(marker) == cudaSuccess);
  }
  SECTION("work queued on the compute stream after the call waits for the collective") {
    spin(comm.stream(), 300);
    comm.all_gather(data.get(), kept::ShardLayout(64, 1, 1));
    KEPT_TEST_CUDA(cudaEventRecord(marker, compute.get()));
    CHECK(cudaEventQuery(marker) == cudaErrorNotReady);
    comm.synchronize();
    KEPT_TEST_CUDA(cudaStreamSynchronize(compute.get()));
    CHECK(cudaEventQuery(marker) == cudaSuccess);
  }
  SECTION("barrier returns once the compute stream's queued work is done") {
    spin(compute.get(), 200);
    comm.barrier();
    CHECK(cudaStreamQuery(compute.get()) == cudaSuccess);
  }
  SECTION("the legacy default stream as the compute stream") {
    comm.set_compute_stream(nullptr);
    spin(nullptr, 200);
    comm.all_reduce_sum(data.get(), 64);
    KEPT_TEST_CUDA(cudaEventRecord(marker, comm.stream()));
    CHECK(cudaEventQuery(marker) == cudaErrorNotReady);
    KEPT_TEST_CUDA(cudaDeviceSynchronize());
    CHECK(cudaEventQuery(marker) == cudaSuccess);
  }
  KEPT_TEST_CUDA(cudaDeviceSynchronize());
  (void)cudaEventDestroy(marker);
}

TEST_CASE("bad arguments fail before anything is queued, naming the operation and the rank",
          "[nccl][errors]") {
  if (no_device()) return;
  kept::LocalCommunicator host;
  Stream compute;
  kept::NcclCommunicator comm(host, 0, compute.get());
  DeviceBuffer<float> data(16);
  std::vector<float> on_host(16);
  CHECK_THROWS_WITH(comm.all_reduce_sum(data.get(), -1),
                    Catch::Contains("all_reduce_sum on rank 0") && Catch::Contains("negative"));
  CHECK_THROWS_WITH(comm.reduce_scatter_sum(data.get(), kept::ShardLayout(16, 2, 1)),
                    Catch::Contains("reduce_scatter_sum on rank 0") &&
                        Catch::Contains("the layout is for 2 ranks"));
  CHECK_THROWS_WITH(comm.all_gather_bytes(data.get(), kept::ShardLayout(16, 3, 1), 4),
                    Catch::Contains("all_gather on rank 0") && Catch::Contains("3 ranks"));
  CHECK_THROWS_WITH(comm.all_gather_bytes(data.get(), kept::ShardLayout(16, 1, 1), 0),
                    Catch::Contains("element size is 0 bytes"));
  CHECK_THROWS_WITH(comm.all_gather_bytes(data.get(), kept::ShardLayout(INT64_MAX / 4, 1, 1), 8),
                    Catch::Contains("overflow"));
  CHECK_THROWS_WITH(comm.broadcast_bytes(data.get(), 16, 1),
                    Catch::Contains("broadcast on rank 0") && Catch::Contains("root 1"));
  CHECK_THROWS_WITH(comm.broadcast_bytes(data.get(), -4, 0), Catch::Contains("negative"));
  CHECK_THROWS_WITH(
      comm.all_reduce_sum(on_host.data(), 16),
      Catch::Contains("all_reduce_sum on rank 0") && Catch::Contains("not device memory"));
  CHECK_THROWS_WITH(comm.broadcast(on_host.data(), 16, 0), Catch::Contains("not device memory"));
  CHECK_THROWS_WITH(comm.all_reduce_sum(nullptr, 4), Catch::Contains("null pointer"));
  // None of that broke the communicator.
  CHECK_NOTHROW(comm.all_reduce_sum(data.get(), 16));
  CHECK_NOTHROW(comm.barrier());

  CHECK_THROWS_WITH(kept::NcclCommunicator(host, -1, compute.get()),
                    Catch::Contains("local rank -1 is negative"));
  kept::NcclOptions no_staging;
  no_staging.staging_bytes = 0;
  CHECK_THROWS_WITH(kept::NcclCommunicator(host, 0, compute.get(), no_staging),
                    Catch::Contains("staging_bytes 0"));
}

TEST_CASE("messages above INT_MAX bytes and elements", "[nccl][large]") {
  if (no_device()) return;
  kept::LocalCommunicator host;
  Stream compute;
  kept::NcclCommunicator comm(host, 0, compute.get(), {kept::NcclSums::NcclAllReduce, 1 << 20});
  const std::int64_t bytes = std::int64_t{INT_MAX} + 4097;
  const std::int64_t floats = std::int64_t{INT_MAX} + 5;
  void* raw = nullptr;
  if (cudaMalloc(&raw, static_cast<std::size_t>(floats) * sizeof(float)) != cudaSuccess) {
    (void)cudaGetLastError();
    WARN("not enough device memory for " << floats * 4 << " bytes; the large case is not run");
    return;
  }
  auto* buffer = static_cast<unsigned char*>(raw);
  KEPT_TEST_CUDA(kept::cuda::launch("byte_pattern", byte_pattern_kernel,
                                    dim3(kept::cuda::detail::blocks_for(floats * 4)), dim3(256), 0,
                                    compute.get(), buffer, floats * 4));
  comm.broadcast_bytes(buffer, bytes, 0);
  comm.all_gather_bytes(buffer, kept::ShardLayout(bytes, 1, 1), 1);  // even: one ncclAllGather
  comm.all_reduce_sum(reinterpret_cast<float*>(buffer), floats);     // ncclAllReduce, size_t count
  comm.synchronize();
  KEPT_TEST_CUDA(cudaStreamSynchronize(compute.get()));
  std::vector<unsigned char> window(4096);
  for (const std::int64_t at :
       {std::int64_t{0}, std::int64_t{INT_MAX} - 2048, bytes - 4096, floats * 4 - 4096}) {
    CAPTURE(at);
    KEPT_TEST_CUDA(cudaMemcpy(window.data(), buffer + at, window.size(), cudaMemcpyDeviceToHost));
    bool same = true;
    for (std::size_t k = 0; k < window.size(); ++k)
      same = same && window[k] == byte_pattern(at + static_cast<std::int64_t>(k));
    CHECK(same);
  }
  (void)cudaFree(raw);
}
