// The loss kernels of the contract (LossKernels<B>, kept/backend/loss_kernels.hpp) on the CUDA
// backend against CpuBf16, entry by entry: the same fp32 logit chunks (two vocabulary slices, so
// the streaming max/sum recurrence is exercised), per-token weights with a zero, targets with a
// -1, in both slices. Both sides compute in fp32 with row sums in double, from identical inputs;
// they differ in summation order and in exp (the CPU's vectorised exp and the kernel's expf are
// each within a few ulp), so every figure agrees to a relative 1e-5 (a few hundred fp32 ulps,
// far below any change of the inputs) and every argmax exactly.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "kept/backend/cpu_bf16.hpp"
#include "kept/backend/cuda/backend.cuh"
#include "kept/core/random.hpp"
#include "support/backend_values.hpp"

namespace {

constexpr std::int64_t kRows = 7, kSlice = 37;

struct Chunk {
  std::vector<float> teacher[2], student[2];
  std::vector<float> weights{1.0f, 0.5f, 0.0f, 2.0f, 1.0f, 1.0f, 0.25f};
  std::vector<std::int32_t> targets{3, 40, 12, -1, 73, 36, 50};
};

Chunk make_chunk() {
  kept::Random random(11);
  Chunk chunk;
  for (int s = 0; s < 2; ++s)
    for (auto* v : {&chunk.teacher[s], &chunk.student[s]}) {
      v->resize(kRows * kSlice);
      for (float& x : *v)
        x = static_cast<float>(3.0 * random.normal());
    }
  return chunk;
}

struct Figures {
  kept::ChunkSums sums;
  std::vector<double> student_ce, teacher_ce;
  std::vector<float> kl_gradient, ce_gradient, se_gradient;
  double hidden = 0;
  std::vector<float> hidden_gradient;
};

using kept::test::host_floats;
template <class B>
kept::Tensor device(B& b, const std::vector<float>& values, kept::DType dtype) {
  return kept::test::to_backend(b, values, dtype);
}

template <class B>
Figures run(B& b, const Chunk& c) {
  using K = kept::LossKernels<B>;
  using View = kept::MatrixView<const float>;
  Figures f;
  typename K::RowBuffers buffers;
  kept::Tensor teacher[2], student[2];
  for (int s = 0; s < 2; ++s) {
    teacher[s] = device(b, c.teacher[s], kept::DType::F32);
    student[s] = device(b, c.student[s], kept::DType::F32);
  }
  const auto view = [](const kept::Tensor& t) { return View(t.data<float>(), kRows, kSlice); };
  K::reset(b, buffers, kRows);
  for (int s = 0; s < 2; ++s)
    K::update(b, buffers, view(teacher[s]), view(student[s]), s * kSlice, 0.5f, c.targets.data(),
              true);
  K::finish(b, buffers);
  f.student_ce.resize(kRows);
  f.teacher_ce.resize(kRows);
  f.sums = K::reduce(b, buffers, true, true, c.weights.data(), c.targets.data(),
                     f.student_ce.data(), f.teacher_ce.data());
  kept::Tensor grad = device(b, c.student[1], kept::DType::F32);
  K::kl_gradient(b, buffers, view(teacher[1]),
                 kept::MatrixView<float>(grad.data<float>(), kRows, kSlice), 2.0f, c.weights.data(),
                 0.5f);
  f.kl_gradient = host_floats(b, grad);
  grad = device(b, c.student[1], kept::DType::F32);
  K::cross_entropy_gradient(b, buffers, kept::MatrixView<float>(grad.data<float>(), kRows, kSlice),
                            kSlice, c.targets.data(), 0.5f);
  f.ce_gradient = host_floats(b, grad);
  grad = device(b, c.student[0], kept::DType::F32);
  K::squared_error(b, buffers, view(teacher[0]),
                   kept::MatrixView<float>(grad.data<float>(), kRows, kSlice), c.weights.data(),
                   0.5f, true);
  f.se_gradient = host_floats(b, grad);
  const kept::Tensor ht = device(b, c.teacher[0], kept::DType::BF16);
  const kept::Tensor hs = device(b, c.student[0], kept::DType::BF16);
  kept::Tensor hg = b.zeros(kept::DType::BF16, ht.shape());
  using Act = typename B::Activation;
  f.hidden = K::hidden_squared_error(
      b, buffers, kept::MatrixView<const Act>(ht.data<Act>(), kRows, kSlice),
      kept::MatrixView<const Act>(hs.data<Act>(), kRows, kSlice),
      kept::MatrixView<Act>(hg.data<Act>(), kRows, kSlice), true, c.weights.data(), 0.5f);
  f.hidden_gradient = host_floats(b, hg);
  return f;
}

void check_close(double got, double want, const char* what) {
  INFO(what << ": cuda " << got << ", cpu-bf16 " << want);
  CHECK(std::abs(got - want) <= 1e-5 * std::max(1.0, std::abs(want)));
}
void check_close(const std::vector<float>& got, const std::vector<float>& want, const char* what,
                 double ulps_of_bf16 = 0) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO(what << "[" << i << "]: cuda " << got[i] << ", cpu-bf16 " << want[i]);
    CHECK(std::abs(got[i] - want[i]) <=
          (1e-5 + ulps_of_bf16 * 0x1p-7) * std::max(1.0f, std::abs(want[i])));
  }
}

}  // namespace

TEST_CASE("the CUDA loss kernels agree with CpuBf16 entry by entry", "[emulation][loss]") {
  if (kept::cuda::cuda_device_count() == 0) {
    SUCCEED("SKIPPED: no CUDA device (" << kept::cuda::probe_devices().describe() << ")");
    return;
  }
  const Chunk chunk = make_chunk();
  kept::CpuBf16 cpu;
  kept::cuda::Cuda context;
  kept::cuda::CudaBackend cuda(context);
  const Figures want = run(cpu, chunk), got = run(cuda, chunk);
  CHECK(got.sums.rows == want.sums.rows);
  CHECK(got.sums.rows == 5);  // the zero weight and the -1 target are not counted
  CHECK(got.sums.agree == want.sums.agree);
  CHECK(got.sums.student_correct == want.sums.student_correct);
  CHECK(got.sums.teacher_correct == want.sums.teacher_correct);
  check_close(got.sums.weight, want.sums.weight, "weight");
  check_close(got.sums.kl, want.sums.kl, "kl");
  check_close(got.sums.student_ce, want.sums.student_ce, "student_ce");
  check_close(got.sums.teacher_ce, want.sums.teacher_ce, "teacher_ce");
  CHECK(got.sums.kl > 0);
  for (std::int64_t r = 0; r < kRows; ++r) {
    check_close(got.student_ce[r], want.student_ce[r], "student_ce row");
    check_close(got.teacher_ce[r], want.teacher_ce[r], "teacher_ce row");
  }
  check_close(got.kl_gradient, want.kl_gradient, "kl_gradient");
  check_close(got.ce_gradient, want.ce_gradient, "cross_entropy_gradient");
  check_close(got.se_gradient, want.se_gradient, "squared_error gradient");
  check_close(got.hidden, want.hidden, "hidden_squared_error");
  // bf16 gradients: one rounding each, which an fp32 difference may flip by one bf16 ulp
  // (at most 2^-7 relative).
  check_close(got.hidden_gradient, want.hidden_gradient, "hidden gradient", 1.0);
}
