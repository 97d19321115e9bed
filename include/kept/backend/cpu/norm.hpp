// kept/backend/cpu/norm.hpp: LayerNorm and RMSNorm, forward and backward, the CPU reference.
//
// Rows are tokens, columns are features (d = cols). Per row x:
//   LayerNorm: mu = mean(x), rstd = 1/sqrt(mean((x - mu)^2) + eps), xhat = (x - mu) * rstd,
//              y = xhat * weight + bias                      (torch.nn.LayerNorm, biased var)
//   RMSNorm:   rstd = 1/sqrt(mean(x^2) + eps), xhat = x * rstd, y = xhat * weight
//              (HF LlamaRMSNorm order: normalise in fp32, then scale by the weight)
// Backward, with g = dy * weight:
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat))
//   dweight = sum_rows dy * xhat, dbias = sum_rows dy.
//
// The kernels are templates over the scalar type: float is the backend's compute type, double
// gives the float64 reference used by gradient checks and numerics reports.
//
// Design: forward saves (mean, rstd) per row, two floats a token, so backward recomputes xhat
// instead of storing it. Every output gradient *accumulates* (dx +=, dweight +=, dbias +=): dx
// adds into the residual stream's gradient, and parameter gradients accumulate over
// micro-batches. Parameter gradients are reduced per thread then summed in a fixed order, so
// results are deterministic for a given thread count.
//
// Speed: the ops are memory-bound (forward: read x, write y; backward: read dy, x, dx, write
// dx), so each row is read from memory once: the later passes over a row (centred squares,
// output; the dx pass of the backward) find it in L1/L2 (a 5120-float row is 20 KiB). Row
// reductions sum blocks of kReductionBlock (256) columns in vector lanes of the element type and
// add each block's sum to a double (vector_math.hpp); the fp32 kernels also have AVX2 and
// AVX-512 instantiations picked at run time, which the backward needs to keep up with the
// memory on two cores. The earlier per-element double accumulation was scalar and several times
// slower than the memory; the error against float64 stays at the old level (bench/RESULTS.md).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kept/backend/cpu/parallel.hpp"
#include "kept/backend/cpu/vector_math.hpp"

namespace kept::cpu {

namespace detail {
// Per-thread partial sums for the parameter gradients, merged in thread order (deterministic).
template <class T>
struct ColumnPartials {
  ColumnPartials(int threads, std::int64_t cols, int arrays)
      : cols(cols),
        arrays(arrays),
        values(static_cast<std::size_t>(threads * arrays * cols), T(0)) {}
  T* slot(int thread, int array) {
    return values.data() + (static_cast<std::int64_t>(thread) * arrays + array) * cols;
  }
  void add_into(int threads, int array, T* destination) {
    for (int thread = 0; thread < threads; ++thread) {
      const T* partial = slot(thread, array);
      for (std::int64_t c = 0; c < cols; ++c)
        destination[c] += partial[c];
    }
  }
  std::int64_t cols;
  int arrays;
  std::vector<T> values;
};

// sum_c (x[c] - shift)^2
template <class T>
KEPT_ALWAYS_INLINE double row_centred_squares(const T* __restrict x, T shift, std::int64_t cols) {
  double total = 0;
  for (std::int64_t block = 0; block < cols; block += kReductionBlock) {
    const std::int64_t block_end = std::min(cols, block + kReductionBlock);
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (std::int64_t c = block; c < block_end; ++c) {
      const T centred = x[c] - shift;
      sum += centred * centred;
    }
    total += static_cast<double>(sum);
  }
  return total;
}
template <class T>
KEPT_ALWAYS_INLINE double row_sum(const T* __restrict x, std::int64_t cols) {
  double total = 0;
  for (std::int64_t block = 0; block < cols; block += kReductionBlock) {
    const std::int64_t block_end = std::min(cols, block + kReductionBlock);
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (std::int64_t c = block; c < block_end; ++c)
      sum += x[c];
    total += static_cast<double>(sum);
  }
  return total;
}

// ---- row-range kernels (force-inlined into the baseline, AVX2 and AVX-512 entry points) ----
//
// Row pipelining: a row's last pass (the output y, or dx) runs in the same loop as the first
// pass of the next row (its sum, or its backward sums and parameter partials), so the memory
// streams of two rows are in flight together. One core keeps only so many misses in flight;
// with the passes one after the other the backward ran at ~16 GB/s a core, pipelined ~21.
// The arithmetic is that of the passes done one after the other, in the same order.

// y = (x - mean) * rstd * w (+ b) for one row, fused (when `next` is not null) with the
// blocked sum of the next row, `f(next[c])` summed: f = identity (LayerNorm) or square
// (RMSNorm, which has no mean: row_mean = 0 and no bias).
template <class T, bool kBias, bool kSquare>
KEPT_ALWAYS_INLINE double norm_output_row(const T* __restrict xr, const T* __restrict w,
                                          const T* __restrict b, T row_mean, T row_rstd,
                                          T* __restrict yr, const T* __restrict next,
                                          std::int64_t cols) {
  double next_total = 0;
  if (next) {
    for (std::int64_t block = 0; block < cols; block += kReductionBlock) {
      const std::int64_t block_end = std::min(cols, block + kReductionBlock);
      T sum = T(0);
#pragma omp simd reduction(+ : sum)
      for (std::int64_t c = block; c < block_end; ++c) {
        if constexpr (kSquare)
          yr[c] = (xr[c] * row_rstd) * w[c];
        else if constexpr (kBias)
          yr[c] = (xr[c] - row_mean) * row_rstd * w[c] + b[c];
        else
          yr[c] = (xr[c] - row_mean) * row_rstd * w[c];
        if constexpr (kSquare)
          sum += next[c] * next[c];
        else
          sum += next[c];
      }
      next_total += static_cast<double>(sum);
    }
  } else {
    KEPT_PRAGMA_SIMD
    for (std::int64_t c = 0; c < cols; ++c) {
      if constexpr (kSquare)
        yr[c] = (xr[c] * row_rstd) * w[c];
      else if constexpr (kBias)
        yr[c] = (xr[c] - row_mean) * row_rstd * w[c] + b[c];
      else
        yr[c] = (xr[c] - row_mean) * row_rstd * w[c];
    }
  }
  return next_total;
}

// LayerNorm forward, three rows in one loop: the output of row r, the centred squares of
// row r + 1 (already in L1/L2, its mean known) and the sum of row r + 2 (from memory). A
// separate squares pass would leave the memory idle while it runs.
template <class T, bool kBias>
KEPT_ALWAYS_INLINE void layernorm_stage_row(const T* __restrict xr, const T* __restrict w,
                                            const T* __restrict b, T row_mean, T row_rstd,
                                            T* __restrict yr, const T* __restrict second,
                                            T second_mean, const T* __restrict third,
                                            double& second_squares, double& third_sum,
                                            std::int64_t cols) {
  second_squares = third_sum = 0;
  auto out = [&](std::int64_t c) KEPT_LAMBDA_INLINE {
    if constexpr (kBias)
      yr[c] = (xr[c] - row_mean) * row_rstd * w[c] + b[c];
    else
      yr[c] = (xr[c] - row_mean) * row_rstd * w[c];
  };
  for (std::int64_t block = 0; block < cols; block += kReductionBlock) {
    const std::int64_t block_end = std::min(cols, block + kReductionBlock);
    T squares = T(0), sum = T(0);
    if (third) {
#pragma omp simd reduction(+ : squares, sum)
      for (std::int64_t c = block; c < block_end; ++c) {
        out(c);
        const T centred = second[c] - second_mean;
        squares += centred * centred;
        sum += third[c];
      }
    } else if (second) {
#pragma omp simd reduction(+ : squares)
      for (std::int64_t c = block; c < block_end; ++c) {
        out(c);
        const T centred = second[c] - second_mean;
        squares += centred * centred;
      }
    } else {
      KEPT_PRAGMA_SIMD
      for (std::int64_t c = block; c < block_end; ++c)
        out(c);
    }
    second_squares += static_cast<double>(squares);
    third_sum += static_cast<double>(sum);
  }
}

template <class T, bool kBias>
KEPT_ALWAYS_INLINE void layernorm_forward_rows_impl(const T* x, const T* weight, const T* bias,
                                                    T* y, T* mean, T* rstd, std::int64_t begin,
                                                    std::int64_t end, std::int64_t cols, T eps) {
  if (begin >= end) return;
  const double n = static_cast<double>(cols);
  // Prologue: the sum of the first row, then its squares fused with the sum of the second.
  T row_mean = static_cast<T>(row_sum(x + begin * cols, cols) / n);
  double squares = 0, next_sum = 0;
  if (begin + 1 < end) {
    const T* first = x + begin * cols;
    const T* second = first + cols;
    for (std::int64_t block = 0; block < cols; block += kReductionBlock) {
      const std::int64_t block_end = std::min(cols, block + kReductionBlock);
      T sq = T(0), sum = T(0);
#pragma omp simd reduction(+ : sq, sum)
      for (std::int64_t c = block; c < block_end; ++c) {
        const T centred = first[c] - row_mean;
        sq += centred * centred;
        sum += second[c];
      }
      squares += static_cast<double>(sq);
      next_sum += static_cast<double>(sum);
    }
  } else {
    squares = row_centred_squares(x + begin * cols, row_mean, cols);
  }
  for (std::int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * cols;
    const T row_rstd = static_cast<T>(1.0 / std::sqrt(squares / n + eps));
    const T next_mean = static_cast<T>(next_sum / n);
    layernorm_stage_row<T, kBias>(xr, weight, bias, row_mean, row_rstd, y + r * cols,
                                  r + 1 < end ? xr + cols : nullptr, next_mean,
                                  r + 2 < end ? xr + 2 * cols : nullptr, squares, next_sum, cols);
    if (mean) mean[r] = row_mean;
    if (rstd) rstd[r] = row_rstd;
    row_mean = next_mean;
  }
}

template <class T>
KEPT_ALWAYS_INLINE void layernorm_forward_rows(const T* x, const T* weight, const T* bias, T* y,
                                               T* mean, T* rstd, std::int64_t begin,
                                               std::int64_t end, std::int64_t cols, T eps) {
  if (bias)
    layernorm_forward_rows_impl<T, true>(x, weight, bias, y, mean, rstd, begin, end, cols, eps);
  else
    layernorm_forward_rows_impl<T, false>(x, weight, bias, y, mean, rstd, begin, end, cols, eps);
}

template <class T>
KEPT_ALWAYS_INLINE void rmsnorm_forward_rows(const T* x, const T* weight, T* y, T* rstd,
                                             std::int64_t begin, std::int64_t end,
                                             std::int64_t cols, T eps) {
  if (begin >= end) return;
  double squares = row_centred_squares(x + begin * cols, T(0), cols);
  for (std::int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * cols;
    const T row_rstd = static_cast<T>(1.0 / std::sqrt(squares / static_cast<double>(cols) + eps));
    squares = norm_output_row<T, false, true>(xr, weight, nullptr, T(0), row_rstd, y + r * cols,
                                              r + 1 < end ? xr + cols : nullptr, cols);
    if (rstd) rstd[r] = row_rstd;
  }
}

// Backward pass 1 of one row: the row sums sum(g) (LayerNorm only) and sum(g * xhat), with
// g = dy * w, and the parameter partials dw += dy * xhat, db += dy (LayerNorm only); fused
// (when `dx_row` is not null) with pass 2 of the previous row:
// dx += prev_rstd * (g - prev_mean_g - xhat * prev_mean_g_xhat) from that row's dy and x.
template <class T, bool kLayerNorm>
KEPT_ALWAYS_INLINE void norm_backward_row(const T* __restrict dyr, const T* __restrict xr,
                                          T row_mean, T row_rstd, const T* __restrict w,
                                          T* __restrict dw, T* __restrict db, double& total_g,
                                          double& total_g_xhat, T* __restrict dx_prev,
                                          const T* __restrict dy_prev, const T* __restrict x_prev,
                                          T prev_mean, T prev_rstd, T prev_mean_g,
                                          T prev_mean_g_xhat, std::int64_t cols) {
  total_g = total_g_xhat = 0;
  for (std::int64_t block = 0; block < cols; block += kReductionBlock) {
    const std::int64_t block_end = std::min(cols, block + kReductionBlock);
    T sum_g = T(0), sum_g_xhat = T(0);
    if (dx_prev) {
#pragma omp simd reduction(+ : sum_g, sum_g_xhat)
      for (std::int64_t c = block; c < block_end; ++c) {
        const T xhat_p = kLayerNorm ? (x_prev[c] - prev_mean) * prev_rstd : x_prev[c] * prev_rstd;
        const T g_p = dy_prev[c] * w[c];
        if constexpr (kLayerNorm)
          dx_prev[c] += prev_rstd * (g_p - prev_mean_g - xhat_p * prev_mean_g_xhat);
        else
          dx_prev[c] += prev_rstd * (g_p - xhat_p * prev_mean_g_xhat);
        const T xhat = kLayerNorm ? (xr[c] - row_mean) * row_rstd : xr[c] * row_rstd;
        const T g = dyr[c] * w[c];
        if constexpr (kLayerNorm) sum_g += g;
        sum_g_xhat += g * xhat;
        dw[c] += dyr[c] * xhat;
        if constexpr (kLayerNorm) db[c] += dyr[c];
      }
    } else {
#pragma omp simd reduction(+ : sum_g, sum_g_xhat)
      for (std::int64_t c = block; c < block_end; ++c) {
        const T xhat = kLayerNorm ? (xr[c] - row_mean) * row_rstd : xr[c] * row_rstd;
        const T g = dyr[c] * w[c];
        if constexpr (kLayerNorm) sum_g += g;
        sum_g_xhat += g * xhat;
        dw[c] += dyr[c] * xhat;
        if constexpr (kLayerNorm) db[c] += dyr[c];
      }
    }
    total_g += static_cast<double>(sum_g);
    total_g_xhat += static_cast<double>(sum_g_xhat);
  }
}

// Pass 2 of the last row (nothing to fuse it with).
template <class T, bool kLayerNorm>
KEPT_ALWAYS_INLINE void norm_backward_dx_row(T* __restrict dxr, const T* __restrict dyr,
                                             const T* __restrict xr, const T* __restrict w,
                                             T row_mean, T row_rstd, T mean_g, T mean_g_xhat,
                                             std::int64_t cols) {
  KEPT_PRAGMA_SIMD
  for (std::int64_t c = 0; c < cols; ++c) {
    const T xhat = kLayerNorm ? (xr[c] - row_mean) * row_rstd : xr[c] * row_rstd;
    const T g = dyr[c] * w[c];
    if constexpr (kLayerNorm)
      dxr[c] += row_rstd * (g - mean_g - xhat * mean_g_xhat);
    else
      dxr[c] += row_rstd * (g - xhat * mean_g_xhat);
  }
}

template <class T, bool kLayerNorm>
KEPT_ALWAYS_INLINE void norm_backward_rows(const T* dy, const T* x, const T* weight, const T* mean,
                                           const T* rstd, T* dx, T* dweight_partial,
                                           T* dbias_partial, std::int64_t begin, std::int64_t end,
                                           std::int64_t cols) {
  if (begin >= end) return;
  auto row_mean = [&](std::int64_t r) { return kLayerNorm ? mean[r] : T(0); };
  double total_g = 0, total_g_xhat = 0;
  norm_backward_row<T, kLayerNorm>(dy + begin * cols, x + begin * cols, row_mean(begin),
                                   rstd[begin], weight, dweight_partial, dbias_partial, total_g,
                                   total_g_xhat, nullptr, nullptr, nullptr, T(0), T(0), T(0), T(0),
                                   cols);
  for (std::int64_t r = begin; r < end; ++r) {
    const T mean_g = static_cast<T>(total_g / static_cast<double>(cols));
    const T mean_g_xhat = static_cast<T>(total_g_xhat / static_cast<double>(cols));
    if (r + 1 < end) {
      norm_backward_row<T, kLayerNorm>(dy + (r + 1) * cols, x + (r + 1) * cols, row_mean(r + 1),
                                       rstd[r + 1], weight, dweight_partial, dbias_partial, total_g,
                                       total_g_xhat, dx + r * cols, dy + r * cols, x + r * cols,
                                       row_mean(r), rstd[r], mean_g, mean_g_xhat, cols);
    } else {
      norm_backward_dx_row<T, kLayerNorm>(dx + r * cols, dy + r * cols, x + r * cols, weight,
                                          row_mean(r), rstd[r], mean_g, mean_g_xhat, cols);
    }
  }
}

template <class T>
KEPT_ALWAYS_INLINE void layernorm_backward_rows(const T* dy, const T* x, const T* weight,
                                                const T* mean, const T* rstd, T* dx,
                                                T* dweight_partial, T* dbias_partial,
                                                std::int64_t begin, std::int64_t end,
                                                std::int64_t cols) {
  norm_backward_rows<T, true>(dy, x, weight, mean, rstd, dx, dweight_partial, dbias_partial, begin,
                              end, cols);
}

template <class T>
KEPT_ALWAYS_INLINE void rmsnorm_backward_rows(const T* dy, const T* x, const T* weight,
                                              const T* rstd, T* dx, T* dweight_partial,
                                              std::int64_t begin, std::int64_t end,
                                              std::int64_t cols) {
  norm_backward_rows<T, false>(dy, x, weight, nullptr, rstd, dx, dweight_partial, nullptr, begin,
                               end, cols);
}

KEPT_CPU_ENTRY_POINTS(layernorm_forward_rows, layernorm_forward_rows<float>,
                      (const float* x, const float* weight, const float* bias, float* y,
                       float* mean, float* rstd, std::int64_t begin, std::int64_t end,
                       std::int64_t cols, float eps),
                      (x, weight, bias, y, mean, rstd, begin, end, cols, eps))
KEPT_CPU_ENTRY_POINTS(layernorm_backward_rows, layernorm_backward_rows<float>,
                      (const float* dy, const float* x, const float* weight, const float* mean,
                       const float* rstd, float* dx, float* dweight_partial, float* dbias_partial,
                       std::int64_t begin, std::int64_t end, std::int64_t cols),
                      (dy, x, weight, mean, rstd, dx, dweight_partial, dbias_partial, begin, end,
                       cols))
KEPT_CPU_ENTRY_POINTS(rmsnorm_forward_rows, rmsnorm_forward_rows<float>,
                      (const float* x, const float* weight, float* y, float* rstd,
                       std::int64_t begin, std::int64_t end, std::int64_t cols, float eps),
                      (x, weight, y, rstd, begin, end, cols, eps))
KEPT_CPU_ENTRY_POINTS(rmsnorm_backward_rows, rmsnorm_backward_rows<float>,
                      (const float* dy, const float* x, const float* weight, const float* rstd,
                       float* dx, float* dweight_partial, std::int64_t begin, std::int64_t end,
                       std::int64_t cols),
                      (dy, x, weight, rstd, dx, dweight_partial, begin, end, cols))
}  // namespace detail

// y[rows, cols] = LayerNorm(x); mean and rstd get one value per row (either may be null).
template <class T>
inline void layernorm_forward(const T* x, const T* weight, const T* bias, T* y, T* mean, T* rstd,
                              std::int64_t rows, std::int64_t cols, T eps) {
  const CpuIsa isa = cpu_isa();
#pragma omp parallel
  {
    std::int64_t begin, end;
    detail::thread_share(rows, 1, begin, end);
    bool dispatched = false;
    KEPT_CPU_DISPATCH_TO(T, isa, detail::layernorm_forward_rows,
                         (x, weight, bias, y, mean, rstd, begin, end, cols, eps))
    if (!dispatched)
      detail::layernorm_forward_rows<T>(x, weight, bias, y, mean, rstd, begin, end, cols, eps);
  }
}

// dx += dLayerNorm/dx . dy; dweight += sum dy*xhat; dbias += sum dy (dbias may be null).
template <class T>
inline void layernorm_backward(const T* dy, const T* x, const T* weight, const T* mean,
                               const T* rstd, T* dx, T* dweight, T* dbias, std::int64_t rows,
                               std::int64_t cols) {
  const int threads = omp_get_max_threads();
  detail::ColumnPartials<T> partials(threads, cols, 2);
  const CpuIsa isa = cpu_isa();
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    T* dweight_partial = partials.slot(thread, 0);
    T* dbias_partial = partials.slot(thread, 1);
    std::int64_t begin, end;
    detail::thread_share(rows, 1, begin, end);
    bool dispatched = false;
    KEPT_CPU_DISPATCH_TO(
        T, isa, detail::layernorm_backward_rows,
        (dy, x, weight, mean, rstd, dx, dweight_partial, dbias_partial, begin, end, cols))
    if (!dispatched)
      detail::layernorm_backward_rows<T>(dy, x, weight, mean, rstd, dx, dweight_partial,
                                         dbias_partial, begin, end, cols);
  }
  if (dweight) partials.add_into(threads, 0, dweight);
  if (dbias) partials.add_into(threads, 1, dbias);
}

// y[rows, cols] = RMSNorm(x); rstd gets one value per row (may be null).
template <class T>
inline void rmsnorm_forward(const T* x, const T* weight, T* y, T* rstd, std::int64_t rows,
                            std::int64_t cols, T eps) {
  const CpuIsa isa = cpu_isa();
#pragma omp parallel
  {
    std::int64_t begin, end;
    detail::thread_share(rows, 1, begin, end);
    bool dispatched = false;
    KEPT_CPU_DISPATCH_TO(T, isa, detail::rmsnorm_forward_rows,
                         (x, weight, y, rstd, begin, end, cols, eps))
    if (!dispatched) detail::rmsnorm_forward_rows<T>(x, weight, y, rstd, begin, end, cols, eps);
  }
}

// dx += dRMSNorm/dx . dy; dweight += sum dy*xhat (dweight may be null).
template <class T>
inline void rmsnorm_backward(const T* dy, const T* x, const T* weight, const T* rstd, T* dx,
                             T* dweight, std::int64_t rows, std::int64_t cols) {
  const int threads = omp_get_max_threads();
  detail::ColumnPartials<T> partials(threads, cols, 1);
  const CpuIsa isa = cpu_isa();
#pragma omp parallel num_threads(threads)
  {
    T* dweight_partial = partials.slot(omp_get_thread_num(), 0);
    std::int64_t begin, end;
    detail::thread_share(rows, 1, begin, end);
    bool dispatched = false;
    KEPT_CPU_DISPATCH_TO(T, isa, detail::rmsnorm_backward_rows,
                         (dy, x, weight, rstd, dx, dweight_partial, begin, end, cols))
    if (!dispatched)
      detail::rmsnorm_backward_rows<T>(dy, x, weight, rstd, dx, dweight_partial, begin, end, cols);
  }
  if (dweight) partials.add_into(threads, 0, dweight);
}

}  // namespace kept::cpu
