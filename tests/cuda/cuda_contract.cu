// The backend contract under nvcc: kept::cuda::CudaBackend satisfies kept::Backend, and the whole
// model (both norms), every objective, the optimizer step, checkpoints and evaluation instantiate
// for it, as tests/unit/test_backend_contract.cpp does for the CPU backends. Where a device (or
// the host emulation, tests/emulation/test_cuda_contract.cpp) is present, a bad argument's error
// names the op.
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
}

TEST_CASE("a bad argument to a CUDA op names the op", "[cuda][contract]") {
  if (kept::cuda::cuda_device_count() == 0) {
    SUCCEED("SKIPPED: no CUDA device (" << kept::cuda::probe_devices().describe() << ")");
    return;
  }
  kept::cuda::Cuda context;
  CudaBackend backend(context);
  CHECK_THROWS_WITH(backend.swiglu_forward(nullptr, nullptr, nullptr, -1),
                    Catch::Contains("swiglu_forward") && Catch::Contains("negative"));
  CHECK_THROWS_WITH(backend.rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, 4, 0, 1e-5f),
                    Catch::Contains("rmsnorm_forward") && Catch::Contains("bad shape"));
  kept::Tensor x = backend.zeros(kept::DType::BF16, {2, 4});
  kept::Tensor w = backend.zeros(kept::DType::BF16, {4, 3});
  kept::Tensor y = backend.zeros(kept::DType::BF16, {2, 4});
  CHECK_THROWS_WITH(
      backend.gemm(kept::MatrixView<const kept::bf16>(x.data<kept::bf16>(), 2, 4),
                   kept::Transpose::No,
                   kept::MatrixView<const kept::bf16>(w.data<kept::bf16>(), 4, 3),
                   kept::Transpose::No, kept::MatrixView<kept::bf16>(y.data<kept::bf16>(), 2, 4)),
      Catch::Contains("gemm") && Catch::Contains("expected [2, 3]"));
}
