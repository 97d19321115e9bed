// OPM solver (kept/opm.hpp): property tests over random seeds and shapes.
//
// The independent reference is a set of float64 loops written from the definitions: per token
// mu, s, r by division, then y_ti = g_i (x_ti - mu_t) / s_t + b_i and u_ti = x_ti / r_t formed
// explicitly, L(w) = sum (y - w u)^2 summed directly, and the least-squares fit per coordinate
// w_i = <y_i, u_i> / <u_i, u_i>. The solver never forms y or u per (token, coordinate) pair
// outside its sums, so agreement is a real check of the closed forms.
#include <catch2/catch.hpp>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <string>
#include <vector>

#include "kept/core/random.hpp"
#include "kept/core/tensor.hpp"
#include "kept/opm.hpp"

using namespace kept;

namespace {

// Calibration data for one norm site: x is [tokens, dim], row-major.
struct Problem {
  std::int64_t tokens = 0;
  std::int64_t dim = 0;
  double eps = 1e-5;
  std::vector<double> x;
  std::vector<double> g;
  std::vector<double> b;

  MatrixView<const double> view() const { return {x.data(), tokens, dim}; }
  double& at(std::int64_t t, std::int64_t i) { return x[static_cast<std::size_t>(t * dim + i)]; }
  double at(std::int64_t t, std::int64_t i) const {
    return x[static_cast<std::size_t>(t * dim + i)];
  }
};

// Activations with per-coordinate offsets (a few "massive" dimensions), per-token scales and
// noise, so that token means are not zero; LayerNorm weights around 1, biases around 0.
Problem random_problem(std::uint64_t seed, std::int64_t dim, double eps = 1e-5,
                       std::int64_t tokens = 0) {
  Random random(Random::derive(seed, "opm") + static_cast<std::uint64_t>(dim));
  Problem p;
  p.dim = dim;
  p.eps = eps;
  p.tokens = tokens > 0 ? tokens : 1 + static_cast<std::int64_t>(random.below(300));
  std::vector<double> offset(static_cast<std::size_t>(dim));
  for (double& o : offset) {
    o = 0.3 * random.normal();
    if (random.uniform() < 0.05) o += 8 * random.normal();
  }
  p.x.resize(static_cast<std::size_t>(p.tokens * dim));
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    const double scale = std::exp(0.5 * random.normal());
    for (std::int64_t i = 0; i < dim; ++i)
      p.at(t, i) = scale * (offset[static_cast<std::size_t>(i)] + random.normal());
  }
  p.g.resize(static_cast<std::size_t>(dim));
  p.b.resize(static_cast<std::size_t>(dim));
  for (double& v : p.g)
    v = 1 + 0.3 * random.normal();
  for (double& v : p.b)
    v = 0.2 * random.normal();
  return p;
}

// Subtracts each token's mean (in double: the result has mean ~1e-17, not exactly 0).
void centre_tokens(Problem& p) {
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    double mean = 0;
    for (std::int64_t i = 0; i < p.dim; ++i)
      mean += p.at(t, i);
    mean /= static_cast<double>(p.dim);
    for (std::int64_t i = 0; i < p.dim; ++i)
      p.at(t, i) -= mean;
  }
}

OpmAccumulator accumulate(const Problem& p) {
  OpmAccumulator acc(p.dim, p.eps);
  acc.add(p.view());
  return acc;
}

// The independent float64 reference: y and u formed explicitly.
struct Reference {
  std::int64_t tokens, dim;
  std::vector<double> y, u;
  std::vector<double> abs_mu_over_s, abs_mu_over_r;

  Reference(const Problem& p, const std::vector<double>& g, const std::vector<double>& b)
      : tokens(p.tokens), dim(p.dim) {
    y.resize(p.x.size());
    u.resize(p.x.size());
    for (std::int64_t t = 0; t < tokens; ++t) {
      double mean = 0;
      for (std::int64_t i = 0; i < dim; ++i)
        mean += p.at(t, i);
      mean /= static_cast<double>(dim);
      double var = 0, ms = 0;
      for (std::int64_t i = 0; i < dim; ++i) {
        var += (p.at(t, i) - mean) * (p.at(t, i) - mean);
        ms += p.at(t, i) * p.at(t, i);
      }
      const double s = std::sqrt(var / static_cast<double>(dim) + p.eps);
      const double r = std::sqrt(ms / static_cast<double>(dim) + p.eps);
      abs_mu_over_s.push_back(std::fabs(mean) / s);
      abs_mu_over_r.push_back(std::fabs(mean) / r);
      for (std::int64_t i = 0; i < dim; ++i) {
        const auto k = static_cast<std::size_t>(t * dim + i);
        const auto j = static_cast<std::size_t>(i);
        y[k] = g[j] * (p.at(t, i) - mean) / s + b[j];
        u[k] = p.at(t, i) / r;
      }
    }
  }
  double yv(std::int64_t t, std::int64_t i) const {
    return y[static_cast<std::size_t>(t * dim + i)];
  }
  double uv(std::int64_t t, std::int64_t i) const {
    return u[static_cast<std::size_t>(t * dim + i)];
  }

  double loss(const std::vector<double>& w) const {
    double total = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      for (std::int64_t i = 0; i < dim; ++i) {
        const double e = yv(t, i) - w[static_cast<std::size_t>(i)] * uv(t, i);
        total += e * e;
      }
    return total;
  }
  double energy() const {
    double total = 0;
    for (double v : y)
      total += v * v;
    return total;
  }
  double energy(std::int64_t i) const {
    double total = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      total += yv(t, i) * yv(t, i);
    return total;
  }
  double uu(std::int64_t i) const {
    double total = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      total += uv(t, i) * uv(t, i);
    return total;
  }
  // dL/dw_i = -2 sum_t (y_ti - w_i u_ti) u_ti.
  double gradient(const std::vector<double>& w, std::int64_t i) const {
    double total = 0;
    for (std::int64_t t = 0; t < tokens; ++t)
      total += -2 * (yv(t, i) - w[static_cast<std::size_t>(i)] * uv(t, i)) * uv(t, i);
    return total;
  }
  // Per-coordinate least squares from the explicit columns (g_i where u_i = 0).
  std::vector<double> least_squares(const std::vector<double>& g) const {
    std::vector<double> w(static_cast<std::size_t>(dim));
    for (std::int64_t i = 0; i < dim; ++i) {
      double yu = 0, uu_sum = 0;
      for (std::int64_t t = 0; t < tokens; ++t) {
        yu += yv(t, i) * uv(t, i);
        uu_sum += uv(t, i) * uv(t, i);
      }
      w[static_cast<std::size_t>(i)] = uu_sum > 0 ? yu / uu_sum : g[static_cast<std::size_t>(i)];
    }
    return w;
  }
};

// max_i |a_i - b_i| / max(floor, |b_i|).
double max_rel_diff(const std::vector<double>& a, const std::vector<double>& b,
                    double floor = 1.0) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    worst = std::max(worst, std::fabs(a[i] - b[i]) / std::max(floor, std::fabs(b[i])));
  return worst;
}

double norm2(const std::vector<double>& v) {
  double total = 0;
  for (double x : v)
    total += x * x;
  return std::sqrt(total);
}

std::vector<double> subtract(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> out(a.size());
  for (std::size_t i = 0; i < a.size(); ++i)
    out[i] = a[i] - b[i];
  return out;
}

void require_error(const std::function<void()>& action, const std::string& fragment) {
  try {
    action();
  } catch (const Error& error) {
    INFO("message: " << error.what());
    CHECK(std::string(error.what()).find(fragment) != std::string::npos);
    return;
  }
  FAIL("expected kept::Error containing \"" << fragment << "\"");
}

// Same-data solutions must agree: weights to `tol` (relative, floor 1), losses relative to the
// output energy (L(w*) is a difference of energy-sized sums).
void require_same_solution(const OpmSolution& a, const OpmSolution& b, double tol) {
  REQUIRE(a.tokens == b.tokens);
  REQUIRE(a.inactive_coordinates == b.inactive_coordinates);
  CHECK(max_rel_diff(a.w_star, b.w_star) <= tol);
  CHECK(max_rel_diff(a.A, b.A) <= tol);
  CHECK(max_rel_diff(a.B, b.B) <= tol);
  // L(g) can exceed L(0) (a poor fit), so the scale is the larger of the two.
  const double scale = std::max({b.output_energy, b.loss_at_g, 1e-300});
  CHECK(std::fabs(a.output_energy - b.output_energy) <= tol * scale);
  CHECK(std::fabs(a.loss_at_w_star - b.loss_at_w_star) <= tol * scale);
  CHECK(std::fabs(a.loss_at_g - b.loss_at_g) <= tol * scale);
  CHECK(std::fabs(a.gap - b.gap) <= tol * scale);
}

#define OPM_SHAPES                                                              \
  const std::uint64_t seed = static_cast<std::uint64_t>(GENERATE(range(1, 9))); \
  const std::int64_t dim = GENERATE(values<std::int64_t>({1, 7, 64, 257}));     \
  CAPTURE(seed, dim)

}  // namespace

TEST_CASE("opm: zero-mean tokens and b = 0 give w* = g (the paper's OPM)", "[opm]") {
  OPM_SHAPES;
  Problem p = random_problem(seed, dim);
  centre_tokens(p);
  std::fill(p.b.begin(), p.b.end(), 0.0);
  const OpmSolution solution = accumulate(p).solve(p.g, p.b);
  CHECK(max_rel_diff(solution.w_star, p.g) <= 1e-12);
  CHECK(solution.max_abs_shift <= 1e-12);
  CHECK(solution.gap <= 1e-20 * std::max(1.0, solution.output_energy));
  // The paper's weights are g itself.
  CHECK(paper_weights(p.g) == p.g);
  if (dim > 1) {
    // s_t = r_t: every active A_i is 1.
    for (double a : solution.A)
      CHECK(std::fabs(a - 1) <= 1e-12);
    CHECK(solution.abs_mu_over_s_max <= 1e-12);
  }
}

TEST_CASE("opm: the gradient of L vanishes at w*", "[opm]") {
  OPM_SHAPES;
  const Problem p = random_problem(seed, dim);
  const OpmAccumulator acc = accumulate(p);
  const OpmSolution solution = acc.solve(p.g, p.b);
  const Reference ref(p, p.g, p.b);
  const double total = solution.output_energy;
  Random random(seed + 99);
  for (int probe = 0; probe < 4; ++probe) {
    const std::int64_t i = static_cast<std::int64_t>(random.below(static_cast<std::uint64_t>(dim)));
    const auto k = static_cast<std::size_t>(i);
    CAPTURE(i);
    const double h = 1e-4 * (1 + std::fabs(solution.w_star[k]));
    auto central_difference = [&](std::vector<double> w) {
      const double centre = w[k];
      w[k] = centre + h;
      const double plus = acc.objective(w, p.g, p.b);
      w[k] = centre - h;
      const double minus = acc.objective(w, p.g, p.b);
      return (plus - minus) / (2 * h);
    };
    // Natural scale of the i-th partial derivative: 2 sqrt(Y_i S_uu_i) (Cauchy-Schwarz).
    const double scale = 2 * std::sqrt(ref.energy(i) * ref.uu(i));
    const double rounding = 1e-13 * total / h;
    CHECK(std::fabs(central_difference(solution.w_star)) <= 1e-9 * scale + rounding);
    // The explicit-loop gradient (independent of the closed form) is zero too.
    CHECK(std::fabs(ref.gradient(solution.w_star, i)) <= 1e-10 * scale + 1e-300);
    // Away from w* the difference is 2 S_uu delta: the probe is not vacuous.
    std::vector<double> moved = solution.w_star;
    const double delta = 0.1 * (1 + std::fabs(moved[k]));
    moved[k] += delta;
    const double expected = 2 * ref.uu(i) * delta;
    CHECK(std::fabs(central_difference(moved) - expected) <= 1e-7 * std::fabs(expected) + rounding);
    CHECK(std::fabs(ref.gradient(moved, i) - expected) <= 1e-10 * (scale + std::fabs(expected)));
  }
}

TEST_CASE("opm: L(w* + d) - L(w*) equals the closed-form gap", "[opm]") {
  OPM_SHAPES;
  const Problem p = random_problem(seed, dim);
  const OpmAccumulator acc = accumulate(p);
  const OpmSolution solution = acc.solve(p.g, p.b);
  const Reference ref(p, p.g, p.b);
  const auto s_uu = acc.sum_u_squared();
  Random random(seed + 7);
  for (int trial = 0; trial < 3; ++trial) {
    std::vector<double> w = solution.w_star;
    double gap = 0;
    for (std::size_t i = 0; i < w.size(); ++i) {
      const double d = 0.3 * random.normal();
      w[i] += d;
      gap += d * d * s_uu[i];
    }
    const double via_objective = acc.objective(w, p.g, p.b) - solution.loss_at_w_star;
    CHECK(std::fabs(via_objective - gap) <= 1e-9 * gap);
    const double via_loops = ref.loss(w) - ref.loss(solution.w_star);
    CHECK(std::fabs(via_loops - gap) <= 1e-9 * gap);
  }
  // The reported gap is L(g) - L(w*).
  CHECK(std::fabs(solution.gap - (solution.loss_at_g - solution.loss_at_w_star)) <=
        1e-12 * std::max(solution.output_energy, solution.loss_at_g));
}

TEST_CASE("opm: objective() agrees with a direct evaluation of L", "[opm]") {
  OPM_SHAPES;
  const Problem p = random_problem(seed, dim);
  const OpmAccumulator acc = accumulate(p);
  const OpmSolution solution = acc.solve(p.g, p.b);
  const Reference ref(p, p.g, p.b);
  const double energy = ref.energy();
  Random random(seed + 3);
  std::vector<std::vector<double>> candidates = {p.g, solution.w_star,
                                                 std::vector<double>(p.g.size(), 0.0)};
  for (int trial = 0; trial < 3; ++trial) {
    std::vector<double> w(p.g.size());
    for (double& v : w)
      v = 1 + random.normal();
    candidates.push_back(w);
  }
  for (const auto& w : candidates) {
    const double expected = ref.loss(w);
    CHECK(std::fabs(acc.objective(w, p.g, p.b) - expected) <=
          1e-11 * std::max(energy, expected) + 1e-300);
  }
  // L(0) is the output energy; the reported losses are objective() at g and w*.
  CHECK(std::fabs(solution.output_energy - energy) <= 1e-11 * energy);
  CHECK(std::fabs(acc.output_energy(p.g, p.b) - energy) <= 1e-11 * energy);
  CHECK(std::fabs(solution.loss_at_g - ref.loss(p.g)) <= 1e-11 * std::max(energy, ref.loss(p.g)));
  CHECK(std::fabs(solution.loss_at_w_star - ref.loss(solution.w_star)) <= 1e-11 * energy);
  // Relative errors: sqrt(L / sum y^2).
  CHECK(std::fabs(solution.rel_err_paper - std::sqrt(ref.loss(p.g) / energy)) <=
        1e-9 * solution.rel_err_paper);
  CHECK(std::fabs(acc.relative_error(p.g, p.g, p.b) - solution.rel_err_paper) <= 1e-12);
}

TEST_CASE("opm: the solver agrees with a direct float64 least-squares fit", "[opm]") {
  OPM_SHAPES;
  const double eps = GENERATE(0.0, 1e-5, 0.1);
  CAPTURE(eps);
  if (dim == 1 && eps == 0.0) return;  // a 1-wide token is constant: LayerNorm is 0/0
  const Problem p = random_problem(seed, dim, eps);
  const OpmSolution solution = accumulate(p).solve(p.g, p.b);
  const Reference ref(p, p.g, p.b);
  CHECK(max_rel_diff(solution.w_star, ref.least_squares(p.g)) <= 1e-10);
}

TEST_CASE("opm: invariant to positive per-token scaling when eps = 0", "[opm]") {
  OPM_SHAPES;
  if (dim == 1) return;  // eps = 0 needs non-constant tokens
  const Problem p = random_problem(seed, dim, 0.0);
  Problem scaled = p;
  Random random(seed + 11);
  for (std::int64_t t = 0; t < p.tokens; ++t) {
    const double c = std::exp(2 * random.normal());
    for (std::int64_t i = 0; i < dim; ++i)
      scaled.at(t, i) *= c;
  }
  const OpmSolution a = accumulate(p).solve(p.g, p.b);
  const OpmSolution b = accumulate(scaled).solve(p.g, p.b);
  CHECK(max_rel_diff(b.w_star, a.w_star) <= 1e-12);
  CHECK(max_rel_diff(b.A, a.A) <= 1e-12);
  CHECK(max_rel_diff(b.B, a.B) <= 1e-12);
  CHECK(std::fabs(b.abs_mu_over_s_mean - a.abs_mu_over_s_mean) <= 1e-12);
}

TEST_CASE("opm: equivariant under a permutation of the coordinates", "[opm]") {
  OPM_SHAPES;
  const Problem p = random_problem(seed, dim);
  std::vector<std::int64_t> perm(static_cast<std::size_t>(dim));
  std::iota(perm.begin(), perm.end(), 0);
  Random random(seed + 5);
  for (std::size_t i = perm.size(); i > 1; --i)
    std::swap(perm[i - 1], perm[random.below(i)]);
  Problem q = p;  // column j of q is column perm[j] of p
  for (std::int64_t j = 0; j < dim; ++j) {
    const auto jj = static_cast<std::size_t>(j);
    q.g[jj] = p.g[static_cast<std::size_t>(perm[jj])];
    q.b[jj] = p.b[static_cast<std::size_t>(perm[jj])];
    for (std::int64_t t = 0; t < p.tokens; ++t)
      q.at(t, j) = p.at(t, perm[jj]);
  }
  const OpmSolution a = accumulate(p).solve(p.g, p.b);
  const OpmSolution b = accumulate(q).solve(q.g, q.b);
  std::vector<double> permuted(a.w_star.size());
  for (std::size_t j = 0; j < permuted.size(); ++j)
    permuted[j] = a.w_star[static_cast<std::size_t>(perm[j])];
  CHECK(max_rel_diff(b.w_star, permuted) <= 1e-12);
  CHECK(std::fabs(b.loss_at_w_star - a.loss_at_w_star) <= 1e-12 * a.output_energy);
}

TEST_CASE("opm: w* is linear in (g, b)", "[opm]") {
  OPM_SHAPES;
  const Problem p = random_problem(seed, dim);
  const Problem p2 = random_problem(seed + 1000, dim);
  const OpmAccumulator acc = accumulate(p);
  Random random(seed + 13);
  const double alpha = random.normal(), gamma = random.normal();
  std::vector<double> g(p.g.size()), b(p.g.size());
  for (std::size_t i = 0; i < g.size(); ++i) {
    g[i] = alpha * p.g[i] + gamma * p2.g[i];
    b[i] = alpha * p.b[i] + gamma * p2.b[i];
  }
  const OpmSolution one = acc.solve(p.g, p.b), two = acc.solve(p2.g, p2.b);
  const OpmSolution mixed = acc.solve(g, b);
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double expected = alpha * one.w_star[i] + gamma * two.w_star[i];
    const double scale =
        std::max(1.0, std::fabs(alpha * one.w_star[i]) + std::fabs(gamma * two.w_star[i]));
    CHECK(std::fabs(mixed.w_star[i] - expected) <= 1e-12 * scale);
  }
}

TEST_CASE("opm: |w* - g| shrinks linearly with a mean offset when b = 0, not when b != 0",
          "[opm]") {
  const std::uint64_t seed = static_cast<std::uint64_t>(GENERATE(range(1, 9)));
  const std::int64_t dim = GENERATE(values<std::int64_t>({2, 7, 64, 257}));
  CAPTURE(seed, dim);
  Problem zero_mean = random_problem(seed, dim);
  centre_tokens(zero_mean);
  const std::vector<double> no_bias(static_cast<std::size_t>(dim), 0.0);
  auto shifted = [&](double m) {
    Problem p = zero_mean;
    for (double& v : p.x)
      v += m;
    return accumulate(p);
  };

  // To first order in m, A_i - 1 = -m c_i with c_i = sum_t z_ti/s_t^2 / sum_t z_ti^2/s_t^2.
  std::vector<double> predicted(static_cast<std::size_t>(dim));
  {
    std::vector<double> num(predicted.size(), 0.0), den(predicted.size(), 0.0);
    for (std::int64_t t = 0; t < zero_mean.tokens; ++t) {
      double var = 0;
      for (std::int64_t i = 0; i < dim; ++i)
        var += zero_mean.at(t, i) * zero_mean.at(t, i);
      const double s2 = var / static_cast<double>(dim) + zero_mean.eps;
      for (std::int64_t i = 0; i < dim; ++i) {
        num[static_cast<std::size_t>(i)] += zero_mean.at(t, i) / s2;
        den[static_cast<std::size_t>(i)] += zero_mean.at(t, i) * zero_mean.at(t, i) / s2;
      }
    }
    for (std::size_t i = 0; i < predicted.size(); ++i)
      predicted[i] = den[i] > 0 ? zero_mean.g[i] * num[i] / den[i] : 0.0;
  }
  const double predicted_ratio = norm2(predicted);
  REQUIRE(predicted_ratio > 0);

  const double m = 1e-5;  // the second-order term is O(m) relative: 1e-4 gives a few % at d = 2
  double ratios[3];
  for (int k = 0; k < 3; ++k) {
    const double offset = m / (1 << k);
    const OpmSolution solution = shifted(offset).solve(zero_mean.g, no_bias);
    ratios[k] = norm2(subtract(solution.w_star, zero_mean.g)) / offset;
    CAPTURE(k, ratios[k], predicted_ratio);
    CHECK(std::fabs(ratios[k] / predicted_ratio - 1) <= 0.03);
  }
  CHECK(std::fabs(ratios[0] / ratios[2] - 1) <= 0.03);
  CHECK(std::fabs(ratios[1] / ratios[2] - 1) <= 0.03);

  // The paper's caveat: with b != 0 the residual b_i B_i stays as m -> 0, with
  // B_i = sum_t x_ti/r_t / sum_t x_ti^2/r_t^2 (a per-coordinate mean over tokens).
  const OpmSolution at_zero = accumulate(zero_mean).solve(zero_mean.g, zero_mean.b);
  std::vector<double> b_residual(static_cast<std::size_t>(dim));
  for (std::size_t i = 0; i < b_residual.size(); ++i)
    b_residual[i] = zero_mean.b[i] * at_zero.B[i];
  const std::vector<double> shift0 = subtract(at_zero.w_star, zero_mean.g);
  CHECK(max_rel_diff(shift0, b_residual) <= 1e-12);
  // (At d = 2 a zero-mean token is (c, -c), u = +-1, and sum_t u_ti can cancel exactly.)
  if (dim > 2) CHECK(norm2(shift0) > 1e-3 * norm2(zero_mean.b));
  const OpmSolution tiny = shifted(m / 4).solve(zero_mean.g, zero_mean.b);
  CHECK(norm2(subtract(tiny.w_star, zero_mean.g)) > 0.5 * norm2(shift0));

  // ...and it vanishes when sum_t x_ti / r_t = 0 per coordinate: a calibration set closed
  // under x -> -x (still zero-mean tokens) gives B = 0 and w* = g even with b != 0.
  Problem symmetric = zero_mean;
  symmetric.tokens = 2 * zero_mean.tokens;
  for (double v : zero_mean.x)
    symmetric.x.push_back(-v);
  const OpmSolution sym = accumulate(symmetric).solve(zero_mean.g, zero_mean.b);
  CHECK(max_rel_diff(sym.w_star, zero_mean.g) <= 1e-12);
  CHECK(sym.abs_B_range.max <= 1e-12);
}

TEST_CASE("opm: streaming in random batches and merging give the same result", "[opm]") {
  OPM_SHAPES;
  const Problem p = random_problem(seed, dim);
  const OpmSolution whole = accumulate(p).solve(p.g, p.b);
  Random random(seed + 17);

  OpmAccumulator batched(dim, p.eps), first(dim, p.eps), second(dim, p.eps);
  std::int64_t t = 0;
  while (t < p.tokens) {
    const std::int64_t n =
        std::min<std::int64_t>(p.tokens - t, 1 + static_cast<std::int64_t>(random.below(80)));
    const MatrixView<const double> batch = p.view().block(t, 0, n, dim);
    batched.add(batch);
    (random.below(2) ? first : second).add(batch);
    t += n;
  }
  batched.add(MatrixView<const double>(p.x.data(), 0, dim));  // an empty batch is a no-op
  REQUIRE(batched.tokens() == p.tokens);
  require_same_solution(batched.solve(p.g, p.b), whole, 1e-12);
  first.merge(second);
  REQUIRE(first.tokens() == p.tokens);
  const OpmSolution merged = first.solve(p.g, p.b);
  require_same_solution(merged, whole, 1e-12);
  // Token diagnostics merge exactly (counts, min, max) or to rounding (sums).
  for (int bin = 0; bin < LogHistogram::kBins; ++bin)
    CHECK(merged.abs_mu_over_s.count(bin) == whole.abs_mu_over_s.count(bin));
  CHECK(merged.abs_mu_over_s_min == whole.abs_mu_over_s_min);
  CHECK(merged.abs_mu_over_s_max == whole.abs_mu_over_s_max);
  CHECK(std::fabs(merged.abs_mu_over_s_mean - whole.abs_mu_over_s_mean) <=
        1e-12 * std::max(1e-300, whole.abs_mu_over_s_mean));
  CHECK(std::fabs(merged.abs_mu_over_r_mean - whole.abs_mu_over_r_mean) <=
        1e-12 * std::max(1e-300, whole.abs_mu_over_r_mean));
}

TEST_CASE("opm: the sums do not depend on the thread count", "[opm]") {
  const std::uint64_t seed = static_cast<std::uint64_t>(GENERATE(1, 2));
  const std::int64_t dim = GENERATE(values<std::int64_t>({7, 257}));
  const Problem p = random_problem(seed, dim, 1e-5, 1000);  // 16 blocks of 64 rows
  const int saved = omp_get_max_threads();
  std::vector<std::vector<double>> sums;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    const OpmAccumulator acc = accumulate(p);
    std::vector<double> all;
    for (auto s :
         {acc.sum_a_squared(), acc.sum_a(), acc.sum_a_u(), acc.sum_u(), acc.sum_u_squared()})
      all.insert(all.end(), s.begin(), s.end());
    all.push_back(acc.abs_mu_over_s().sum());
    all.push_back(acc.sum_abs_mu_over_r());
    sums.push_back(all);
  }
  omp_set_num_threads(saved);
  CHECK(sums[0] == sums[1]);  // bit-identical
  CHECK(sums[0] == sums[2]);
}

TEST_CASE("opm: float and double inputs agree", "[opm]") {
  OPM_SHAPES;
  const Problem p = random_problem(seed, dim);
  std::vector<float> as_float(p.x.begin(), p.x.end());
  Problem rounded = p;
  for (std::size_t k = 0; k < p.x.size(); ++k)
    rounded.x[k] = as_float[k];

  OpmAccumulator from_float(dim, p.eps);
  from_float.add(MatrixView<const float>(as_float.data(), p.tokens, dim));
  const OpmSolution f = from_float.solve(p.g, p.b);
  // The same values through the double path: the statistics are double either way.
  require_same_solution(f, accumulate(rounded).solve(p.g, p.b), 1e-14);
  // Against the unrounded data: to float rounding.
  require_same_solution(f, accumulate(p).solve(p.g, p.b), 1e-5);
  // A mutable float view is accepted too.
  OpmAccumulator mutable_view(dim, p.eps);
  mutable_view.add(MatrixView<float>(as_float.data(), p.tokens, dim));
  require_same_solution(mutable_view.solve(p.g, p.b), f, 0.0);
}

TEST_CASE("opm: tensors of any float dtype and rank", "[opm]") {
  const Problem p = random_problem(3, 64, 1e-5, 60);
  Tensor x = Tensor::empty(DType::F64, Shape{3, 20, 64});
  std::copy(p.x.begin(), p.x.end(), x.data<double>());
  OpmAccumulator from_tensor(64, p.eps), from_view(64, p.eps);
  from_tensor.add(x);
  from_view.add(p.view());
  require_same_solution(from_tensor.solve(p.g, p.b), from_view.solve(p.g, p.b), 0.0);

  const Tensor x_bf16 = x.to(DType::BF16);
  OpmAccumulator from_bf16(64, p.eps), from_f32(64, p.eps);
  from_bf16.add(x_bf16);
  from_f32.add(x_bf16.to(DType::F32));
  require_same_solution(from_bf16.solve(p.g, p.b), from_f32.solve(p.g, p.b), 0.0);

  OpmAccumulator acc(64, p.eps);
  require_error([&] { acc.add(Tensor::zeros(DType::I32, Shape{2, 64})); }, "floating-point");
}

TEST_CASE("opm: coordinates never activated are reported and get w* = g", "[opm]") {
  OPM_SHAPES;
  Problem p = random_problem(seed, dim);
  Random random(seed + 23);
  std::vector<std::int64_t> dead;
  for (std::int64_t i = 0; i < dim; ++i)
    if (random.uniform() < 0.2 || i == dim / 2) dead.push_back(i);
  for (std::int64_t i : dead)
    for (std::int64_t t = 0; t < p.tokens; ++t)
      p.at(t, i) = 0;
  // An all-zero token is fine when eps > 0 (it only contributes b^2 to the output energy).
  for (std::int64_t i = 0; i < dim; ++i)
    p.at(0, i) = 0;
  const OpmAccumulator acc = accumulate(p);
  const OpmSolution solution = acc.solve(p.g, p.b);
  CHECK(solution.inactive_coordinates == dead);
  CHECK(solution.inactive_count() == static_cast<std::int64_t>(dead.size()));
  for (std::int64_t i : dead) {
    const auto k = static_cast<std::size_t>(i);
    CHECK(solution.w_star[k] == p.g[k]);
    CHECK(solution.A[k] == 1.0);
    CHECK(solution.B[k] == 0.0);
    // L does not depend on w_i there.
    std::vector<double> w = solution.w_star;
    w[k] += 5;
    CHECK(acc.objective(w, p.g, p.b) == acc.objective(solution.w_star, p.g, p.b));
  }
  const Reference ref(p, p.g, p.b);
  CHECK(max_rel_diff(solution.w_star, ref.least_squares(p.g)) <= 1e-10);
  CHECK(std::fabs(solution.loss_at_w_star - ref.loss(solution.w_star)) <=
        1e-11 * ref.energy() + 1e-300);
}

TEST_CASE("opm: diagnostics", "[opm]") {
  OPM_SHAPES;
  const Problem p = random_problem(seed, dim);
  const OpmSolution solution = accumulate(p).solve(p.g, p.b);
  const Reference ref(p, p.g, p.b);

  // |mu|/s: the histogram counts every token; min/mean/max are exact.
  const LogHistogram& hist = solution.abs_mu_over_s;
  std::int64_t counted = 0;
  for (int bin = 0; bin < LogHistogram::kBins; ++bin)
    counted += hist.count(bin);
  CHECK(counted == p.tokens);
  CHECK(hist.count() == p.tokens);
  std::vector<double> sorted = ref.abs_mu_over_s;
  std::sort(sorted.begin(), sorted.end());
  const double exact_mean =
      std::accumulate(sorted.begin(), sorted.end(), 0.0) / static_cast<double>(sorted.size());
  CHECK(std::fabs(solution.abs_mu_over_s_min - sorted.front()) <= 1e-12 * sorted.front());
  CHECK(std::fabs(solution.abs_mu_over_s_max - sorted.back()) <= 1e-12 * sorted.back());
  CHECK(std::fabs(solution.abs_mu_over_s_mean - exact_mean) <= 1e-12 * exact_mean);
  // Quantiles from the histogram are within one bin of the order statistic.
  const double bin_ratio = std::pow(10.0, 1.0 / LogHistogram::kBinsPerDecade) * (1 + 1e-12);
  for (double q : {0.0, 0.1, 0.5, 0.9, 0.99, 1.0}) {
    const double rank = std::ceil(q * static_cast<double>(sorted.size()));
    const double exact = sorted[static_cast<std::size_t>(std::max(rank, 1.0)) - 1];
    const double estimate = hist.quantile(q);
    CAPTURE(q, exact, estimate);
    if (exact < LogHistogram::kLowest) {
      CHECK(estimate < LogHistogram::kLowest);
    } else {
      CHECK(estimate <= exact * bin_ratio);
      CHECK(estimate >= exact / bin_ratio);
    }
  }
  CHECK(solution.abs_mu_over_s_p50 == hist.quantile(0.5));
  CHECK(solution.abs_mu_over_s_p50 <= solution.abs_mu_over_s_p90);
  CHECK(solution.abs_mu_over_s_p90 <= solution.abs_mu_over_s_p99);
  CHECK(solution.abs_mu_over_s_p99 <= solution.abs_mu_over_s_max);
  const double mean_mu_over_r =
      std::accumulate(ref.abs_mu_over_r.begin(), ref.abs_mu_over_r.end(), 0.0) /
      static_cast<double>(p.tokens);
  CHECK(std::fabs(solution.abs_mu_over_r_mean - mean_mu_over_r) <= 1e-12 * mean_mu_over_r);

  // Relative output errors: in [0, 1] for w* (L(w*) <= L(0)), never worse than the paper's.
  CHECK(solution.rel_err_calibrated >= 0);
  CHECK(solution.rel_err_calibrated <= 1);
  CHECK(solution.rel_err_calibrated <= solution.rel_err_paper);
  const double energy = ref.energy();
  CHECK(std::fabs(solution.rel_err_calibrated * solution.rel_err_calibrated -
                  ref.loss(solution.w_star) / energy) <= 1e-10);

  // Shift and coefficient summaries against the vectors they summarise.
  const std::vector<double> shift = subtract(solution.w_star, p.g);
  double max_shift = 0;
  for (double v : shift)
    max_shift = std::max(max_shift, std::fabs(v));
  CHECK(solution.max_abs_shift == max_shift);
  CHECK(std::fabs(solution.rel_shift - norm2(shift) / norm2(p.g)) <= 1e-12);
  CHECK(solution.A_range.min == *std::min_element(solution.A.begin(), solution.A.end()));
  CHECK(solution.A_range.max == *std::max_element(solution.A.begin(), solution.A.end()));
  CHECK(solution.A_range.min <= solution.A_range.mean);
  CHECK(solution.A_range.mean <= solution.A_range.max);
  double max_abs_b = 0;
  for (double v : solution.B)
    max_abs_b = std::max(max_abs_b, std::fabs(v));
  CHECK(solution.abs_B_range.max == max_abs_b);
}

TEST_CASE("opm: the log histogram's bins and quantiles", "[opm]") {
  CHECK(LogHistogram::bin_of(0.0) == 0);
  CHECK(LogHistogram::bin_of(0.5e-8) == 0);
  CHECK(LogHistogram::bin_of(1.0) == 1 + 8 * LogHistogram::kBinsPerDecade);
  CHECK(LogHistogram::bin_of(1e9) == LogHistogram::kBins - 1);
  for (int bin = 1; bin < LogHistogram::kBins; ++bin) {
    CAPTURE(bin);
    CHECK(LogHistogram::lower_edge(bin) > LogHistogram::lower_edge(bin - 1));
    CHECK(LogHistogram::bin_of(LogHistogram::lower_edge(bin)) == bin);
    CHECK(LogHistogram::bin_of(std::nextafter(LogHistogram::lower_edge(bin), 0.0)) == bin - 1);
  }
  LogHistogram empty;
  CHECK(empty.quantile(0.5) == 0);
  CHECK(empty.min() == 0);
  CHECK(empty.mean() == 0);
  LogHistogram h;
  for (double v : {0.0, 1e-3, 2e-3, 4e-3, 1e5})
    h.add(v);
  CHECK(h.count() == 5);
  CHECK(h.quantile(0) == 0);
  CHECK(h.quantile(1) == 1e5);
  CHECK(h.min() == 0);
  CHECK(h.max() == 1e5);
  require_error([&] { h.add(-1); }, "non-negative");
  require_error([&] { h.quantile(1.5); }, "outside [0, 1]");
}

TEST_CASE("opm: bad input is a kept::Error that names the problem", "[opm]") {
  require_error([] { OpmAccumulator(0, 1e-5); }, "dim must be >= 1");
  require_error([] { OpmAccumulator(4, -1e-5); }, "eps must be finite and >= 0");
  require_error([] { OpmAccumulator(4, std::nan("")); }, "eps must be finite and >= 0");
  require_error([] { OpmAccumulator(4, INFINITY); }, "eps must be finite and >= 0");

  const Problem p = random_problem(1, 4, 1e-5, 10);
  OpmAccumulator acc(4, 1e-5);
  std::vector<double> wide(30, 1.0);
  require_error([&] { acc.add(MatrixView<const double>(wide.data(), 10, 3)); },
                "batch has 3 columns, expected dim = 4");
  require_error([&] { acc.solve(p.g, p.b); }, "at least one calibration token");
  acc.add(p.view());
  const std::vector<double> short_g(3, 1.0), long_b(5, 0.0);
  require_error([&] { acc.solve(short_g, p.b); }, "g has 3 values, expected dim 4");
  require_error([&] { acc.solve(p.g, long_b); }, "b has 5 values, expected dim 4");
  require_error([&] { acc.objective(short_g, p.g, p.b); }, "w has 3 values, expected dim 4");

  // A bad batch throws and leaves the accumulator as it was.
  const OpmSolution before = acc.solve(p.g, p.b);
  Problem bad = p;
  bad.at(7, 2) = std::nan("");
  require_error([&] { acc.add(bad.view()); }, "token 7 of the batch (token 17 overall)");
  bad.at(7, 2) = INFINITY;
  require_error([&] { acc.add(bad.view()); }, "non-finite");
  CHECK(acc.tokens() == p.tokens);
  require_same_solution(acc.solve(p.g, p.b), before, 0.0);

  OpmAccumulator no_eps(4, 0.0);
  Problem constant = p;
  for (std::int64_t i = 0; i < 4; ++i)
    constant.at(3, i) = 2.5;
  require_error([&] { no_eps.add(constant.view()); }, "constant (variance 0) and eps = 0");
  CHECK(no_eps.tokens() == 0);

  require_error([&] { acc.merge(OpmAccumulator(5, 1e-5)); }, "cannot merge dim 5 into dim 4");
  require_error([&] { acc.merge(OpmAccumulator(4, 1e-6)); }, "eps");
}
