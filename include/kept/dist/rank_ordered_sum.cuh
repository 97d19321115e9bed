// kept/dist/rank_ordered_sum.cuh: the device half of the deterministic reduce-scatter of
// kept/dist/nccl_communicator.cuh, without NCCL: the rounds and staging rows of received pieces,
// and the kernel that adds the N contributions of a shard in rank order. Kept apart from the
// NCCL calls so that the host emulation (include/kept/backend/cuda/emulation) compiles and runs
// it in CI (tests/emulation/test_rank_ordered_sum.cpp), and nvcc on a GPU.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"
#include "kept/backend/cuda/platform.cuh"
#include "kept/core/error.hpp"
#include "kept/dist/shard_layout.hpp"

namespace kept::detail {

// ---- the deterministic reduce-scatter's pieces (pure arithmetic, tested without NCCL) -----------

// Staging rows start on 64-float (256-byte) boundaries, so the sum kernel moves 16-byte packs.
inline constexpr std::int64_t kSumRowAlignment = 64;
// The alignment (elements) of all_reduce_sum's ShardLayout: shard boundaries on 256 bytes.
inline constexpr std::int64_t kAllReduceAlignment = 64;

// Floats per staging row for `ranks` ranks within `staging_bytes`: a multiple of
// kSumRowAlignment when that fits, at least 1.
inline std::int64_t sum_piece_elements(std::int64_t staging_bytes, int ranks) {
  KEPT_CHECK(staging_bytes > 0, "NcclCommunicator: staging_bytes ", staging_bytes,
             " is not positive");
  const std::int64_t rows = std::max(1, ranks - 1);
  std::int64_t piece = staging_bytes / static_cast<std::int64_t>(sizeof(float)) / rows;
  if (piece >= kSumRowAlignment) piece -= piece % kSumRowAlignment;
  return std::max<std::int64_t>(piece, 1);
}

// Where peer's piece lands in the owner's staging: rows for every rank but the owner, in rank
// order (the owner's own contribution is read in place).
__host__ __device__ inline int staging_slot(int peer, int owner) {
  return peer < owner ? peer : peer - 1;
}

// The rounds of a reduce-scatter over `layout` with at most `piece` floats per shard and round.
// Every rank computes the same rounds; in round r, rank k's shard contributes the floats
// [offset(k) + start(r), offset(k) + start(r) + piece(k, r)), which each peer sends to k.
class SumRounds {
 public:
  SumRounds(const ShardLayout& layout, std::int64_t piece)
      : layout_(layout), piece_(piece), largest_(layout.max_count()) {
    KEPT_CHECK(piece >= 1, "SumRounds: piece ", piece, " is not positive");
  }
  std::int64_t rounds() const { return largest_ / piece_ + (largest_ % piece_ != 0 ? 1 : 0); }
  std::int64_t start(std::int64_t round) const { return round * piece_; }
  // Floats of `rank`'s shard in `round` (0 once the shard is done).
  std::int64_t piece(int rank, std::int64_t round) const {
    return std::clamp<std::int64_t>(layout_.count(rank) - start(round), 0, piece_);
  }
  // The staging row stride at `owner`: its largest piece, rounded up to kSumRowAlignment.
  std::int64_t row_stride(int owner) const {
    const std::int64_t widest = std::min(piece_, layout_.count(owner));
    return (widest + kSumRowAlignment - 1) / kSumRowAlignment * kSumRowAlignment;
  }

 private:
  ShardLayout layout_;
  std::int64_t piece_ = 1;
  std::int64_t largest_ = 0;
};

// ---- the rank-ordered sum kernel ----------------------------------------------------------------

// own[i] = ((x_0[i] + x_1[i]) + x_2[i]) + ... + x_{ranks-1}[i], fp32, rounded to nearest after
// each addition (__fadd_rn: no contraction, no reassociation), where x_own_rank is own itself and
// x_k for k != own_rank is row staging_slot(k, own_rank) of `rows` (row_stride floats apart).
// N floats per item (16-byte packs when N = 4).
template <int N>
__global__ void rank_ordered_sum_kernel(float* own, const float* rows, std::int64_t row_stride,
                                        int ranks, int own_rank, std::int64_t packs) {
  using cuda::detail::load_pack;
  using cuda::detail::Pack;
  cuda::detail::grid_stride(packs, [&](std::int64_t p) {
    const auto contribution = [&](int k) {
      return k == own_rank ? load_pack<N>(own, p)
                           : load_pack<N>(rows + staging_slot(k, own_rank) * row_stride, p);
    };
    Pack<float, N> sum = contribution(0);
    for (int k = 1; k < ranks; ++k) {
      const Pack<float, N> x = contribution(k);
      for (int j = 0; j < N; ++j)
        sum.v[j] = __fadd_rn(sum.v[j], x.v[j]);
    }
    cuda::detail::store_pack<N>(own, p, sum);
  });
}

// Queues rank_ordered_sum_kernel over `count` floats on `stream`; returns the launch status.
inline cudaError_t launch_rank_ordered_sum(float* own, const float* rows, std::int64_t row_stride,
                                           std::int64_t count, int ranks, int own_rank,
                                           cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  constexpr int kPack = cuda::detail::kPackOf<float>;
  const bool pack = row_stride % kPack == 0 && cuda::detail::packable(count, kPack, {own, rows});
  const std::int64_t items = pack ? count / kPack : count;
  return cuda::launch(
      "rank_ordered_sum", pack ? rank_ordered_sum_kernel<kPack> : rank_ordered_sum_kernel<1>,
      dim3(cuda::detail::blocks_for(items)), dim3(cuda::detail::kElementwiseThreads), 0, stream,
      own, rows, row_stride, ranks, own_rank, items);
}

}  // namespace kept::detail
