// kept/backend/cuda/layernorm.cuh: LayerNorm forward and backward on the GPU.
//
// Rows are tokens, columns are features (d = cols). Per row x (the CPU reference,
// kept/backend/cpu/norm.hpp, has the same math and the same argument order):
//   forward:  mu = mean(x), rstd = 1/sqrt(mean((x - mu)^2) + eps), xhat = (x - mu) * rstd,
//             y = xhat * weight + bias          (torch.nn.LayerNorm: biased variance; no bias if
//                                                bias is null)
//   backward, with g = dy * weight:
//             dx      += rstd * (g - mean(g) - xhat * mean(g * xhat))
//             dweight += sum_rows dy * xhat,     dbias += sum_rows dy
// Storage: x, y, dy, dx are T (float or bf16); weight, bias, dweight, dbias and the per-row
// mean/rstd saved by the forward are fp32; all arithmetic is fp32, bf16 results are rounded once
// (to nearest even). The backward recomputes xhat from x and the saved (mean, rstd).
// Every gradient ACCUMULATES (+=), as on the CPU: dx adds into the residual stream's gradient,
// and the parameter gradients accumulate over micro-batches.
//
// Design.
// - One thread block per row. A row (1k-16k features for the models kept converts) is far too
//   long for a warp to hold in registers, and a block can keep the whole row in registers
//   (up to 4 packs of 16 bytes per thread), so x is read from memory exactly once: the mean is
//   a block reduction, then the variance is computed from the registers around the exact mean
//   (two-pass, no E[x^2] - E[x]^2 cancellation), then y is written. Rows longer than the cached
//   capacity use the same code streaming from L1/L2. 16-byte vector loads when cols is a multiple
//   of the pack width (4 floats, 8 bf16) and all pointers are 16-byte aligned, scalar otherwise.
//   Reductions use cub::BlockReduce; block sizes (128..1024) are chosen per row length so that
//   every thread holds about 4 packs.
// - The backward runs a persistent grid (one wave: SMs x resident blocks). Each block strides
//   over rows; since a thread owns the same columns in every row, it accumulates its columns'
//   dweight/dbias contributions in registers across all of the block's rows, and writes them
//   once into an fp32 scratch [blocks, 2, cols]. A second kernel sums the partials over blocks
//   in a fixed order and adds them into dweight/dbias. No floating-point atomics: atomicAdd
//   order varies from run to run, which makes gradients (and so training runs) irreproducible,
//   and thousands of blocks hitting the same cols addresses would also serialise. With a fixed
//   grid the result is bitwise reproducible on a given GPU model. The scratch is at most a few
//   MiB ((SMs x blocks/SM) x 2 x cols floats) and stays in L2.
//
// API: launchers with raw device pointers that return cudaError_t (never throw), and the Cuda
// members defined at the end (validate, throw kept::Error).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kept/backend/cuda/norm_common.cuh"
#include "kept/backend/cuda/runtime.cuh"

namespace kept::cuda {
namespace detail {

template <class T, int kPack, int kBlock, int kItems>
__global__ void __launch_bounds__(kBlock)
    layernorm_forward_kernel(const T* x, const float* __restrict__ weight,
                             const float* __restrict__ bias, T* y, float* mean, float* rstd,
                             std::int64_t rows, int cols, float eps) {
  constexpr int kSlots = kItems > 0 ? kItems : 1;
  const int packs = cols / kPack;
  const float n = static_cast<float>(cols);
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    Pack<T, kPack> cache[kSlots];

    float sum = 0.0f;
    for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
      const Pack<T, kPack> v = load_pack<kPack>(xr, p);
      if constexpr (kItems > 0) cache[k] = v;
#pragma unroll
      for (int j = 0; j < kPack; ++j)
        sum += to_f32(v.v[j]);
    });
    const float row_mean = block_sum<kBlock>(sum) / n;
    // The row again: from registers (cached kernels) or from L1/L2 (streaming kernels).
    const auto x_pack = [&](int k, int p) {
      if constexpr (kItems > 0) {
        return cache[k];
      } else {
        (void)k;
        return load_pack<kPack>(xr, p);
      }
    };

    float squares = 0.0f;
    for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
      const Pack<T, kPack> v = x_pack(k, p);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float centred = to_f32(v.v[j]) - row_mean;
        squares += centred * centred;
      }
    });
    const float row_rstd = 1.0f / sqrtf(block_sum<kBlock>(squares) / n + eps);

    for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
      const Pack<T, kPack> v = x_pack(k, p);
      const Pack<float, kPack> w = load_pack<kPack>(weight, p);
      Pack<float, kPack> b{};
      if (bias) b = load_pack<kPack>(bias, p);
      Pack<T, kPack> out;
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float normed = (to_f32(v.v[j]) - row_mean) * row_rstd;
        out.v[j] = from_f32<T>(normed * w.v[j] + b.v[j]);
      }
      store_pack<kPack>(yr, p, out);
    });
    if (threadIdx.x == 0) {
      if (mean) mean[r] = row_mean;
      if (rstd) rstd[r] = row_rstd;
    }
  }
}

// partials: null, or this grid's [gridDim.x, 2, cols] fp32 scratch (dweight, dbias partials).
template <class T, int kPack, int kBlock, int kItems>
__global__ void __launch_bounds__(kBlock)
    layernorm_backward_kernel(const T* dy, const T* x, const float* __restrict__ weight,
                              const float* __restrict__ mean, const float* __restrict__ rstd, T* dx,
                              float* partials, std::int64_t rows, int cols) {
  constexpr int kSlots = kItems > 0 ? kItems : 1;
  const int packs = cols / kPack;
  const float n = static_cast<float>(cols);
  float* part_w = partials ? partials + static_cast<std::int64_t>(blockIdx.x) * 2 * cols : nullptr;
  float* part_b = partials ? part_w + cols : nullptr;

  // Cached kernels: this thread's columns' dweight/dbias sums over the block's rows.
  float acc_w[kSlots][kPack];
  float acc_b[kSlots][kPack];
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
#pragma unroll
    for (int j = 0; j < kPack; ++j)
      acc_w[k][j] = acc_b[k][j] = 0.0f;
  }
  if constexpr (kItems == 0) {
    // Streaming kernels accumulate in the block's scratch row directly (each element is only
    // ever touched by the thread that owns its column, so no synchronisation is needed).
    if (part_w) {
      for_each_pack<kBlock, kItems>(packs, [&](int, int p) {
        store_pack<kPack>(part_w, p, Pack<float, kPack>{});
        store_pack<kPack>(part_b, p, Pack<float, kPack>{});
      });
    }
  }

  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    const float row_mean = mean[r];
    const float row_rstd = rstd[r];
    Pack<T, kPack> x_cache[kSlots];
    Pack<T, kPack> dy_cache[kSlots];

    float sum_g = 0.0f, sum_g_xhat = 0.0f;
    for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
      const Pack<T, kPack> xv = load_pack<kPack>(xr, p);
      const Pack<T, kPack> dyv = load_pack<kPack>(dyr, p);
      if constexpr (kItems > 0) {
        x_cache[k] = xv;
        dy_cache[k] = dyv;
      }
      const Pack<float, kPack> w = load_pack<kPack>(weight, p);
      Pack<float, kPack> dw, db;  // this row's contributions to dweight, dbias
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float xhat = (to_f32(xv.v[j]) - row_mean) * row_rstd;
        const float d = to_f32(dyv.v[j]);
        const float g = d * w.v[j];
        sum_g += g;
        sum_g_xhat += g * xhat;
        dw.v[j] = d * xhat;
        db.v[j] = d;
      }
      if constexpr (kItems > 0) {
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          acc_w[k][j] += dw.v[j];
          acc_b[k][j] += db.v[j];
        }
      } else if (part_w) {
        Pack<float, kPack> pw = load_pack<kPack>(part_w, p);
        Pack<float, kPack> pb = load_pack<kPack>(part_b, p);
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          pw.v[j] += dw.v[j];
          pb.v[j] += db.v[j];
        }
        store_pack<kPack>(part_w, p, pw);
        store_pack<kPack>(part_b, p, pb);
      }
    });
    const float2 sums = block_sum<kBlock>(make_float2(sum_g, sum_g_xhat));
    const float mean_g = sums.x / n;
    const float mean_g_xhat = sums.y / n;

    for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
      Pack<T, kPack> xv, dyv;
      if constexpr (kItems > 0) {
        xv = x_cache[k];
        dyv = dy_cache[k];
      } else {
        (void)k;
        xv = load_pack<kPack>(xr, p);
        dyv = load_pack<kPack>(dyr, p);
      }
      const Pack<float, kPack> w = load_pack<kPack>(weight, p);
      Pack<T, kPack> dxv = load_pack<kPack>(dxr, p);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float xhat = (to_f32(xv.v[j]) - row_mean) * row_rstd;
        const float g = to_f32(dyv.v[j]) * w.v[j];
        dxv.v[j] = from_f32<T>(to_f32(dxv.v[j]) + row_rstd * (g - mean_g - xhat * mean_g_xhat));
      }
      store_pack<kPack>(dxr, p, dxv);
    });
  }

  if constexpr (kItems > 0) {
    if (part_w) {
      for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
        Pack<float, kPack> pw, pb;
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          pw.v[j] = acc_w[k][j];
          pb.v[j] = acc_b[k][j];
        }
        store_pack<kPack>(part_w, p, pw);
        store_pack<kPack>(part_b, p, pb);
      });
    }
  }
}

}  // namespace detail

// y = LayerNorm(x) over rows x cols (row-major, contiguous); mean/rstd (one float per row) may
// be null; bias may be null. T is float or __nv_bfloat16. Queued on `stream`.
template <class T>
cudaError_t layernorm_forward(const T* x, const float* weight, const float* bias, T* y, float* mean,
                              float* rstd, std::int64_t rows, std::int64_t cols, float eps,
                              cudaStream_t stream) {
  static_assert(detail::is_norm_storage_v<T>, "LayerNorm storage must be float or __nv_bfloat16");
  if (rows < 0 || cols < 0 || cols > INT_MAX) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const bool vectorize =
      cols % detail::kVectorWidth<T> == 0 && detail::aligned_16({x, y, weight, bias});
  const auto grid = static_cast<unsigned>(rows < INT_MAX ? rows : INT_MAX);
  const int n = static_cast<int>(cols);
  return detail::dispatch_row_kernel<T, detail::kForwardCachedItems, 1024>(
      n, vectorize, [&]<int kPack, int kBlock, int kItems>() -> cudaError_t {
        detail::layernorm_forward_kernel<T, kPack, kBlock, kItems>
            <<<grid, kBlock, 0, stream>>>(x, weight, bias, y, mean, rstd, rows, n, eps);
        return cudaGetLastError();
      });
}

// dx += dLayerNorm/dx . dy; dweight += sum dy*xhat; dbias += sum dy (either may be null).
// Two-phase scratch protocol (like CUB): with scratch == nullptr, writes the bytes of fp32
// scratch needed into *scratch_bytes (always >= 16) and returns without launching; otherwise
// *scratch_bytes is the size of `scratch` (16-byte aligned) and the kernels are queued. The
// scratch must stay untouched until they finish (stream order). dx must not alias dy or x.
template <class T>
cudaError_t layernorm_backward(float* scratch, std::size_t* scratch_bytes, const T* dy, const T* x,
                               const float* weight, const float* mean, const float* rstd, T* dx,
                               float* dweight, float* dbias, std::int64_t rows, std::int64_t cols,
                               cudaStream_t stream) {
  static_assert(detail::is_norm_storage_v<T>, "LayerNorm storage must be float or __nv_bfloat16");
  if (scratch_bytes == nullptr || rows < 0 || cols < 0 || cols > INT_MAX)
    return cudaErrorInvalidValue;
  if (scratch != nullptr && !detail::aligned_16({scratch})) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) {
    if (scratch == nullptr) *scratch_bytes = detail::scratch_request(0);
    return cudaSuccess;
  }
  const bool params = dweight != nullptr || dbias != nullptr;
  const bool vectorize =
      cols % detail::kVectorWidth<T> == 0 && detail::aligned_16({dy, x, dx, weight});
  const int n = static_cast<int>(cols);
  return detail::dispatch_row_kernel<T, detail::kBackwardCachedItems, 512>(
      n, vectorize, [&]<int kPack, int kBlock, int kItems>() -> cudaError_t {
        const auto kernel = detail::layernorm_backward_kernel<T, kPack, kBlock, kItems>;
        int grid = 0;
        KEPT_CUDA_RETURN_IF_ERROR(detail::persistent_grid(kernel, kBlock, rows, &grid));
        const std::size_t needed =
            detail::scratch_request(params ? static_cast<std::size_t>(grid) * 2 *
                                                 static_cast<std::size_t>(n) * sizeof(float)
                                           : 0);
        if (scratch == nullptr) {
          *scratch_bytes = needed;
          return cudaSuccess;
        }
        if (*scratch_bytes < needed) return cudaErrorInvalidValue;
        kernel<<<grid, kBlock, 0, stream>>>(dy, x, weight, mean, rstd, dx,
                                            params ? scratch : nullptr, rows, n);
        KEPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
        if (!params) return cudaSuccess;
        return detail::launch_column_partials(scratch, grid, 2, n, dweight, dbias, stream);
      });
}

// ---- the Cuda backend members
// ---------------------------------------------------------------------

template <class T>
void Cuda::layernorm_forward(const T* x, const float* weight, const float* bias, T* y, float* mean,
                             float* rstd, std::int64_t rows, std::int64_t cols, float eps) {
  static_assert(detail::is_norm_storage_v<device_element_t<T>>,
                "Cuda::layernorm_forward: T must be float, kept::bf16 or __nv_bfloat16");
  detail::check_norm_shape("layernorm_forward", rows, cols);
  if (rows == 0 || cols == 0) return;
  KEPT_CHECK(x && weight && y, "layernorm_forward: x, weight and y must not be null");
  KEPT_CUDA_CHECK(::kept::cuda::layernorm_forward(device_ptr(x), weight, bias, device_ptr(y), mean,
                                                  rstd, rows, cols, eps, stream()));
}

template <class T>
void Cuda::layernorm_backward(const T* dy, const T* x, const float* weight, const float* mean,
                              const float* rstd, T* dx, float* dweight, float* dbias,
                              std::int64_t rows, std::int64_t cols) {
  static_assert(detail::is_norm_storage_v<device_element_t<T>>,
                "Cuda::layernorm_backward: T must be float, kept::bf16 or __nv_bfloat16");
  detail::check_norm_shape("layernorm_backward", rows, cols);
  if (rows == 0 || cols == 0) return;
  KEPT_CHECK(dy && x && weight && mean && rstd && dx,
             "layernorm_backward: dy, x, weight, mean, rstd and dx must not be null");
  std::size_t bytes = 0;
  KEPT_CUDA_CHECK(::kept::cuda::layernorm_backward<device_element_t<T>>(
      nullptr, &bytes, device_ptr(dy), device_ptr(x), weight, mean, rstd, device_ptr(dx), dweight,
      dbias, rows, cols, stream()));
  float* partials = static_cast<float*>(scratch(bytes));
  KEPT_CUDA_CHECK(::kept::cuda::layernorm_backward(partials, &bytes, device_ptr(dy), device_ptr(x),
                                                   weight, mean, rstd, device_ptr(dx), dweight,
                                                   dbias, rows, cols, stream()));
}

}  // namespace kept::cuda
