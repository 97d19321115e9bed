// The backend contract (kept/backend/backend.hpp): every CPU backend satisfies it, a backend
// that lacks an op does not, and the whole model, every objective and the evaluation
// instantiate for every backend (explicit instantiation compiles every member, so an op the
// templates call but the concept forgot, or a signature that drifted, fails this file).
#include <catch2/catch.hpp>

#include <tuple>

#include "kept/backend/backend.hpp"
#include "kept/backend/cpu.hpp"
#include "kept/model/decoder.hpp"
#include "kept/xkd/xkd.hpp"

namespace {

// A backend with one op spelled the CUDA slice's old way (bool instead of Transpose).
struct DriftedGemm : kept::Cpu {
  void gemm(kept::MatrixView<const float>, bool, kept::MatrixView<const float>, bool,
            kept::MatrixView<float>) {}
};
// A backend that lacks an op.
struct NoSwiglu : kept::Cpu {
  void swiglu_forward() = delete;
};

template <class B>
constexpr auto objectives =
    std::tuple{&kept::xkd::logit_kl<B>, &kept::xkd::logit_mse<B>, &kept::xkd::cross_entropy<B>,
               &kept::xkd::hidden_mse<B>, &kept::xkd::accumulate_eval<B>};

}  // namespace

template class kept::Decoder<kept::LayerNorm, kept::Cpu>;
template class kept::Decoder<kept::RMSNorm, kept::Cpu>;
template class kept::Decoder<kept::LayerNorm, kept::Cpu64>;
template class kept::Decoder<kept::RMSNorm, kept::Cpu64>;

static_assert(kept::Backend<kept::Cpu>);
static_assert(kept::Backend<kept::Cpu64>);
static_assert(!kept::Backend<DriftedGemm>, "a gemm with bool transposes must not satisfy it");
static_assert(!kept::Backend<NoSwiglu>, "a backend without swiglu_forward must not satisfy it");
static_assert(!kept::Backend<int>);

TEST_CASE("every objective instantiates for every CPU backend") {
  std::apply([](auto... f) { CHECK(((f != nullptr) && ...)); }, objectives<kept::Cpu>);
  std::apply([](auto... f) { CHECK(((f != nullptr) && ...)); }, objectives<kept::Cpu64>);
}
