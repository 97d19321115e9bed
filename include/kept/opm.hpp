// kept/opm.hpp: OPM (Optimized Parameter Mapping), the weight of the RMSNorm that replaces a
// LayerNorm, solved in closed form from one streaming pass over calibration activations.
//
// The math (proofs/opm-derivation.md, proved in proofs/opm.v). For a token x in R^d:
//   LayerNorm: y_i = g_i a_i + b_i,  a_i = (x_i - mu) / s,  mu = mean(x),  s = sqrt(var(x) + eps)
//   RMSNorm:   z_i = w_i u_i,        u_i = x_i / r,         r = sqrt(mean(x^2) + eps)
// (var is the biased variance, as torch.nn.LayerNorm; eps is the same in both.) Over calibration
// tokens t the L2 output-alignment objective is
//   L(w) = sum_t sum_i (y_ti - w_i u_ti)^2.
// Each w_i appears in one term only and L is a convex quadratic in it, so with the per-coordinate
// sums (in brackets, the names other write-ups of this derivation use)
//   S_au_i = sum_t a_ti u_ti  [S_ab]    S_u_i = sum_t u_ti  [S_a1]    S_uu_i = sum_t u_ti^2  [S_bb]
//   S_aa_i = sum_t a_ti^2               S_a_i = sum_t a_ti            T = number of tokens
// the minimiser is
//   w*_i = g_i A_i + b_i B_i,   A_i = S_au_i / S_uu_i,   B_i = S_u_i / S_uu_i,
// and for any w
//   L(w) = sum_i [ R_i + S_uu_i (w_i - w*_i)^2 ],  so  L(w) - L(w*) = sum_i S_uu_i (w_i - w*_i)^2,
//   R_i  = Y_i - (g_i S_au_i + b_i S_u_i)^2 / S_uu_i    (= L_i(w*_i), the unexplained part),
//   Y_i  = sum_t y_ti^2 = g_i^2 S_aa_i + 2 g_i b_i S_a_i + b_i^2 T    (= L_i(0)).
// This is the expansion L_i(w) = Y_i - 2 w_i sum_t y_ti u_ti + w_i^2 S_uu_i, with
// sum_t y_ti u_ti = g_i S_au_i + b_i S_u_i, rearranged around w* (completing the square).
// Five sums per coordinate and the token count are thus enough to evaluate L for ANY (w, g, b)
// after the pass: the paper's choice w = g ("paper mode", no data needed: paper_weights), the
// calibrated optimum w*, or any trained weight, with no second pass over the data.
//
// Facts the tests check. If every token has mu_t = 0 then s_t = r_t, a = u, A_i = 1, and with
// b = 0 too w* = g: the paper's OPM. A small mean offset m moves w* away from g linearly in m.
// A bias b != 0 does NOT vanish as mu -> 0: its residual b_i B_i needs b -> 0 or
// sum_t x_ti / r_t = 0 per coordinate (a per-feature mean over tokens, which LLMs with "massive
// activations" in fixed dimensions do not have), contrary to the report's wording.
// A coordinate with S_uu_i = 0 (x_ti = 0 on every token: never activated) does not enter L
// through w_i at all, so w*_i is undetermined; we define w*_i = g_i there (A_i = 1, B_i = 0, so
// w* = g A + b B still holds) and report those coordinates.
//
// Design choices.
// - One pass, streaming: calibration activations for a 14B model do not fit in memory (5,120
//   doubles a token per site, three sites a layer), and the sums are all that L needs. Batches
//   may come in any number and size, from any number of accumulators (merge), as float or
//   double rows (MatrixView, any row stride).
// - Double everywhere: per-token statistics (mu, s, r, with a two-pass variance per row as the
//   CPU LayerNorm kernel does) and the running sums are float64 whatever the input type. The sums
//   run over millions of tokens, and L(w*) is a difference of two such sums: in float it would be
//   lost in rounding. Sums are blocked (64 rows per partial, partials per batch, batches into the
//   totals), which keeps the rounding error growth well below that of one long running sum.
// - Deterministic independently of the thread count: rows are cut into fixed blocks of 64, each
//   block sums its rows in order into its own partial (blocks run in parallel, OpenMP), and the
//   partials are added in block order. The same batches give bit-identical sums on 1 or 64
//   threads. (Different batch boundaries give different rounding, ~1e-16 relative.)
// - A failing add() (a non-finite activation; a constant token with eps = 0, where LayerNorm is
//   0/0) throws kept::Error and leaves the accumulator unchanged.
//
// What is exact and what is not. The sums and every closed form are exact mathematics evaluated
// in float64. L(w*) = sum_i R_i is computed as a difference Y_i - (...)^2 / S_uu_i and is
// accurate to about 1e-16 * sum_t y^2 in absolute terms (clamped at 0): a relative output error
// sqrt(L(w*) / sum y^2) below ~1e-8 is at the rounding floor, not a measurement. The gap
// L(w) - L(w*) is evaluated without cancellation. The activations are whatever the caller
// captured (typically from an fp32 or bf16 forward of the source model): OPM is exact for the
// empirical distribution it is fed, not for the model's true activation distribution.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "kept/backend/cpu/vector_math.hpp"
#include "kept/core/dtype.hpp"
#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"

namespace kept {

namespace detail {
// The accumulator's per-row loops, float64 arithmetic on float or double input. For float input
// they also get AVX2 and AVX-512 entry points picked at run time (backend/cpu/vector_math.hpp):
// float64 lanes are few at the baseline ISA and these loops are arithmetic-bound.

// sum_c x_c and sum_c x_c^2. The simd reductions keep one partial sum a lane, which breaks the
// add-latency chain of a scalar loop (same float64 arithmetic, summed in another order).
template <class T>
KEPT_ALWAYS_INLINE void opm_row_moments(const T* __restrict x, std::int64_t cols, double* sum_out,
                                        double* squares_out) {
  double sum = 0, squares = 0;
#pragma omp simd reduction(+ : sum, squares)
  for (std::int64_t c = 0; c < cols; ++c) {
    const double v = x[c];
    sum += v;
    squares += v * v;
  }
  *sum_out = sum;
  *squares_out = squares;
}

// sum_c (x_c - mu)^2
template <class T>
KEPT_ALWAYS_INLINE void opm_row_centred_squares(const T* __restrict x, std::int64_t cols, double mu,
                                                double* centred_out) {
  double centred = 0;
#pragma omp simd reduction(+ : centred)
  for (std::int64_t c = 0; c < cols; ++c) {
    const double e = static_cast<double>(x[c]) - mu;
    centred += e * e;
  }
  *centred_out = centred;
}

// The five per-coordinate sums (opm_accumulate_row below) for kRows tokens at once, each
// coordinate's sums loaded and stored once for all of them (the sums, 5 x cols doubles, live in L2;
// one row at a time their traffic was the limit). Rows are added in order, so the result is
// bit-identical to kRows calls of the one-row form. `rows` points to kRows rows; `scale` holds mu,
// inv_s, inv_r for each.
template <int kRows, class T>
KEPT_ALWAYS_INLINE void opm_accumulate_rows(const T* const* rows, std::int64_t cols,
                                            const double* scale, double* __restrict sums) {
  double* __restrict aa = sums;
  double* __restrict a1 = sums + cols;
  double* __restrict au = sums + 2 * cols;
  double* __restrict u1 = sums + 3 * cols;
  double* __restrict uu = sums + 4 * cols;
#pragma omp simd
  for (std::int64_t c = 0; c < cols; ++c) {
    double s_aa = aa[c], s_a = a1[c], s_au = au[c], s_u = u1[c], s_uu = uu[c];
    for (int k = 0; k < kRows; ++k) {
      const double v = rows[k][c];
      const double a = (v - scale[3 * k]) * scale[3 * k + 1];
      const double u = v * scale[3 * k + 2];
      s_aa += a * a;
      s_a += a;
      s_au += a * u;
      s_u += u;
      s_uu += u * u;
    }
    aa[c] = s_aa;
    a1[c] = s_a;
    au[c] = s_au;
    u1[c] = s_u;
    uu[c] = s_uu;
  }
}

// One token's contribution to the five per-coordinate sums (a = (x - mu) / s, u = x / rms):
// sums[kAA] += a^2, [kA] += a, [kAU] += a u, [kU] += u, [kUU] += u^2; `sums` holds the five
// arrays of `cols` one after the other.
template <class T>
KEPT_ALWAYS_INLINE void opm_accumulate_row(const T* __restrict x, std::int64_t cols, double mu,
                                           double inv_s, double inv_r, double* __restrict sums) {
  const double scale[3] = {mu, inv_s, inv_r};
  const T* row = x;
  opm_accumulate_rows<1>(&row, cols, scale, sums);
}

inline constexpr int kOpmRowsAtOnce = 8;

KEPT_CPU_ENTRY_POINTS(opm_row_moments, opm_row_moments<float>,
                      (const float* x, std::int64_t cols, double* sum, double* squares),
                      (x, cols, sum, squares))
KEPT_CPU_ENTRY_POINTS(opm_row_centred_squares, opm_row_centred_squares<float>,
                      (const float* x, std::int64_t cols, double mu, double* centred),
                      (x, cols, mu, centred))
KEPT_CPU_ENTRY_POINTS(opm_accumulate_row, opm_accumulate_row<float>,
                      (const float* x, std::int64_t cols, double mu, double inv_s, double inv_r,
                       double* sums),
                      (x, cols, mu, inv_s, inv_r, sums))
KEPT_CPU_ENTRY_POINTS(opm_accumulate_rows, (opm_accumulate_rows<kOpmRowsAtOnce, float>),
                      (const float* const* rows, std::int64_t cols, const double* scale,
                       double* sums),
                      (rows, cols, scale, sums))
}  // namespace detail

// Element types add() takes: float or double, const or not.
template <class T>
concept OpmActivation = (std::same_as<std::remove_const_t<T>, float> ||
                         std::same_as<std::remove_const_t<T>, double>);

// A streaming summary of a non-negative quantity: count, sum, exact min and max, and a fixed
// log-spaced histogram from which quantiles are estimated (to within one bin, a factor
// 10^(1/8) = 1.33). Bin 0 is [0, 1e-8), bins 1..96 cover [1e-8, 1e4) with 8 bins a decade,
// bin 97 is [1e4, inf). Fixed edges make histograms from different runs and sites comparable
// and mergeable.
class LogHistogram {
 public:
  static constexpr double kLowest = 1e-8;
  static constexpr int kDecades = 12;
  static constexpr int kBinsPerDecade = 8;
  static constexpr int kLogBins = kDecades * kBinsPerDecade;
  static constexpr int kBins = kLogBins + 2;

  static double lower_edge(int bin) {
    KEPT_CHECK(bin >= 0 && bin < kBins, "histogram bin ", bin, " out of range [0, ", kBins, ")");
    if (bin == 0) return 0.0;
    return kLowest * std::pow(10.0, static_cast<double>(bin - 1) / kBinsPerDecade);
  }
  static double upper_edge(int bin) {
    KEPT_CHECK(bin >= 0 && bin < kBins, "histogram bin ", bin, " out of range [0, ", kBins, ")");
    if (bin == kBins - 1) return std::numeric_limits<double>::infinity();
    return lower_edge(bin + 1);
  }
  static int bin_of(double value) {
    if (!(value >= kLowest)) return 0;
    if (value >= lower_edge(kBins - 1)) return kBins - 1;
    int bin = 1 + static_cast<int>(std::floor(std::log10(value / kLowest) * kBinsPerDecade));
    bin = std::clamp(bin, 1, kLogBins);
    // log10 may round across an edge: settle against the edges themselves.
    while (bin > 1 && value < lower_edge(bin))
      --bin;
    while (bin < kLogBins && value >= upper_edge(bin))
      ++bin;
    return bin;
  }

  void add(double value) {
    KEPT_CHECK(value >= 0 && std::isfinite(value), "histogram value ", value,
               " is not a finite non-negative number");
    ++counts_[static_cast<std::size_t>(bin_of(value))];
    ++count_;
    sum_ += value;
    min_ = std::min(min_, value);
    max_ = std::max(max_, value);
  }
  void merge(const LogHistogram& other) {
    for (int bin = 0; bin < kBins; ++bin)
      counts_[static_cast<std::size_t>(bin)] += other.counts_[static_cast<std::size_t>(bin)];
    count_ += other.count_;
    sum_ += other.sum_;
    min_ = std::min(min_, other.min_);
    max_ = std::max(max_, other.max_);
  }

  std::int64_t count() const { return count_; }
  std::int64_t count(int bin) const {
    KEPT_CHECK(bin >= 0 && bin < kBins, "histogram bin ", bin, " out of range [0, ", kBins, ")");
    return counts_[static_cast<std::size_t>(bin)];
  }
  double sum() const { return sum_; }
  // 0 for an empty histogram.
  double min() const { return count_ ? min_ : 0.0; }
  double max() const { return count_ ? max_ : 0.0; }
  double mean() const { return count_ ? sum_ / static_cast<double>(count_) : 0.0; }

  // The q-quantile (q in [0, 1]) estimated from the counts: interpolated geometrically inside
  // its log bin (linearly in the bin [0, 1e-8)), and clamped to [min, max], so quantile(0) and
  // quantile(1) are the exact min and max. 0 for an empty histogram.
  double quantile(double q) const {
    KEPT_CHECK(q >= 0 && q <= 1, "quantile ", q, " is outside [0, 1]");
    if (count_ == 0) return 0.0;
    const double target = q * static_cast<double>(count_);
    double below = 0;
    for (int bin = 0; bin < kBins; ++bin) {
      const double in_bin = static_cast<double>(counts_[static_cast<std::size_t>(bin)]);
      if (in_bin == 0 || below + in_bin < target) {
        below += in_bin;
        continue;
      }
      const double fraction = std::clamp((target - below) / in_bin, 0.0, 1.0);
      const double lo = std::max(lower_edge(bin), min_);
      const double hi = std::min(upper_edge(bin), max_);
      const double value =
          (bin == 0 || lo <= 0) ? lo + fraction * (hi - lo) : lo * std::pow(hi / lo, fraction);
      return std::clamp(value, min_, max_);
    }
    return max_;
  }

 private:
  std::array<std::int64_t, kBins> counts_{};
  std::int64_t count_ = 0;
  double sum_ = 0;
  double min_ = std::numeric_limits<double>::infinity();
  double max_ = 0;
};

// min / mean / max of a per-coordinate quantity (zeros when it has no values).
struct OpmRange {
  double min = 0;
  double mean = 0;
  double max = 0;
};

// The OPM result for one norm site, for the LayerNorm (g, b) it was solved for.
struct OpmSolution {
  std::int64_t dim = 0;
  double eps = 0;
  std::int64_t tokens = 0;

  // Weights: w* = g A + b B (element-wise); A_i = 1, B_i = 0, w*_i = g_i where inactive.
  std::vector<double> w_star;
  std::vector<double> A;
  std::vector<double> B;
  // Coordinates with x_ti = 0 on every calibration token (S_uu_i = 0): w*_i is undetermined.
  std::vector<std::int64_t> inactive_coordinates;

  // The objective, summed over all calibration tokens and coordinates.
  double output_energy = 0;   // sum_t ||y_t||^2 = L(0)
  double loss_at_w_star = 0;  // L(w*): calibrated mode
  double loss_at_g = 0;       // L(g): the paper's mode
  double gap = 0;             // L(g) - L(w*) = sum_i S_uu_i (g_i - w*_i)^2, without cancellation
  // ||y - z(w)||_F / ||y||_F = sqrt(L(w) / output_energy) over the calibration tokens.
  double rel_err_calibrated = 0;
  double rel_err_paper = 0;

  // How far the optimum is from the paper's choice.
  double max_abs_shift = 0;  // max_i |w*_i - g_i|
  double rel_shift = 0;      // ||w* - g|| / ||g|| (0 when g = 0)
  // Over the active coordinates.
  OpmRange A_range;
  OpmRange abs_B_range;

  // Per-token mean diagnostics: |mu_t| / s_t over the calibration tokens (the LayerNorm scale:
  // how far from the zero-mean regime the site is), with quantiles from the histogram.
  LogHistogram abs_mu_over_s;
  double abs_mu_over_s_min = 0;
  double abs_mu_over_s_mean = 0;
  double abs_mu_over_s_p50 = 0;
  double abs_mu_over_s_p90 = 0;
  double abs_mu_over_s_p99 = 0;
  double abs_mu_over_s_max = 0;
  double abs_mu_over_r_mean = 0;  // mean_t |mu_t| / r_t (the RMSNorm scale)

  std::int64_t inactive_count() const {
    return static_cast<std::int64_t>(inactive_coordinates.size());
  }
};

// The paper's OPM: w = g, b discarded. Needs no calibration data; kept as a named function so
// that callers say which mapping they use.
inline std::vector<double> paper_weights(std::span<const double> g) {
  return std::vector<double>(g.begin(), g.end());
}

// Streaming accumulator of the OPM sums for one norm site. Feed it the pre-norm activations
// (the residual stream entering the LayerNorm; rows = tokens, cols = dim) with add(), in any
// number of batches; merge() combines accumulators fed by different workers. solve() and
// objective() then give the optimum and the objective for any LayerNorm (g, b) and any w.
class OpmAccumulator {
 public:
  static constexpr std::int64_t kRowsPerBlock = 64;

  OpmAccumulator(std::int64_t dim, double eps) : dim_(dim), eps_(eps) {
    KEPT_CHECK(dim >= 1, "OPM accumulator: dim must be >= 1, got ", dim);
    KEPT_CHECK(std::isfinite(eps) && eps >= 0, "OPM accumulator: eps must be finite and >= 0, got ",
               eps);
    sums_.assign(static_cast<std::size_t>(kSumCount * dim), 0.0);
  }

  std::int64_t dim() const { return dim_; }
  double eps() const { return eps_; }
  std::int64_t tokens() const { return tokens_; }

  // Adds a batch of pre-norm activations [tokens, dim], float or double, any row stride.
  template <OpmActivation T>
  void add(MatrixView<T> pre_norm_activations) {
    add_rows(MatrixView<const std::remove_const_t<T>>(
        pre_norm_activations.data, pre_norm_activations.rows, pre_norm_activations.cols,
        pre_norm_activations.stride));
  }

  // Adds a host tensor [..., dim] of F32, F64, BF16 or F16 (16-bit types convert exactly to F32).
  void add(const Tensor& pre_norm_activations) {
    KEPT_CHECK(pre_norm_activations.space() == MemorySpace::Host,
               "OPM accumulator: activations must be a host tensor, got one on ",
               memory_space_name(pre_norm_activations.space()));
    KEPT_CHECK(pre_norm_activations.rank() >= 1,
               "OPM accumulator: activations must have rank >= 1, got a scalar");
    switch (pre_norm_activations.dtype()) {
      case DType::F32:
        add(as_matrix<float>(pre_norm_activations));
        return;
      case DType::F64:
        add(as_matrix<double>(pre_norm_activations));
        return;
      case DType::BF16:
      case DType::F16: {
        const Tensor widened = pre_norm_activations.to(DType::F32);
        add(as_matrix<float>(widened));
        return;
      }
      default:
        fail("OPM accumulator: activations must be a floating-point tensor, got ",
             dtype_name(pre_norm_activations.dtype()));
    }
  }

  // Adds the sums of `other` (same dim and eps) into this accumulator.
  void merge(const OpmAccumulator& other) {
    KEPT_CHECK(other.dim_ == dim_, "OPM accumulator: cannot merge dim ", other.dim_, " into dim ",
               dim_);
    KEPT_CHECK(other.eps_ == eps_, "OPM accumulator: cannot merge sums taken with eps ", other.eps_,
               " into sums taken with eps ", eps_);
    for (std::size_t k = 0; k < sums_.size(); ++k)
      sums_[k] += other.sums_[k];
    tokens_ += other.tokens_;
    abs_mu_over_s_.merge(other.abs_mu_over_s_);
    sum_abs_mu_over_r_ += other.sum_abs_mu_over_r_;
  }

  // The optimum and the diagnostics for the LayerNorm (g, b). Needs at least one token.
  OpmSolution solve(std::span<const double> g, std::span<const double> b) const {
    check_weights(g, "g");
    check_weights(b, "b");
    KEPT_CHECK(tokens_ > 0, "OPM accumulator: solve() needs at least one calibration token");
    OpmSolution solution;
    solution.dim = dim_;
    solution.eps = eps_;
    solution.tokens = tokens_;
    const auto n = static_cast<std::size_t>(dim_);
    solution.w_star.resize(n);
    solution.A.resize(n);
    solution.B.resize(n);
    double shift_squares = 0, g_squares = 0;
    std::int64_t active = 0;
    solution.A_range = {std::numeric_limits<double>::infinity(), 0,
                        -std::numeric_limits<double>::infinity()};
    solution.abs_B_range = solution.A_range;
    for (std::int64_t i = 0; i < dim_; ++i) {
      const auto k = static_cast<std::size_t>(i);
      const Coordinate c = coordinate(i, g[k], b[k]);
      solution.w_star[k] = c.w_star;
      solution.A[k] = c.A;
      solution.B[k] = c.B;
      const double shift = g[k] - c.w_star;
      const double gap = c.s_uu * shift * shift;
      solution.output_energy += c.energy;
      solution.loss_at_w_star += c.residual;
      solution.loss_at_g += c.residual + gap;
      solution.gap += gap;
      solution.max_abs_shift = std::max(solution.max_abs_shift, std::fabs(shift));
      shift_squares += shift * shift;
      g_squares += g[k] * g[k];
      if (!c.active) {
        solution.inactive_coordinates.push_back(i);
        continue;
      }
      ++active;
      update_range(solution.A_range, c.A);
      update_range(solution.abs_B_range, std::fabs(c.B));
    }
    finish_range(solution.A_range, active);
    finish_range(solution.abs_B_range, active);
    solution.rel_shift = g_squares > 0 ? std::sqrt(shift_squares / g_squares) : 0.0;
    solution.rel_err_calibrated = relative(solution.loss_at_w_star, solution.output_energy);
    solution.rel_err_paper = relative(solution.loss_at_g, solution.output_energy);
    solution.abs_mu_over_s = abs_mu_over_s_;
    solution.abs_mu_over_s_min = abs_mu_over_s_.min();
    solution.abs_mu_over_s_mean = abs_mu_over_s_.mean();
    solution.abs_mu_over_s_p50 = abs_mu_over_s_.quantile(0.50);
    solution.abs_mu_over_s_p90 = abs_mu_over_s_.quantile(0.90);
    solution.abs_mu_over_s_p99 = abs_mu_over_s_.quantile(0.99);
    solution.abs_mu_over_s_max = abs_mu_over_s_.max();
    solution.abs_mu_over_r_mean = sum_abs_mu_over_r_ / static_cast<double>(tokens_);
    return solution;
  }

  // L(w) = sum_t sum_i (y_ti - w_i u_ti)^2 for the LayerNorm (g, b), in closed form.
  double objective(std::span<const double> w, std::span<const double> g,
                   std::span<const double> b) const {
    check_weights(w, "w");
    check_weights(g, "g");
    check_weights(b, "b");
    double total = 0;
    for (std::int64_t i = 0; i < dim_; ++i) {
      const auto k = static_cast<std::size_t>(i);
      const Coordinate c = coordinate(i, g[k], b[k]);
      const double shift = w[k] - c.w_star;
      total += c.residual + c.s_uu * shift * shift;
    }
    return total;
  }

  // sum_t ||y_t||^2 = L(0) for the LayerNorm (g, b).
  double output_energy(std::span<const double> g, std::span<const double> b) const {
    check_weights(g, "g");
    check_weights(b, "b");
    double total = 0;
    for (std::int64_t i = 0; i < dim_; ++i) {
      const auto k = static_cast<std::size_t>(i);
      total += coordinate(i, g[k], b[k]).energy;
    }
    return total;
  }

  // ||y - z(w)||_F / ||y||_F over the calibration tokens.
  double relative_error(std::span<const double> w, std::span<const double> g,
                        std::span<const double> b) const {
    return relative(objective(w, g, b), output_energy(g, b));
  }

  // The raw per-coordinate sums (see the top of this file), for reports and cross-checks.
  std::span<const double> sum_a_squared() const { return sum(kAA); }  // S_aa = sum_t a^2
  std::span<const double> sum_a() const { return sum(kA); }           // S_a  = sum_t a
  std::span<const double> sum_a_u() const { return sum(kAU); }        // S_au = sum_t a u
  std::span<const double> sum_u() const { return sum(kU); }           // S_u  = sum_t u
  std::span<const double> sum_u_squared() const { return sum(kUU); }  // S_uu = sum_t u^2
  const LogHistogram& abs_mu_over_s() const { return abs_mu_over_s_; }
  double sum_abs_mu_over_r() const { return sum_abs_mu_over_r_; }

 private:
  enum SumIndex : std::int64_t { kAA, kA, kAU, kU, kUU, kSumCount };

  struct RowStats {
    double mu = 0, inv_s = 0, inv_r = 0, abs_mu_over_s = 0, abs_mu_over_r = 0;
  };
  enum RowStatus : unsigned char { kRowOk, kRowNonFinite, kRowConstant };

  struct Coordinate {
    double energy;    // Y_i = sum_t y_ti^2
    double residual;  // R_i = L_i(w*_i)
    double w_star, A, B, s_uu;
    bool active;
  };

  std::span<const double> sum(SumIndex which) const {
    return {sums_.data() + which * dim_, static_cast<std::size_t>(dim_)};
  }
  const double* sum_ptr(SumIndex which) const { return sums_.data() + which * dim_; }

  void check_weights(std::span<const double> v, const char* name) const {
    KEPT_CHECK(static_cast<std::int64_t>(v.size()) == dim_, "OPM: ", name, " has ", v.size(),
               " values, expected dim ", dim_);
  }

  static double relative(double loss, double energy) {
    if (energy > 0) return std::sqrt(loss / energy);
    return loss > 0 ? std::numeric_limits<double>::infinity() : 0.0;
  }
  static void update_range(OpmRange& range, double value) {
    range.min = std::min(range.min, value);
    range.max = std::max(range.max, value);
    range.mean += value;
  }
  static void finish_range(OpmRange& range, std::int64_t count) {
    if (count == 0) {
      range = {};
      return;
    }
    range.mean /= static_cast<double>(count);
  }

  Coordinate coordinate(std::int64_t i, double g, double b) const {
    const double s_aa = sum_ptr(kAA)[i], s_a = sum_ptr(kA)[i], s_au = sum_ptr(kAU)[i];
    const double s_u = sum_ptr(kU)[i], s_uu = sum_ptr(kUU)[i];
    Coordinate c{};
    // A Gram form, PSD in exact arithmetic: clamp the rounding below 0.
    c.energy = std::max(0.0, g * g * s_aa + 2 * g * b * s_a + b * b * static_cast<double>(tokens_));
    c.s_uu = s_uu;
    c.active = s_uu > 0;
    if (!c.active) {
      c.A = 1;
      c.B = 0;
      c.w_star = g;
      c.residual = c.energy;
      return c;
    }
    c.A = s_au / s_uu;
    c.B = s_u / s_uu;
    c.w_star = g * c.A + b * c.B;
    const double cross = g * s_au + b * s_u;  // sum_t y_ti u_ti
    c.residual = std::max(0.0, c.energy - cross * c.w_star);
    return c;
  }

  template <class T>
  void add_rows(MatrixView<const T> x) {
    KEPT_CHECK(x.cols == dim_, "OPM accumulator: batch has ", x.cols,
               " columns, expected dim = ", dim_);
    KEPT_CHECK(x.rows >= 0, "OPM accumulator: batch has ", x.rows, " rows");
    if (x.rows == 0) return;
    KEPT_CHECK(x.data != nullptr, "OPM accumulator: batch of ", x.rows, " rows has no data");
    KEPT_CHECK(x.rows == 1 || x.stride >= x.cols, "OPM accumulator: row stride ", x.stride,
               " is smaller than the ", x.cols, " columns");
    const std::int64_t rows = x.rows, cols = x.cols;
    const double inv_cols = 1.0 / static_cast<double>(cols);
    const double eps = eps_;
    const cpu::CpuIsa isa = cpu::cpu_isa();

    // Pass 1: per-token statistics in double, validated before anything is committed.
    std::vector<RowStats> stats(static_cast<std::size_t>(rows));
    std::vector<unsigned char> status(static_cast<std::size_t>(rows), kRowOk);
#pragma omp parallel for schedule(static)
    for (std::int64_t r = 0; r < rows; ++r) {
      const T* xr = x.row(r);
      double sum = 0, squares = 0, centred = 0;
      bool dispatched = false;
      KEPT_CPU_DISPATCH_TO(T, isa, detail::opm_row_moments, (xr, cols, &sum, &squares))
      if (!dispatched) detail::opm_row_moments(xr, cols, &sum, &squares);
      if (!std::isfinite(sum) || !std::isfinite(squares)) {
        status[static_cast<std::size_t>(r)] = kRowNonFinite;
        continue;
      }
      const double mu = sum * inv_cols;
      dispatched = false;
      KEPT_CPU_DISPATCH_TO(T, isa, detail::opm_row_centred_squares, (xr, cols, mu, &centred))
      if (!dispatched) detail::opm_row_centred_squares(xr, cols, mu, &centred);
      const double var_eps = centred * inv_cols + eps;
      const double ms_eps = squares * inv_cols + eps;
      if (!(var_eps > 0) || !(ms_eps > 0)) {
        status[static_cast<std::size_t>(r)] = kRowConstant;
        continue;
      }
      const double s = std::sqrt(var_eps), rms = std::sqrt(ms_eps);
      stats[static_cast<std::size_t>(r)] = {mu, 1.0 / s, 1.0 / rms, std::fabs(mu) / s,
                                            std::fabs(mu) / rms};
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      const unsigned char st = status[static_cast<std::size_t>(r)];
      KEPT_CHECK(st != kRowNonFinite, "OPM accumulator: token ", r, " of the batch (token ",
                 tokens_ + r, " overall) has a non-finite or overflowing activation");
      KEPT_CHECK(st != kRowConstant, "OPM accumulator: token ", r, " of the batch (token ",
                 tokens_ + r,
                 " overall) is constant (variance 0) and eps = 0: LayerNorm is undefined there");
    }

    // Token diagnostics, in row order.
    LogHistogram batch_histogram;
    double batch_mu_over_r = 0;
    for (const RowStats& s : stats) {
      batch_histogram.add(s.abs_mu_over_s);
      batch_mu_over_r += s.abs_mu_over_r;
    }

    // Pass 2: per-coordinate sums. Fixed blocks of kRowsPerBlock rows, each into its own partial,
    // added in block order: the result does not depend on the thread count.
    static_assert(kAA == 0 && kA == 1 && kAU == 2 && kU == 3 && kUU == 4 && kSumCount == 5,
                  "detail::opm_accumulate_row writes the sums in this order");
    const std::int64_t width = kSumCount * cols;
    const std::int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    const std::int64_t per_round =
        std::min<std::int64_t>(blocks, std::max(1, omp_get_max_threads()));
    std::vector<double> batch(static_cast<std::size_t>(width), 0.0);
    std::vector<double> partials(static_cast<std::size_t>(per_round * width));
    for (std::int64_t first = 0; first < blocks; first += per_round) {
      const std::int64_t count = std::min(per_round, blocks - first);
      std::fill(partials.begin(), partials.begin() + count * width, 0.0);
#pragma omp parallel for schedule(static)
      for (std::int64_t k = 0; k < count; ++k) {
        const std::int64_t begin = (first + k) * kRowsPerBlock;
        const std::int64_t end = std::min(rows, begin + kRowsPerBlock);
        double* out = partials.data() + k * width;
        constexpr int kAtOnce = detail::kOpmRowsAtOnce;
        std::int64_t r = begin;
        for (; r + kAtOnce <= end; r += kAtOnce) {
          const T* group[kAtOnce];
          double scale[3 * kAtOnce];
          for (int j = 0; j < kAtOnce; ++j) {
            const RowStats& s = stats[static_cast<std::size_t>(r + j)];
            group[j] = x.row(r + j);
            scale[3 * j] = s.mu;
            scale[3 * j + 1] = s.inv_s;
            scale[3 * j + 2] = s.inv_r;
          }
          bool dispatched = false;
          KEPT_CPU_DISPATCH_TO(T, isa, detail::opm_accumulate_rows, (group, cols, scale, out))
          if (!dispatched) detail::opm_accumulate_rows<kAtOnce>(group, cols, scale, out);
        }
        for (; r < end; ++r) {
          const T* xr = x.row(r);
          const RowStats s = stats[static_cast<std::size_t>(r)];
          bool dispatched = false;
          KEPT_CPU_DISPATCH_TO(T, isa, detail::opm_accumulate_row,
                               (xr, cols, s.mu, s.inv_s, s.inv_r, out))
          if (!dispatched) detail::opm_accumulate_row(xr, cols, s.mu, s.inv_s, s.inv_r, out);
        }
      }
      for (std::int64_t k = 0; k < count; ++k) {
        const double* partial = partials.data() + k * width;
        for (std::int64_t j = 0; j < width; ++j)
          batch[static_cast<std::size_t>(j)] += partial[j];
      }
    }

    // Commit.
    for (std::size_t j = 0; j < sums_.size(); ++j)
      sums_[j] += batch[j];
    tokens_ += rows;
    abs_mu_over_s_.merge(batch_histogram);
    sum_abs_mu_over_r_ += batch_mu_over_r;
  }

  std::int64_t dim_;
  double eps_;
  std::int64_t tokens_ = 0;
  std::vector<double> sums_;  // kSumCount arrays of dim_, in SumIndex order
  LogHistogram abs_mu_over_s_;
  double sum_abs_mu_over_r_ = 0;
};

}  // namespace kept
