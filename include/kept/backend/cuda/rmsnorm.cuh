// kept/backend/cuda/rmsnorm.cuh: RMSNorm forward and backward on the GPU.
//
// Rows are tokens, columns are features (d = cols). Per row x (the CPU reference,
// kept/backend/cpu/norm.hpp, has the same math and the same argument order):
//   forward:  rstd = 1/sqrt(mean(x^2) + eps), xhat = x * rstd, y = xhat * weight
//             (HF LlamaRMSNorm order: normalise in fp32, then scale by the weight)
//   backward, with g = dy * weight:
//             dx      += rstd * (g - xhat * mean(g * xhat))
//             dweight += sum_rows dy * xhat
// Storage: x, y, dy, dx are T (float or bf16); weight, dweight and the per-row rstd saved by
// the forward are fp32; all arithmetic is fp32, bf16 results are rounded once (nearest even).
// Every gradient ACCUMULATES (+=), as on the CPU.
//
// Design: the same as layernorm.cuh (see there for the reasoning): one thread block per row, the
// row held in registers (4 packs of 16 bytes per thread; longer rows stream from L1/L2), 16-byte
// vector loads when alignment allows, cub::BlockReduce for the row sums; the backward runs one
// persistent wave of blocks that keep their columns' dweight partials in registers across rows,
// write them once to an fp32 scratch [blocks, cols], and a second kernel sums the partials over
// blocks in a fixed order: deterministic, no floating-point atomics. RMSNorm needs one row
// reduction in the forward (sum x^2) and one in the backward (sum g * xhat).
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
    rmsnorm_forward_kernel(const T* x, const float* __restrict__ weight, T* y, float* rstd,
                           std::int64_t rows, int cols, float eps) {
  constexpr int kSlots = kItems > 0 ? kItems : 1;
  const int packs = cols / kPack;
  const float n = static_cast<float>(cols);
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    Pack<T, kPack> cache[kSlots];

    float squares = 0.0f;
    for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
      const Pack<T, kPack> v = load_pack<kPack>(xr, p);
      if constexpr (kItems > 0) cache[k] = v;
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float value = to_f32(v.v[j]);
        squares += value * value;
      }
    });
    const float row_rstd = 1.0f / sqrtf(block_sum<kBlock>(squares) / n + eps);

    for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
      Pack<T, kPack> v;
      if constexpr (kItems > 0) {
        v = cache[k];
      } else {
        (void)k;
        v = load_pack<kPack>(xr, p);
      }
      const Pack<float, kPack> w = load_pack<kPack>(weight, p);
      Pack<T, kPack> out;
#pragma unroll
      for (int j = 0; j < kPack; ++j)
        out.v[j] = from_f32<T>((to_f32(v.v[j]) * row_rstd) * w.v[j]);
      store_pack<kPack>(yr, p, out);
    });
    if (threadIdx.x == 0 && rstd) rstd[r] = row_rstd;
  }
}

// partials: null, or this grid's [gridDim.x, cols] fp32 scratch (dweight partials).
template <class T, int kPack, int kBlock, int kItems>
__global__ void __launch_bounds__(kBlock)
    rmsnorm_backward_kernel(const T* dy, const T* x, const float* __restrict__ weight,
                            const float* __restrict__ rstd, T* dx, float* partials,
                            std::int64_t rows, int cols) {
  constexpr int kSlots = kItems > 0 ? kItems : 1;
  const int packs = cols / kPack;
  const float n = static_cast<float>(cols);
  float* part_w = partials ? partials + static_cast<std::int64_t>(blockIdx.x) * cols : nullptr;

  float acc_w[kSlots][kPack];
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
#pragma unroll
    for (int j = 0; j < kPack; ++j)
      acc_w[k][j] = 0.0f;
  }
  if constexpr (kItems == 0) {
    if (part_w) {
      for_each_pack<kBlock, kItems>(
          packs, [&](int, int p) { store_pack<kPack>(part_w, p, Pack<float, kPack>{}); });
    }
  }

  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    const T* dyr = dy + r * cols;
    T* dxr = dx + r * cols;
    const float row_rstd = rstd[r];
    Pack<T, kPack> x_cache[kSlots];
    Pack<T, kPack> dy_cache[kSlots];

    float sum_g_xhat = 0.0f;
    for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
      const Pack<T, kPack> xv = load_pack<kPack>(xr, p);
      const Pack<T, kPack> dyv = load_pack<kPack>(dyr, p);
      if constexpr (kItems > 0) {
        x_cache[k] = xv;
        dy_cache[k] = dyv;
      }
      const Pack<float, kPack> w = load_pack<kPack>(weight, p);
      Pack<float, kPack> dw;
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        const float xhat = to_f32(xv.v[j]) * row_rstd;
        const float d = to_f32(dyv.v[j]);
        sum_g_xhat += (d * w.v[j]) * xhat;
        dw.v[j] = d * xhat;
      }
      if constexpr (kItems > 0) {
#pragma unroll
        for (int j = 0; j < kPack; ++j)
          acc_w[k][j] += dw.v[j];
      } else if (part_w) {
        Pack<float, kPack> pw = load_pack<kPack>(part_w, p);
#pragma unroll
        for (int j = 0; j < kPack; ++j)
          pw.v[j] += dw.v[j];
        store_pack<kPack>(part_w, p, pw);
      }
    });
    const float mean_g_xhat = block_sum<kBlock>(sum_g_xhat) / n;

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
        const float xhat = to_f32(xv.v[j]) * row_rstd;
        const float g = to_f32(dyv.v[j]) * w.v[j];
        dxv.v[j] = from_f32<T>(to_f32(dxv.v[j]) + row_rstd * (g - xhat * mean_g_xhat));
      }
      store_pack<kPack>(dxr, p, dxv);
    });
  }

  if constexpr (kItems > 0) {
    if (part_w) {
      for_each_pack<kBlock, kItems>(packs, [&](int k, int p) {
        Pack<float, kPack> pw;
#pragma unroll
        for (int j = 0; j < kPack; ++j)
          pw.v[j] = acc_w[k][j];
        store_pack<kPack>(part_w, p, pw);
      });
    }
  }
}

}  // namespace detail

// y = RMSNorm(x) over rows x cols (row-major, contiguous); rstd (one float per row) may be null.
// T is float or __nv_bfloat16. Queued on `stream`.
template <class T>
cudaError_t rmsnorm_forward(const T* x, const float* weight, T* y, float* rstd, std::int64_t rows,
                            std::int64_t cols, float eps, cudaStream_t stream) {
  static_assert(detail::is_norm_storage_v<T>, "RMSNorm storage must be float or __nv_bfloat16");
  if (rows < 0 || cols < 0 || cols > INT_MAX) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) return cudaSuccess;
  const bool vectorize = cols % detail::kVectorWidth<T> == 0 && detail::aligned_16({x, y, weight});
  const auto grid = static_cast<unsigned>(rows < INT_MAX ? rows : INT_MAX);
  const int n = static_cast<int>(cols);
  return detail::dispatch_row_kernel<T, detail::kForwardCachedItems, 1024>(
      n, vectorize, [&]<int kPack, int kBlock, int kItems>() -> cudaError_t {
        detail::rmsnorm_forward_kernel<T, kPack, kBlock, kItems>
            <<<grid, kBlock, 0, stream>>>(x, weight, y, rstd, rows, n, eps);
        return cudaGetLastError();
      });
}

// dx += dRMSNorm/dx . dy; dweight += sum dy*xhat (dweight may be null). Same two-phase scratch
// protocol as layernorm_backward: scratch == nullptr queries *scratch_bytes (>= 16).
template <class T>
cudaError_t rmsnorm_backward(float* scratch, std::size_t* scratch_bytes, const T* dy, const T* x,
                             const float* weight, const float* rstd, T* dx, float* dweight,
                             std::int64_t rows, std::int64_t cols, cudaStream_t stream) {
  static_assert(detail::is_norm_storage_v<T>, "RMSNorm storage must be float or __nv_bfloat16");
  if (scratch_bytes == nullptr || rows < 0 || cols < 0 || cols > INT_MAX)
    return cudaErrorInvalidValue;
  if (scratch != nullptr && !detail::aligned_16({scratch})) return cudaErrorInvalidValue;
  if (rows == 0 || cols == 0) {
    if (scratch == nullptr) *scratch_bytes = detail::scratch_request(0);
    return cudaSuccess;
  }
  const bool params = dweight != nullptr;
  const bool vectorize =
      cols % detail::kVectorWidth<T> == 0 && detail::aligned_16({dy, x, dx, weight});
  const int n = static_cast<int>(cols);
  return detail::dispatch_row_kernel<T, detail::kBackwardCachedItems, 512>(
      n, vectorize, [&]<int kPack, int kBlock, int kItems>() -> cudaError_t {
        const auto kernel = detail::rmsnorm_backward_kernel<T, kPack, kBlock, kItems>;
        int grid = 0;
        KEPT_CUDA_RETURN_IF_ERROR(detail::persistent_grid(kernel, kBlock, rows, &grid));
        const std::size_t needed = detail::scratch_request(
            params ? static_cast<std::size_t>(grid) * static_cast<std::size_t>(n) * sizeof(float)
                   : 0);
        if (scratch == nullptr) {
          *scratch_bytes = needed;
          return cudaSuccess;
        }
        if (*scratch_bytes < needed) return cudaErrorInvalidValue;
        kernel<<<grid, kBlock, 0, stream>>>(dy, x, weight, rstd, dx, params ? scratch : nullptr,
                                            rows, n);
        KEPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
        if (!params) return cudaSuccess;
        return detail::launch_column_partials(scratch, grid, 1, n, dweight, nullptr, stream);
      });
}

// ---- the Cuda backend members
// ---------------------------------------------------------------------

template <class T>
void Cuda::rmsnorm_forward(const T* x, const float* weight, T* y, float* rstd, std::int64_t rows,
                           std::int64_t cols, float eps) {
  static_assert(detail::is_norm_storage_v<device_element_t<T>>,
                "Cuda::rmsnorm_forward: T must be float, kept::bf16 or __nv_bfloat16");
  detail::check_norm_shape("rmsnorm_forward", rows, cols);
  if (rows == 0 || cols == 0) return;
  KEPT_CHECK(x && weight && y, "rmsnorm_forward: x, weight and y must not be null");
  KEPT_CUDA_CHECK(::kept::cuda::rmsnorm_forward(device_ptr(x), weight, device_ptr(y), rstd, rows,
                                                cols, eps, stream()));
}

template <class T>
void Cuda::rmsnorm_backward(const T* dy, const T* x, const float* weight, const float* rstd, T* dx,
                            float* dweight, std::int64_t rows, std::int64_t cols) {
  static_assert(detail::is_norm_storage_v<device_element_t<T>>,
                "Cuda::rmsnorm_backward: T must be float, kept::bf16 or __nv_bfloat16");
  detail::check_norm_shape("rmsnorm_backward", rows, cols);
  if (rows == 0 || cols == 0) return;
  KEPT_CHECK(dy && x && weight && rstd && dx,
             "rmsnorm_backward: dy, x, weight, rstd and dx must not be null");
  std::size_t bytes = 0;
  KEPT_CUDA_CHECK(::kept::cuda::rmsnorm_backward<device_element_t<T>>(
      nullptr, &bytes, device_ptr(dy), device_ptr(x), weight, rstd, device_ptr(dx), dweight, rows,
      cols, stream()));
  float* partials = static_cast<float*>(scratch(bytes));
  KEPT_CUDA_CHECK(::kept::cuda::rmsnorm_backward(partials, &bytes, device_ptr(dy), device_ptr(x),
                                                 weight, rstd, device_ptr(dx), dweight, rows, cols,
                                                 stream()));
}

}  // namespace kept::cuda
