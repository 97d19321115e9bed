// CUDA backend: GEMM and norm kernels against host references (ThunderKittens style: each test
// struct pairs a host reference with the device call, and one harness compares them).
//
// Without a GPU every device test WARNs "SKIPPED: no CUDA device (cudaGetDeviceCount: ...)" and
// returns (ctest shows it as Skipped); with KEPT_REQUIRE_CUDA=1 that is a failure instead.
//
// Tolerances. u = 2^-24 (fp32 unit roundoff); bf16 storage rounds to nearest with relative error
// at most 2^-8 (8 significant bits). Every bound below is an a-priori rounding-error bound scaled
// by the magnitude of the terms that are summed (not of the result, which may cancel), with a
// safety factor, so a correct kernel passes on any GPU while a wrong index, transpose, missing
// term or dropped accumulation (errors of order 1 relative to those magnitudes) fails:
// - GEMM: any fp32 summation order of K products satisfies |fl(s) - s| <= gamma_K sum|a b|, and
//   tensor cores may truncate instead of rounding (2u per add). Tolerance per element:
//   4 (K + 4) u (|alpha| sum_k |a_ik b_kj| + |beta c_ij|), plus 2^-8 |ref| for a bf16 output.
//   Products of bf16 inputs are exact in fp32, and inputs are rounded to their storage type on
//   the host first, so the float64 reference sees exactly the values the GPU sees.
// - Norm row statistics: fp32 sums over a row; a thread adds <= 32 terms, then cub::BlockReduce
//   adds them in a 5-level warp tree and thread 0 adds <= 32 warp totals: a chain of <= ~70
//   additions, error <= ~70 u sum|terms|. We allow 1e-5 (= 168 u) times the sum of magnitudes.
//   The CPU accumulates in double, so its own error is negligible next to that.
//   y:       1e-5 (|w| (|xhat| + rstd mean|x|) + |b|)     (mean error scaled by rstd, rstd error)
//   mean:    1e-5 mean|x| (+ 1e-30),  rstd: 1e-5 relative
//   dx:      1e-5 (|dx0| + rstd (|g| + mean|g| + |xhat| mean|g xhat|))
//   dweight, dbias: 2 (64 + rows) u (|init| + sum_rows |term|)   (both sides sum rows in fp32)
//   plus 2^-8 |ref| for every bf16-stored output (one final rounding).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kept/backend/cpu/norm.hpp"
#include "kept/backend/cuda.cuh"
#include "kept/core/dtype.hpp"
#include "kept/core/tensor.hpp"

using kept::bf16;
using kept::MatrixView;
using kept::Tensor;

namespace {

constexpr double kUnit = 0x1p-24;         // fp32 unit roundoff
constexpr double kBf16Rounding = 0x1p-8;  // bf16 relative rounding error bound

// ---- device availability ------------------------------------------------------------------------

bool require_cuda() {
  const char* value = std::getenv("KEPT_REQUIRE_CUDA");
  return value && std::string(value) == "1";
}

// True if a device is present; otherwise reports the skip (or fails under KEPT_REQUIRE_CUDA=1).
bool have_device() {
  static const kept::cuda::DeviceProbe probe = kept::cuda::probe_devices();
  if (probe.status == cudaSuccess && probe.count > 0) return true;
  if (probe.status != cudaSuccess && !kept::cuda::is_no_device_status(probe.status))
    FAIL("cudaGetDeviceCount failed unexpectedly: " << probe.describe());
  if (require_cuda()) FAIL("KEPT_REQUIRE_CUDA=1 but no CUDA device (" << probe.describe() << ")");
  WARN("SKIPPED: no CUDA device (" << probe.describe() << ")");
  return false;
}

// One context for the whole run; never destroyed (its destructor would run after the CUDA
// runtime's own teardown at exit).
kept::cuda::Cuda& backend() {
  static kept::cuda::Cuda* instance = new kept::cuda::Cuda(0);
  return *instance;
}

// ---- storage helpers
// ------------------------------------------------------------------------------

inline float as_float(float value) {
  return value;
}
inline float as_float(bf16 value) {
  return kept::to_float(value);
}
template <class S>
S from_float(float value) {
  if constexpr (std::is_same_v<S, float>) {
    return value;
  } else {
    return kept::to_bf16(value);
  }
}
template <class S>
const char* storage_name() {
  return std::is_same_v<S, float> ? "f32" : "bf16";
}

template <class S>
std::vector<S> random_storage(std::mt19937& rng, std::size_t count, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<S> values(count);
  for (auto& value : values)
    value = from_float<S>(dist(rng));
  return values;
}

template <class S>
std::vector<float> to_floats(const std::vector<S>& values) {
  std::vector<float> result(values.size());
  for (std::size_t i = 0; i < values.size(); ++i)
    result[i] = as_float(values[i]);
  return result;
}

// A device copy of a host vector, `offset` elements into its allocation (offset 1 makes the
// pointer misaligned for 16-byte vector access).
template <class S>
struct DeviceArray {
  Tensor tensor;
  S* ptr = nullptr;
  std::size_t count = 0;

  explicit DeviceArray(const std::vector<S>& host, std::size_t offset = 0) : count(host.size()) {
    tensor = kept::cuda::device_empty(
        kept::DType::U8, kept::Shape{static_cast<std::int64_t>((count + offset) * sizeof(S))});
    ptr = reinterpret_cast<S*>(tensor.raw()) + offset;
    if (count)
      KEPT_CUDA_CHECK(cudaMemcpy(ptr, host.data(), count * sizeof(S), cudaMemcpyHostToDevice));
  }
  std::vector<S> download() const {
    backend().synchronize();
    std::vector<S> host(count);
    if (count)
      KEPT_CUDA_CHECK(cudaMemcpy(host.data(), ptr, count * sizeof(S), cudaMemcpyDeviceToHost));
    return host;
  }
};

// ---- comparison ---------------------------------------------------------------------------------

struct Comparison {
  std::string what;
  std::int64_t checked = 0, failed = 0, worst_index = -1;
  double worst_ratio = 0, worst_got = 0, worst_want = 0, worst_tol = 0;

  void add(std::int64_t index, double got, double want, double tolerance) {
    ++checked;
    double ratio = std::fabs(got - want) / tolerance;
    if (!std::isfinite(got) || !(ratio == ratio)) ratio = std::numeric_limits<double>::infinity();
    if (ratio > 1) ++failed;
    if (ratio > worst_ratio || worst_index < 0) {
      worst_ratio = ratio;
      worst_index = index;
      worst_got = got;
      worst_want = want;
      worst_tol = tolerance;
    }
  }
  std::string report() const {
    std::ostringstream out;
    out << what << ": " << failed << " of " << checked << " outside tolerance; worst at "
        << worst_index << ": got " << worst_got << ", want " << worst_want << ", |diff| "
        << std::fabs(worst_got - worst_want) << ", tol " << worst_tol << " (ratio " << worst_ratio
        << ")";
    return out.str();
  }
};

#define KEPT_CHECK_COMPARISON(comparison) \
  do {                                    \
    INFO((comparison).report());          \
    CHECK((comparison).failed == 0);      \
  } while (0)

// ---- GEMM
// ---------------------------------------------------------------------------------------------

struct GemmCase {
  std::int64_t m, n, k;
  bool transpose_a, transpose_b;
  float alpha, beta;
  std::int64_t pad = 0;  // extra elements at the end of every row of A, B and C

  std::string describe() const {
    std::ostringstream out;
    out << "C[" << m << "," << n << "] = " << alpha << " * op(A)" << (transpose_a ? "^T" : "")
        << " op(B)" << (transpose_b ? "^T" : "") << " + " << beta << " * C, K=" << k << ", pad "
        << pad;
    return out.str();
  }
};

// TAB: input storage (float or bf16), TC: output storage.
template <class TAB, class TC>
struct GemmTest {
  GemmCase shape;
  std::int64_t a_rows, a_cols, lda, b_rows, b_cols, ldb, ldc;
  std::vector<TAB> a, b;
  std::vector<TC> c0;

  explicit GemmTest(const GemmCase& s, std::uint32_t seed) : shape(s) {
    std::mt19937 rng(seed);
    a_rows = s.transpose_a ? s.k : s.m;
    a_cols = s.transpose_a ? s.m : s.k;
    b_rows = s.transpose_b ? s.n : s.k;
    b_cols = s.transpose_b ? s.k : s.n;
    lda = a_cols + s.pad;
    ldb = b_cols + s.pad;
    ldc = s.n + s.pad;
    a = random_storage<TAB>(rng, static_cast<std::size_t>(a_rows * lda), -1.0f, 1.0f);
    b = random_storage<TAB>(rng, static_cast<std::size_t>(b_rows * ldb), -1.0f, 1.0f);
    // With beta == 0, C must not be read: fill it with NaN so a read would show.
    c0 = s.beta == 0.0f ? std::vector<TC>(static_cast<std::size_t>(s.m * ldc),
                                          from_float<TC>(std::numeric_limits<float>::quiet_NaN()))
                        : random_storage<TC>(rng, static_cast<std::size_t>(s.m * ldc), -1.0f, 1.0f);
  }

  double op_a(std::int64_t i, std::int64_t kk) const {
    return as_float(shape.transpose_a ? a[kk * lda + i] : a[i * lda + kk]);
  }
  double op_b(std::int64_t kk, std::int64_t j) const {
    return as_float(shape.transpose_b ? b[j * ldb + kk] : b[kk * ldb + j]);
  }

  // Host reference in float64; `bound` gets |alpha| sum|a b| + |beta c| per element.
  void host(std::vector<double>& c, std::vector<double>& bound) const {
    c.assign(static_cast<std::size_t>(shape.m * shape.n), 0.0);
    bound.assign(c.size(), 0.0);
    for (std::int64_t i = 0; i < shape.m; ++i) {
      for (std::int64_t j = 0; j < shape.n; ++j) {
        double sum = 0, magnitude = 0;
        for (std::int64_t kk = 0; kk < shape.k; ++kk) {
          const double product = op_a(i, kk) * op_b(kk, j);
          sum += product;
          magnitude += std::fabs(product);
        }
        const double old = shape.beta == 0.0f ? 0.0 : as_float(c0[i * ldc + j]);
        c[i * shape.n + j] = shape.alpha * sum + shape.beta * old;
        bound[i * shape.n + j] = std::fabs(shape.alpha) * magnitude + std::fabs(shape.beta * old);
      }
    }
  }

  std::vector<TC> device() const {
    DeviceArray<TAB> da(a), db(b);
    DeviceArray<TC> dc(c0);
    backend().matmul(MatrixView<const TAB>(da.ptr, a_rows, a_cols, lda), shape.transpose_a,
                     MatrixView<const TAB>(db.ptr, b_rows, b_cols, ldb), shape.transpose_b,
                     MatrixView<TC>(dc.ptr, shape.m, shape.n, ldc), shape.alpha, shape.beta);
    return dc.download();
  }

  void run() const {
    INFO(storage_name<TAB>() << " -> " << storage_name<TC>() << ": " << shape.describe());
    std::vector<double> want, bound;
    host(want, bound);
    const std::vector<TC> got = device();
    Comparison values{"C"}, padding{"C padding (must be untouched)"};
    for (std::int64_t i = 0; i < shape.m; ++i) {
      for (std::int64_t j = 0; j < ldc; ++j) {
        const std::size_t at = static_cast<std::size_t>(i * ldc + j);
        if (j >= shape.n) {
          const float before = as_float(c0[at]), after = as_float(got[at]);
          const bool same = (before == after) || (std::isnan(before) && std::isnan(after));
          padding.add(i * ldc + j, same ? 0.0 : 1.0, 0.0, 0.5);
          continue;
        }
        const double ref = want[i * shape.n + j];
        double tolerance = 4.0 * static_cast<double>(shape.k + 4) * kUnit * bound[i * shape.n + j];
        if constexpr (!std::is_same_v<TC, float>)
          tolerance = tolerance * (1 + kBf16Rounding) + kBf16Rounding * std::fabs(ref);
        values.add(i * shape.n + j, as_float(got[at]), ref, tolerance + 1e-30);
      }
    }
    KEPT_CHECK_COMPARISON(values);
    KEPT_CHECK_COMPARISON(padding);
  }
};

std::vector<GemmCase> gemm_cases() {
  std::vector<GemmCase> cases;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      cases.push_back({97, 203, 61, ta, tb, 1.0f, 0.0f});
      cases.push_back({97, 203, 61, ta, tb, 0.5f, -1.25f});
      cases.push_back({64, 128, 256, ta, tb, 1.0f, 1.0f});
      cases.push_back({33, 17, 45, ta, tb, -2.0f, 0.5f, 3});  // padded (odd) leading dimensions
      cases.push_back({1, 1, 1, ta, tb, 1.0f, 0.0f});
    }
  }
  cases.push_back({16, 24, 4096, false, true, 1.0f, 0.0f});  // long K: accumulation precision
  cases.push_back({200, 1, 33, false, false, 1.0f, 0.0f});   // vector shapes
  cases.push_back({1, 300, 77, false, true, 1.0f, 2.0f});
  cases.push_back({5, 7, 0, false, false, 1.0f, 0.5f});  // K == 0: C = beta C
  cases.push_back({5, 7, 0, true, true, 1.0f, 0.0f});    // K == 0, beta 0: zeros over NaN
  return cases;
}

// ---- norms
// ------------------------------------------------------------------------------------------

struct NormCase {
  std::int64_t rows, cols;
  std::size_t offset = 0;  // 1: activations misaligned by one element (scalar kernels)
  std::string describe() const {
    std::ostringstream out;
    out << "rows " << rows << ", cols " << cols << (offset ? ", misaligned" : "");
    return out.str();
  }
};

std::vector<NormCase> norm_cases() {
  return {{257, 1},   {300, 96},  {129, 1000}, {31, 4096},   {64, 5120},   {24, 8192},
          {33, 8195}, {9, 20000}, {17, 3001},  {50, 700, 1}, {33, 1000, 1}};
}

// Inputs shared by both norms: x with per-row offsets and scales (so the LayerNorm mean matters),
// parameters near 1, and non-zero initial gradients (the kernels must accumulate into them).
template <class S>
struct NormInputs {
  std::int64_t rows, cols;
  std::vector<S> x, dy, dx0;
  std::vector<float> weight, bias, dweight0, dbias0;

  NormInputs(const NormCase& c, std::uint32_t seed) : rows(c.rows), cols(c.cols) {
    std::mt19937 rng(seed);
    const std::size_t count = static_cast<std::size_t>(rows * cols);
    std::uniform_real_distribution<float> offset(-1.0f, 1.0f), scale(0.5f, 2.0f), unit(-2.0f, 2.0f);
    x.resize(count);
    for (std::int64_t r = 0; r < rows; ++r) {
      const float row_offset = offset(rng), row_scale = scale(rng);
      for (std::int64_t col = 0; col < cols; ++col)
        x[r * cols + col] = from_float<S>(row_offset + row_scale * unit(rng));
    }
    dy = random_storage<S>(rng, count, -1.0f, 1.0f);
    dx0 = random_storage<S>(rng, count, -0.5f, 0.5f);
    weight = random_storage<float>(rng, static_cast<std::size_t>(cols), 0.5f, 1.5f);
    bias = random_storage<float>(rng, static_cast<std::size_t>(cols), -0.5f, 0.5f);
    dweight0 = random_storage<float>(rng, static_cast<std::size_t>(cols), -0.1f, 0.1f);
    dbias0 = random_storage<float>(rng, static_cast<std::size_t>(cols), -0.1f, 0.1f);
  }
  double mean_abs_x(std::int64_t r) const {
    double sum = 0;
    for (std::int64_t col = 0; col < cols; ++col)
      sum += std::fabs(as_float(x[r * cols + col]));
    return sum / static_cast<double>(cols);
  }
};

template <class S>
double storage_tolerance(double fp32_tolerance, double ref) {
  if constexpr (std::is_same_v<S, float>) {
    return fp32_tolerance + 1e-30;
  } else {
    return fp32_tolerance * (1 + kBf16Rounding) + kBf16Rounding * std::fabs(ref) + 1e-30;
  }
}

// Parameter-gradient check: ref = init + sum_rows term (CPU), tolerance from sum_rows |term|.
void compare_column_sums(Comparison& comparison, const std::vector<float>& got,
                         const std::vector<float>& want, const std::vector<float>& init,
                         const std::vector<double>& magnitude, std::int64_t rows) {
  for (std::size_t c = 0; c < got.size(); ++c) {
    const double tolerance =
        2.0 * static_cast<double>(64 + rows) * kUnit * (std::fabs(init[c]) + magnitude[c]);
    comparison.add(static_cast<std::int64_t>(c), got[c], want[c], tolerance + 1e-30);
  }
}

template <class S>
struct LayerNormTest {
  NormCase shape;
  NormInputs<S> in;
  static constexpr float kEps = 1e-5f;

  LayerNormTest(const NormCase& s, std::uint32_t seed) : shape(s), in(s, seed) {}

  void run() const {
    INFO("LayerNorm " << storage_name<S>() << ": " << shape.describe());
    const std::int64_t rows = in.rows, cols = in.cols;
    const std::size_t count = static_cast<std::size_t>(rows * cols);
    const std::vector<float> x = to_floats(in.x), dy = to_floats(in.dy);

    // Host reference: forward, then backward from the host statistics.
    std::vector<float> y_ref(count), mean_ref(rows), rstd_ref(rows);
    kept::cpu::layernorm_forward(x.data(), in.weight.data(), in.bias.data(), y_ref.data(),
                                 mean_ref.data(), rstd_ref.data(), rows, cols, kEps);
    std::vector<float> dx_ref = to_floats(in.dx0), dw_ref = in.dweight0, db_ref = in.dbias0;
    kept::cpu::layernorm_backward(dy.data(), x.data(), in.weight.data(), mean_ref.data(),
                                  rstd_ref.data(), dx_ref.data(), dw_ref.data(), db_ref.data(),
                                  rows, cols);

    // Device: forward.
    DeviceArray<S> dx_in(in.x, shape.offset), dy_in(in.dy, shape.offset);
    DeviceArray<S> d_y{std::vector<S>(count), shape.offset};
    DeviceArray<float> d_weight(in.weight), d_bias(in.bias);
    DeviceArray<float> d_mean{std::vector<float>(rows)}, d_rstd{std::vector<float>(rows)};
    backend().layernorm_forward(dx_in.ptr, d_weight.ptr, d_bias.ptr, d_y.ptr, d_mean.ptr,
                                d_rstd.ptr, rows, cols, kEps);
    const std::vector<S> y = d_y.download();
    const std::vector<float> mean = d_mean.download(), rstd = d_rstd.download();

    Comparison y_cmp{"y"}, mean_cmp{"mean"}, rstd_cmp{"rstd"};
    for (std::int64_t r = 0; r < rows; ++r) {
      const double mean_abs = in.mean_abs_x(r);
      mean_cmp.add(r, mean[r], mean_ref[r], 1e-5 * mean_abs + 1e-30);
      rstd_cmp.add(r, rstd[r], rstd_ref[r], 1e-5 * rstd_ref[r]);
      for (std::int64_t c = 0; c < cols; ++c) {
        const std::size_t i = static_cast<std::size_t>(r * cols + c);
        const double xhat = (x[i] - mean_ref[r]) * rstd_ref[r];
        const double scale = std::fabs(in.weight[c]) * (std::fabs(xhat) + rstd_ref[r] * mean_abs) +
                             std::fabs(in.bias[c]);
        y_cmp.add(static_cast<std::int64_t>(i), as_float(y[i]), y_ref[i],
                  storage_tolerance<S>(1e-5 * scale, y_ref[i]));
      }
    }
    KEPT_CHECK_COMPARISON(y_cmp);
    KEPT_CHECK_COMPARISON(mean_cmp);
    KEPT_CHECK_COMPARISON(rstd_cmp);

    // Device: backward from the host statistics (isolates the backward kernel), twice from the
    // same state: the parameter-gradient reduction must be bitwise deterministic.
    DeviceArray<float> d_mean_ref(mean_ref), d_rstd_ref(rstd_ref);
    std::vector<S> dx_runs[2];
    std::vector<float> dw_runs[2], db_runs[2];
    for (int run = 0; run < 2; ++run) {
      DeviceArray<S> d_dx(in.dx0, shape.offset);
      DeviceArray<float> d_dw(in.dweight0), d_db(in.dbias0);
      backend().layernorm_backward(dy_in.ptr, dx_in.ptr, d_weight.ptr, d_mean_ref.ptr,
                                   d_rstd_ref.ptr, d_dx.ptr, d_dw.ptr, d_db.ptr, rows, cols);
      dx_runs[run] = d_dx.download();
      dw_runs[run] = d_dw.download();
      db_runs[run] = d_db.download();
    }

    Comparison dx_cmp{"dx"}, dw_cmp{"dweight"}, db_cmp{"dbias"};
    std::vector<double> dw_magnitude(cols, 0.0), db_magnitude(cols, 0.0);
    for (std::int64_t r = 0; r < rows; ++r) {
      double sum_abs_g = 0, sum_abs_g_xhat = 0;
      for (std::int64_t c = 0; c < cols; ++c) {
        const std::size_t i = static_cast<std::size_t>(r * cols + c);
        const double xhat = (x[i] - mean_ref[r]) * rstd_ref[r];
        const double g = static_cast<double>(dy[i]) * in.weight[c];
        sum_abs_g += std::fabs(g);
        sum_abs_g_xhat += std::fabs(g * xhat);
        dw_magnitude[c] += std::fabs(dy[i] * xhat);
        db_magnitude[c] += std::fabs(dy[i]);
      }
      const double mean_abs_g = sum_abs_g / cols, mean_abs_g_xhat = sum_abs_g_xhat / cols;
      for (std::int64_t c = 0; c < cols; ++c) {
        const std::size_t i = static_cast<std::size_t>(r * cols + c);
        const double xhat = (x[i] - mean_ref[r]) * rstd_ref[r];
        const double g = static_cast<double>(dy[i]) * in.weight[c];
        const double scale =
            std::fabs(as_float(in.dx0[i])) +
            rstd_ref[r] * (std::fabs(g) + mean_abs_g + std::fabs(xhat) * mean_abs_g_xhat);
        dx_cmp.add(static_cast<std::int64_t>(i), as_float(dx_runs[0][i]), dx_ref[i],
                   storage_tolerance<S>(1e-5 * scale, dx_ref[i]));
      }
    }
    compare_column_sums(dw_cmp, dw_runs[0], dw_ref, in.dweight0, dw_magnitude, rows);
    compare_column_sums(db_cmp, db_runs[0], db_ref, in.dbias0, db_magnitude, rows);
    KEPT_CHECK_COMPARISON(dx_cmp);
    KEPT_CHECK_COMPARISON(dw_cmp);
    KEPT_CHECK_COMPARISON(db_cmp);
    CHECK(std::memcmp(dx_runs[0].data(), dx_runs[1].data(), count * sizeof(S)) == 0);
    CHECK(dw_runs[0] == dw_runs[1]);
    CHECK(db_runs[0] == db_runs[1]);
  }
};

template <class S>
struct RmsNormTest {
  NormCase shape;
  NormInputs<S> in;
  static constexpr float kEps = 1e-5f;

  RmsNormTest(const NormCase& s, std::uint32_t seed) : shape(s), in(s, seed) {}

  void run() const {
    INFO("RMSNorm " << storage_name<S>() << ": " << shape.describe());
    const std::int64_t rows = in.rows, cols = in.cols;
    const std::size_t count = static_cast<std::size_t>(rows * cols);
    const std::vector<float> x = to_floats(in.x), dy = to_floats(in.dy);

    std::vector<float> y_ref(count), rstd_ref(rows);
    kept::cpu::rmsnorm_forward(x.data(), in.weight.data(), y_ref.data(), rstd_ref.data(), rows,
                               cols, kEps);
    std::vector<float> dx_ref = to_floats(in.dx0), dw_ref = in.dweight0;
    kept::cpu::rmsnorm_backward(dy.data(), x.data(), in.weight.data(), rstd_ref.data(),
                                dx_ref.data(), dw_ref.data(), rows, cols);

    DeviceArray<S> dx_in(in.x, shape.offset), dy_in(in.dy, shape.offset);
    DeviceArray<S> d_y{std::vector<S>(count), shape.offset};
    DeviceArray<float> d_weight(in.weight), d_rstd{std::vector<float>(rows)};
    backend().rmsnorm_forward(dx_in.ptr, d_weight.ptr, d_y.ptr, d_rstd.ptr, rows, cols, kEps);
    const std::vector<S> y = d_y.download();
    const std::vector<float> rstd = d_rstd.download();

    Comparison y_cmp{"y"}, rstd_cmp{"rstd"};
    for (std::int64_t r = 0; r < rows; ++r) {
      rstd_cmp.add(r, rstd[r], rstd_ref[r], 1e-5 * rstd_ref[r]);
      for (std::int64_t c = 0; c < cols; ++c) {
        const std::size_t i = static_cast<std::size_t>(r * cols + c);
        const double scale = std::fabs(in.weight[c]) * std::fabs(x[i] * rstd_ref[r]);
        y_cmp.add(static_cast<std::int64_t>(i), as_float(y[i]), y_ref[i],
                  storage_tolerance<S>(1e-5 * scale, y_ref[i]));
      }
    }
    KEPT_CHECK_COMPARISON(y_cmp);
    KEPT_CHECK_COMPARISON(rstd_cmp);

    DeviceArray<float> d_rstd_ref(rstd_ref);
    std::vector<S> dx_runs[2];
    std::vector<float> dw_runs[2];
    for (int run = 0; run < 2; ++run) {
      DeviceArray<S> d_dx(in.dx0, shape.offset);
      DeviceArray<float> d_dw(in.dweight0);
      backend().rmsnorm_backward(dy_in.ptr, dx_in.ptr, d_weight.ptr, d_rstd_ref.ptr, d_dx.ptr,
                                 d_dw.ptr, rows, cols);
      dx_runs[run] = d_dx.download();
      dw_runs[run] = d_dw.download();
    }

    Comparison dx_cmp{"dx"}, dw_cmp{"dweight"};
    std::vector<double> dw_magnitude(cols, 0.0);
    for (std::int64_t r = 0; r < rows; ++r) {
      double sum_abs_g_xhat = 0;
      for (std::int64_t c = 0; c < cols; ++c) {
        const std::size_t i = static_cast<std::size_t>(r * cols + c);
        const double xhat = x[i] * static_cast<double>(rstd_ref[r]);
        sum_abs_g_xhat += std::fabs(static_cast<double>(dy[i]) * in.weight[c] * xhat);
        dw_magnitude[c] += std::fabs(dy[i] * xhat);
      }
      const double mean_abs_g_xhat = sum_abs_g_xhat / cols;
      for (std::int64_t c = 0; c < cols; ++c) {
        const std::size_t i = static_cast<std::size_t>(r * cols + c);
        const double xhat = x[i] * static_cast<double>(rstd_ref[r]);
        const double g = static_cast<double>(dy[i]) * in.weight[c];
        const double scale = std::fabs(as_float(in.dx0[i])) +
                             rstd_ref[r] * (std::fabs(g) + std::fabs(xhat) * mean_abs_g_xhat);
        dx_cmp.add(static_cast<std::int64_t>(i), as_float(dx_runs[0][i]), dx_ref[i],
                   storage_tolerance<S>(1e-5 * scale, dx_ref[i]));
      }
    }
    compare_column_sums(dw_cmp, dw_runs[0], dw_ref, in.dweight0, dw_magnitude, rows);
    KEPT_CHECK_COMPARISON(dx_cmp);
    KEPT_CHECK_COMPARISON(dw_cmp);
    CHECK(std::memcmp(dx_runs[0].data(), dx_runs[1].data(), count * sizeof(S)) == 0);
    CHECK(dw_runs[0] == dw_runs[1]);
  }
};

}  // namespace

// ---- host-only tests (run everywhere)
// ------------------------------------------------------------

TEST_CASE("CUDA errors name the call, the file:line and the status", "[cuda][runtime]") {
  try {
    KEPT_CUDA_CHECK(cudaErrorInvalidValue);
    FAIL("KEPT_CUDA_CHECK did not throw");
  } catch (const kept::Error& error) {
    const std::string message = error.what();
    INFO(message);
    CHECK(message.find("test_cuda_backend.cu:") != std::string::npos);
    CHECK(message.find("cudaErrorInvalidValue") != std::string::npos);
  }
  try {
    KEPT_CUDA_CHECK(CUBLAS_STATUS_NOT_SUPPORTED);
    FAIL("KEPT_CUDA_CHECK did not throw");
  } catch (const kept::Error& error) {
    const std::string message = error.what();
    INFO(message);
    CHECK(message.find("CUBLAS_STATUS_NOT_SUPPORTED") != std::string::npos);
  }
  CHECK_NOTHROW(KEPT_CUDA_CHECK(cudaSuccess));
}

TEST_CASE("cuda_device_count reports no device as 0, not as an error", "[cuda][runtime]") {
  const kept::cuda::DeviceProbe probe = kept::cuda::probe_devices();
  INFO(probe.describe());
  if (probe.status == cudaSuccess || kept::cuda::is_no_device_status(probe.status)) {
    const int count = kept::cuda::cuda_device_count();
    CHECK(count == probe.count);
    if (count == 0) {
      CHECK_THROWS_AS(kept::cuda::Cuda(0), kept::Error);  // names the missing device
    }
  } else {
    CHECK_THROWS_AS(kept::cuda::cuda_device_count(), kept::Error);
  }
}

// ---- device tests
// ---------------------------------------------------------------------------------------

TEST_CASE("device tensors round-trip and live in MemorySpace::Cuda", "[cuda][runtime]") {
  if (!have_device()) return;
  Tensor host = Tensor::empty(kept::DType::BF16, kept::Shape{3, 5});
  for (std::int64_t i = 0; i < host.numel(); ++i)
    host.data<bf16>()[i] = kept::to_bf16(0.25f * static_cast<float>(i) - 1.0f);
  Tensor device = kept::cuda::to_device(host);
  CHECK(device.space() == kept::MemorySpace::Cuda);
  CHECK(device.shape() == host.shape());
  CHECK(device.dtype() == kept::DType::BF16);
  Tensor back = kept::cuda::to_host(device);
  CHECK(back.space() == kept::MemorySpace::Host);
  CHECK(std::memcmp(back.raw(), host.raw(), host.nbytes()) == 0);
  Tensor zeros = backend().zeros(kept::DType::F32, kept::Shape{7});
  Tensor zeros_host = backend().download(zeros);
  for (float value : zeros_host.span<float>())
    CHECK(value == 0.0f);
  CHECK(kept::cuda::device_empty(kept::DType::F32, kept::Shape{0}).nbytes() == 0);
}

TEST_CASE("GEMM bf16 -> bf16 matches a float64 reference", "[cuda][gemm]") {
  if (!have_device()) return;
  std::uint32_t seed = 1;
  for (const GemmCase& c : gemm_cases())
    GemmTest<bf16, bf16>(c, seed++).run();
}

TEST_CASE("GEMM bf16 -> f32 matches a float64 reference", "[cuda][gemm]") {
  if (!have_device()) return;
  std::uint32_t seed = 100;
  for (const GemmCase& c : gemm_cases())
    GemmTest<bf16, float>(c, seed++).run();
}

TEST_CASE("GEMM f32 -> f32 matches a float64 reference (no TF32)", "[cuda][gemm]") {
  if (!have_device()) return;
  std::uint32_t seed = 200;
  for (const GemmCase& c : gemm_cases())
    GemmTest<float, float>(c, seed++).run();
}

TEST_CASE("GEMM works on device tensors through as_matrix and rejects bad shapes", "[cuda][gemm]") {
  if (!have_device()) return;
  // y[4, 3] = x[4, 2] w[3, 2]^T, the nn.Linear layout, on exact small integers.
  Tensor x = Tensor::empty(kept::DType::BF16, kept::Shape{4, 2});
  Tensor w = Tensor::empty(kept::DType::BF16, kept::Shape{3, 2});
  for (std::int64_t i = 0; i < 8; ++i)
    x.data<bf16>()[i] = kept::to_bf16(static_cast<float>(i));
  for (std::int64_t i = 0; i < 6; ++i)
    w.data<bf16>()[i] = kept::to_bf16(static_cast<float>(i % 4 - 1));
  Tensor dx = backend().upload(x), dw = backend().upload(w);
  Tensor dy = backend().empty(kept::DType::F32, kept::Shape{4, 3});
  backend().matmul(kept::as_matrix<bf16>(std::as_const(dx)), false,
                   kept::as_matrix<bf16>(std::as_const(dw)), true, kept::as_matrix<float>(dy));
  Tensor y = backend().download(dy);
  for (std::int64_t i = 0; i < 4; ++i) {
    for (std::int64_t j = 0; j < 3; ++j) {
      float want = 0;
      for (std::int64_t k = 0; k < 2; ++k)
        want += static_cast<float>(i * 2 + k) * static_cast<float>((j * 2 + k) % 4 - 1);
      CHECK(y.data<float>()[i * 3 + j] == want);
    }
  }
  CHECK_THROWS_AS(
      backend().matmul(kept::as_matrix<bf16>(std::as_const(dx)), false,
                       kept::as_matrix<bf16>(std::as_const(dw)), false, kept::as_matrix<float>(dy)),
      kept::Error);  // inner dimensions 2 vs 3
}

TEST_CASE("LayerNorm forward/backward match kept::cpu (f32 storage)", "[cuda][norm]") {
  if (!have_device()) return;
  std::uint32_t seed = 300;
  for (const NormCase& c : norm_cases())
    LayerNormTest<float>(c, seed++).run();
}

TEST_CASE("LayerNorm forward/backward match kept::cpu (bf16 storage)", "[cuda][norm]") {
  if (!have_device()) return;
  std::uint32_t seed = 400;
  for (const NormCase& c : norm_cases())
    LayerNormTest<bf16>(c, seed++).run();
}

TEST_CASE("RMSNorm forward/backward match kept::cpu (f32 storage)", "[cuda][norm]") {
  if (!have_device()) return;
  std::uint32_t seed = 500;
  for (const NormCase& c : norm_cases())
    RmsNormTest<float>(c, seed++).run();
}

TEST_CASE("RMSNorm forward/backward match kept::cpu (bf16 storage)", "[cuda][norm]") {
  if (!have_device()) return;
  std::uint32_t seed = 600;
  for (const NormCase& c : norm_cases())
    RmsNormTest<bf16>(c, seed++).run();
}

TEST_CASE("norms accept null optional outputs and empty shapes", "[cuda][norm]") {
  if (!have_device()) return;
  const NormCase shape{8, 64};
  NormInputs<bf16> in(shape, 700);
  DeviceArray<bf16> d_x(in.x), d_dy(in.dy), d_dx(in.dx0), d_y(in.x);
  DeviceArray<float> d_w(in.weight), d_stats{std::vector<float>(8, 1.0f)};
  // No bias, no saved statistics, no parameter gradients: must run and touch nothing else.
  backend().layernorm_forward(d_x.ptr, d_w.ptr, nullptr, d_y.ptr, nullptr, nullptr, 8, 64, 1e-5f);
  backend().rmsnorm_forward(d_x.ptr, d_w.ptr, d_y.ptr, nullptr, 8, 64, 1e-5f);
  backend().layernorm_backward(d_dy.ptr, d_x.ptr, d_w.ptr, d_stats.ptr, d_stats.ptr, d_dx.ptr,
                               nullptr, nullptr, 8, 64);
  backend().rmsnorm_backward(d_dy.ptr, d_x.ptr, d_w.ptr, d_stats.ptr, d_dx.ptr, nullptr, 8, 64);
  backend().layernorm_forward(d_x.ptr, d_w.ptr, nullptr, d_y.ptr, nullptr, nullptr, 0, 64, 1e-5f);
  backend().rmsnorm_backward(d_dy.ptr, d_x.ptr, d_w.ptr, d_stats.ptr, d_dx.ptr, nullptr, 0, 64);
  CHECK_NOTHROW(backend().synchronize());
  CHECK_NOTHROW(backend().check_last_error());
  CHECK_THROWS_AS(backend().rmsnorm_forward(d_x.ptr, d_w.ptr, d_y.ptr, nullptr, -1, 64, 1e-5f),
                  kept::Error);
}
