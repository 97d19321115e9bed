// kept/backend/cuda/norm.cuh: LayerNorm and RMSNorm, forward and backward, on CUDA.
//
// Math (as kept/backend/cpu/norm.hpp, d = cols, per row x):
//   LayerNorm: mu = mean(x), rstd = 1/sqrt(mean((x - mu)^2) + eps), xhat = (x - mu) rstd,
//              y = xhat w + b
//   RMSNorm:   rstd = 1/sqrt(mean(x^2) + eps), xhat = x rstd, y = xhat w
//   backward, g = dy w:  dx += rstd (g - mean(g) - xhat mean(g xhat))   (RMSNorm: no mean(g))
//                        dw += sum_rows dy xhat,  db += sum_rows dy
//
// Design: one block of kNormThreads per row, thread t owning column packs t, t + kNormThreads,
// ... (16-byte packs of 8 bf16 when the row allows, single columns otherwise);
// fp32 math from bf16 (or fp32) storage, row sums through block_sum (a fixed butterfly: the same
// bits on a GPU and in the emulator), the variance from the centred values (two passes over a
// row, the second from L1/L2). The backward runs a fixed grid of `parts` blocks, block b taking
// rows b, b + parts, ...; each keeps its weight/bias-gradient partials in its own row of a
// scratch array (only its own threads touch it), and a deterministic column sum adds the
// partials into dw/db in a fixed order. No atomics: a run and its rerun agree bit for bit.
#pragma once

#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"

namespace kept::cuda::detail {

inline constexpr int kNormThreads = 128;

// Columns move in packs of N (16-byte accesses when N > 1: cols a multiple of N, rows and
// parameters 16-byte aligned); thread t owns packs t, t + kNormThreads, ...
template <bool kLayerNorm, int N, class T, class W>
__global__ void norm_forward_kernel(const T* x, const W* weight, const W* bias, T* y, float* mean,
                                    float* rstd, std::int64_t cols, float eps) {
  const std::int64_t row = blockIdx.x, packs = cols / N;
  const T* xr = x + row * cols;
  T* yr = y + row * cols;
  const float inv_cols = 1.0f / static_cast<float>(cols);
  float mu = 0.0f;
  if constexpr (kLayerNorm) {
    float sum = 0.0f;
    for (std::int64_t p = threadIdx.x; p < packs; p += kNormThreads) {
      const Pack<T, N> xv = load_pack<N>(xr, p);
      for (int k = 0; k < N; ++k)
        sum += to_f32(xv.v[k]);
    }
    mu = block_sum<kNormThreads>(sum) * inv_cols;
  }
  float squares = 0.0f;
  for (std::int64_t p = threadIdx.x; p < packs; p += kNormThreads) {
    const Pack<T, N> xv = load_pack<N>(xr, p);
    for (int k = 0; k < N; ++k) {
      const float centred = to_f32(xv.v[k]) - mu;
      squares += centred * centred;
    }
  }
  const float r = 1.0f / sqrtf(block_sum<kNormThreads>(squares) * inv_cols + eps);
  for (std::int64_t p = threadIdx.x; p < packs; p += kNormThreads) {
    const Pack<T, N> xv = load_pack<N>(xr, p);
    const Pack<W, N> wv = load_pack<N>(weight, p);
    Pack<T, N> out;
    for (int k = 0; k < N; ++k) {
      float value = (to_f32(xv.v[k]) - mu) * r * to_f32(wv.v[k]);
      if (kLayerNorm && bias) value += to_f32(bias[p * N + k]);
      out.v[k] = from_f32<T>(value);
    }
    store_pack<N>(yr, p, out);
  }
  if (threadIdx.x == 0) {
    if (kLayerNorm && mean) mean[row] = mu;
    if (rstd) rstd[row] = r;
  }
}

// partials: [2 * parts, cols] fp32 (dw rows, then db rows); null when no parameter gradient.
template <bool kLayerNorm, int N, class T, class W>
__global__ void norm_backward_kernel(const T* dy, const T* x, const W* weight, const float* mean,
                                     const float* rstd, T* dx, float* partials, std::int64_t rows,
                                     std::int64_t cols) {
  const std::int64_t parts = gridDim.x, packs = cols / N;
  float* dw_part = partials ? partials + blockIdx.x * cols : nullptr;
  float* db_part = partials ? partials + (parts + blockIdx.x) * cols : nullptr;
  if (partials)
    for (std::int64_t c = threadIdx.x; c < cols; c += kNormThreads) {
      dw_part[c] = 0.0f;
      db_part[c] = 0.0f;
    }
  // Thread t owns the same columns in the zeroing above and the loops below (packs t, t + 128,
  // ... cover columns N p .. N p + N - 1): with N > 1 those are not the columns t, t + 128, ...
  // it zeroed, so the block meets at a barrier first.
  __syncthreads();
  const float inv_cols = 1.0f / static_cast<float>(cols);
  for (std::int64_t row = blockIdx.x; row < rows; row += parts) {
    const T* dyr = dy + row * cols;
    const T* xr = x + row * cols;
    T* dxr = dx + row * cols;
    const float mu = kLayerNorm ? mean[row] : 0.0f, r = rstd[row];
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (std::int64_t p = threadIdx.x; p < packs; p += kNormThreads) {
      const Pack<T, N> dv = load_pack<N>(dyr, p), xv = load_pack<N>(xr, p);
      const Pack<W, N> wv = load_pack<N>(weight, p);
      for (int k = 0; k < N; ++k) {
        const float d = to_f32(dv.v[k]), xhat = (to_f32(xv.v[k]) - mu) * r;
        const float g = d * to_f32(wv.v[k]);
        sum_g += g;
        sum_gx += g * xhat;
        if (partials) {
          dw_part[p * N + k] += d * xhat;
          db_part[p * N + k] += d;
        }
      }
    }
    const float mean_g = kLayerNorm ? block_sum<kNormThreads>(sum_g) * inv_cols : 0.0f;
    const float mean_gx = block_sum<kNormThreads>(sum_gx) * inv_cols;
    for (std::int64_t p = threadIdx.x; p < packs; p += kNormThreads) {
      const Pack<T, N> dv = load_pack<N>(dyr, p), xv = load_pack<N>(xr, p);
      const Pack<W, N> wv = load_pack<N>(weight, p);
      Pack<T, N> out = load_pack<N>(dxr, p);
      for (int k = 0; k < N; ++k) {
        const float xhat = (to_f32(xv.v[k]) - mu) * r;
        const float g = to_f32(dv.v[k]) * to_f32(wv.v[k]);
        out.v[k] = from_f32<T>(to_f32(out.v[k]) + r * (g - mean_g - xhat * mean_gx));
      }
      store_pack<N>(dxr, p, out);
    }
  }
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

template <bool kLayerNorm, class T, class W>
cudaError_t launch_norm_forward(const T* x, const W* weight, const W* bias, T* y, float* mean,
                                float* rstd, std::int64_t rows, std::int64_t cols, float eps,
                                cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > INT_MAX) return cudaErrorInvalidValue;
  using namespace detail;
  const char* name = kLayerNorm ? "layernorm_forward" : "rmsnorm_forward";
  constexpr int N = kPackOf<T>;
  if (packable(cols, N, {x, weight, y}))
    return launch(name, norm_forward_kernel<kLayerNorm, N, T, W>, dim3(static_cast<unsigned>(rows)),
                  dim3(kNormThreads), 0, stream, x, weight, bias, y, mean, rstd, cols, eps);
  return launch(name, norm_forward_kernel<kLayerNorm, 1, T, W>, dim3(static_cast<unsigned>(rows)),
                dim3(kNormThreads), 0, stream, x, weight, bias, y, mean, rstd, cols, eps);
}

// Blocks of the backward grid; the scratch it needs is 2 * parts * cols floats.
inline int norm_backward_parts(std::int64_t rows, int sm_count) {
  const std::int64_t wave = static_cast<std::int64_t>(sm_count) * 4;
  return static_cast<int>(std::clamp<std::int64_t>(rows, 1, wave));
}

// dw/db may be null (then `partials` may be too); otherwise partials holds 2 * parts * cols
// floats of scratch.
template <bool kLayerNorm, class T, class W>
cudaError_t launch_norm_backward(const T* dy, const T* x, const W* weight, const float* mean,
                                 const float* rstd, T* dx, float* dw, float* db, float* partials,
                                 int parts, std::int64_t rows, std::int64_t cols,
                                 cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  using namespace detail;
  float* scratch = dw != nullptr || db != nullptr ? partials : static_cast<float*>(nullptr);
  const char* name = kLayerNorm ? "layernorm_backward" : "rmsnorm_backward";
  constexpr int N = kPackOf<T>;
  const auto kernel = packable(cols, N, {dy, x, weight, dx})
                          ? norm_backward_kernel<kLayerNorm, N, T, W>
                          : norm_backward_kernel<kLayerNorm, 1, T, W>;
  KEPT_CUDA_RETURN_IF_ERROR(launch(name, kernel, dim3(static_cast<unsigned>(parts)),
                                   dim3(kNormThreads), 0, stream, dy, x, weight, mean, rstd, dx,
                                   scratch, rows, cols));
  if (dw)
    KEPT_CUDA_RETURN_IF_ERROR(
        detail::launch_column_sum<float>(partials, parts, cols, cols, dw, stream));
  if (db)
    KEPT_CUDA_RETURN_IF_ERROR(
        detail::launch_column_sum<float>(partials + parts * cols, parts, cols, cols, db, stream));
  return cudaSuccess;
}

}  // namespace kept::cuda
