// cuDNN's fused attention (include/kept/backend/cuda/cudnn_attention.hpp) through CudaBackend,
// against kept's own attention kernels on the same device: o, the log-sum-exp and the three
// accumulated gradients, at an odd sequence length and at head_dim 64 and 128 (cuDNN needs a
// multiple of 8). Runs on a GPU (scripts/device.sh); without one, or in a build without cuDNN, it
// says SKIPPED and passes.
//
// Bounds. Both read the same bf16 inputs and accumulate in fp32, but flash attention rounds the
// probabilities (and, backward, dS) to bf16 for its tensor-core products, where kept keeps them
// in fp32: an output element moves by up to ~2^-8 of its row's scale. Each tensor is checked
// against 4 * 2^-8 * max |kept's tensor| (plus the bf16 rounding of the result itself); the
// log-sum-exp is fp32 on both sides (a sum of exponentials in another order): within 1e-3.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kept/backend/cuda/backend.cuh"
#include "kept/core/random.hpp"

// kept::cuda::choose_attention_engine (cudnn_engine.cpp): cuDNN's engine, or null and why.
std::shared_ptr<kept::cuda::AttentionEngine> attention_engine_compiled_once(std::string& said);

namespace {

struct Outputs {
  std::vector<float> o, lse, dq, dk, dv;
};

std::vector<float> floats(kept::cuda::CudaBackend& b, const kept::Tensor& t) {
  const kept::Tensor host = b.download(t).to(kept::DType::F32);
  return {host.data<float>(), host.data<float>() + host.numel()};
}

Outputs run(kept::cuda::Cuda& context, const kept::AttentionShape& shape) {
  kept::cuda::CudaBackend b(context);
  const std::int64_t rows = shape.batch * shape.seq, cols = shape.row_stride();
  kept::Random random(17);
  auto input = [&](double scale) {
    kept::Tensor host = kept::Tensor::empty(kept::DType::F32, {rows, cols});
    for (float& x : host.span<float>())
      x = static_cast<float>(scale * random.normal());
    kept::Tensor device = b.zeros(kept::DType::BF16, {rows, cols});
    b.upload(host, device);
    return device;
  };
  const kept::Tensor q = input(1.0), k = input(1.0), v = input(1.0), d_o = input(0.5);
  kept::Tensor o = b.zeros(kept::DType::BF16, {rows, cols});
  kept::Tensor lse = b.zeros(kept::DType::F32, {shape.batch, shape.heads, shape.seq});
  kept::Tensor dq = b.zeros(kept::DType::BF16, {rows, cols}),
               dk = b.zeros(kept::DType::BF16, {rows, cols}),
               dv = b.zeros(kept::DType::BF16, {rows, cols});
  using kept::bf16;
  b.attention_forward(q.data<bf16>(), k.data<bf16>(), v.data<bf16>(), o.data<bf16>(),
                      lse.data<float>(), shape);
  b.attention_backward(d_o.data<bf16>(), q.data<bf16>(), k.data<bf16>(), v.data<bf16>(),
                       o.data<bf16>(), lse.data<float>(), dq.data<bf16>(), dk.data<bf16>(),
                       dv.data<bf16>(), shape);
  context.synchronize();
  return {floats(b, o), floats(b, lse), floats(b, dq), floats(b, dk), floats(b, dv)};
}

void check_close(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  REQUIRE(got.size() == want.size());
  float scale = 0.0f;
  for (float x : want)
    scale = std::max(scale, std::fabs(x));
  const float bound = 4.0f * 0x1p-8f * scale;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (std::fabs(got[i] - want[i]) > std::fabs(got[worst] - want[worst])) worst = i;
  INFO(what << ": worst element " << worst << ": cuDNN " << got[worst] << ", kept " << want[worst]
            << ", bound " << bound + 0x1p-8f * std::fabs(want[worst]));
  CHECK(std::fabs(got[worst] - want[worst]) <= bound + 0x1p-8f * std::fabs(want[worst]));
}

}  // namespace

TEST_CASE("cuDNN attention agrees with kept's attention kernels", "[cuda][cudnn]") {
  if (kept::cuda::cuda_device_count() == 0) {
    SUCCEED("SKIPPED: no CUDA device (" << kept::cuda::probe_devices().describe() << ")");
    return;
  }
  for (const kept::AttentionShape shape :
       {kept::AttentionShape{2, 133, 3, 64}, kept::AttentionShape{1, 256, 2, 128}}) {
    INFO("batch " << shape.batch << ", seq " << shape.seq << ", heads " << shape.heads
                  << ", head_dim " << shape.head_dim);
    std::string said;
    auto engine = attention_engine_compiled_once(said);
    if (!engine) {
      // Built without cuDNN, or KEPT_ATTENTION=kept: nothing to compare. cuDNN failing to
      // start on a GPU is a failure.
      REQUIRE(said.find("did not start") == std::string::npos);
      SUCCEED("SKIPPED: " << said);
      return;
    }
    kept::cuda::Cuda plain, with_cudnn;
    with_cudnn.use_attention_engine(std::move(engine));
    const Outputs want = run(plain, shape), got = run(with_cudnn, shape);
    check_close(got.o, want.o, "o");
    REQUIRE(got.lse.size() == want.lse.size());
    for (std::size_t i = 0; i < want.lse.size(); ++i) {
      INFO("lse " << i);
      CHECK(std::fabs(got.lse[i] - want.lse[i]) <= 1e-3f);
    }
    check_close(got.dq, want.dq, "dq");
    check_close(got.dk, want.dk, "dk");
    check_close(got.dv, want.dv, "dv");
  }
}
