// The sparse-teacher KL kernels of the contract (LossKernels<B>::sparse_kl_*,
// kept/backend/loss_kernels.hpp) on the CUDA backend against CpuBf16, entry by entry: fp32 logit
// chunks in two vocabulary slices (the tail's streaming max/sum and the kept-id walk cross a
// slice boundary), kept ids in both slices and at the slice edges, a row whose tail mass is 0,
// per-token weights with a zero. Both sides compute in fp32 with row sums in double from
// identical inputs, so every figure agrees to a relative 1e-5 (as test_loss_kernels.cpp) and
// every argmax exactly. Then the whole objective, xkd::sparse_logit_kl, on both backends.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kept/backend/cpu_bf16.hpp"
#include "kept/backend/cuda/backend.cuh"
#include "kept/core/random.hpp"
#include "kept/io/teacher_logits.hpp"
#include "kept/xkd/sparse_kl.hpp"
#include "support/backend_values.hpp"

namespace {

constexpr std::int64_t kRows = 6, kSlice = 37, kK = 5;

struct Chunk {
  std::vector<float> student[2];
  std::vector<std::int32_t> ids;
  std::vector<float> probs, tails;
  std::vector<float> weights{1.0f, 0.5f, 0.0f, 2.0f, 1.0f, 0.25f};
};

Chunk make_chunk() {
  kept::Random random(23);
  Chunk chunk;
  for (auto& slice : chunk.student) {
    slice.resize(kRows * kSlice);
    for (float& x : slice)
      x = static_cast<float>(3.0 * random.normal());
  }
  // Row r keeps ids at the slice edges (0, 36, 37, 73) in some rows, elsewhere spread out.
  const std::int32_t patterns[kRows][kK] = {{0, 5, 36, 37, 73},   {2, 9, 40, 41, 60},
                                            {1, 2, 3, 4, 5},      {36, 37, 38, 70, 72},
                                            {10, 20, 30, 50, 73}, {0, 1, 71, 72, 73}};
  for (std::int64_t r = 0; r < kRows; ++r) {
    double sum = 0;
    std::vector<double> p(kK);
    for (double& x : p)
      sum += x = 0.1 + random.uniform();
    const double tail = r == 4 ? 0.0 : 0.3 * random.uniform();
    for (std::int64_t i = 0; i < kK; ++i) {
      chunk.ids.push_back(patterns[r][i]);
      chunk.probs.push_back(static_cast<float>(p[i] / sum * (1 - tail)));
    }
    chunk.tails.push_back(static_cast<float>(tail));
  }
  return chunk;
}

struct Figures {
  kept::ChunkSums sums;
  std::vector<float> gradient[2];
};

using kept::test::host_floats;
template <class B>
kept::Tensor device(B& b, const std::vector<float>& values) {
  return kept::test::to_backend(b, values);
}

template <class B>
Figures run(B& b, const Chunk& c) {
  using K = kept::LossKernels<B>;
  using View = kept::MatrixView<const float>;
  Figures f;
  typename K::RowBuffers buffers;
  kept::Tensor student[2] = {device(b, c.student[0]), device(b, c.student[1])};
  const float inv_t = 0.5f;
  K::reset(b, buffers, kRows);
  K::sparse_kl_begin(
      b, buffers,
      kept::SparseTeacherChunk<float>{c.ids.data(), c.probs.data(), c.tails.data(), kRows, kK});
  for (int s = 0; s < 2; ++s) {
    const View view(student[s].data<float>(), kRows, kSlice);
    K::update(b, buffers, View(), view, s * kSlice, inv_t, nullptr, true);
    K::sparse_kl_update(b, buffers, view, s * kSlice, inv_t);
  }
  K::finish(b, buffers);
  f.sums = K::sparse_kl_reduce(b, buffers, c.weights.data());
  for (int s = 0; s < 2; ++s) {
    K::sparse_kl_gradient(b, buffers,
                          kept::MatrixView<float>(student[s].data<float>(), kRows, kSlice),
                          s * kSlice, 2.0f, c.weights.data(), 0.5f);
    f.gradient[s] = host_floats(b, student[s]);
  }
  return f;
}

void check_close(double got, double want, const char* what) {
  INFO(what << ": cuda " << got << ", cpu-bf16 " << want);
  CHECK(std::abs(got - want) <= 1e-5 * std::max(1.0, std::abs(want)));
}

template <class B>
struct Head {
  kept::Linear<B> head;
  kept::Tensor hidden;
};

// A student head and hidden states with bf16 values, on backend `b`, from a seed.
template <class B>
Head<B> make_head(B& b, std::int64_t tokens, std::int64_t width, std::int64_t vocab) {
  kept::Random random(31);
  auto draw = [&](const kept::Shape& shape, double scale) {
    kept::Tensor host = kept::Tensor::empty(kept::DType::F32, shape);
    for (float& x : host.span<float>())
      x = static_cast<float>(scale * random.normal());
    kept::Tensor out = b.zeros(kept::DType::BF16, shape);
    b.upload(host.to(kept::DType::BF16), out);
    return out;
  };
  Head<B> h;
  h.head = kept::Linear<B>(b, "lm_head", width, vocab, false);
  h.head.weight.value = draw({vocab, width}, 0.8);
  h.head.weight.grad = b.zeros(kept::DType::F32, {vocab, width});
  h.hidden = draw({tokens, width}, 1.0);
  return h;
}

}  // namespace

TEST_CASE("the CUDA sparse-KL kernels agree with CpuBf16 entry by entry",
          "[emulation][loss][sparse_kl]") {
  if (kept::cuda::cuda_device_count() == 0) {
    SUCCEED("SKIPPED: no CUDA device (" << kept::cuda::probe_devices().describe() << ")");
    return;
  }
  const Chunk chunk = make_chunk();
  kept::CpuBf16 cpu;
  kept::cuda::Cuda context;
  kept::cuda::CudaBackend cuda(context);
  const Figures want = run(cpu, chunk), got = run(cuda, chunk);
  CHECK(got.sums.rows == 5);  // the zero weight is not counted
  CHECK(got.sums.rows == want.sums.rows);
  CHECK(got.sums.agree == want.sums.agree);
  check_close(got.sums.weight, want.sums.weight, "weight");
  check_close(got.sums.kl, want.sums.kl, "kl");
  CHECK(got.sums.kl > 0);
  for (int s = 0; s < 2; ++s) {
    REQUIRE(got.gradient[s].size() == want.gradient[s].size());
    for (std::size_t i = 0; i < got.gradient[s].size(); ++i) {
      INFO("slice " << s << " [" << i << "]: cuda " << got.gradient[s][i] << ", cpu-bf16 "
                    << want.gradient[s][i]);
      CHECK(std::abs(got.gradient[s][i] - want.gradient[s][i]) <=
            1e-5 * std::max(1.0f, std::abs(want.gradient[s][i])));
    }
  }
  // Row 2 (weight 0) has a zero gradient.
  for (int s = 0; s < 2; ++s)
    for (std::int64_t v = 0; v < kSlice; ++v)
      CHECK(got.gradient[s][2 * kSlice + v] == 0.0f);
}

TEST_CASE("sparse_logit_kl on CUDA agrees with CpuBf16", "[emulation][sparse_kl]") {
  if (kept::cuda::cuda_device_count() == 0) {
    SUCCEED("SKIPPED: no CUDA device (" << kept::cuda::probe_devices().describe() << ")");
    return;
  }
  constexpr std::int64_t kTokens = 7, kWidth = 16, kVocab = 45, kKeep = 6;
  kept::Random random(4);
  kept::SparseTeacherRows teacher;
  for (std::int64_t t = 0; t < kTokens; ++t) {
    std::vector<float> logits(kVocab);
    for (float& x : logits)
      x = static_cast<float>(2.0 * random.normal());
    kept::append_teacher_top_k(logits.data(), 1, kVocab, 1.5, kKeep, teacher);
  }
  const std::vector<float> weights{1, 0.5f, 0, 2, 1, 1, 0.25f};
  const kept::xkd::SparseKlOptions options{.temperature = 1.5,
                                           .chunking = {.token_chunk = 3, .vocab_chunk = 20}};
  struct Result {
    kept::xkd::LogitLossResult loss;
    std::vector<float> d_hidden, d_weight;
  };
  auto run_on = [&](auto& b) {
    using B = std::remove_reference_t<decltype(b)>;
    Head<B> h = make_head(b, kTokens, kWidth, kVocab);
    kept::Tensor d_hidden = b.zeros(kept::DType::BF16, {kTokens, kWidth});
    auto d_view = kept::as_matrix<kept::bf16>(d_hidden);
    Result r;
    r.loss = kept::xkd::sparse_logit_kl(b, teacher.view(), h.head,
                                        kept::as_matrix<const kept::bf16>(h.hidden), &d_view,
                                        options, weights);
    r.d_hidden = host_floats(b, d_hidden);
    r.d_weight = host_floats(b, h.head.weight.grad);
    return r;
  };
  kept::CpuBf16 cpu;
  kept::cuda::Cuda context;
  kept::cuda::CudaBackend cuda(context);
  const Result want = run_on(cpu), got = run_on(cuda);
  check_close(got.loss.loss, want.loss.loss, "loss");
  CHECK(got.loss.tokens == want.loss.tokens);
  CHECK(got.loss.top1_agree == want.loss.top1_agree);
  CHECK(want.loss.loss > 0.1);
  // Normwise: the fp32 weight gradient to GEMM rounding; the bf16 d_hidden may differ by one
  // bf16 rounding where the fp32 sums differ in their last bits.
  auto normwise = [](const std::vector<float>& a, const std::vector<float>& b) {
    double worst = 0, largest = 1e-30;
    for (std::size_t i = 0; i < a.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::abs(a[i] - b[i])));
      largest = std::max(largest, static_cast<double>(std::abs(b[i])));
    }
    return worst / largest;
  };
  CHECK(normwise(got.d_weight, want.d_weight) <= 1e-5);
  CHECK(normwise(got.d_hidden, want.d_hidden) <= 0x1p-7);
}
