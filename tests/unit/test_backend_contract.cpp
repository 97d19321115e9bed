// The backend contract (kept/backend/backend.hpp): every CPU backend satisfies it, a backend
// that lacks an op does not, and the whole model, every objective, the optimizer step, the
// checkpoint round trip and the evaluation instantiate for every backend (explicit
// instantiation compiles every member, so an op the templates call but the concept forgot, or a
// signature that drifted, fails this file). tests/cuda/cuda_contract.cu does the same for Cuda.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "kept/backend/backend.hpp"
#include "kept/backend/cpu.hpp"
#include "kept/backend/cpu_bf16.hpp"
#include "kept/io/weights.hpp"
#include "kept/model/decoder.hpp"
#include "kept/model/init.hpp"
#include "kept/train/adamw.hpp"
#include "kept/train/checkpoint_state.hpp"
#include "kept/xkd/xkd.hpp"
#include "support/training_surface.hpp"

namespace {

// A backend with one op spelled the CUDA slice's old way (bool instead of Transpose).
struct DriftedGemm : kept::Cpu {
  void gemm(kept::MatrixView<const float>, bool, kept::MatrixView<const float>, bool,
            kept::MatrixView<float>) {}
};
// A bf16 backend whose weight-gradient GEMM cannot write fp32 gradients.
struct NoMixedGemm : kept::CpuBf16 {
  template <class TC>
  void gemm(kept::MatrixView<const kept::bf16>, kept::Transpose, kept::MatrixView<const kept::bf16>,
            kept::Transpose, kept::MatrixView<TC>, float = 1,
            float = 0) requires std::is_same_v<TC, kept::bf16> {}
};
// A backend that lacks an op.
struct NoSwiglu : kept::Cpu {
  void swiglu_forward() = delete;
};

template <class B>
constexpr auto objectives = std::tuple{&kept::xkd::logit_kl<B>,         &kept::xkd::logit_mse<B>,
                                       &kept::xkd::cross_entropy<B>,    &kept::xkd::hidden_mse<B>,
                                       &kept::xkd::accumulate_eval<B>,  &kept::xkd::opm_l2<B>,
                                       &kept::test::training_surface<B>};

}  // namespace

template class kept::Decoder<kept::LayerNorm, kept::Cpu>;
template class kept::Decoder<kept::RMSNorm, kept::Cpu>;
template class kept::Decoder<kept::LayerNorm, kept::Cpu64>;
template class kept::Decoder<kept::RMSNorm, kept::Cpu64>;
template class kept::Decoder<kept::LayerNorm, kept::CpuBf16>;
template class kept::Decoder<kept::RMSNorm, kept::CpuBf16>;

static_assert(kept::Backend<kept::Cpu>);
static_assert(kept::Backend<kept::Cpu64>);
static_assert(kept::Backend<kept::CpuBf16>);
static_assert(!kept::Backend<DriftedGemm>, "a gemm with bool transposes must not satisfy it");
static_assert(!kept::Backend<NoSwiglu>, "a backend without swiglu_forward must not satisfy it");
static_assert(!kept::Backend<NoMixedGemm>, "bf16 x bf16 -> fp32 gradients is part of the contract");
static_assert(!kept::Backend<int>);

TEST_CASE("every objective instantiates for every CPU backend") {
  std::apply([](auto... f) { CHECK(((f != nullptr) && ...)); }, objectives<kept::Cpu>);
  std::apply([](auto... f) { CHECK(((f != nullptr) && ...)); }, objectives<kept::Cpu64>);
  std::apply([](auto... f) { CHECK(((f != nullptr) && ...)); }, objectives<kept::CpuBf16>);
}

namespace {

// The same initial values on two backends (init draws on the host and uploads).
template <class B>
kept::Decoder<kept::RMSNorm, B> tiny_model(B& backend) {
  kept::ModelConfig config =
      kept::ModelConfig::decoder(kept::Architecture::Llama, 37, 16, 24, 2, 2);
  config.rope_theta = 1e4;
  kept::Decoder<kept::RMSNorm, B> model(backend, config);
  kept::init_parameters(backend, model, {.seed = 11, .std = 0.3});
  return model;
}

std::vector<std::int32_t> tiny_tokens() {
  std::vector<std::int32_t> tokens;
  for (int i = 0; i < 2 * 9; ++i)
    tokens.push_back((i * 7 + 3) % 37);
  return tokens;
}

}  // namespace

TEST_CASE("CpuBf16 runs the model close to float64 and trains with fp32 master weights",
          "[backend][bf16]") {
  kept::Cpu64 cpu64;
  kept::CpuBf16 bf16;
  auto reference = tiny_model(cpu64);
  auto model = tiny_model(bf16);
  const std::vector<std::int32_t> tokens = tiny_tokens();

  // Forward: logits agree to a few bf16 ulps of the logits' scale. Each of the ~20 ops between
  // embedding and logits rounds its output once (2^-8 relative); the errors add, not multiply,
  // at this depth, so 20 * 2^-8 of the largest logit is a generous a-priori bound.
  typename kept::Decoder<kept::RMSNorm, kept::Cpu64>::Activations ref_acts;
  typename kept::Decoder<kept::RMSNorm, kept::CpuBf16>::Activations acts;
  reference.forward(cpu64, tokens, 2, 9, ref_acts, kept::ForwardMode::Inference);
  model.forward(bf16, tokens, 2, 9, acts, kept::ForwardMode::Training);
  kept::Tensor ref_logits, logits;
  reference.logits(cpu64, ref_acts, ref_logits);
  model.logits(bf16, acts, logits);
  REQUIRE(logits.dtype() == kept::DType::F32);  // logits are Stat
  const auto r = ref_logits.span<const double>();
  const auto l = logits.span<const float>();
  double scale = 0, worst = 0;
  for (std::size_t i = 0; i < r.size(); ++i) {
    scale = std::max(scale, std::abs(r[i]));
    worst = std::max(worst, std::abs(r[i] - l[i]));
  }
  CHECK(worst <= 20 * 0x1p-8 * scale);
  CHECK(worst > 0);  // bf16 storage really rounds

  // Training: gradients are fp32, the parameter stays round(master) after every step, and the
  // cross-entropy falls.
  std::vector<std::int32_t> targets(tokens.begin() + 1, tokens.end());
  targets.push_back(-1);
  kept::AdamW optimizer({.lr = 3e-2, .weight_decay = 0.0});
  auto params = kept::parameters_of(model);
  kept::Tensor d_hidden;
  double first = 0, last = 0;
  for (int step = 0; step < 8; ++step) {
    model.zero_grad(bf16);
    model.forward(bf16, tokens, 2, 9, acts, kept::ForwardMode::Training);
    bf16.ensure(d_hidden, kept::DType::BF16, acts.hidden.shape());
    bf16.fill_zero(d_hidden);
    auto d_view = kept::as_matrix<kept::bf16>(d_hidden);
    const double loss =
        kept::xkd::cross_entropy(bf16, model.lm_head,
                                 kept::as_matrix<const kept::bf16>(acts.hidden), targets, &d_view)
            .loss;
    model.backward(bf16, acts, d_hidden);
    REQUIRE(model.lm_head.weight.grad.dtype() == kept::DType::F32);
    REQUIRE(kept::all_finite(bf16, params));
    optimizer.step(bf16, params);
    (step == 0 ? first : last) = loss;
  }
  CHECK(last < 0.8 * first);
  const auto state = optimizer.state_tensors(bf16);
  int masters = 0;
  for (const kept::NamedTensor& t : state) {
    if (!t.name.starts_with("master/")) continue;
    ++masters;
    const kept::Parameter* p = nullptr;
    for (const kept::Parameter* q : params)
      if ("master/" + q->name == t.name) p = q;
    REQUIRE(p);
    const auto master = t.tensor.span<const float>();
    const auto value = p->value.span<const kept::bf16>();
    for (std::size_t i = 0; i < master.size(); ++i)
      REQUIRE(value[i].bits == kept::to_bf16(master[i]).bits);
  }
  CHECK(masters == static_cast<int>(params.size()));
}
