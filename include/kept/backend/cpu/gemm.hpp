// kept/backend/cpu/gemm.hpp: C = alpha * op(A) op(B) + beta * C on row-major matrices.
//
// A thin, shape-checked front for OpenBLAS sgemm (float) and dgemm (the float64 reference). kept
// links Debian's OpenMP build of OpenBLAS (see cmake/FindKeptOpenBLAS.cmake): called from inside an
// OpenMP parallel region it runs on the calling thread, so kernels such as attention can
// parallelise over heads and call sgemm per head without oversubscribing the cores.
#pragma once

#include <cblas.h>

#include <cstdint>
#include <type_traits>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"

namespace kept::cpu {

template <class T>
requires std::is_same_v<T, float> || std::is_same_v<T, double>
inline void gemm(MatrixView<const T> a, Transpose transpose_a, MatrixView<const T> b,
                 Transpose transpose_b, MatrixView<T> c, T alpha = T(1), T beta = T(0)) {
  const bool ta = transpose_a == Transpose::Yes, tb = transpose_b == Transpose::Yes;
  const std::int64_t m = ta ? a.cols : a.rows, k = ta ? a.rows : a.cols;
  const std::int64_t kb = tb ? b.cols : b.rows, n = tb ? b.rows : b.cols;
  KEPT_CHECK(k == kb && c.rows == m && c.cols == n, "gemm shape mismatch: op(A) is ", m, "x", k,
             ", op(B) is ", kb, "x", n, ", C is ", c.rows, "x", c.cols);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    // BLAS leaves C untouched only when beta == 1; make the k == 0 case mean C = beta * C.
    for (std::int64_t r = 0; r < m; ++r)
      for (std::int64_t col = 0; col < n; ++col)
        c(r, col) = beta == T(0) ? T(0) : beta * c(r, col);
    return;
  }
  auto ld = [](const auto& view) { return static_cast<int>(view.stride < 1 ? 1 : view.stride); };
  const auto op_a = ta ? CblasTrans : CblasNoTrans, op_b = tb ? CblasTrans : CblasNoTrans;
  const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
  if constexpr (std::is_same_v<T, float>)
    cblas_sgemm(CblasRowMajor, op_a, op_b, mi, ni, ki, alpha, a.data, ld(a), b.data, ld(b), beta,
                c.data, ld(c));
  else
    cblas_dgemm(CblasRowMajor, op_a, op_b, mi, ni, ki, alpha, a.data, ld(a), b.data, ld(b), beta,
                c.data, ld(c));
}

}  // namespace kept::cpu
