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
// instead of storing it. Row statistics accumulate in double: a row of 5120 fp32 values
// summed in float loses ~3 digits, and the extra cost is nil next to the memory traffic.
// Every output gradient *accumulates* (dx +=, dweight +=, dbias +=): dx adds into the residual
// stream's gradient, and parameter gradients accumulate over micro-batches. Parameter
// gradients are reduced per thread then summed in a fixed order, so results are deterministic
// for a given thread count.
#pragma once

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

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
}  // namespace detail

// y[rows, cols] = LayerNorm(x); mean and rstd get one value per row (either may be null).
template <class T>
inline void layernorm_forward(const T* x, const T* weight, const T* bias, T* y, T* mean, T* rstd,
                              std::int64_t rows, std::int64_t cols, T eps) {
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    double sum = 0;
    for (std::int64_t c = 0; c < cols; ++c)
      sum += xr[c];
    const T row_mean = static_cast<T>(sum / static_cast<double>(cols));
    double squares = 0;
    for (std::int64_t c = 0; c < cols; ++c) {
      const double centred = static_cast<double>(xr[c]) - row_mean;
      squares += centred * centred;
    }
    const T row_rstd = static_cast<T>(1.0 / std::sqrt(squares / static_cast<double>(cols) + eps));
    for (std::int64_t c = 0; c < cols; ++c) {
      const T normed = (xr[c] - row_mean) * row_rstd;
      yr[c] = bias ? normed * weight[c] + bias[c] : normed * weight[c];
    }
    if (mean) mean[r] = row_mean;
    if (rstd) rstd[r] = row_rstd;
  }
}

// dx += dLayerNorm/dx . dy; dweight += sum dy*xhat; dbias += sum dy (dbias may be null).
template <class T>
inline void layernorm_backward(const T* dy, const T* x, const T* weight, const T* mean,
                               const T* rstd, T* dx, T* dweight, T* dbias, std::int64_t rows,
                               std::int64_t cols) {
  const int threads = omp_get_max_threads();
  detail::ColumnPartials<T> partials(threads, cols, 2);
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num();
    T* dweight_partial = partials.slot(thread, 0);
    T* dbias_partial = partials.slot(thread, 1);
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* dyr = dy + r * cols;
      const T* xr = x + r * cols;
      T* dxr = dx + r * cols;
      const T row_mean = mean[r], row_rstd = rstd[r];
      double sum_g = 0, sum_g_xhat = 0;
      for (std::int64_t c = 0; c < cols; ++c) {
        const T xhat = (xr[c] - row_mean) * row_rstd;
        const T g = dyr[c] * weight[c];
        sum_g += g;
        sum_g_xhat += static_cast<double>(g) * xhat;
        dweight_partial[c] += dyr[c] * xhat;
        dbias_partial[c] += dyr[c];
      }
      const T mean_g = static_cast<T>(sum_g / static_cast<double>(cols));
      const T mean_g_xhat = static_cast<T>(sum_g_xhat / static_cast<double>(cols));
      for (std::int64_t c = 0; c < cols; ++c) {
        const T xhat = (xr[c] - row_mean) * row_rstd;
        const T g = dyr[c] * weight[c];
        dxr[c] += row_rstd * (g - mean_g - xhat * mean_g_xhat);
      }
    }
  }
  if (dweight) partials.add_into(threads, 0, dweight);
  if (dbias) partials.add_into(threads, 1, dbias);
}

// y[rows, cols] = RMSNorm(x); rstd gets one value per row (may be null).
template <class T>
inline void rmsnorm_forward(const T* x, const T* weight, T* y, T* rstd, std::int64_t rows,
                            std::int64_t cols, T eps) {
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    double squares = 0;
    for (std::int64_t c = 0; c < cols; ++c)
      squares += static_cast<double>(xr[c]) * xr[c];
    const T row_rstd = static_cast<T>(1.0 / std::sqrt(squares / static_cast<double>(cols) + eps));
    for (std::int64_t c = 0; c < cols; ++c)
      yr[c] = (xr[c] * row_rstd) * weight[c];
    if (rstd) rstd[r] = row_rstd;
  }
}

// dx += dRMSNorm/dx . dy; dweight += sum dy*xhat (dweight may be null).
template <class T>
inline void rmsnorm_backward(const T* dy, const T* x, const T* weight, const T* rstd, T* dx,
                             T* dweight, std::int64_t rows, std::int64_t cols) {
  const int threads = omp_get_max_threads();
  detail::ColumnPartials<T> partials(threads, cols, 1);
#pragma omp parallel num_threads(threads)
  {
    T* dweight_partial = partials.slot(omp_get_thread_num(), 0);
#pragma omp for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* dyr = dy + r * cols;
      const T* xr = x + r * cols;
      T* dxr = dx + r * cols;
      const T row_rstd = rstd[r];
      double sum_g_xhat = 0;
      for (std::int64_t c = 0; c < cols; ++c) {
        const T xhat = xr[c] * row_rstd;
        sum_g_xhat += static_cast<double>(dyr[c] * weight[c]) * xhat;
        dweight_partial[c] += dyr[c] * xhat;
      }
      const T mean_g_xhat = static_cast<T>(sum_g_xhat / static_cast<double>(cols));
      for (std::int64_t c = 0; c < cols; ++c) {
        const T xhat = xr[c] * row_rstd;
        dxr[c] += row_rstd * (dyr[c] * weight[c] - xhat * mean_g_xhat);
      }
    }
  }
  if (dweight) partials.add_into(threads, 0, dweight);
}

}  // namespace kept::cpu
