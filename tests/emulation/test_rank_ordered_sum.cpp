// The rank-ordered sum kernel of the NCCL communicator's deterministic reduce-scatter
// (kept/dist/rank_ordered_sum.cuh) fed N = 3 ranks' contributions laid out in staging as ncclRecv
// would leave them, bit for bit against a host fp32 rank-ordered sum: on the host emulation in
// CI, and on a GPU (kept_cuda_tests compiles this file with nvcc).
#include <catch2/catch.hpp>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <tuple>
#include <vector>

#include "kept/backend/cuda/runtime.cuh"
#include "kept/dist/rank_ordered_sum.cuh"
#include "kept/dist/shard_layout.hpp"
#include "support/rank_contributions.hpp"

using kept::test::contributions;
using kept::test::same_bits;

namespace {

#define KEPT_TEST_CUDA(call) REQUIRE((call) == cudaSuccess)

// fp32 device memory for a test, freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::int64_t count) : count_(count) {
    KEPT_TEST_CUDA(cudaMalloc(reinterpret_cast<void**>(&data_),
                              static_cast<std::size_t>(count) * sizeof(float)));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { (void)cudaFree(data_); }
  float* get() const { return data_; }
  void upload(const std::vector<float>& host) const {
    REQUIRE(static_cast<std::int64_t>(host.size()) == count_);
    KEPT_TEST_CUDA(
        cudaMemcpy(data_, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  }
  std::vector<float> download() const {
    std::vector<float> host(static_cast<std::size_t>(count_));
    KEPT_TEST_CUDA(
        cudaMemcpy(host.data(), data_, host.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return host;
  }

 private:
  float* data_ = nullptr;
  std::int64_t count_ = 0;
};

}  // namespace

// Three ranks' reduce-scatter, done on one GPU: for each owner, every round's pieces from the
// other two ranks are copied into the staging rows where ncclRecv would put them (the rest of
// staging holds NaN), and the kernel adds them to the owner's buffer in place.
TEST_CASE("the rank-ordered sum kernel adds N = 3 contributions as they arrive, bit for bit",
          "[emulation][collective]") {
  if (kept::cuda::cuda_device_count() == 0) {
    SUCCEED("SKIPPED: no CUDA device (" << kept::cuda::probe_devices().describe() << ")");
    return;
  }
  constexpr int kRanks = 3;
  // Alignment 64: 16-byte packs except the last piece; alignment 1: odd offsets, one float a
  // thread. Staging of 800 bytes: 64-float pieces, several rounds.
  using Case = std::tuple<std::int64_t, std::int64_t, std::int64_t>;
  const std::vector<Case> cases = {{1037, 64, 800}, {1000, 1, 800}, {5, 4, 1 << 20}};
  for (const auto& [elements, alignment, staging_bytes] : cases) {
    CAPTURE(elements, alignment, staging_bytes);
    const kept::ShardLayout layout(elements, kRanks, alignment);
    const std::int64_t piece = kept::detail::sum_piece_elements(staging_bytes, kRanks);
    const kept::detail::SumRounds rounds(layout, piece);
    std::vector<std::vector<float>> x;
    for (int rank = 0; rank < kRanks; ++rank)
      x.push_back(contributions(42 + static_cast<std::uint64_t>(elements), rank, elements));
    int order_matters = 0;
    for (int owner = 0; owner < kRanks; ++owner) {
      CAPTURE(owner);
      DeviceBuffer data(elements);
      data.upload(x[static_cast<std::size_t>(owner)]);
      const std::int64_t stride = rounds.row_stride(owner);
      const std::int64_t staging = std::max<std::int64_t>(stride, 1) * (kRanks - 1);
      DeviceBuffer rows(staging);
      // NaN everywhere a received piece does not overwrite it.
      KEPT_TEST_CUDA(
          cudaMemset(rows.get(), 0xff, static_cast<std::size_t>(staging) * sizeof(float)));
      float* own = data.get() + layout.offset(owner);
      for (std::int64_t round = 0; round < rounds.rounds(); ++round) {
        const std::int64_t start = rounds.start(round);
        const std::int64_t mine = rounds.piece(owner, round);
        for (int peer = 0; peer < kRanks; ++peer) {
          if (peer == owner || mine == 0) continue;
          KEPT_TEST_CUDA(
              cudaMemcpy(rows.get() + kept::detail::staging_slot(peer, owner) * stride,
                         x[static_cast<std::size_t>(peer)].data() + layout.offset(owner) + start,
                         static_cast<std::size_t>(mine) * sizeof(float), cudaMemcpyHostToDevice));
        }
        KEPT_TEST_CUDA(kept::detail::launch_rank_ordered_sum(own + start, rows.get(), stride, mine,
                                                             kRanks, owner, nullptr));
      }
      KEPT_TEST_CUDA(cudaDeviceSynchronize());
      const std::vector<float> got = data.download();
      std::vector<float> expected = x[static_cast<std::size_t>(owner)];
      for (std::int64_t i = layout.offset(owner); i < layout.end(owner); ++i) {
        const auto e = static_cast<std::size_t>(i);
        const float sum = (x[0][e] + x[1][e]) + x[2][e];  // fp32, rank order
        expected[e] = sum;
        if (std::bit_cast<std::uint32_t>(sum) !=
            std::bit_cast<std::uint32_t>((x[2][e] + x[1][e]) + x[0][e]))
          ++order_matters;
      }
      CHECK(same_bits(got, expected));  // the shard summed, the rest untouched
    }
    if (elements > 100) CHECK(order_matters > 0);  // the data tell the orders apart
  }
}
