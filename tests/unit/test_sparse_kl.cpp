// The sparse-teacher KL (kept/xkd/sparse_kl.hpp): with k = vocab it is logit_kl (loss and
// gradients); for k < vocab it matches its float64 definition, sits below the dense KL by
// exactly r KL(p_tail / r || q_tail / Q) and within the header's bound, and its gradients match
// finite differences in float64; CpuBf16 follows Cpu; malformed teacher rows are refused by row.
// The emulated CUDA backend is compared with CpuBf16 in tests/emulation/test_sparse_kl_kernels.cpp.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/backend/cpu_bf16.hpp"
#include "kept/io/teacher_logits.hpp"
#include "kept/xkd/logit_kl.hpp"
#include "kept/xkd/sparse_kl.hpp"
#include "support/backend_values.hpp"
#include "support/errors.hpp"
#include "support/gradcheck.hpp"

using namespace kept;
using namespace kept::test;
using namespace kept::xkd;

namespace {

using Matrix = std::vector<std::vector<double>>;  // [rows][cols]

double value_at(const Tensor& t, std::int64_t i) {
  switch (t.dtype()) {
    case DType::F64:
      return t.data<double>()[i];
    case DType::BF16:
      return static_cast<double>(to_float(t.data<bf16>()[i]));
    default:
      return t.data<float>()[i];
  }
}

// A student LM head and its final hidden states. Values are drawn as fp32 and converted, so the
// fixtures of one seed hold the same numbers on every backend.
template <class Backend>
struct Student {
  using Act = typename Backend::Activation;
  Backend backend;
  Linear<Backend> head;
  Tensor hidden;
  std::int64_t tokens, width, vocab;

  Student(std::int64_t tokens_, std::int64_t width_, std::int64_t vocab_, std::uint64_t seed,
          bool bias = false)
      : tokens(tokens_), width(width_), vocab(vocab_) {
    Random random(seed);
    head = Linear<Backend>(backend, "lm_head", width, vocab, bias);
    auto draw = [&](const Shape& shape, double scale, DType dtype) {
      return random_tensor<float>(shape, random, scale).to(dtype);
    };
    head.weight.value = draw({vocab, width}, 0.8, Backend::Precision::param);
    if (bias) head.bias.value = draw({vocab}, 0.5, Backend::Precision::param);
    hidden = draw({tokens, width}, 1.0, Backend::Precision::activation);
  }

  void zero_grads() {
    head.visit(
        [&](Parameter& p) { p.grad = backend.zeros(Backend::Precision::grad, p.value.shape()); });
  }
  MatrixView<const Act> view() const { return as_matrix<Act>(hidden); }

  // logits[i][v] = hidden[i] . W[v] + b[v], in double.
  Matrix logits() const {
    Matrix out(static_cast<std::size_t>(tokens), std::vector<double>(vocab));
    for (std::int64_t i = 0; i < tokens; ++i)
      for (std::int64_t v = 0; v < vocab; ++v) {
        double sum = head.has_bias() ? value_at(head.bias.value, v) : 0.0;
        for (std::int64_t c = 0; c < width; ++c)
          sum += value_at(hidden, i * width + c) * value_at(head.weight.value, v * width + c);
        out[i][v] = sum;
      }
    return out;
  }
};

Matrix random_logits(std::int64_t rows, std::int64_t cols, double scale, std::uint64_t seed) {
  Random random(seed);
  Matrix out(static_cast<std::size_t>(rows), std::vector<double>(cols));
  for (auto& row : out)
    for (double& x : row)
      x = static_cast<double>(static_cast<float>(scale * random.normal()));
  return out;
}

SparseTeacherRows sparse_rows(const Matrix& teacher, double temperature, std::int64_t k) {
  SparseTeacherRows rows;
  for (const auto& row : teacher)
    append_teacher_top_k(row.data(), 1, static_cast<std::int64_t>(row.size()), temperature, k,
                         rows);
  return rows;
}

// The teacher row renormalised as the header says: p_i = exp(lp_i) / Z, r / Z.
struct RowDistribution {
  std::vector<std::int32_t> ids;
  std::vector<double> p;
  double r = 0;
};
RowDistribution row_distribution(const SparseTeacherRows& t, std::size_t i) {
  RowDistribution d;
  double total = t.tail_mass[i];
  for (std::int64_t j = 0; j < t.k; ++j) {
    d.ids.push_back(t.ids[i * t.k + j]);
    d.p.push_back(std::exp(static_cast<double>(t.logprobs[i * t.k + j])));
    total += d.p.back();
  }
  for (double& x : d.p)
    x /= total;
  d.r = t.tail_mass[i] / total;
  return d;
}

// KL_sparse of one row, from the definition.
double sparse_kl_of(const std::vector<double>& student_logits, const RowDistribution& d,
                    double temperature) {
  const auto q = softmax(student_logits, temperature);
  std::vector<char> kept(q.size(), 0);
  double kl = 0;
  for (std::size_t j = 0; j < d.ids.size(); ++j) {
    kept[d.ids[j]] = 1;
    if (d.p[j] > 0) kl += d.p[j] * std::log(d.p[j] / q[d.ids[j]]);
  }
  double tail = 0;
  for (std::size_t v = 0; v < q.size(); ++v)
    if (!kept[v]) tail += q[v];
  if (d.r > 0) kl += d.r * std::log(d.r / tail);
  return kl;
}

double dense_kl_of(const std::vector<double>& teacher, const std::vector<double>& student,
                   double temperature) {
  const auto p = softmax(teacher, temperature), q = softmax(student, temperature);
  double kl = 0;
  for (std::size_t v = 0; v < p.size(); ++v)
    if (p[v] > 0) kl += p[v] * std::log(p[v] / q[v]);
  return kl;
}

// (1/N) sum_i w_i T^2 KL_sparse_i
double reference_sparse(const Matrix& student, const SparseTeacherRows& t, double temperature,
                        const std::vector<float>& weights = {}, double normalizer = 0) {
  double total = 0, weight_sum = 0;
  for (std::size_t i = 0; i < student.size(); ++i) {
    const double w = weights.empty() ? 1.0 : weights[i];
    weight_sum += w;
    if (w != 0)
      total += w * temperature * temperature *
               sparse_kl_of(student[i], row_distribution(t, i), temperature);
  }
  const double n = normalizer > 0 ? normalizer : weight_sum;
  return n > 0 ? total / n : 0.0;
}

struct RunResult {
  LogitLossResult result;
  Tensor d_hidden, d_weight, d_bias;
};

template <class Backend>
RunResult run_sparse(Student<Backend>& s, const SparseTeacherRows& t, double temperature,
                     Chunking chunking = {}, const std::vector<float>& weights = {},
                     double normalizer = 0) {
  using Act = typename Backend::Activation;
  s.zero_grads();
  RunResult run;
  run.d_hidden = s.backend.zeros(Backend::Precision::activation, s.hidden.shape());
  auto d_hidden = as_matrix<Act>(run.d_hidden);
  run.result = sparse_logit_kl(
      s.backend, t.view(), s.head, s.view(), &d_hidden,
      {.temperature = temperature, .chunking = chunking, .normalizer = normalizer}, weights);
  run.d_weight = s.head.weight.grad;
  if (s.head.has_bias()) run.d_bias = s.head.bias.grad;
  return run;
}

// max |a - b| / max |b| over two tensors of any float dtype.
double normwise(const Tensor& a, const Tensor& b) {
  REQUIRE(a.numel() == b.numel());
  double worst = 0, largest = 1e-300;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    worst = std::max(worst, std::fabs(value_at(a, i) - value_at(b, i)));
    largest = std::max(largest, std::fabs(value_at(b, i)));
  }
  return worst / largest;
}

// The dense teacher whose logits are exactly T * (the stored log-probs): identity hidden states
// [tokens, tokens] and a head whose column i is row i's log-probs. With k = vocab the two
// objectives then see the same distribution, up to the renormalisation's rounding.
template <class Backend>
struct DenseTwin {
  using Act = typename Backend::Activation;
  Linear<Backend> head;
  Tensor hidden;
  DenseTwin(Backend& backend, const SparseTeacherRows& t, std::int64_t vocab, double temperature) {
    const std::int64_t tokens = t.rows;
    head = Linear<Backend>(backend, "teacher.lm_head", tokens, vocab, false);
    Tensor w = Tensor::empty(DType::F64, {vocab, tokens});
    for (std::int64_t i = 0; i < tokens; ++i)
      for (std::int64_t j = 0; j < t.k; ++j)
        w.data<double>()[t.ids[i * t.k + j] * tokens + i] =
            temperature * static_cast<double>(t.logprobs[i * t.k + j]);
    head.weight.value = w.to(Backend::Precision::param);
    Tensor h = Tensor::empty(DType::F64, {tokens, tokens});
    for (std::int64_t i = 0; i < tokens * tokens; ++i)
      h.data<double>()[i] = i % (tokens + 1) == 0 ? 1.0 : 0.0;
    hidden = h.to(Backend::Precision::activation);
  }
  MatrixView<const Act> view() const { return as_matrix<Act>(hidden); }
};

template <class Backend>
void check_equals_logit_kl(double tolerance) {
  constexpr std::int64_t kTokens = 9, kWidth = 6, kVocab = 19;
  const double temperature = GENERATE(1.0, 2.0, 0.7);
  const std::int64_t vocab_chunk = GENERATE(0, 5);
  INFO("temperature " << temperature << ", vocab_chunk " << vocab_chunk);
  Student<Backend> s(kTokens, kWidth, kVocab, 3);
  const SparseTeacherRows t =
      sparse_rows(random_logits(kTokens, kVocab, 2.0, 7), temperature, kVocab);
  for (float r : t.tail_mass)
    REQUIRE(r == 0.0f);
  const Chunking chunking{.token_chunk = 4, .vocab_chunk = vocab_chunk};
  const std::vector<float> weights{1, 0.5f, 0, 2, 1, 1, 0.25f, 1, 1};
  const RunResult sparse = run_sparse(s, t, temperature, chunking, weights);

  DenseTwin<Backend> twin(s.backend, t, kVocab, temperature);
  s.zero_grads();
  Tensor d_hidden = s.backend.zeros(Backend::Precision::activation, s.hidden.shape());
  auto d_view = as_matrix<typename Backend::Activation>(d_hidden);
  const LogitLossResult dense =
      logit_kl(s.backend, twin.head, twin.view(), s.head, s.view(), &d_view,
               {.temperature = temperature, .chunking = chunking}, weights);
  CHECK(sparse.result.loss == Approx(dense.loss).epsilon(tolerance));
  CHECK(sparse.result.tokens == dense.tokens);
  CHECK(sparse.result.weight_sum == dense.weight_sum);
  CHECK(sparse.result.top1_agree == dense.top1_agree);
  CHECK(normwise(sparse.d_hidden, d_hidden) <= tolerance);
  CHECK(normwise(sparse.d_weight, s.head.weight.grad) <= tolerance);
  CHECK(dense.loss > 0.05);
}

}  // namespace

TEST_CASE("sparse_logit_kl with k = vocab is logit_kl (float64, 1e-12)", "[xkd][sparse_kl]") {
  check_equals_logit_kl<Cpu64>(1e-12);
}

TEST_CASE("sparse_logit_kl with k = vocab is logit_kl (fp32, 1e-6)", "[xkd][sparse_kl]") {
  check_equals_logit_kl<Cpu>(1e-6);
}

TEST_CASE("sparse_logit_kl matches its float64 definition for k < vocab", "[xkd][sparse_kl]") {
  constexpr std::int64_t kTokens = 11, kWidth = 5, kVocab = 23;
  const std::int64_t k = GENERATE(1, 4, 22);
  const double temperature = GENERATE(1.0, 3.0);
  INFO("k " << k << ", temperature " << temperature);
  Student<Cpu64> s(kTokens, kWidth, kVocab, 5, /*bias=*/true);
  const Matrix teacher = random_logits(kTokens, kVocab, 2.5, 9);
  const SparseTeacherRows t = sparse_rows(teacher, temperature, k);
  const Matrix logits = s.logits();
  const std::vector<float> weights{1, 0, 2, 1, 0.5f, 1, 1, 3, 1, 0.25f, 1};
  for (const Chunking chunking : {Chunking{}, Chunking{.token_chunk = 3, .vocab_chunk = 4},
                                  Chunking{.token_chunk = 1, .vocab_chunk = 1}}) {
    INFO("token_chunk " << chunking.token_chunk << ", vocab_chunk " << chunking.vocab_chunk);
    const RunResult run = run_sparse(s, t, temperature, chunking, weights);
    CHECK(run.result.loss ==
          Approx(reference_sparse(logits, t, temperature, weights)).epsilon(1e-12));
    CHECK(run.result.tokens == 10);
    // Top-1 agreement: the most probable kept id against the student's argmax.
    std::int64_t agree = 0;
    for (std::int64_t i = 0; i < kTokens; ++i) {
      if (weights[i] == 0) continue;
      const auto& row = logits[i];
      const auto argmax = std::max_element(row.begin(), row.end()) - row.begin();
      agree += t.ids[i * k] == argmax;
    }
    CHECK(run.result.top1_agree == agree);
    // A normaliser replaces the weight sum.
    const RunResult normalised = run_sparse(s, t, temperature, chunking, weights, 40.0);
    CHECK(normalised.result.loss ==
          Approx(reference_sparse(logits, t, temperature, weights, 40.0)).epsilon(1e-12));
  }
  // fp32 against float64, same values.
  Student<Cpu> s32(kTokens, kWidth, kVocab, 5, true);
  const RunResult run32 = run_sparse(s32, t, temperature, {.token_chunk = 4, .vocab_chunk = 7});
  const RunResult run64 = run_sparse(s, t, temperature, {.token_chunk = 4, .vocab_chunk = 7});
  CHECK(run32.result.loss == Approx(run64.result.loss).epsilon(1e-5));
  CHECK(normwise(run32.d_hidden, run64.d_hidden) <= 1e-5);
  CHECK(normwise(run32.d_weight, run64.d_weight) <= 1e-5);
  CHECK(normwise(run32.d_bias, run64.d_bias) <= 1e-5);
}

TEST_CASE("sparse KL is below the dense KL by r KL(tail || tail), within the stated bound",
          "[xkd][sparse_kl]") {
  constexpr std::int64_t kTokens = 24, kWidth = 7, kVocab = 41;
  const double temperature = GENERATE(0.5, 1.0, 2.0, 4.0);
  const std::int64_t k = GENERATE(1, 3, 8, 20);
  INFO("temperature " << temperature << ", k " << k);
  Student<Cpu64> s(kTokens, kWidth, kVocab, 13);
  const Matrix teacher = random_logits(kTokens, kVocab, 3.0, 17);
  const SparseTeacherRows t = sparse_rows(teacher, temperature, k);
  const Matrix student = s.logits();
  double largest_error = 0;
  for (std::int64_t i = 0; i < kTokens; ++i) {
    INFO("token " << i);
    // The library's value for this one token (T^2 KL_sparse, normaliser 1).
    const xkd::SparseTeacher one{t.ids.data() + i * k, t.logprobs.data() + i * k,
                                 t.tail_mass.data() + i, 1, k};
    const auto hidden = s.view().block(i, 0, 1, kWidth);
    const double sparse =
        sparse_logit_kl(s.backend, one, s.head, hidden, nullptr, {.temperature = temperature})
            .loss /
        (temperature * temperature);
    const double dense = dense_kl_of(teacher[i], student[i], temperature);
    const double error = dense - sparse;
    // The chain rule, computed independently: r KL(p_tail / r || q_tail / Q).
    const auto p = softmax(teacher[i], temperature), q = softmax(student[i], temperature);
    std::vector<char> kept(kVocab, 0);
    for (std::int64_t j = 0; j < k; ++j)
      kept[t.ids[i * k + j]] = 1;
    double r = 0, Q = 0;
    for (std::int64_t v = 0; v < kVocab; ++v)
      if (!kept[v]) {
        r += p[v];
        Q += q[v];
      }
    double tail_kl = 0;
    for (std::int64_t v = 0; v < kVocab; ++v)
      if (!kept[v] && p[v] > 0) tail_kl += p[v] / r * std::log((p[v] / r) / (q[v] / Q));
    const double bound =
        sparse_kl_error_bound(student[i], std::span(t.ids).subspan(i * k, k),
                              std::span(t.logprobs).subspan(i * k, k), t.tail_mass[i], temperature);
    // Slack for the fp32 log-probs and tail mass of the file format (~1e-7 relative each).
    const double slack = 1e-6 * (1 + dense);
    INFO("dense " << dense << ", sparse " << sparse << ", error " << error << ", r KL_tail "
                  << r * tail_kl << ", bound " << bound);
    CHECK(error >= -slack);
    CHECK(error == Approx(r * tail_kl).margin(slack));
    CHECK(error <= bound + slack);
    largest_error = std::max(largest_error, error);
  }
  CHECK(largest_error > 1e-4);  // the check above had something to bound
}

TEST_CASE("sparse_logit_kl gradients match finite differences in float64", "[xkd][sparse_kl]") {
  struct Case {
    double temperature;
    std::int64_t k, token_chunk, vocab_chunk;
    bool weighted, bias;
  };
  const Case c = GENERATE(Case{1.0, 4, 256, 0, false, false}, Case{2.5, 1, 3, 5, true, true},
                          Case{0.7, 9, 4, 1, true, false}, Case{1.0, 23, 2, 6, false, true});
  INFO("T " << c.temperature << ", k " << c.k << ", token_chunk " << c.token_chunk
            << ", vocab_chunk " << c.vocab_chunk << ", weighted " << c.weighted << ", bias "
            << c.bias);
  constexpr std::int64_t kTokens = 8, kWidth = 6, kVocab = 23;
  Student<Cpu64> s(kTokens, kWidth, kVocab, 21, c.bias);
  const SparseTeacherRows t =
      sparse_rows(random_logits(kTokens, kVocab, 2.0, 4), c.temperature, c.k);
  const std::vector<float> weights =
      c.weighted ? std::vector<float>{1, 0.5f, 0, 2, 1, 1, 0.25f, 1} : std::vector<float>{};
  const RunResult run = run_sparse(
      s, t, c.temperature, {.token_chunk = c.token_chunk, .vocab_chunk = c.vocab_chunk}, weights);
  auto loss = [&] { return reference_sparse(s.logits(), t, c.temperature, weights); };
  CHECK(run.result.loss == Approx(loss()).epsilon(1e-12));
  Random random(8);
  check_gradient("student hidden", s.hidden, run.d_hidden, loss, random);
  check_gradient("student head weight", s.head.weight.value, run.d_weight, loss, random);
  if (c.bias) check_gradient("student head bias", s.head.bias.value, run.d_bias, loss, random);
  if (c.weighted)
    for (std::int64_t j = 0; j < kWidth; ++j)
      CHECK(run.d_hidden.data<double>()[2 * kWidth + j] == 0.0);
}

TEST_CASE("CpuBf16 sparse KL follows the fp32 one within bf16 rounding", "[xkd][sparse_kl]") {
  constexpr std::int64_t kTokens = 7, kWidth = 8, kVocab = 29;
  Student<CpuBf16> sb(kTokens, kWidth, kVocab, 2);
  Student<Cpu> s32(kTokens, kWidth, kVocab, 2);
  // The fp32 side gets the bf16 values, so both compute on identical inputs.
  s32.head.weight.value = sb.head.weight.value.to(DType::F32);
  s32.hidden = sb.hidden.to(DType::F32);
  const SparseTeacherRows t = sparse_rows(random_logits(kTokens, kVocab, 2.0, 6), 1.5, 6);
  const RunResult b = run_sparse(sb, t, 1.5, {.token_chunk = 3, .vocab_chunk = 10});
  const RunResult f = run_sparse(s32, t, 1.5, {.token_chunk = 3, .vocab_chunk = 10});
  // Same bf16-representable inputs, fp32 logits on both: the loss agrees to fp32 rounding; the
  // bf16 d_hidden is the fp32 one rounded once.
  CHECK(b.result.loss == Approx(f.result.loss).epsilon(1e-5));
  CHECK(normwise(b.d_hidden, f.d_hidden) <= 1.0 / 128);
  CHECK(normwise(b.d_weight, f.d_weight) <= 1e-5);
}

TEST_CASE("sparse_logit_kl refuses malformed teacher rows, naming the row", "[xkd][sparse_kl]") {
  constexpr std::int64_t kTokens = 3, kWidth = 4, kVocab = 10;
  Student<Cpu> s(kTokens, kWidth, kVocab, 1);
  const SparseTeacherRows good = sparse_rows(random_logits(kTokens, kVocab, 1.0, 2), 1.0, 3);
  auto run = [&](const SparseTeacherRows& t) { run_sparse(s, t, 1.0); };
  {
    SparseTeacherRows t = good;
    t.ids[1 * 3 + 2] = 10;
    CHECK_THAT(error_of([&] { run(t); }),
               ContainsAll({"sparse teacher row 1", "id 10", "outside the vocabulary"}));
  }
  {
    SparseTeacherRows t = good;
    t.ids[2 * 3 + 1] = t.ids[2 * 3 + 0];
    CHECK_THAT(error_of([&] { run(t); }), ContainsAll({"sparse teacher row 2", "kept twice"}));
  }
  {
    SparseTeacherRows t = good;
    t.tail_mass[0] = 1.5f;
    CHECK_THAT(error_of([&] { run(t); }), ContainsAll({"sparse teacher row 0", "tail mass"}));
  }
  {
    SparseTeacherRows t = good;
    t.logprobs[4] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THAT(error_of([&] { run(t); }), ContainsAll({"sparse teacher row 1", "log-prob"}));
  }
  {
    SparseTeacherRows t = good;
    t.rows = 2;
    CHECK_THAT(error_of([&] { run(t); }), ContainsAll({"2 rows", "3 tokens"}));
  }
  {
    const SparseTeacherRows t = sparse_rows(random_logits(kTokens, 12, 1.0, 2), 1.0, 11);
    CHECK_THAT(error_of([&] { run(t); }), ContainsAll({"k = 11", "[1, 10]"}));
  }
}
