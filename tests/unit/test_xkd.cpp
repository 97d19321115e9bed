// The XKD objectives (kept/xkd/): every value against a float64 reference written from the
// definition with plain loops, every gradient against finite differences of that reference in
// float64, token and vocabulary chunking against the unchunked computation, fp32 against
// float64, the frozen teacher, an end-to-end Orion teacher -> Llama student Decoder pair, and
// the error messages for inputs that do not fit together.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "kept/backend/cpu.hpp"
#include "kept/model/decoder.hpp"
#include "kept/xkd/xkd.hpp"
#include "support/backend_values.hpp"
#include "support/gradcheck.hpp"
#include "support/layer_harness.hpp"

using namespace kept;
using namespace kept::test;
using namespace kept::xkd;

namespace {

// ---- float64 references, straight from the definitions ------------------------------------

using Matrix = std::vector<std::vector<double>>;  // [rows][cols]

Matrix to_rows(const Tensor& tensor) {
  const std::int64_t cols = tensor.dim(tensor.rank() - 1), rows = tensor.numel() / cols;
  Matrix result(static_cast<std::size_t>(rows), std::vector<double>(cols));
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c)
      result[r][c] = element(tensor, r * cols + c);
  return result;
}

// logits[i][v] = sum_k hidden[i][k] W[v][k] + b[v]
template <class Backend>
Matrix reference_logits(const Tensor& hidden, const Linear<Backend>& head) {
  const Matrix h = to_rows(hidden), w = to_rows(head.weight.value);
  const Matrix b =
      head.has_bias() ? to_rows(head.bias.value.reshape({1, head.out_features()})) : Matrix{};
  Matrix logits(h.size(), std::vector<double>(w.size(), 0.0));
  for (std::size_t i = 0; i < h.size(); ++i)
    for (std::size_t v = 0; v < w.size(); ++v) {
      double sum = b.empty() ? 0.0 : b[0][v];
      for (std::size_t k = 0; k < h[i].size(); ++k)
        sum += h[i][k] * w[v][k];
      logits[i][v] = sum;
    }
  return logits;
}

std::size_t argmax(const std::vector<double>& x) {
  return static_cast<std::size_t>(std::max_element(x.begin(), x.end()) - x.begin());
}

double weight_of(const std::vector<float>& weights, std::size_t i) {
  return weights.empty() ? 1.0 : weights[i];
}
double denominator(const std::vector<float>& weights, std::size_t tokens, double normalizer) {
  if (normalizer > 0) return normalizer;
  double sum = 0;
  for (std::size_t i = 0; i < tokens; ++i)
    sum += weight_of(weights, i);
  return sum;
}

// (1/N) sum_i w_i T^2 sum_v p_v log(p_v / q_v)
double reference_kl(const Matrix& teacher, const Matrix& student, double temperature,
                    const std::vector<float>& weights = {}, double normalizer = 0) {
  double total = 0;
  for (std::size_t i = 0; i < teacher.size(); ++i) {
    const auto p = softmax(teacher[i], temperature), q = softmax(student[i], temperature);
    double kl = 0;
    for (std::size_t v = 0; v < p.size(); ++v)
      if (p[v] > 0) kl += p[v] * std::log(p[v] / q[v]);
    total += weight_of(weights, i) * temperature * temperature * kl;
  }
  const double n = denominator(weights, teacher.size(), normalizer);
  return n > 0 ? total / n : 0.0;
}

// dloss/ds = (w_i / N) T (q - p), then through the head: d_hidden = dlogits W.
template <class Backend>
Matrix reference_kl_hidden_gradient(const Matrix& teacher, const Matrix& student,
                                    const Linear<Backend>& head, double temperature) {
  const Matrix w = to_rows(head.weight.value);
  const double n = static_cast<double>(teacher.size());
  Matrix d_hidden(teacher.size(), std::vector<double>(w[0].size(), 0.0));
  for (std::size_t i = 0; i < teacher.size(); ++i) {
    const auto p = softmax(teacher[i], temperature), q = softmax(student[i], temperature);
    for (std::size_t v = 0; v < p.size(); ++v)
      for (std::size_t k = 0; k < w[v].size(); ++k)
        d_hidden[i][k] += temperature * (q[v] - p[v]) / n * w[v][k];
  }
  return d_hidden;
}

// (1/N) sum_i w_i (1/V) sum_v (s - t)^2
double reference_logit_mse(const Matrix& teacher, const Matrix& student,
                           const std::vector<float>& weights = {}) {
  double total = 0;
  for (std::size_t i = 0; i < teacher.size(); ++i) {
    double sum = 0;
    for (std::size_t v = 0; v < teacher[i].size(); ++v)
      sum += (student[i][v] - teacher[i][v]) * (student[i][v] - teacher[i][v]);
    total += weight_of(weights, i) * sum / static_cast<double>(teacher[i].size());
  }
  const double n = denominator(weights, teacher.size(), 0);
  return n > 0 ? total / n : 0.0;
}

// -log softmax(s)[y] for one row.
double cross_entropy_of(const std::vector<double>& logits, std::int32_t target) {
  return -std::log(softmax(logits, 1.0)[static_cast<std::size_t>(target)]);
}

// mean over tokens with y >= 0 of -log softmax(s)[y]
double reference_cross_entropy(const Matrix& logits, const std::vector<std::int32_t>& targets) {
  double total = 0;
  int counted = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    if (targets[i] < 0) continue;
    total += cross_entropy_of(logits[i], targets[i]);
    ++counted;
  }
  return counted ? total / counted : 0.0;
}

// (1/N) sum_i w_i sum_l ||s^l_i - t'^l_i||^2, t' optionally centred per token.
double reference_hidden_mse(const std::vector<Tensor>& teacher, const std::vector<Tensor>& student,
                            bool centre, const std::vector<float>& weights = {}) {
  double total = 0;
  std::size_t tokens = 0;
  for (std::size_t l = 0; l < teacher.size(); ++l) {
    const Matrix t = to_rows(teacher[l]), s = to_rows(student[l]);
    tokens = t.size();
    for (std::size_t i = 0; i < t.size(); ++i) {
      double mean = 0;
      for (double x : t[i])
        mean += x / static_cast<double>(t[i].size());
      double sum = 0;
      for (std::size_t c = 0; c < t[i].size(); ++c) {
        const double diff = s[i][c] - (t[i][c] - (centre ? mean : 0.0));
        sum += diff * diff;
      }
      total += weight_of(weights, i) * sum;
    }
  }
  return total / denominator(weights, tokens, 0);
}

// ---- fixtures ----------------------------------------------------------------------------

// A teacher and a student LM head with their final hidden states. Values are drawn as fp32 and
// converted, so the Cpu and Cpu64 fixtures of one seed hold identical numbers.
template <class Backend>
struct HeadPair {
  using Scalar = typename Backend::Activation;
  Backend backend;
  Linear<Backend> teacher_head, student_head;
  Tensor teacher_hidden, student_hidden;
  std::int64_t tokens, hidden, vocab;

  HeadPair(std::int64_t tokens_, std::int64_t hidden_, std::int64_t vocab_, std::uint64_t seed,
           bool bias = false)
      : tokens(tokens_), hidden(hidden_), vocab(vocab_) {
    Random random(seed);
    teacher_head = Linear<Backend>(backend, "teacher.lm_head", hidden, vocab, bias);
    student_head = Linear<Backend>(backend, "lm_head", hidden, vocab, bias);
    auto draw = [&](const Shape& shape, double scale) {
      return random_tensor<float>(shape, random, scale).to(Backend::Precision::activation);
    };
    teacher_head.weight.value = draw({vocab, hidden}, 0.6);
    student_head.weight.value = draw({vocab, hidden}, 0.6);
    if (bias) {
      teacher_head.bias.value = draw({vocab}, 0.5);
      student_head.bias.value = draw({vocab}, 0.5);
    }
    teacher_hidden = draw({tokens, hidden}, 1.0);
    student_hidden = draw({tokens, hidden}, 1.0);
  }

  // Fresh zero gradients for the student head (the teacher's stay undefined).
  void zero_student_grads() {
    student_head.visit(
        [&](Parameter& p) { p.grad = backend.zeros(Backend::Precision::grad, p.value.shape()); });
  }
  MatrixView<const Scalar> teacher_view() const { return as_matrix<Scalar>(teacher_hidden); }
  MatrixView<const Scalar> student_view() const { return as_matrix<Scalar>(student_hidden); }
  Matrix teacher_logits() const { return reference_logits(teacher_hidden, teacher_head); }
  Matrix student_logits() const { return reference_logits(student_hidden, student_head); }
};

enum class Objective { Kl, Mse, CrossEntropy };

const char* objective_name(Objective objective) {
  switch (objective) {
    case Objective::Kl:
      return "logit_kl";
    case Objective::Mse:
      return "logit_mse";
    case Objective::CrossEntropy:
      return "cross_entropy";
  }
  return "?";
}

struct RunSettings {
  double temperature = 1.0;
  std::int64_t token_chunk = 256, vocab_chunk = 0;
  std::vector<float> weights{};         // KL, MSE
  std::vector<std::int32_t> targets{};  // CE
};

struct RunResult {
  double loss = 0;
  std::int64_t tokens = 0, top1 = 0;
  Tensor d_hidden, d_weight, d_bias;

  // An objective's result, with its top-1 count (agreement or accuracy).
  template <class Result>
  void take(const Result& r, std::int64_t top1_count) {
    loss = r.loss;
    tokens = r.tokens;
    top1 = top1_count;
  }
};

// Runs one objective from zero gradients; returns its value and the student gradients.
template <class Backend>
RunResult run_objective(HeadPair<Backend>& pair, Objective objective, const RunSettings& settings,
                        LogitWorkspace<Backend>* workspace = nullptr) {
  using Scalar = typename Backend::Activation;
  pair.zero_student_grads();
  RunResult result;
  result.d_hidden = pair.backend.zeros(Backend::Precision::activation, pair.student_hidden.shape());
  auto d_hidden = as_matrix<Scalar>(result.d_hidden);
  switch (objective) {
    case Objective::Kl: {
      const auto r = logit_kl(
          pair.backend, pair.teacher_head, pair.teacher_view(), pair.student_head,
          pair.student_view(), &d_hidden,
          {.temperature = settings.temperature,
           .chunking = {.token_chunk = settings.token_chunk, .vocab_chunk = settings.vocab_chunk}},
          settings.weights, workspace);
      result.take(r, r.top1_agree);
      break;
    }
    case Objective::Mse: {
      const auto r = logit_mse(
          pair.backend, pair.teacher_head, pair.teacher_view(), pair.student_head,
          pair.student_view(), &d_hidden,
          {.chunking = {.token_chunk = settings.token_chunk, .vocab_chunk = settings.vocab_chunk}},
          settings.weights, workspace);
      result.take(r, r.top1_agree);
      break;
    }
    case Objective::CrossEntropy: {
      const auto r = cross_entropy(
          pair.backend, pair.student_head, pair.student_view(), settings.targets, &d_hidden,
          {.chunking = {.token_chunk = settings.token_chunk, .vocab_chunk = settings.vocab_chunk}},
          workspace);
      result.take(r, r.correct);
      break;
    }
  }
  result.d_weight = pair.student_head.weight.grad;
  if (pair.student_head.has_bias()) result.d_bias = pair.student_head.bias.grad;
  return result;
}

// The reference value of an objective for the pair's current values.
template <class Backend>
double reference_value(const HeadPair<Backend>& pair, Objective objective,
                       const RunSettings& settings) {
  switch (objective) {
    case Objective::Kl:
      return reference_kl(pair.teacher_logits(), pair.student_logits(), settings.temperature,
                          settings.weights);
    case Objective::Mse:
      return reference_logit_mse(pair.teacher_logits(), pair.student_logits(), settings.weights);
    case Objective::CrossEntropy:
      return reference_cross_entropy(pair.student_logits(), settings.targets);
  }
  return 0;
}

std::vector<std::int32_t> random_targets(std::int64_t tokens, std::int64_t vocab, Random& random,
                                         bool with_ignored) {
  std::vector<std::int32_t> targets(static_cast<std::size_t>(tokens));
  for (std::size_t i = 0; i < targets.size(); ++i)
    targets[i] = static_cast<std::int32_t>(random.below(static_cast<std::uint64_t>(vocab)));
  if (with_ignored) {
    targets[1] = -1;
    targets.back() = -1;
  }
  return targets;
}

// A mask (0/1) and general non-negative weights for 10 tokens.
std::vector<float> mask_weights() {
  return {1, 1, 0, 1, 1, 1, 0, 1, 1, 1};
}
std::vector<float> soft_weights() {
  return {0.5f, 2, 0, 1, 1.5f, 0.25f, 1, 3, 0, 1};
}

double max_abs(const Tensor& tensor) {
  double worst = 0;
  for (std::int64_t i = 0; i < tensor.numel(); ++i)
    worst = std::max(worst, std::fabs(element(tensor, i)));
  return worst;
}

}  // namespace

// ---- values ------------------------------------------------------------------------------

TEST_CASE("XKD logit objectives match float64 references from the definitions", "[xkd]") {
  const Objective objective = GENERATE(Objective::Kl, Objective::Mse, Objective::CrossEntropy);
  const bool bias = GENERATE(false, true);
  const int weighting = GENERATE(0, 1, 2);  // none, 0/1 mask, general weights
  INFO(objective_name(objective) << ", bias " << bias << ", weighting " << weighting);
  HeadPair<Cpu64> pair(10, 6, 23, 11, bias);
  Random random(3);
  RunSettings settings;
  settings.weights = weighting == 0   ? std::vector<float>{}
                     : weighting == 1 ? mask_weights()
                                      : soft_weights();
  settings.targets = random_targets(10, 23, random, weighting > 0);
  for (double temperature : {1.0, 2.0, 0.5}) {
    if (objective != Objective::Kl && temperature != 1.0) continue;
    settings.temperature = temperature;
    INFO("temperature " << temperature);
    const RunResult result = run_objective(pair, objective, settings);
    const double expected = reference_value(pair, objective, settings);
    CHECK(result.loss == Approx(expected).epsilon(1e-12));
    CHECK(result.loss > 0);
  }
}

TEST_CASE("logit_kl top-1 agreement and token counts follow the definition", "[xkd]") {
  HeadPair<Cpu64> pair(10, 6, 23, 12);
  // Make some students agree with the teacher: copy the teacher's hidden state and head rows.
  pair.student_head.weight.value = pair.teacher_head.weight.value.clone();
  for (std::int64_t i = 0; i < 10; i += 3)
    for (std::int64_t k = 0; k < 6; ++k)
      pair.student_hidden.data<double>()[i * 6 + k] = pair.teacher_hidden.data<double>()[i * 6 + k];
  const Matrix t = pair.teacher_logits(), s = pair.student_logits();
  const std::vector<float> weights = mask_weights();
  std::int64_t agree = 0, counted = 0;
  for (std::size_t i = 0; i < 10; ++i) {
    if (weights[i] == 0) continue;
    ++counted;
    agree += argmax(t[i]) == argmax(s[i]);
  }
  REQUIRE(agree >= 3);
  REQUIRE(agree < counted);
  for (std::int64_t vocab_chunk : {0, 4}) {
    const auto result =
        logit_kl(pair.backend, pair.teacher_head, pair.teacher_view(), pair.student_head,
                 pair.student_view(), nullptr,
                 {.chunking = {.token_chunk = 3, .vocab_chunk = vocab_chunk}}, weights);
    CHECK(result.tokens == counted);
    CHECK(result.weight_sum == 8.0);
    CHECK(result.top1_agree == agree);
    const auto mse = logit_mse(pair.backend, pair.teacher_head, pair.teacher_view(),
                               pair.student_head, pair.student_view(), nullptr,
                               {.chunking = {.vocab_chunk = vocab_chunk}}, weights);
    CHECK(mse.top1_agree == agree);
  }
}

TEST_CASE("logit_kl scales by T^2 and its gradient matches the T (q - p) reference", "[xkd]") {
  HeadPair<Cpu64> pair(10, 6, 23, 13);
  const Matrix t = pair.teacher_logits(), s = pair.student_logits();
  for (double temperature : {1.0, 2.0, 4.0}) {
    INFO("temperature " << temperature);
    RunSettings settings;
    settings.temperature = temperature;
    const RunResult result = run_objective(pair, Objective::Kl, settings);
    // The loss is T^2 times the KL of the softened distributions.
    CHECK(result.loss == Approx(reference_kl(t, s, temperature)).epsilon(1e-12));
    CHECK(result.loss / (temperature * temperature) ==
          Approx(reference_kl(t, s, temperature) / (temperature * temperature)).epsilon(1e-12));
    const Matrix expected = reference_kl_hidden_gradient(t, s, pair.student_head, temperature);
    double worst = 0, largest = 0;
    for (std::size_t i = 0; i < expected.size(); ++i)
      for (std::size_t k = 0; k < expected[i].size(); ++k) {
        worst = std::max(worst, std::fabs(element(result.d_hidden, i * 6 + k) - expected[i][k]));
        largest = std::max(largest, std::fabs(expected[i][k]));
      }
    CHECK(worst <= 1e-12 * largest);
    CHECK(largest > 1e-3);
  }
  // With T^2 the gradient keeps its order of magnitude as T grows; without it, it would fall
  // like 1/T^2 (a factor 16 from T = 1 to 4).
  RunSettings at1, at4;
  at4.temperature = 4.0;
  const double norm1 = max_abs(run_objective(pair, Objective::Kl, at1).d_hidden);
  const double norm4 = max_abs(run_objective(pair, Objective::Kl, at4).d_hidden);
  CHECK(norm4 > norm1 / 8);
}

// ---- gradients ---------------------------------------------------------------------------

TEST_CASE("XKD logit objective gradients match finite differences in float64", "[xkd]") {
  struct Case {
    Objective objective;
    double temperature;
    int weighting;
    std::int64_t token_chunk, vocab_chunk;
    bool bias;
  };
  const Case c =
      GENERATE(Case{Objective::Kl, 1.0, 0, 256, 0, false}, Case{Objective::Kl, 2.5, 1, 3, 5, true},
               Case{Objective::Kl, 0.7, 2, 4, 1, false}, Case{Objective::Mse, 1.0, 0, 256, 0, true},
               Case{Objective::Mse, 1.0, 2, 3, 7, false},
               Case{Objective::CrossEntropy, 1.0, 0, 256, 0, false},
               Case{Objective::CrossEntropy, 1.0, 1, 3, 5, true});
  INFO(objective_name(c.objective)
       << ", T " << c.temperature << ", weighting " << c.weighting << ", token_chunk "
       << c.token_chunk << ", vocab_chunk " << c.vocab_chunk << ", bias " << c.bias);
  HeadPair<Cpu64> pair(10, 6, 23, 21, c.bias);
  Random random(5);
  RunSettings settings;
  settings.temperature = c.temperature;
  settings.token_chunk = c.token_chunk;
  settings.vocab_chunk = c.vocab_chunk;
  settings.weights = c.weighting == 0   ? std::vector<float>{}
                     : c.weighting == 1 ? mask_weights()
                                        : soft_weights();
  settings.targets = random_targets(10, 23, random, c.weighting > 0);
  const RunResult result = run_objective(pair, c.objective, settings);
  auto loss = [&] { return reference_value(pair, c.objective, settings); };
  check_gradient("student hidden", pair.student_hidden, result.d_hidden, loss, random);
  check_gradient("student head weight", pair.student_head.weight.value, result.d_weight, loss,
                 random);
  if (c.bias)
    check_gradient("student head bias", pair.student_head.bias.value, result.d_bias, loss, random);
  // Masked tokens get no gradient.
  if (c.weighting == 1 && c.objective != Objective::CrossEntropy)
    for (std::int64_t k = 0; k < 6; ++k)
      CHECK(result.d_hidden.data<double>()[2 * 6 + k] == 0.0);
  if (c.weighting > 0 && c.objective == Objective::CrossEntropy)
    for (std::int64_t k = 0; k < 6; ++k)
      CHECK(result.d_hidden.data<double>()[1 * 6 + k] == 0.0);
}

TEST_CASE("hidden_mse matches Eq. 1 and its gradients match finite differences", "[xkd]") {
  const bool centre = GENERATE(false, true);
  const bool weighted = GENERATE(false, true);
  INFO("centre_teacher " << centre << ", weighted " << weighted);
  Cpu64 cpu;
  Random random(8);
  const std::int64_t slots = 4, tokens = 10, hidden = 6;
  std::vector<Tensor> teacher, student;
  for (std::int64_t l = 0; l < slots; ++l) {
    // An offset per token makes centring matter.
    teacher.push_back(random_tensor({tokens, hidden}, random, 1.0, 0.7));
    student.push_back(random_tensor({tokens, hidden}, random, 1.0));
  }
  const std::vector<float> weights = weighted ? soft_weights() : std::vector<float>{};
  std::vector<Tensor> d_states;
  const HiddenMseResult result =
      hidden_mse(cpu, teacher, student, &d_states, {.centre_teacher = centre}, weights);
  const double expected = reference_hidden_mse(teacher, student, centre, weights);
  CHECK(result.loss == Approx(expected).epsilon(1e-12));
  REQUIRE(result.slot_loss.size() == slots);
  double slot_sum = 0;
  for (double x : result.slot_loss)
    slot_sum += x;
  CHECK(slot_sum == Approx(result.loss).epsilon(1e-12));
  REQUIRE(d_states.size() == slots);
  // The loss is quadratic, so a central difference is exact whatever the step: a large step
  // keeps the rounding of the (large) sum over all slots out of the comparison.
  for (std::int64_t l = 0; l < slots; ++l)
    check_gradient("state " + std::to_string(l), student[l], d_states[l],
                   [&] { return reference_hidden_mse(teacher, student, centre, weights); }, random,
                   {.step = 1e-2});

  // Against a student equal to the centred teacher, the centred loss is zero.
  if (centre) {
    std::vector<Tensor> centred;
    for (const Tensor& t : teacher) {
      Tensor c = t.clone();
      for (std::int64_t i = 0; i < tokens; ++i) {
        double mean = 0;
        for (std::int64_t k = 0; k < hidden; ++k)
          mean += c.data<double>()[i * hidden + k] / hidden;
        for (std::int64_t k = 0; k < hidden; ++k)
          c.data<double>()[i * hidden + k] -= mean;
      }
      centred.push_back(c);
    }
    const auto zero = hidden_mse(cpu, teacher, centred, &d_states, {.centre_teacher = true});
    CHECK(zero.loss <= 1e-24);
    for (const Tensor& d : d_states)
      CHECK(max_abs(d) <= 1e-12);
  }
}

// ---- exactness and chunking --------------------------------------------------------------

TEST_CASE("logit_kl is exactly zero, with zero gradient, when student == teacher", "[xkd]") {
  HeadPair<Cpu64> pair(10, 6, 23, 31, /*bias=*/true);
  pair.student_head.weight.value = pair.teacher_head.weight.value.clone();
  pair.student_head.bias.value = pair.teacher_head.bias.value.clone();
  pair.student_hidden = pair.teacher_hidden.clone();
  for (double temperature : {1.0, 3.0})
    for (std::int64_t vocab_chunk : {0, 1, 5})
      for (std::int64_t token_chunk : {1, 4, 256}) {
        INFO("T " << temperature << ", vocab_chunk " << vocab_chunk << ", token_chunk "
                  << token_chunk);
        RunSettings settings;
        settings.temperature = temperature;
        settings.token_chunk = token_chunk;
        settings.vocab_chunk = vocab_chunk;
        settings.weights = soft_weights();
        const RunResult result = run_objective(pair, Objective::Kl, settings);
        CHECK(std::fabs(result.loss) <= 1e-12);
        CHECK(max_abs(result.d_hidden) <= 1e-12);
        CHECK(max_abs(result.d_weight) <= 1e-12);
        CHECK(max_abs(result.d_bias) <= 1e-12);
        CHECK(result.top1 == result.tokens);
        const RunResult mse = run_objective(pair, Objective::Mse, settings);
        CHECK(mse.loss == 0.0);
        CHECK(max_abs(mse.d_hidden) == 0.0);
      }
}

TEST_CASE("Token and vocabulary chunking give the unchunked result", "[xkd]") {
  const Objective objective = GENERATE(Objective::Kl, Objective::Mse, Objective::CrossEntropy);
  INFO(objective_name(objective));
  auto compare = [&](auto backend_tag, double tolerance) {
    using Backend = decltype(backend_tag);
    HeadPair<Backend> pair(10, 6, 23, 41, /*bias=*/true);
    Random random(9);
    RunSettings settings;
    settings.temperature = objective == Objective::Kl ? 1.7 : 1.0;
    settings.weights = soft_weights();
    settings.targets = random_targets(10, 23, random, true);
    settings.token_chunk = 10;
    const RunResult whole = run_objective(pair, objective, settings);
    LogitWorkspace<Backend> workspace;  // shared across the runs: buffers are reused
    for (std::int64_t token_chunk : {1, 3, 7, 10, 256})
      for (std::int64_t vocab_chunk : {1, 5, 13, 23, 0}) {
        INFO("token_chunk " << token_chunk << ", vocab_chunk " << vocab_chunk);
        settings.token_chunk = token_chunk;
        settings.vocab_chunk = vocab_chunk;
        const RunResult chunked = run_objective(pair, objective, settings, &workspace);
        CHECK(std::fabs(chunked.loss - whole.loss) <= tolerance * std::fabs(whole.loss));
        CHECK(chunked.tokens == whole.tokens);
        CHECK(chunked.top1 == whole.top1);
        CHECK(relative_max_error(chunked.d_hidden, whole.d_hidden) <= tolerance);
        CHECK(relative_max_error(chunked.d_weight, whole.d_weight) <= tolerance);
        CHECK(relative_max_error(chunked.d_bias, whole.d_bias) <= tolerance);
      }
  };
  SECTION("float64") {
    compare(Cpu64{}, 1e-12);
  }
  SECTION("fp32") {
    compare(Cpu{}, 1e-5);
  }
}

TEST_CASE("fp32 objectives agree with float64", "[xkd]") {
  const Objective objective = GENERATE(Objective::Kl, Objective::Mse, Objective::CrossEntropy);
  INFO(objective_name(objective));
  HeadPair<Cpu> pair32(10, 6, 23, 51, true);
  HeadPair<Cpu64> pair64(10, 6, 23, 51, true);
  Random random(10);
  RunSettings settings;
  settings.temperature = 2.0;
  settings.token_chunk = 4;
  settings.vocab_chunk = 9;
  settings.weights = mask_weights();
  settings.targets = random_targets(10, 23, random, true);
  const RunResult r32 = run_objective(pair32, objective, settings);
  const RunResult r64 = run_objective(pair64, objective, settings);
  CHECK(r32.loss == Approx(r64.loss).epsilon(1e-5));
  CHECK(r32.top1 == r64.top1);
  CHECK(relative_max_error(r32.d_hidden, r64.d_hidden) < 1e-5);
  CHECK(relative_max_error(r32.d_weight, r64.d_weight) < 1e-5);
  CHECK(relative_max_error(r32.d_bias, r64.d_bias) < 1e-5);
}

TEST_CASE("The teacher head's parameters get no gradient", "[xkd]") {
  HeadPair<Cpu64> pair(10, 6, 23, 61, true);
  SECTION("undefined teacher grads stay undefined") {
    for (Objective objective : {Objective::Kl, Objective::Mse}) {
      run_objective(pair, objective, {.vocab_chunk = 5});
      CHECK_FALSE(pair.teacher_head.weight.grad.defined());
      CHECK_FALSE(pair.teacher_head.bias.grad.defined());
    }
  }
  SECTION("allocated teacher grads stay zero") {
    pair.teacher_head.visit(
        [&](Parameter& p) { p.grad = pair.backend.zeros(DType::F32, p.value.shape()); });
    for (Objective objective : {Objective::Kl, Objective::Mse})
      for (std::int64_t vocab_chunk : {0, 5}) {
        const RunResult result = run_objective(pair, objective, {.vocab_chunk = vocab_chunk});
        CHECK(max_abs(result.d_weight) > 0);
        CHECK(max_abs(pair.teacher_head.weight.grad) == 0.0);
        CHECK(max_abs(pair.teacher_head.bias.grad) == 0.0);
      }
    EvalSums sums;
    std::vector<std::int32_t> targets(10, 3);
    accumulate_eval(pair.backend, &pair.teacher_head, pair.teacher_view(), pair.student_head,
                    pair.student_view(), targets, 5, sums);
    CHECK(max_abs(pair.teacher_head.weight.grad) == 0.0);
  }
}

TEST_CASE("Gradients accumulate into d_hidden and the head grads", "[xkd]") {
  HeadPair<Cpu64> pair(10, 6, 23, 62);
  const RunResult once = run_objective(pair, Objective::Kl, {});
  Tensor d_hidden = once.d_hidden.clone();
  auto view = as_matrix<double>(d_hidden);
  const Tensor d_weight = once.d_weight.clone();
  logit_kl(pair.backend, pair.teacher_head, pair.teacher_view(), pair.student_head,
           pair.student_view(), &view, {.chunking = {.vocab_chunk = 7}});
  for (std::int64_t i = 0; i < d_hidden.numel(); ++i)
    CHECK(d_hidden.data<double>()[i] == Approx(2 * once.d_hidden.data<double>()[i]).margin(1e-15));
  for (std::int64_t i = 0; i < d_weight.numel(); ++i)
    CHECK(pair.student_head.weight.grad.data<double>()[i] ==
          Approx(2 * d_weight.data<double>()[i]).margin(1e-15));
}

// ---- metrics -----------------------------------------------------------------------------

TEST_CASE("Evaluation sums match the references and add up over batches", "[xkd]") {
  HeadPair<Cpu64> pair(12, 6, 23, 71);
  Random random(12);
  std::vector<std::int32_t> targets = random_targets(12, 23, random, true);
  const std::int64_t seq = 4;
  const Matrix t = pair.teacher_logits(), s = pair.student_logits();
  // The reference: KL at T = 1, both CEs, agreement, per-position CE, over counted tokens.
  double kl = 0, student_ce = 0, teacher_ce = 0;
  std::int64_t counted = 0, agree = 0, student_correct = 0, teacher_correct = 0;
  std::vector<double> ce_by_position(seq, 0.0);
  std::vector<std::int64_t> tokens_by_position(seq, 0);
  for (std::size_t i = 0; i < 12; ++i) {
    if (targets[i] < 0) continue;
    ++counted;
    kl += reference_kl({t[i]}, {s[i]}, 1.0);
    student_ce += cross_entropy_of(s[i], targets[i]);
    teacher_ce += cross_entropy_of(t[i], targets[i]);
    agree += argmax(t[i]) == argmax(s[i]);
    student_correct += argmax(s[i]) == static_cast<std::size_t>(targets[i]);
    teacher_correct += argmax(t[i]) == static_cast<std::size_t>(targets[i]);
    ce_by_position[i % seq] += cross_entropy_of(s[i], targets[i]);
    ++tokens_by_position[i % seq];
  }
  for (std::int64_t vocab_chunk : {0, 1, 6})
    for (std::int64_t token_chunk : {1, 5, 256}) {
      INFO("token_chunk " << token_chunk << ", vocab_chunk " << vocab_chunk);
      EvalSums sums;
      accumulate_eval(pair.backend, &pair.teacher_head, pair.teacher_view(), pair.student_head,
                      pair.student_view(), targets, seq, sums,
                      {.chunking = {.token_chunk = token_chunk, .vocab_chunk = vocab_chunk}});
      CHECK(sums.tokens == counted);
      CHECK(sums.kl == Approx(kl).epsilon(1e-12));
      CHECK(sums.student_ce == Approx(student_ce).epsilon(1e-12));
      CHECK(sums.teacher_ce == Approx(teacher_ce).epsilon(1e-12));
      CHECK(sums.agree == agree);
      CHECK(sums.student_correct == student_correct);
      CHECK(sums.teacher_correct == teacher_correct);
      REQUIRE(sums.student_ce_by_position.size() == seq);
      for (std::int64_t k = 0; k < seq; ++k) {
        CHECK(sums.student_ce_by_position[k] == Approx(ce_by_position[k]).epsilon(1e-12));
        CHECK(sums.tokens_by_position[k] == tokens_by_position[k]);
      }
      CHECK(sums.student_perplexity() == Approx(std::exp(student_ce / counted)).epsilon(1e-12));
      CHECK(sums.mean_kl() == Approx(kl / counted).epsilon(1e-12));
      CHECK(sums.agreement_rate() == Approx(double(agree) / counted));
      // The CE sums agree with the cross_entropy objective.
      CHECK(sums.student_ce / counted == Approx(cross_entropy(pair.backend, pair.student_head,
                                                              pair.student_view(), targets, nullptr)
                                                    .loss)
                                             .epsilon(1e-12));
    }

  // Two batches accumulate to the sums of the whole.
  EvalSums whole, parts, first, second;
  accumulate_eval(pair.backend, &pair.teacher_head, pair.teacher_view(), pair.student_head,
                  pair.student_view(), targets, seq, whole);
  const auto half = [](MatrixView<const double> view, std::int64_t part) {
    return view.block(part * 8, 0, part ? 4 : 8, view.cols);
  };
  const std::span<const std::int32_t> all(targets);
  accumulate_eval(pair.backend, &pair.teacher_head, half(pair.teacher_view(), 0), pair.student_head,
                  half(pair.student_view(), 0), all.subspan(0, 8), seq, parts);
  accumulate_eval(pair.backend, &pair.teacher_head, half(pair.teacher_view(), 1), pair.student_head,
                  half(pair.student_view(), 1), all.subspan(8, 4), seq, second);
  first.merge(parts);
  first.merge(second);
  CHECK(first.tokens == whole.tokens);
  CHECK(first.kl == Approx(whole.kl).epsilon(1e-12));
  CHECK(first.student_ce == Approx(whole.student_ce).epsilon(1e-12));
  CHECK(first.agree == whole.agree);
  for (std::int64_t k = 0; k < seq; ++k)
    CHECK(first.student_ce_by_position[k] == Approx(whole.student_ce_by_position[k]));

  // Without a teacher: the student's perplexity only.
  EvalSums alone;
  accumulate_eval(pair.backend, static_cast<const Linear<Cpu64>*>(nullptr), {}, pair.student_head,
                  pair.student_view(), targets, seq, alone);
  CHECK(alone.student_ce == Approx(student_ce).epsilon(1e-12));
  CHECK(alone.teacher_ce == 0.0);
  CHECK(alone.agree == 0);
}

// ---- end to end --------------------------------------------------------------------------

namespace {
template <class Model>
void randomize_model(Model& model, Random& random) {
  randomize(model.embed_tokens, random, 1.0);
  for (auto& block : model.layers)
    randomize(block, random, 0.3);
  randomize(model.norm, random, 0.3);
  randomize(model.lm_head, random, 0.5);
}
}  // namespace

TEST_CASE("XKD end to end: Orion teacher, Llama student, KL + Eq. 1 through Decoder::backward",
          "[xkd]") {
  Cpu64 cpu;
  Random random(77);
  Decoder<LayerNorm, Cpu64> teacher(cpu, tiny_decoder_config(Architecture::Orion));
  Decoder<RMSNorm, Cpu64> student(cpu, tiny_decoder_config(Architecture::Llama));
  randomize_model(teacher, random);
  randomize_model(student, random);
  const std::int64_t batch = 2, seq = 5;
  std::vector<std::int32_t> tokens;
  for (int i = 0; i < batch * seq; ++i)
    tokens.push_back(static_cast<std::int32_t>(random.below(37)));
  const std::vector<float> weights = mask_weights();
  const double temperature = 1.5, hidden_weight = 0.1;

  Decoder<LayerNorm, Cpu64>::Activations teacher_acts;
  teacher.forward(cpu, tokens, batch, seq, teacher_acts, ForwardMode::Inference,
                  /*keep_states=*/true);
  Tensor teacher_logits;
  teacher.logits(cpu, teacher_acts, teacher_logits);
  const Matrix t = to_rows(teacher_logits);

  // The reference objective, from full logits and plain loops.
  Decoder<RMSNorm, Cpu64>::Activations acts;
  Tensor student_logits;
  auto objective = [&] {
    student.forward(cpu, tokens, batch, seq, acts, ForwardMode::Training);
    student.logits(cpu, acts, student_logits);
    return reference_kl(t, to_rows(student_logits), temperature, weights) +
           hidden_weight * reference_hidden_mse(teacher_acts.states, acts.states, true, weights);
  };

  // The analytic gradient: chunked logit_kl + hidden_mse, then the student's backward.
  const double expected = objective();
  student.zero_grad(cpu);
  Tensor d_hidden = cpu.zeros(DType::F64, acts.hidden.shape());
  auto d_hidden_view = as_matrix<double>(d_hidden);
  const auto kl = logit_kl(
      cpu, teacher.lm_head, as_matrix<double>(teacher_acts.hidden), student.lm_head,
      as_matrix<double>(acts.hidden), &d_hidden_view,
      {.temperature = temperature, .chunking = {.token_chunk = 3, .vocab_chunk = 8}}, weights);
  // normalizer = (sum of the weights) / hidden_weight folds the 0.1 factor into the mean.
  std::vector<Tensor> d_states;
  const auto states =
      hidden_mse(cpu, teacher_acts.states, acts.states, &d_states,
                 {.centre_teacher = true, .normalizer = 8.0 / hidden_weight}, weights);
  CHECK(kl.loss + states.loss == Approx(expected).epsilon(1e-12));
  student.backward(cpu, acts, d_hidden, &d_states);
  CHECK_FALSE(teacher.lm_head.weight.grad.defined());

  int checked = 0;
  student.visit_parameters([&](Parameter& p) {
    const bool pick = p.name == "model.embed_tokens.weight" ||
                      p.name == "model.layers.0.self_attn.q_proj.weight" ||
                      p.name == "model.layers.1.mlp.down_proj.weight" ||
                      p.name == "model.layers.1.input_layernorm.weight" ||
                      p.name == "model.norm.weight" || p.name == "lm_head.weight";
    if (!pick) return;
    check_gradient(p.name, p.value, p.grad, objective, random, {.directions = 2, .coordinates = 2});
    ++checked;
  });
  CHECK(checked == 6);
}

// ---- errors ------------------------------------------------------------------------------

TEST_CASE("XKD objectives reject inputs that do not fit together", "[xkd]") {
  Cpu64 cpu;
  HeadPair<Cpu64> pair(10, 6, 23, 81);
  SECTION("vocabulary sizes differ") {
    Linear<Cpu64> other(cpu, "lm_head", 6, 25, false);
    CHECK_THROWS_WITH(
        logit_kl(cpu, pair.teacher_head, pair.teacher_view(), other, pair.student_view(), nullptr),
        Catch::Contains("vocabulary sizes differ") && Catch::Contains("23") &&
            Catch::Contains("25"));
    CHECK_THROWS_WITH(
        logit_mse(cpu, pair.teacher_head, pair.teacher_view(), other, pair.student_view(), nullptr),
        Catch::Contains("23") && Catch::Contains("25"));
    EvalSums sums;
    std::vector<std::int32_t> targets(10, 0);
    CHECK_THROWS_WITH(accumulate_eval(cpu, &pair.teacher_head, pair.teacher_view(), other,
                                      pair.student_view(), targets, 5, sums),
                      Catch::Contains("23") && Catch::Contains("25"));
  }
  SECTION("hidden sizes differ") {
    Random random(1);
    Tensor wide = random_tensor({10, 8}, random);
    CHECK_THROWS_WITH(
        logit_kl(cpu, pair.teacher_head, as_matrix<double>(wide), pair.student_head,
                 pair.student_view(), nullptr),
        Catch::Contains("teacher hidden states have 8") && Catch::Contains("takes 6"));
    CHECK_THROWS_WITH(
        logit_kl(cpu, pair.teacher_head, pair.teacher_view(), pair.student_head,
                 as_matrix<double>(wide), nullptr),
        Catch::Contains("student hidden states have 8") && Catch::Contains("takes 6"));
    std::vector<Tensor> teacher_states{wide, wide},
        student_states{pair.student_hidden, pair.student_hidden};
    CHECK_THROWS_WITH(hidden_mse(cpu, teacher_states, student_states, nullptr),
                      Catch::Contains("teacher 8") && Catch::Contains("student 6"));
    std::vector<Tensor> three{pair.student_hidden, pair.student_hidden, pair.student_hidden};
    CHECK_THROWS_WITH(hidden_mse(cpu, student_states, three, nullptr),
                      Catch::Contains("2 residual-stream slots") && Catch::Contains("student 3"));
  }
  SECTION("token counts differ") {
    const auto fewer = pair.student_view().block(0, 0, 7, 6);
    CHECK_THROWS_WITH(
        logit_kl(cpu, pair.teacher_head, pair.teacher_view(), pair.student_head, fewer, nullptr),
        Catch::Contains("10 tokens") && Catch::Contains("student 7"));
    std::vector<float> weights(7, 1.0f);
    CHECK_THROWS_WITH(logit_kl(cpu, pair.teacher_head, pair.teacher_view(), pair.student_head,
                               pair.student_view(), nullptr, {}, weights),
                      Catch::Contains("7 token weights for 10 tokens"));
  }
  SECTION("target ids out of range") {
    std::vector<std::int32_t> targets(10, 1);
    targets[4] = 23;
    CHECK_THROWS_WITH(
        cross_entropy(cpu, pair.student_head, pair.student_view(), targets, nullptr),
        Catch::Contains("target id 23 at token 4") && Catch::Contains("vocabulary of 23"));
    targets[4] = -2;
    EvalSums sums;
    CHECK_THROWS_WITH(accumulate_eval(cpu, &pair.teacher_head, pair.teacher_view(),
                                      pair.student_head, pair.student_view(), targets, 5, sums),
                      Catch::Contains("target id -2"));
  }
  SECTION("bad options") {
    CHECK_THROWS_WITH(logit_kl(cpu, pair.teacher_head, pair.teacher_view(), pair.student_head,
                               pair.student_view(), nullptr, {.temperature = 0}),
                      Catch::Contains("temperature"));
    CHECK_THROWS_WITH(logit_kl(cpu, pair.teacher_head, pair.teacher_view(), pair.student_head,
                               pair.student_view(), nullptr, {.chunking = {.token_chunk = 0}}),
                      Catch::Contains("token_chunk"));
    std::vector<float> negative(10, 1.0f);
    negative[3] = -1;
    CHECK_THROWS_WITH(logit_mse(cpu, pair.teacher_head, pair.teacher_view(), pair.student_head,
                                pair.student_view(), nullptr, {}, negative),
                      Catch::Contains("token weight -1 at token 3"));
  }
}

TEST_CASE("A teacher of a different width is fine for the logit objectives", "[xkd]") {
  // KEPT's teacher and student are the same size, but the logit objectives only need the
  // vocabularies to match; each model's hidden states need only fit its own head.
  Cpu64 cpu;
  HeadPair<Cpu64> wide(10, 9, 23, 91), narrow(10, 6, 23, 92);
  const double expected = reference_kl(wide.teacher_logits(), narrow.student_logits(), 1.0);
  const auto result = logit_kl(cpu, wide.teacher_head, wide.teacher_view(), narrow.student_head,
                               narrow.student_view(), nullptr, {.chunking = {.vocab_chunk = 4}});
  CHECK(result.loss == Approx(expected).epsilon(1e-12));
}

// ---- opm-l2 (the norm-only objective) -----------------------------------------------------

TEST_CASE("opm_l2: value from the definition and gradient by finite differences", "[xkd]") {
  const std::int64_t rows = 6, cols = 9;
  Random random(404);
  std::vector<double> x(rows * cols), g(cols), b(cols), w(cols);
  for (double& v : x)
    v = 0.4 + random.normal();
  for (double& v : g)
    v = 1.0 + 0.3 * random.normal();
  for (double& v : b)
    v = 0.3 * random.normal();
  for (double& v : w)
    v = 1.0 + 0.3 * random.normal();
  const double eps = 1e-5, normalizer = 4.0;
  Cpu64 cpu;
  OpmL2Workspace<Cpu64> workspace;
  auto loss_at = [&](const std::vector<double>& weight, std::vector<double>* grad) {
    std::vector<double> scratch(cols, 0.0);
    return opm_l2(cpu, MatrixView<const double>(x.data(), rows, cols), g.data(), b.data(), eps,
                  weight.data(), eps, grad ? grad->data() : scratch.data(), normalizer, workspace);
  };
  // The definition, written out in float64.
  double expected = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    double mean = 0, square = 0;
    for (std::int64_t c = 0; c < cols; ++c)
      mean += x[r * cols + c] / cols;
    for (std::int64_t c = 0; c < cols; ++c)
      square += x[r * cols + c] * x[r * cols + c] / cols;
    double var = 0;
    for (std::int64_t c = 0; c < cols; ++c)
      var += (x[r * cols + c] - mean) * (x[r * cols + c] - mean) / cols;
    for (std::int64_t c = 0; c < cols; ++c) {
      const double y = g[c] * (x[r * cols + c] - mean) / std::sqrt(var + eps) + b[c];
      const double z = w[c] * x[r * cols + c] / std::sqrt(square + eps);
      expected += (z - y) * (z - y) / normalizer;
    }
  }
  std::vector<double> grad(cols, 0.5);  // d_weight accumulates: starts from 0.5
  CHECK(loss_at(w, &grad) == Approx(expected).epsilon(1e-12));
  for (std::int64_t c = 0; c < cols; ++c) {
    std::vector<double> plus = w, minus = w;
    plus[c] += 1e-6;
    minus[c] -= 1e-6;
    const double numeric = (loss_at(plus, nullptr) - loss_at(minus, nullptr)) / 2e-6;
    CHECK(grad[c] - 0.5 == Approx(numeric).epsilon(1e-7).margin(1e-9));
  }
}
