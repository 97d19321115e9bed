// kept/backend/cuda/norm_common.cuh: what the LayerNorm and RMSNorm kernels share.
//
// - Element access: T is float or __nv_bfloat16 in memory, fp32 in registers.
// - Pack<T, N>: N consecutive elements moved with one 16-byte load/store (N = 16 / sizeof(T):
//   4 floats or 8 bf16) when the row length and every pointer allow it, else N = 1.
// - Row traversal: thread t of a kBlock-thread block owns packs t, t + kBlock, t + 2 kBlock, ...
//   of every row, so a thread touches the same columns in every row (which is what lets the
//   backward keep per-column gradient partials in registers). "Cached" kernels (kItems > 0) hold
//   up to kItems packs per thread in registers, so a row is read from memory once; longer rows
//   use kItems == 0 and re-read the row (from L1/L2) for each pass.
// - block_sum: cub::BlockReduce, then a broadcast through shared memory.
// - column_partials_kernel: the second, deterministic stage of the parameter-gradient reduction:
//   dst[c] += sum over blocks b of partials[b][c], summed in a fixed order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <initializer_list>
#include <type_traits>

#include "kept/backend/cuda/runtime.cuh"

namespace kept::cuda::detail {

// The activation storage types the norm kernels take.
template <class T>
inline constexpr bool is_norm_storage_v =
    std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>;

inline void check_norm_shape(const char* op, std::int64_t rows, std::int64_t cols) {
  KEPT_CHECK(rows >= 0 && cols >= 0 && cols <= INT_MAX, op, ": bad shape [", rows, ", ", cols,
             "] (need rows >= 0, 0 <= cols <= 2^31-1)");
}

__device__ __forceinline__ float to_f32(float value) {
  return value;
}
__device__ __forceinline__ float to_f32(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

template <class T>
__device__ __forceinline__ T from_f32(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    return __float2bfloat16_rn(value);  // round to nearest even, like kept::to_bf16
  }
}

inline constexpr int kVectorBytes = 16;

template <class T>
inline constexpr int kVectorWidth = kVectorBytes / static_cast<int>(sizeof(T));

template <class T, int N>
struct alignas(sizeof(T) * N < kVectorBytes ? sizeof(T) * N : kVectorBytes) Pack {
  T v[N];
};

template <int N, class T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* base, int pack) {
  return *reinterpret_cast<const Pack<T, N>*>(base + static_cast<std::ptrdiff_t>(pack) * N);
}

template <int N, class T>
__device__ __forceinline__ void store_pack(T* base, int pack, const Pack<T, N>& value) {
  *reinterpret_cast<Pack<T, N>*>(base + static_cast<std::ptrdiff_t>(pack) * N) = value;
}

// True when every non-null pointer is 16-byte aligned (rows then stay aligned when cols is a
// multiple of the pack width).
inline bool aligned_16(std::initializer_list<const void*> pointers) {
  for (const void* pointer : pointers)
    if (reinterpret_cast<std::uintptr_t>(pointer) % kVectorBytes != 0) return false;
  return true;
}

// Calls f(k, p) for every pack p < packs this thread owns, p = threadIdx.x + k * kBlock; with
// kItems > 0 the loop has a constant trip count (k indexes register arrays), else it streams.
template <int kBlock, int kItems, class F>
__device__ __forceinline__ void for_each_pack(int packs, F&& f) {
  if constexpr (kItems > 0) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int p = static_cast<int>(threadIdx.x) + k * kBlock;
      if (p < packs) f(k, p);
    }
  } else {
    int k = 0;
    for (int p = static_cast<int>(threadIdx.x); p < packs; p += kBlock, ++k)
      f(k, p);
  }
}

struct Float2Sum {
  __device__ __forceinline__ float2 operator()(const float2& a, const float2& b) const {
    return make_float2(a.x + b.x, a.y + b.y);
  }
};

// Sum over the block, returned to every thread. Deterministic for a given kBlock.
template <int kBlock>
__device__ __forceinline__ float block_sum(float value) {
  using Reduce = cub::BlockReduce<float, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ float total;
  const float sum = Reduce(temp).Sum(value);
  if (threadIdx.x == 0) total = sum;
  __syncthreads();
  const float result = total;
  __syncthreads();  // the next call may overwrite temp and total
  return result;
}

template <int kBlock>
__device__ __forceinline__ float2 block_sum(float2 value) {
  using Reduce = cub::BlockReduce<float2, kBlock>;
  __shared__ typename Reduce::TempStorage temp;
  __shared__ float2 total;
  const float2 sum = Reduce(temp).Reduce(value, Float2Sum{});
  if (threadIdx.x == 0) total = sum;
  __syncthreads();
  const float2 result = total;
  __syncthreads();
  return result;
}

// Packs kept in registers per thread by the cached kernels. The backward holds x, dy and two
// fp32 gradient accumulators per element, so it caches fewer packs to keep registers (and so
// resident blocks) reasonable: 4 packs of 8 bf16 there cost ~164 registers, 2 packs ~90.
inline constexpr int kForwardCachedItems = 4;
inline constexpr int kBackwardCachedItems = 2;

// Picks the smallest block whose threads x kItems packs cover a row, up to kMaxCachedBlock
// threads; longer rows get the streaming kernel (1024 threads, kItems = 0). launch is a generic
// lambda called as launch.template operator()<kPack, kBlock, kItems>().
template <int kPack, int kItems, int kMaxCachedBlock, class Launch>
cudaError_t dispatch_row_shape(int packs, Launch& launch) {
  if (packs <= 128 * kItems) return launch.template operator()<kPack, 128, kItems>();
  if (packs <= 256 * kItems) return launch.template operator()<kPack, 256, kItems>();
  if constexpr (kMaxCachedBlock >= 512) {
    if (packs <= 512 * kItems) return launch.template operator()<kPack, 512, kItems>();
  }
  if constexpr (kMaxCachedBlock >= 1024) {
    if (packs <= 1024 * kItems) return launch.template operator()<kPack, 1024, kItems>();
  }
  return launch.template operator()<kPack, 1024, 0>();
}

template <class T, int kItems, int kMaxCachedBlock, class Launch>
cudaError_t dispatch_row_kernel(int cols, bool vectorize, Launch&& launch) {
  constexpr int kWidth = kVectorWidth<T>;
  if (vectorize) return dispatch_row_shape<kWidth, kItems, kMaxCachedBlock>(cols / kWidth, launch);
  return dispatch_row_shape<1, kItems, kMaxCachedBlock>(cols, launch);
}

// Blocks of a persistent backward grid: one wave, min(rows, SMs x resident blocks per SM).
template <class Kernel>
cudaError_t persistent_grid(Kernel kernel, int block, std::int64_t rows, int* grid) {
  int device = 0, sms = 0, per_sm = 0;
  KEPT_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  KEPT_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  KEPT_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0));
  const std::int64_t wave = static_cast<std::int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  *grid = static_cast<int>(rows < wave ? (rows > 0 ? rows : 1) : wave);
  return cudaSuccess;
}

inline constexpr int kColumnTile = 32;  // columns per block of column_partials_kernel
inline constexpr int kColumnRows = 8;   // threads per column, each summing a strided subset

// dst_a[c] += sum_{b < parts} partials[(b * arrays + a) * cols + c] for a = blockIdx.y, with a
// fixed summation order (thread y sums b = y, y + 8, ...; then y = 0..7 in order), so results
// are bitwise reproducible for a given number of parts.
__global__ void __launch_bounds__(kColumnTile* kColumnRows)
    column_partials_kernel(const float* __restrict__ partials, int parts, int arrays, int cols,
                           float* dst0, float* dst1) {
  float* dst = blockIdx.y == 0 ? dst0 : dst1;
  if (dst == nullptr) return;  // uniform over the block
  __shared__ float sums[kColumnRows][kColumnTile + 1];
  const int c = static_cast<int>(blockIdx.x) * kColumnTile + static_cast<int>(threadIdx.x);
  float sum = 0.0f;
  if (c < cols) {
    for (int b = static_cast<int>(threadIdx.y); b < parts; b += kColumnRows)
      sum += partials[(static_cast<std::int64_t>(b) * arrays + blockIdx.y) * cols + c];
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.0f;
#pragma unroll
    for (int y = 0; y < kColumnRows; ++y)
      total += sums[y][threadIdx.x];
    dst[c] += total;
  }
}

inline cudaError_t launch_column_partials(const float* partials, int parts, int arrays, int cols,
                                          float* dst0, float* dst1, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + kColumnTile - 1) / kColumnTile),
                  static_cast<unsigned>(arrays));
  column_partials_kernel<<<grid, dim3(kColumnTile, kColumnRows), 0, stream>>>(
      partials, parts, arrays, cols, dst0, dst1);
  return cudaGetLastError();
}

// CUB-style two-phase scratch protocol of the backward launchers: never 0 bytes, so a caller
// can always tell "query" (scratch == nullptr) from "run".
inline std::size_t scratch_request(std::size_t bytes) {
  return bytes < 16 ? 16 : bytes;
}

}  // namespace kept::cuda::detail
