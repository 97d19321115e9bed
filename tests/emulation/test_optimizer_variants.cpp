// AdamW's compact states on the CUDA backend against CpuBf16, to the bit: fp32 masters or bf16
// weights rounded stochastically, fp32, bf16 or 8-bit blockwise moments. Both sides run the same
// element functions (kept/core/element_math.hpp, kept/core/dynamic_code.hpp) with the same
// counter-based rounding bits, and the 8-bit kernel's block maximum is exact in any order, so
// values, codes, absmax and moments must agree byte for byte after several steps. Compiled by
// g++ against the host emulation (every CI run) and by nvcc into kept_cuda_tests (on a GPU).
#include <catch2/catch.hpp>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kept/backend/cpu_bf16.hpp"
#include "kept/backend/cuda/backend.cuh"
#include "kept/core/random.hpp"
#include "kept/layers/parameter.hpp"
#include "kept/train/adamw.hpp"

namespace {

struct Run {
  std::vector<kept::Tensor> values;  // host copies, after the last step
  std::vector<kept::NamedTensor> state;
};

// Five steps; at step `reload_at` (when >= 0) the state goes through state_tensors() into a new
// optimizer, as a checkpoint and resume would.
template <class B>
Run train(B& b, const kept::AdamWConfig& config, int reload_at = -1) {
  // 1000 elements (three full quantisation blocks and a partial one), 300, and a small norm
  // weight below min_8bit_size.
  const std::vector<std::pair<std::string, kept::Shape>> shapes{
      {"w1", {10, 100}}, {"w2", {300}}, {"norm", {40}}};
  std::vector<kept::Parameter> params;
  kept::Random init(4);
  for (const auto& [name, shape] : shapes) {
    kept::Tensor host = kept::Tensor::empty(kept::DType::F32, shape);
    for (float& x : host.span<float>())
      x = static_cast<float>(0.5 * init.normal());
    kept::Parameter p;
    p.name = name;
    p.role = name == "norm" ? kept::ParamRole::NormWeight : kept::ParamRole::Weight;
    p.value = b.zeros(kept::DType::BF16, shape);
    b.upload(host, p.value);
    p.grad = b.zeros(kept::DType::F32, shape);
    params.push_back(std::move(p));
  }
  std::vector<kept::Parameter*> ptrs;
  for (auto& p : params)
    ptrs.push_back(&p);
  kept::AdamW optimizer(config);
  for (int step = 0; step < 5; ++step) {
    if (step == reload_at) {
      const std::vector<kept::NamedTensor> saved = optimizer.state_tensors(b);
      optimizer = kept::AdamW(config);
      optimizer.load_state(b, saved, ptrs);
    }
    kept::Random random(30 + static_cast<std::uint64_t>(step));
    for (kept::Parameter* p : ptrs) {
      kept::Tensor g = kept::Tensor::empty(kept::DType::F32, p->value.shape());
      for (float& x : g.span<float>())
        x = static_cast<float>(random.normal());
      b.upload(g, p->grad);
    }
    optimizer.set_lr(0.01 * (step + 1));
    optimizer.step(b, ptrs);
  }
  Run run;
  for (kept::Parameter* p : ptrs)
    run.values.push_back(b.download(p->value));
  run.state = optimizer.state_tensors(b);
  return run;
}

bool same_bytes(const kept::Tensor& a, const kept::Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

// Values and every state tensor (names, dtypes, shapes, bytes) the same.
void check_same(const Run& got, const Run& want) {
  REQUIRE(got.values.size() == want.values.size());
  for (std::size_t i = 0; i < want.values.size(); ++i) {
    INFO("value " << i);
    CHECK(same_bytes(got.values[i], want.values[i]));
  }
  REQUIRE(got.state.size() == want.state.size());
  for (std::size_t i = 0; i < want.state.size(); ++i) {
    INFO(want.state[i].name);
    CHECK(got.state[i].name == want.state[i].name);
    CHECK(same_bytes(got.state[i].tensor, want.state[i].tensor));
  }
}

}  // namespace

TEST_CASE("AdamW's compact states agree to the bit on CUDA and CpuBf16", "[emulation][adamw]") {
  if (kept::cuda::cuda_device_count() == 0) {
    SUCCEED("SKIPPED: no CUDA device (" << kept::cuda::probe_devices().describe() << ")");
    return;
  }
  kept::cuda::Cuda context;
  kept::cuda::CudaBackend cuda(context);
  kept::CpuBf16 cpu;
  for (const bool master : {true, false})
    for (const int bits : {32, 16, 8}) {
      INFO((master ? "fp32 masters" : "stochastic rounding") << ", " << bits << "-bit moments");
      const kept::AdamWConfig config{.lr = 0.01,
                                     .weight_decay = 0.1,
                                     .master_weights = master,
                                     .moment_bits = bits,
                                     .min_8bit_size = 256};
      check_same(train(cuda, config), train(cpu, config));
    }
}

// memory.states_on "host": the state in host memory, each parameter's updated through a staging
// buffer chunk by chunk (here 256 elements, so the 1000- and 300-element parameters take four
// and two chunks, the last ones partial). The copies are exact and the rounding bits are indexed
// by the element's place in its parameter, so everything must match the device-resident run to
// the bit, and a reload of the host state continues it exactly.
TEST_CASE("AdamW with states in host memory, staged in chunks, matches device states to the bit",
          "[emulation][adamw]") {
  if (kept::cuda::cuda_device_count() == 0) {
    SUCCEED("SKIPPED: no CUDA device (" << kept::cuda::probe_devices().describe() << ")");
    return;
  }
  kept::cuda::Cuda context;
  kept::cuda::CudaBackend cuda(context);
  for (const bool master : {true, false})
    for (const int bits : {32, 16, 8}) {
      INFO((master ? "fp32 masters" : "stochastic rounding") << ", " << bits << "-bit moments");
      const kept::AdamWConfig device{.lr = 0.01,
                                     .weight_decay = 0.1,
                                     .master_weights = master,
                                     .moment_bits = bits,
                                     .min_8bit_size = 256};
      kept::AdamWConfig host = device;
      host.states_on_host = true;
      host.host_state_chunk = 256;
      const Run want = train(cuda, device);
      for (const int reload_at : {-1, 3}) {
        INFO("reloaded at step " << reload_at);
        check_same(train(cuda, host, reload_at), want);
      }
    }
  // The chunk must keep 8-bit blocks whole.
  CHECK_THROWS_WITH(kept::AdamW(kept::AdamWConfig{.states_on_host = true, .host_state_chunk = 100}),
                    Catch::Contains("host_state_chunk"));
}
