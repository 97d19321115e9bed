// The backend contract under nvcc: kept::cuda::CudaBackend satisfies kept::Backend, and the whole
// model (both norms), every objective, the optimizer step, checkpoints and evaluation instantiate
// for it, as tests/unit/test_backend_contract.cpp does for the CPU backends. A host-only test
// checks that an op the backend lacks names itself.
#include <catch2/catch.hpp>

#include <filesystem>
#include <tuple>

#include "kept/backend/cuda/backend.cuh"
#include "kept/model/decoder.hpp"
#include "kept/xkd/xkd.hpp"
#include "support/training_surface.hpp"

using kept::cuda::CudaBackend;

template class kept::Decoder<kept::LayerNorm, CudaBackend>;
template class kept::Decoder<kept::RMSNorm, CudaBackend>;

namespace {

constexpr auto objectives =
    std::tuple{&kept::xkd::logit_kl<CudaBackend>,         &kept::xkd::logit_mse<CudaBackend>,
               &kept::xkd::cross_entropy<CudaBackend>,    &kept::xkd::hidden_mse<CudaBackend>,
               &kept::xkd::accumulate_eval<CudaBackend>,  &kept::xkd::opm_l2<CudaBackend>,
               &kept::test::training_surface<CudaBackend>};

}  // namespace

static_assert(kept::Backend<CudaBackend>);

TEST_CASE("the CUDA backend instantiates every objective and the training surface",
          "[cuda][contract]") {
  std::apply([](auto... f) { CHECK(((f != nullptr) && ...)); }, objectives);
  CHECK_THROWS_WITH(kept::cuda::not_implemented("swiglu_forward"),
                    Catch::Contains("not implemented on cuda: swiglu_forward"));
}
