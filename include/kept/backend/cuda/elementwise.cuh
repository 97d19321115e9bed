// kept/backend/cuda/elementwise.cuh: the elementwise ops of the backend contract on CUDA.
//
//   add            out = a + b                   (bf16: fp32 sum, rounded once)
//   accumulate     out += a                      (reads bf16 out, adds in fp32, rounds once)
//   add_bias       out[r, c] += bias[c]          (out bf16 or fp32, bias bf16)
//   bias_backward  d_bias[c] += sum_r d_out[r, c] (deterministic column sum, fp32)
//   scale          x *= factor                   (fp32 gradients)
//   convert        dst = src (fp32 <-> bf16, rounding to nearest even; the mixed GEMMs' staging)
//   fill_matrix    c = beta * c over a strided matrix (the K = 0 GEMM)
// Memory-bound: one pass, grid-stride loops, fp32 math.
#pragma once

#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"
#include "kept/core/element_math.hpp"

namespace kept::cuda::detail {

struct AddOp {
  __device__ __forceinline__ float operator()(float x, float y) const { return x + y; }
};

// out += a; separate from add so `out` is one (written) pointer, not an input aliasing it.
template <int N, class T>
__global__ void accumulate_kernel(const T* a, T* out, std::int64_t packs) {
  grid_stride(packs, [&](std::int64_t p) {
    const Pack<T, N> x = load_pack<N>(a, p);
    Pack<T, N> r = load_pack<N>(out, p);
    for (int k = 0; k < N; ++k)
      r.v[k] = from_f32<T>(to_f32(r.v[k]) + to_f32(x.v[k]));
    store_pack<N>(out, p, r);
  });
}
template <class T, class B>
__global__ void add_bias_kernel(T* out, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                const B* bias) {
  grid_stride(rows * cols, [&](std::int64_t i) {
    T& value = out[(i / cols) * ld + i % cols];
    value = from_f32<T>(to_f32(value) + to_f32(bias[i % cols]));
  });
}
template <int N, class T>
__global__ void scale_kernel(T* x, float factor, std::int64_t packs) {
  grid_stride(packs, [&](std::int64_t p) {
    Pack<T, N> r = load_pack<N>(x, p);
    for (int k = 0; k < N; ++k)
      r.v[k] *= factor;
    store_pack<N>(x, p, r);
  });
}
template <class T>
__global__ void fill_uniform_kernel(T* x, std::int64_t count, std::uint64_t seed, float bound) {
  grid_stride(count, [&](std::int64_t i) {
    x[i] = from_f32<T>(uniform_symmetric(seed, static_cast<std::uint64_t>(i), bound));
  });
}
template <class From, class To>
__global__ void convert_kernel(const From* src, std::int64_t rows, std::int64_t cols,
                               std::int64_t ld_src, To* dst) {
  grid_stride(rows * cols, [&](std::int64_t i) {
    dst[i] = from_f32<To>(to_f32(src[(i / cols) * ld_src + i % cols]));
  });
}
template <class T>
__global__ void fill_matrix_kernel(T* c, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                   float beta) {
  grid_stride(rows * cols, [&](std::int64_t i) {
    T& value = c[(i / cols) * ld + i % cols];
    value = from_f32<T>(beta == 0.0f ? 0.0f : beta * to_f32(value));
  });
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

template <class T>
cudaError_t launch_add(const T* a, const T* b, T* out, std::int64_t count, cudaStream_t stream) {
  return detail::launch_binary_map("add", a, b, out, detail::AddOp{}, count, stream);
}
template <class T>
cudaError_t launch_accumulate(const T* a, T* out, std::int64_t count, cudaStream_t stream) {
  using namespace detail;
  return launch_elementwise<T>("accumulate", accumulate_kernel<kPackOf<T>, T>,
                               accumulate_kernel<1, T>, count, {a, out}, stream, a, out);
}
template <class T, class B>
cudaError_t launch_add_bias(T* out, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                            const B* bias, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  using namespace detail;
  return launch("add_bias", add_bias_kernel<T, B>, dim3(blocks_for(rows * cols)),
                dim3(kElementwiseThreads), 0, stream, out, rows, cols, ld, bias);
}
inline cudaError_t launch_scale(float* x, std::int64_t count, float factor, cudaStream_t stream) {
  using namespace detail;
  return launch_elementwise<float>("scale", scale_kernel<kPackOf<float>, float>,
                                   scale_kernel<1, float>, count, {x}, stream, x, factor);
}
template <class T>
cudaError_t launch_fill_uniform(T* x, std::int64_t count, std::uint64_t seed, float bound,
                                cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  using namespace detail;
  return launch("fill_uniform", fill_uniform_kernel<T>, dim3(blocks_for(count)),
                dim3(kElementwiseThreads), 0, stream, x, count, seed, bound);
}
template <class From, class To>
cudaError_t launch_convert(const From* src, std::int64_t rows, std::int64_t cols,
                           std::int64_t ld_src, To* dst, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  using namespace detail;
  return launch("convert", convert_kernel<From, To>, dim3(blocks_for(rows * cols)),
                dim3(kElementwiseThreads), 0, stream, src, rows, cols, ld_src, dst);
}
template <class T>
cudaError_t launch_fill_matrix(T* c, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                               float beta, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  using namespace detail;
  return launch("fill_matrix", fill_matrix_kernel<T>, dim3(blocks_for(rows * cols)),
                dim3(kElementwiseThreads), 0, stream, c, rows, cols, ld, beta);
}

}  // namespace kept::cuda
