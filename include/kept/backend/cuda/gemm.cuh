// kept/backend/cuda/gemm.cuh: row-major GEMM on cuBLASLt, bf16 or fp32 inputs, fp32 accumulation.
//
// Math (the CPU convention, row-major):
//   C[M,N] = alpha * op(A) op(B) + beta * C,   op(X) = X or X^T,   op(A): [M,K], op(B): [K,N]
// A, B and C are row-major with leading dimensions (row strides) lda, ldb, ldc >= their stored
// column counts. Accumulation is fp32 (CUBLAS_COMPUTE_32F, never TF32); alpha and beta are fp32;
// bf16 outputs are rounded once, at the end. With beta == 0, C is never read.
//
// The row-major/column-major swap: cuBLAS is column-major, and a row-major matrix X with leading
// dimension ld, read column-major with the same ld, is X^T. So instead of C = op(A) op(B) we ask
// cuBLAS for the column-major C^T[N,M] = op(B)^T op(A)^T, which needs no copy:
//   cuBLAS "A" = our B, transa = N if B is not transposed (its column-major view already is
//                B^T = op(B)^T, an N x K matrix), T otherwise (stored [N,K] row-major = a K x N
//                column-major matrix, transposed to N x K);
//   cuBLAS "B" = our A, transb = N if A is not transposed (K x M), T otherwise (M x K stored);
//   m = N, n = M, k = K, and the column-major C is N x M with ld = ldc.
//
// Design: one cuBLASLt matmul descriptor, three layouts and the heuristic's best algorithm are
// cached per (shape, transposes, leading dimensions, types, pointer/ld alignment), so a training
// step pays the heuristic once per distinct GEMM. The 32 MiB workspace of the Cuda context is
// passed to every call. If cuBLASLt offers no algorithm for a case (odd leading dimensions on some
// architectures) the plan falls back to cublasGemmEx with the same swap. K == 0 is C = beta * C
// (BLAS semantics) with a small kernel, since cuBLASLt rejects k = 0.
#pragma once

#include <algorithm>
#include <climits>
#include <compare>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>

#include "kept/backend/cuda/elementwise.cuh"
#include "kept/backend/cuda/platform.cuh"
#include "kept/backend/cuda/runtime.cuh"
#if defined(KEPT_CUDA_EMULATION)
#include "kept/backend/cpu/gemm.hpp"
#endif
#include "kept/core/tensor.hpp"

namespace kept::cuda {

// One row-major GEMM, type-erased: each operand CUDA_R_16BF or CUDA_R_32F. cuBLASLt needs A and B
// of one type; Cuda::run_gemm stages a mixed pair (an fp32 logit chunk with bf16 weights or
// activations) by widening the bf16 operand to fp32 first, which is exact.
struct GemmProblem {
  cudaDataType_t a_type = CUDA_R_16BF;
  cudaDataType_t b_type = CUDA_R_16BF;
  cudaDataType_t c_type = CUDA_R_16BF;
  std::int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  std::int64_t lda = 0;
  bool transpose_a = false;
  const void* b = nullptr;
  std::int64_t ldb = 0;
  bool transpose_b = false;
  void* c = nullptr;
  std::int64_t ldc = 0;
  float alpha = 1.0f;
  float beta = 0.0f;
};

namespace detail {
constexpr std::size_t cuda_type_size(cudaDataType_t type) {
  return type == CUDA_R_32F ? 4 : type == CUDA_R_16BF ? 2 : 0;
}
}  // namespace detail
}  // namespace kept::cuda

#if defined(KEPT_CUDA_EMULATION)
namespace kept::cuda {
namespace detail {

// The emulated cuBLASLt: the same row-major contract (types, transposes, leading dimensions,
// alpha, beta, C unread when beta == 0, K == 0 is C = beta C) computed on the CPU: operands widened
// to fp32, one fp32 GEMM (OpenBLAS, fp32 accumulation), a bf16 C rounded once. The operands must
// be device memory.
template <class T>
void widen_matrix(const void* data, cudaDataType_t type, std::int64_t rows, std::int64_t cols,
                  std::int64_t ld, std::vector<float>& out) {
  out.resize(static_cast<std::size_t>(rows * cols));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c)
      out[static_cast<std::size_t>(r * cols + c)] =
          type == CUDA_R_32F
              ? static_cast<const float*>(data)[r * ld + c]
              : __bfloat162float(static_cast<const __nv_bfloat16*>(data)[r * ld + c]);
}

inline cublasStatus_t emulated_gemm(const GemmProblem& p) {
  const auto size = [](cudaDataType_t type) { return type == CUDA_R_32F ? 4 : 2; };
  const std::int64_t a_rows = p.transpose_a ? p.k : p.m, a_cols = p.transpose_a ? p.m : p.k;
  const std::int64_t b_rows = p.transpose_b ? p.n : p.k, b_cols = p.transpose_b ? p.k : p.n;
  const auto on_device = [&](const void* data, std::int64_t rows, std::int64_t cols,
                             std::int64_t ld, cudaDataType_t type) {
    if (rows * cols == 0) return true;
    return emulation::is_device(data,
                                static_cast<std::size_t>(((rows - 1) * ld + cols) * size(type)));
  };
  if (!on_device(p.c, p.m, p.n, p.ldc, p.c_type) ||
      (p.k > 0 && (!on_device(p.a, a_rows, a_cols, p.lda, p.a_type) ||
                   !on_device(p.b, b_rows, b_cols, p.ldb, p.b_type))))
    return CUBLAS_STATUS_INVALID_VALUE;
  std::vector<float> a, b, c(static_cast<std::size_t>(p.m * p.n), 0.0f);
  if (p.beta != 0.0f) widen_matrix<float>(p.c, p.c_type, p.m, p.n, p.ldc, c);
  MatrixView<float> cv(c.data(), p.m, p.n);
  if (p.k == 0) {
    for (float& value : c)
      value = p.beta == 0.0f ? 0.0f : p.beta * value;
  } else {
    widen_matrix<float>(p.a, p.a_type, a_rows, a_cols, p.lda, a);
    widen_matrix<float>(p.b, p.b_type, b_rows, b_cols, p.ldb, b);
    cpu::gemm(MatrixView<const float>(a.data(), a_rows, a_cols),
              p.transpose_a ? Transpose::Yes : Transpose::No,
              MatrixView<const float>(b.data(), b_rows, b_cols),
              p.transpose_b ? Transpose::Yes : Transpose::No, cv, p.alpha, p.beta);
  }
  for (std::int64_t r = 0; r < p.m; ++r)
    for (std::int64_t col = 0; col < p.n; ++col) {
      const float value = c[static_cast<std::size_t>(r * p.n + col)];
      if (p.c_type == CUDA_R_32F)
        static_cast<float*>(p.c)[r * p.ldc + col] = value;
      else
        static_cast<__nv_bfloat16*>(p.c)[r * p.ldc + col] = __float2bfloat16_rn(value);
    }
  return CUBLAS_STATUS_SUCCESS;
}

}  // namespace detail
}  // namespace kept::cuda
#else
namespace kept::cuda {
namespace detail {

// Largest power of two (<= 256) dividing both the address and the row pitch in bytes: what the
// cuBLASLt heuristic may assume about every row start of the operand.
inline std::uint32_t operand_alignment(const void* pointer, std::int64_t ld, std::size_t element) {
  const std::uint64_t bits = static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(pointer)) |
                             static_cast<std::uint64_t>(ld) * element | 256u;
  return static_cast<std::uint32_t>(bits & (~bits + 1));
}

struct GemmKey {
  std::int64_t m, n, k, lda, ldb, ldc;
  int ab_type, c_type;
  bool transpose_a, transpose_b;
  std::uint32_t align_a, align_b, align_c;
  auto operator<=>(const GemmKey&) const = default;
};

// A cached cuBLASLt plan; layouts are named by their cuBLAS roles (lt_a holds our B).
struct GemmPlan {
  GemmPlan() = default;
  GemmPlan(const GemmPlan&) = delete;
  GemmPlan& operator=(const GemmPlan&) = delete;
  ~GemmPlan() {
    if (lt_c) (void)cublasLtMatrixLayoutDestroy(lt_c);
    if (lt_b) (void)cublasLtMatrixLayoutDestroy(lt_b);
    if (lt_a) (void)cublasLtMatrixLayoutDestroy(lt_a);
    if (desc) (void)cublasLtMatmulDescDestroy(desc);
  }
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t lt_a = nullptr, lt_b = nullptr, lt_c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool use_lt = false;  // false: no cuBLASLt algorithm, use cublasGemmEx
};

}  // namespace detail
}  // namespace kept::cuda

#define KEPT_CUBLAS_RETURN_IF_ERROR(call)                                         \
  do {                                                                            \
    const cublasStatus_t kept_cublas_status_ = (call);                            \
    if (kept_cublas_status_ != CUBLAS_STATUS_SUCCESS) return kept_cublas_status_; \
  } while (0)

namespace kept::cuda {
namespace detail {

struct GemmPlanCache {
  static constexpr std::size_t kMaxPlans = 4096;  // bounded even with ever-changing shapes

  GemmPlanCache() = default;
  GemmPlanCache(const GemmPlanCache&) = delete;
  GemmPlanCache& operator=(const GemmPlanCache&) = delete;
  ~GemmPlanCache() {
    plans.clear();
    if (fallback) (void)cublasDestroy(fallback);
  }

  std::map<GemmKey, std::unique_ptr<GemmPlan>> plans;
  cublasHandle_t fallback = nullptr;  // created on first use
};

inline cublasStatus_t build_gemm_plan(GemmPlan& plan, cublasLtHandle_t lt, const GemmKey& key,
                                      std::size_t workspace_bytes) {
  const auto ab_type = static_cast<cudaDataType_t>(key.ab_type);
  const auto c_type = static_cast<cudaDataType_t>(key.c_type);
  KEPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  // cuBLAS computes C^T = op(B)^T op(A)^T: its first operand is our B, its second our A.
  const std::int32_t op_first = key.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const std::int32_t op_second = key.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  KEPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                             &op_first, sizeof(op_first)));
  KEPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                             &op_second, sizeof(op_second)));
  // Column-major layouts of the stored matrices (before op): a row-major R x C matrix is a
  // column-major C x R matrix with the same leading dimension.
  const auto rows = [](std::int64_t value) { return static_cast<std::uint64_t>(value); };
  KEPT_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&plan.lt_a, ab_type, rows(key.transpose_b ? key.k : key.n),
                                 rows(key.transpose_b ? key.n : key.k), key.ldb));
  KEPT_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&plan.lt_b, ab_type, rows(key.transpose_a ? key.m : key.k),
                                 rows(key.transpose_a ? key.k : key.m), key.lda));
  KEPT_CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(&plan.lt_c, c_type, rows(key.n), rows(key.m), key.ldc));

  cublasLtMatmulPreference_t preference = nullptr;
  KEPT_CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(&preference));
  const std::uint64_t max_workspace = workspace_bytes;
  cublasStatus_t status = cublasLtMatmulPreferenceSetAttribute(
      preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace, sizeof(max_workspace));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, std::uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_b},  // cuBLAS A is our B
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c}};
  for (const auto& [attribute, value] : alignments) {
    if (status != CUBLAS_STATUS_SUCCESS) break;
    status = cublasLtMatmulPreferenceSetAttribute(preference, attribute, &value, sizeof(value));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (status == CUBLAS_STATUS_SUCCESS) {
    status = cublasLtMatmulAlgoGetHeuristic(lt, plan.desc, plan.lt_a, plan.lt_b, plan.lt_c,
                                            plan.lt_c, preference, 1, &result, &found);
  }
  (void)cublasLtMatmulPreferenceDestroy(preference);
  plan.use_lt =
      status == CUBLAS_STATUS_SUCCESS && found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (plan.use_lt) plan.algo = result.algo;
  // NOT_SUPPORTED from the heuristic only means "no Lt kernel": the fallback handles it.
  return status == CUBLAS_STATUS_NOT_SUPPORTED ? CUBLAS_STATUS_SUCCESS : status;
}

inline cublasStatus_t gemm_fallback(GemmPlanCache& cache, void* workspace,
                                    std::size_t workspace_bytes, cudaStream_t stream,
                                    const GemmProblem& p) {
  if (p.m > INT_MAX || p.n > INT_MAX || p.k > INT_MAX || p.lda > INT_MAX || p.ldb > INT_MAX ||
      p.ldc > INT_MAX)
    return CUBLAS_STATUS_INVALID_VALUE;
  if (!cache.fallback) KEPT_CUBLAS_RETURN_IF_ERROR(cublasCreate(&cache.fallback));
  KEPT_CUBLAS_RETURN_IF_ERROR(cublasSetStream(cache.fallback, stream));
  KEPT_CUBLAS_RETURN_IF_ERROR(cublasSetWorkspace(cache.fallback, workspace, workspace_bytes));
  return cublasGemmEx(cache.fallback, p.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                      p.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(p.n),
                      static_cast<int>(p.m), static_cast<int>(p.k), &p.alpha, p.b, p.a_type,
                      static_cast<int>(p.ldb), p.a, p.a_type, static_cast<int>(p.lda), &p.beta, p.c,
                      p.c_type, static_cast<int>(p.ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

}  // namespace detail

// Runs one row-major GEMM on `stream`. Returns the cuBLAS status (a failed K == 0 kernel launch
// reports CUBLAS_STATUS_EXECUTION_FAILED). Shapes must already be validated (Cuda::matmul does).
inline cublasStatus_t gemm_rowmajor(detail::GemmPlanCache& cache, cublasLtHandle_t lt,
                                    void* workspace, std::size_t workspace_bytes,
                                    cudaStream_t stream, const GemmProblem& p) {
  if (p.m == 0 || p.n == 0) return CUBLAS_STATUS_SUCCESS;
  if (p.k == 0) {
    const cudaError_t status =
        p.c_type == CUDA_R_32F
            ? launch_fill_matrix(static_cast<float*>(p.c), p.m, p.n, p.ldc, p.beta, stream)
            : launch_fill_matrix(static_cast<__nv_bfloat16*>(p.c), p.m, p.n, p.ldc, p.beta, stream);
    return status == cudaSuccess ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_EXECUTION_FAILED;
  }
  if (p.a_type != p.b_type) return CUBLAS_STATUS_NOT_SUPPORTED;  // run_gemm stages mixed types
  const std::size_t ab_size = detail::cuda_type_size(p.a_type);
  const std::size_t c_size = detail::cuda_type_size(p.c_type);
  if (ab_size == 0 || c_size == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
  const detail::GemmKey key{p.m,
                            p.n,
                            p.k,
                            p.lda,
                            p.ldb,
                            p.ldc,
                            static_cast<int>(p.a_type),
                            static_cast<int>(p.c_type),
                            p.transpose_a,
                            p.transpose_b,
                            detail::operand_alignment(p.a, p.lda, ab_size),
                            detail::operand_alignment(p.b, p.ldb, ab_size),
                            detail::operand_alignment(p.c, p.ldc, c_size)};
  auto found = cache.plans.find(key);
  if (found == cache.plans.end()) {
    if (cache.plans.size() >= detail::GemmPlanCache::kMaxPlans) cache.plans.clear();
    auto plan = std::make_unique<detail::GemmPlan>();
    KEPT_CUBLAS_RETURN_IF_ERROR(detail::build_gemm_plan(*plan, lt, key, workspace_bytes));
    found = cache.plans.emplace(key, std::move(plan)).first;
  }
  detail::GemmPlan& plan = *found->second;
  if (plan.use_lt) {
    const cublasStatus_t status =
        cublasLtMatmul(lt, plan.desc, &p.alpha, p.b, plan.lt_a, p.a, plan.lt_b, &p.beta, p.c,
                       plan.lt_c, p.c, plan.lt_c, &plan.algo, workspace, workspace_bytes, stream);
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) return status;
    plan.use_lt = false;  // remember, and take the cublasGemmEx path from now on
  }
  return detail::gemm_fallback(cache, workspace, workspace_bytes, stream, p);
}

}  // namespace kept::cuda
#endif

namespace kept::cuda {
namespace detail {

template <class T>
constexpr cudaDataType_t cuda_type_of() {
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

template <class TA, class TB, class TC>
GemmProblem make_gemm_problem(MatrixView<const TA> a, bool transpose_a, MatrixView<const TB> b,
                              bool transpose_b, MatrixView<TC> c, float alpha, float beta) {
  GemmProblem p;
  p.a_type = cuda_type_of<TA>();
  p.b_type = cuda_type_of<TB>();
  p.c_type = cuda_type_of<TC>();
  p.m = transpose_a ? a.cols : a.rows;
  p.k = transpose_a ? a.rows : a.cols;
  const std::int64_t k_b = transpose_b ? b.cols : b.rows;
  p.n = transpose_b ? b.rows : b.cols;
  KEPT_CHECK(k_b == p.k, "gemm: op(A) is [", p.m, ", ", p.k, "] but op(B) is [", k_b, ", ", p.n,
             "] (inner dimensions differ)");
  KEPT_CHECK(c.rows == p.m && c.cols == p.n, "gemm: C is [", c.rows, ", ", c.cols, "], expected [",
             p.m, ", ", p.n, "]");
  const auto check_ld = [](const char* name, std::int64_t stride, std::int64_t cols) {
    KEPT_CHECK(stride >= std::max<std::int64_t>(1, cols), "gemm: ", name, " has stride ", stride,
               " < max(1, cols = ", cols, ")");
  };
  check_ld("C", c.stride, c.cols);
  if (p.k > 0) {
    check_ld("A", a.stride, a.cols);
    check_ld("B", b.stride, b.cols);
  }
  p.a = a.data;
  p.lda = a.stride;
  p.transpose_a = transpose_a;
  p.b = b.data;
  p.ldb = b.stride;
  p.transpose_b = transpose_b;
  p.c = c.data;
  p.ldc = c.stride;
  p.alpha = alpha;
  p.beta = beta;
  return p;
}

inline void check_gemm(cublasStatus_t status, const GemmProblem& p, const char* file, int line) {
  if (status == CUBLAS_STATUS_SUCCESS) return;
  const auto type = [](cudaDataType_t t) { return t == CUDA_R_32F ? "f32" : "bf16"; };
  fail(file, ":", line, ": ", kEmulated ? "emulated " : "", "cuBLAS(Lt) gemm ", type(p.a_type),
       " x ", type(p.b_type), " -> ", type(p.c_type), " op(A)[", p.m, ", ", p.k, "]",
       p.transpose_a ? "^T" : "", " x op(B)[", p.k, ", ", p.n, "]", p.transpose_b ? "^T" : "",
       " (lda ", p.lda, ", ldb ", p.ldb, ", ldc ", p.ldc,
       ") failed: ", cublasLtGetStatusName(status), " (", static_cast<int>(status),
       "): ", cublasLtGetStatusString(status),
       status == CUBLAS_STATUS_INVALID_VALUE && kEmulated ? " (an operand is not device memory)"
                                                          : "");
}

}  // namespace detail

#if defined(KEPT_CUDA_EMULATION)
inline void Cuda::run_gemm(const GemmProblem& p) {
  detail::check_gemm(detail::emulated_gemm(p), p, __FILE__, __LINE__);
}
#else
inline detail::GemmPlanCache& Cuda::gemm_plans() {
  if (!gemm_plans_) {
    gemm_plans_ = std::unique_ptr<detail::GemmPlanCache, void (*)(detail::GemmPlanCache*)>(
        new detail::GemmPlanCache(), [](detail::GemmPlanCache* cache) { delete cache; });
  }
  return *gemm_plans_;
}

// A mixed pair (fp32 with bf16) is staged: the bf16 operand widened to fp32 in scratch (exact),
// then one fp32 GEMM with fp32 accumulation.
inline void Cuda::run_gemm(const GemmProblem& problem) {
  GemmProblem p = problem;
  if (p.k > 0 && p.m > 0 && p.n > 0 && p.a_type != p.b_type) {
    const bool widen_a = p.a_type == CUDA_R_16BF;
    const std::int64_t rows = widen_a ? (p.transpose_a ? p.k : p.m) : (p.transpose_b ? p.n : p.k);
    const std::int64_t cols = widen_a ? (p.transpose_a ? p.m : p.k) : (p.transpose_b ? p.k : p.n);
    float* staged =
        static_cast<float*>(scratch(sizeof(float) * static_cast<std::size_t>(rows * cols)));
    const void* source = widen_a ? p.a : p.b;
    const std::int64_t ld = widen_a ? p.lda : p.ldb;
    KEPT_CUDA_CHECK(launch_convert(static_cast<const __nv_bfloat16*>(source), rows, cols, ld,
                                   staged, stream()));
    (widen_a ? p.a : p.b) = staged;
    (widen_a ? p.lda : p.ldb) = cols;
    (widen_a ? p.a_type : p.b_type) = CUDA_R_32F;
  }
  detail::check_gemm(
      gemm_rowmajor(gemm_plans(), lt_handle(), workspace(), workspace_bytes(), stream(), p), p,
      __FILE__, __LINE__);
}
#endif

template <class TA, class TB, class TC>
void Cuda::matmul(MatrixView<const TA> a, bool transpose_a, MatrixView<const TB> b,
                  bool transpose_b, MatrixView<TC> c, float alpha, float beta) {
  run_gemm(detail::make_gemm_problem(a, transpose_a, b, transpose_b, c, alpha, beta));
}

}  // namespace kept::cuda
