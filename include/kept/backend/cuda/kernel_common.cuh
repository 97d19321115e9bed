// kept/backend/cuda/kernel_common.cuh: what kept's own kernels share: fp32 <-> storage
// conversion, grid sizing, and the deterministic column sum used by every parameter gradient
// that is a sum over rows (bias, norm weights, embedding rows).
//
// Storage types are float and __nv_bfloat16 (kept::bf16 has the same bits; device_ptr in
// runtime.cuh converts); kernels compute in fp32 and round a bf16 result once, to nearest even.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "kept/backend/cuda/platform.cuh"

namespace kept::cuda::detail {

__device__ __forceinline__ float to_f32(float value) {
  return value;
}
__device__ __forceinline__ float to_f32(__nv_bfloat16 value) {
  return __bfloat162float(value);
}
template <class T>
__device__ __forceinline__ T from_f32(float value) {
  if constexpr (std::is_same_v<T, float>)
    return value;
  else
    return __float2bfloat16_rn(value);
}

inline constexpr int kElementwiseThreads = 256;

// ---- 16-byte vectors -------------------------------------------------------------------------
// Pack<T, N>: N consecutive elements moved with one 16-byte load or store (N = kPackOf<T>: 8 bf16
// or 4 floats) when every pointer is 16-byte aligned and the element count a multiple of N;
// N = 1 otherwise. Launchers pick N at run time (vector_width) and instantiate both.
template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
template <class T>
inline constexpr int kPackOf = 16 / static_cast<int>(sizeof(T));

template <int N, class T>
__device__ __forceinline__ Pack<std::remove_const_t<T>, N> load_pack(T* base, std::int64_t pack) {
  return reinterpret_cast<const Pack<std::remove_const_t<T>, N>*>(base)[pack];
}
template <int N, class T>
__device__ __forceinline__ void store_pack(T* base, std::int64_t pack, const Pack<T, N>& value) {
  reinterpret_cast<Pack<T, N>*>(base)[pack] = value;
}

// True when `count` elements of every (non-null) pointer can move as 16-byte packs of N.
inline bool packable(std::int64_t count, int n, std::initializer_list<const void*> pointers) {
  if (count % n != 0) return false;
  for (const void* pointer : pointers)
    if (reinterpret_cast<std::uintptr_t>(pointer) % 16 != 0) return false;
  return true;
}

// Blocks for a grid-stride loop over `count` elements: enough to fill the device, never more
// than the work needs.
inline unsigned blocks_for(std::int64_t count, int threads = kElementwiseThreads) {
  const std::int64_t needed = (count + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<std::int64_t>(needed, 1, 65535));
}

// The grid-stride index loop of a 1-D launch.
template <class F>
__device__ __forceinline__ void grid_stride(std::int64_t count, F&& f) {
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride)
    f(i);
}

// out = op(a, b) elementwise over `packs` packs of N, fp32 math, one rounding per output: the
// binary elementwise ops (add, the SwiGLU gate) are this kernel with their own `Op`.
template <int N, class T, class Op>
__global__ void binary_map_kernel(const T* a, const T* b, T* out, Op op, std::int64_t packs) {
  grid_stride(packs, [&](std::int64_t p) {
    const Pack<T, N> x = load_pack<N>(a, p), y = load_pack<N>(b, p);
    Pack<T, N> r;
    for (int k = 0; k < N; ++k)
      r.v[k] = from_f32<T>(op(to_f32(x.v[k]), to_f32(y.v[k])));
    store_pack<N>(out, p, r);
  });
}

// Launches an elementwise kernel over `count` elements: its 16-byte-pack instantiation (N =
// kPackOf<T>) when `pointers` allow it, else the one-element one; the kernel's last parameter is
// the number of packs.
template <class T, class... Params, class... Args>
cudaError_t launch_elementwise(const char* name, void (*packed)(Params...),
                               void (*single)(Params...), std::int64_t count,
                               std::initializer_list<const void*> pointers, cudaStream_t stream,
                               Args... args) {
  if (count == 0) return cudaSuccess;
  constexpr int N = kPackOf<T>;
  const bool pack = packable(count, N, pointers);
  const std::int64_t items = pack ? count / N : count;
  return launch(name, pack ? packed : single, dim3(blocks_for(items)), dim3(kElementwiseThreads), 0,
                stream, args..., items);
}

template <class T, class Op>
cudaError_t launch_binary_map(const char* name, const T* a, const T* b, T* out, Op op,
                              std::int64_t count, cudaStream_t stream) {
  return launch_elementwise<T>(name, binary_map_kernel<kPackOf<T>, T, Op>,
                               binary_map_kernel<1, T, Op>, count, {a, b, out}, stream, a, b, out,
                               op);
}

// ---- deterministic column sums: dst[c] += sum_r src[r * ld + c] ----------------------------
// Block (32, 8): column c = 32 blockIdx.x + threadIdx.x; thread y sums rows y, y + 8, ... in
// order, then thread y = 0 adds the 8 partials in order. Same bits on every run and device.
inline constexpr int kColumnTile = 32;
inline constexpr int kColumnRows = 8;

template <class T>
__global__ void column_sum_kernel(const T* src, std::int64_t rows, std::int64_t cols,
                                  std::int64_t ld, float* dst) {
  __shared__ float sums[kColumnRows][kColumnTile + 1];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kColumnTile + threadIdx.x;
  float sum = 0.0f;
  if (c < cols)
    for (std::int64_t r = threadIdx.y; r < rows; r += kColumnRows)
      sum += to_f32(src[r * ld + c]);
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.0f;
    for (int y = 0; y < kColumnRows; ++y)
      total += sums[y][threadIdx.x];
    dst[c] += total;
  }
}

template <class T>
cudaError_t launch_column_sum(const T* src, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                              float* dst, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const auto tiles = static_cast<unsigned>((cols + kColumnTile - 1) / kColumnTile);
  return launch("column_sum", column_sum_kernel<T>, dim3(tiles), dim3(kColumnTile, kColumnRows), 0,
                stream, src, rows, cols, ld, dst);
}

}  // namespace kept::cuda::detail
