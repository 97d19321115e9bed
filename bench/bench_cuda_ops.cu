// bench/bench_cuda_ops.cu: the CUDA backend's speed (kept/backend/cuda/backend.cuh), measured with
// CUDA events on the backend stream.
//
// - Memory-bound ops at rows x cols = 16384 x {1024, 4096, 5120, 8192}, bf16 storage: the norms
//   (LayerNorm, RMSNorm; forward and backward), SwiGLU forward and backward, the residual add:
//   achieved GB/s counting the bytes the op must move (activations; bf16 parameters, fp32
//   parameter gradients and per-row statistics), beside a device copy-bandwidth probe
//   (cudaMemcpy device-to-device, read + write) measured in the same run, and the ratio.
// - bf16 GEMM with fp32 accumulation, y = x w^T (the nn.Linear layout), at 4096^3 and at
//   M x N x K = 5120 x 15360 x 5120 (a 14B MLP up-projection over 5120 tokens): TFLOP/s.
// - Causal attention at the 14B shape (4096 tokens, 40 heads x 128) and at 2 x 2048 x 16 x 128:
//   kept's own kernels and, in a build with cuDNN, cuDNN's fused attention through the same
//   CudaBackend ops (bench/cudnn_engine.cpp); TFLOP/s of the causal half, forward 2 b h s^2 d
//   (QK^T and PV), backward 2.5 times that (the convention of cuDNN's and flash attention's
//   published figures).
// - The chunked LM head with KL (xkd::logit_kl: teacher and student logits a chunk at a time, the
//   KL gradient, the student's d_hidden and d_weight) at the 14B head: 4096 tokens, hidden 5120,
//   vocab 84608: TFLOP/s of its four GEMMs (8 T V H) against the GEMM rate above, and the logit
//   workspace against one chunk's fp32 logits.
// bench/bench_torch_cuda.py measures the same shapes in torch (eager, torch.compile, SDPA on
// cuDNN); scripts/device.sh runs both in one call.
//
// Usage: bench_cuda_ops [--iters N] [--quick]   (--quick: 3 iterations, for smoke tests)
// Without a GPU it prints "no CUDA device: skipped" and exits 0.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kept/backend/cuda.cuh"
#include "kept/layers/linear.hpp"
#include "kept/xkd/logit_kl.hpp"

// kept::cuda::choose_attention_engine (tests/cuda/cudnn_engine.cpp): cuDNN's engine, or null and why.
std::shared_ptr<kept::cuda::AttentionEngine> attention_engine_compiled_once(std::string& said);

namespace {

using kept::bf16;
using kept::DType;
using kept::MatrixView;
using kept::Shape;
using kept::Tensor;

// Deterministic pseudo-random values in [-1, 1) (x hashed), so no input is NaN or denormal.
template <class T>
__global__ void fill_kernel(T* data, std::int64_t count, std::uint32_t seed, float scale,
                            float offset) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    const float value = offset + scale * (static_cast<float>(h >> 8) * 0x1p-23f - 1.0f);
    if constexpr (std::is_same_v<T, float>) {
      data[i] = value;
    } else {
      data[i] = __float2bfloat16_rn(value);
    }
  }
}

template <class T>
void fill(kept::cuda::Cuda& cuda, void* data, std::int64_t count, std::uint32_t seed,
          float scale = 1.0f, float offset = 0.0f) {
  KEPT_CUDA_CHECK(kept::cuda::launch("fill", fill_kernel<T>, dim3(1024), dim3(256), 0,
                                     cuda.stream(), static_cast<T*>(data), count, seed, scale,
                                     offset));
}

// Mean milliseconds per call of `op` over `iters` calls, after 2 warm-up calls.
template <class Op>
double time_ms(kept::cuda::Cuda& cuda, int iters, Op&& op) {
  for (int i = 0; i < 2; ++i)
    op();
  cudaEvent_t start, stop;
  KEPT_CUDA_CHECK(cudaEventCreate(&start));
  KEPT_CUDA_CHECK(cudaEventCreate(&stop));
  KEPT_CUDA_CHECK(cudaEventRecord(start, cuda.stream()));
  for (int i = 0; i < iters; ++i)
    op();
  KEPT_CUDA_CHECK(cudaEventRecord(stop, cuda.stream()));
  KEPT_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  KEPT_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  KEPT_CUDA_CHECK(cudaEventDestroy(start));
  KEPT_CUDA_CHECK(cudaEventDestroy(stop));
  cuda.check_last_error();
  return static_cast<double>(ms) / iters;
}

int run(int iters) {
  kept::cuda::Cuda cuda(0);
  kept::cuda::CudaBackend backend(cuda);
  cudaDeviceProp prop{};
  KEPT_CUDA_CHECK(cudaGetDeviceProperties(&prop, cuda.device()));
  int runtime = 0, driver = 0;
  KEPT_CUDA_CHECK(cudaRuntimeGetVersion(&runtime));
  KEPT_CUDA_CHECK(cudaDriverGetVersion(&driver));
  std::printf("device: %s, sm_%d%d, %d SMs, %.1f GiB; CUDA runtime %d, driver %d; %d iterations\n",
              prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              static_cast<double>(prop.totalGlobalMem) / (1 << 30), runtime, driver, iters);

  // ---- copy bandwidth probe: 1 GiB device-to-device, bytes read + written.
  const std::size_t copy_bytes = std::size_t{1} << 30;
  Tensor copy_src = cuda.empty(DType::U8, Shape{static_cast<std::int64_t>(copy_bytes)});
  Tensor copy_dst = cuda.empty(DType::U8, Shape{static_cast<std::int64_t>(copy_bytes)});
  KEPT_CUDA_CHECK(cudaMemsetAsync(copy_src.raw(), 1, copy_bytes, cuda.stream()));
  const double copy_ms = time_ms(cuda, iters, [&] {
    KEPT_CUDA_CHECK(cudaMemcpyAsync(copy_dst.raw(), copy_src.raw(), copy_bytes,
                                    cudaMemcpyDeviceToDevice, cuda.stream()));
  });
  const double copy_gbs = 2.0 * static_cast<double>(copy_bytes) / (copy_ms * 1e-3) / 1e9;
  std::printf("copy  cudaMemcpy D2D 1 GiB: %.3f ms, %.1f GB/s (read + write)\n\n", copy_ms,
              copy_gbs);
  copy_src = Tensor();
  copy_dst = Tensor();

  // ---- norms, bf16 storage.
  std::printf("%-16s %6s %6s %10s %9s %8s\n", "op", "rows", "cols", "time_us", "GB/s", "of_copy");
  const std::int64_t rows = 16384;
  for (const std::int64_t cols : {1024, 4096, 5120, 8192}) {
    const std::int64_t count = rows * cols;
    Tensor x = cuda.empty(DType::BF16, Shape{rows, cols});
    Tensor y = cuda.empty(DType::BF16, Shape{rows, cols});
    Tensor dy = cuda.empty(DType::BF16, Shape{rows, cols});
    Tensor dx = cuda.empty(DType::BF16, Shape{rows, cols});
    Tensor weight = cuda.empty(DType::BF16, Shape{cols});
    Tensor bias = cuda.empty(DType::BF16, Shape{cols});
    Tensor dweight = cuda.zeros(DType::F32, Shape{cols});
    Tensor dbias = cuda.zeros(DType::F32, Shape{cols});
    Tensor mean = cuda.empty(DType::F32, Shape{rows});
    Tensor rstd = cuda.empty(DType::F32, Shape{rows});
    fill<__nv_bfloat16>(cuda, x.raw(), count, 1, 2.0f, 0.1f);
    fill<__nv_bfloat16>(cuda, dy.raw(), count, 2);
    fill<__nv_bfloat16>(cuda, dx.raw(), count, 3, 0.01f);
    fill<__nv_bfloat16>(cuda, weight.raw(), cols, 4, 0.5f, 1.0f);
    fill<__nv_bfloat16>(cuda, bias.raw(), cols, 5, 0.1f);

    const bf16* xp = x.data<bf16>();
    const bf16* dyp = dy.data<bf16>();
    bf16* yp = y.data<bf16>();
    bf16* dxp = dx.data<bf16>();
    const bf16* wp = weight.data<bf16>();
    const bf16* bp = bias.data<bf16>();
    float* mp = mean.data<float>();
    float* rp = rstd.data<float>();
    float* dwp = dweight.data<float>();
    float* dbp = dbias.data<float>();
    const double act = static_cast<double>(count) * sizeof(bf16);
    const double stats = static_cast<double>(rows) * sizeof(float);
    const double param = static_cast<double>(cols) * sizeof(bf16);
    const double grad = static_cast<double>(cols) * sizeof(float);

    const auto report = [&](const char* name, double ms, double bytes) {
      const double gbs = bytes / (ms * 1e-3) / 1e9;
      std::printf("%-16s %6lld %6lld %10.1f %9.1f %7.1f%%\n", name, static_cast<long long>(rows),
                  static_cast<long long>(cols), ms * 1e3, gbs, 100.0 * gbs / copy_gbs);
    };
    report("layernorm_fwd",
           time_ms(cuda, iters,
                   [&] { backend.layernorm_forward(xp, wp, bp, yp, mp, rp, rows, cols, 1e-5f); }),
           2 * act + 2 * param + 2 * stats);
    report("layernorm_bwd",
           time_ms(
               cuda, iters,
               [&] { backend.layernorm_backward(dyp, xp, wp, mp, rp, dxp, dwp, dbp, rows, cols); }),
           4 * act + 2 * stats + param + 4 * grad);
    report(
        "rmsnorm_fwd",
        time_ms(cuda, iters, [&] { backend.rmsnorm_forward(xp, wp, yp, rp, rows, cols, 1e-5f); }),
        2 * act + param + stats);
    report("rmsnorm_bwd",
           time_ms(cuda, iters,
                   [&] { backend.rmsnorm_backward(dyp, xp, wp, rp, dxp, dwp, rows, cols); }),
           4 * act + stats + param + 2 * grad);
    report("swiglu_fwd", time_ms(cuda, iters, [&] { backend.swiglu_forward(xp, dyp, yp, count); }),
           3 * act);
    report("swiglu_bwd",
           time_ms(cuda, iters, [&] { backend.swiglu_backward(dyp, xp, xp, dxp, yp, count); }),
           5 * act);
    report("add", time_ms(cuda, iters, [&] { backend.add(xp, dyp, yp, count); }), 3 * act);
  }

  // ---- bf16 GEMM, fp32 accumulation: y[M,N] = x[M,K] w[N,K]^T.
  std::printf("\n%-16s %6s %6s %6s %10s %9s\n", "gemm", "M", "N", "K", "time_us", "TFLOP/s");
  struct GemmShape {
    const char* name;
    std::int64_t m, n, k;
  };
  double gemm_tflops = 0;  // the last (14B MLP) shape's rate, for the LM head's ratio
  for (const GemmShape& s : {GemmShape{"bf16 x w^T", 4096, 4096, 4096},
                             GemmShape{"bf16 x w^T mlp", 5120, 15360, 5120}}) {
    Tensor a = cuda.empty(DType::BF16, Shape{s.m, s.k});
    Tensor b = cuda.empty(DType::BF16, Shape{s.n, s.k});
    Tensor c = cuda.empty(DType::BF16, Shape{s.m, s.n});
    fill<__nv_bfloat16>(cuda, a.raw(), a.numel(), 11);
    fill<__nv_bfloat16>(cuda, b.raw(), b.numel(), 12, 0.05f);
    const MatrixView<const bf16> av = kept::as_matrix<bf16>(std::as_const(a));
    const MatrixView<const bf16> bv = kept::as_matrix<bf16>(std::as_const(b));
    const MatrixView<bf16> cv = kept::as_matrix<bf16>(c);
    const double ms = time_ms(cuda, iters, [&] { cuda.matmul(av, false, bv, true, cv); });
    const double tflops = 2.0 * static_cast<double>(s.m) * static_cast<double>(s.n) *
                          static_cast<double>(s.k) / (ms * 1e-3) / 1e12;
    std::printf("%-16s %6lld %6lld %6lld %10.1f %9.1f\n", s.name, static_cast<long long>(s.m),
                static_cast<long long>(s.n), static_cast<long long>(s.k), ms * 1e3, tflops);
    gemm_tflops = tflops;
  }

  // ---- the chunked LM head with KL at the 14B head.
  {
    using Backend = kept::cuda::CudaBackend;
    const std::int64_t tokens = 4096, hidden = 5120, vocab = 84608;
    kept::Linear<Backend> teacher(backend, "teacher", hidden, vocab, false);
    kept::Linear<Backend> student(backend, "student", hidden, vocab, false);
    student.weight.grad = cuda.zeros(DType::F32, Shape{vocab, hidden});
    fill<__nv_bfloat16>(cuda, teacher.weight.value.raw(), vocab * hidden, 31, 0.02f);
    fill<__nv_bfloat16>(cuda, student.weight.value.raw(), vocab * hidden, 32, 0.02f);
    Tensor th = cuda.empty(DType::BF16, Shape{tokens, hidden});
    Tensor sh = cuda.empty(DType::BF16, Shape{tokens, hidden});
    Tensor dh = cuda.zeros(DType::BF16, Shape{tokens, hidden});
    fill<__nv_bfloat16>(cuda, th.raw(), tokens * hidden, 33);
    fill<__nv_bfloat16>(cuda, sh.raw(), tokens * hidden, 34);
    MatrixView<bf16> d_hidden = kept::as_matrix<bf16>(dh);
    std::printf("\n%-16s %6s %6s %6s %6s %6s %10s %9s %8s %10s\n", "lm head + KL", "tokens",
                "hidden", "vocab", "chunk", "slice", "time_us", "TFLOP/s", "of_gemm", "ws/chunk");
    for (const kept::xkd::Chunking chunking :
         {kept::xkd::Chunking{1024, 0}, kept::xkd::Chunking{4096, 16384},
          kept::xkd::Chunking{512, 0}}) {
      kept::xkd::LogitWorkspace<Backend> workspace;
      kept::xkd::LogitKlOptions options;
      options.chunking = chunking;
      const double ms = time_ms(cuda, std::max(1, iters / 4), [&] {
        (void)kept::xkd::logit_kl(backend, teacher, kept::as_matrix<bf16>(std::as_const(th)),
                                  student, kept::as_matrix<bf16>(std::as_const(sh)), &d_hidden,
                                  options, {}, &workspace);
      });
      const std::int64_t slice = chunking.vocab_chunk ? chunking.vocab_chunk : vocab;
      const double one_chunk = static_cast<double>(chunking.token_chunk * slice) * sizeof(float);
      const double held = static_cast<double>(workspace.teacher_logits.nbytes() +
                                              workspace.student_logits.nbytes());
      const double tflops = 8.0 * static_cast<double>(tokens) * static_cast<double>(vocab) *
                            static_cast<double>(hidden) / (ms * 1e-3) / 1e12;
      std::printf("%-16s %6lld %6lld %6lld %6lld %6lld %10.1f %9.1f %7.1f%% %10.2f\n", "logit_kl",
                  static_cast<long long>(tokens), static_cast<long long>(hidden),
                  static_cast<long long>(vocab), static_cast<long long>(chunking.token_chunk),
                  static_cast<long long>(slice), ms * 1e3, tflops, 100.0 * tflops / gemm_tflops,
                  held / one_chunk);
    }
  }

  // ---- causal attention, bf16 storage.
  std::printf("\n%-16s %5s %5s %5s %5s %10s %9s %10s %9s\n", "attention", "batch", "seq", "heads",
              "dim", "fwd_us", "TFLOP/s", "bwd_us", "TFLOP/s");
  struct Engine {
    const char* name;
    std::shared_ptr<kept::cuda::AttentionEngine> engine;
  };
  std::vector<Engine> engines{{"kept kernels", nullptr}};
  std::string said;
  if (auto cudnn = attention_engine_compiled_once(said))
    engines.push_back({"cuDNN SDPA", std::move(cudnn)});
  std::printf("(%s)\n", said.c_str());
  for (const kept::AttentionShape shape :
       {kept::AttentionShape{1, 4096, 40, 128}, kept::AttentionShape{2, 2048, 16, 128}}) {
    const std::int64_t tokens = shape.batch * shape.seq, width = shape.row_stride();
    std::vector<Tensor> buffers;
    for (int i = 0; i < 8; ++i) {
      buffers.push_back(cuda.zeros(DType::BF16, Shape{tokens, width}));
      fill<__nv_bfloat16>(cuda, buffers.back().raw(), tokens * width,
                          static_cast<std::uint32_t>(20 + i));
    }
    Tensor lse = cuda.empty(DType::F32, Shape{shape.batch, shape.heads, shape.seq});
    auto p = [&](int i) { return buffers[static_cast<std::size_t>(i)].data<bf16>(); };
    const double flops = 2.0 * static_cast<double>(shape.batch * shape.heads) *
                         static_cast<double>(shape.seq) * static_cast<double>(shape.seq) *
                         static_cast<double>(shape.head_dim);
    for (const Engine& engine : engines) {
      cuda.use_attention_engine(engine.engine);
      const int attention_iters = engine.engine ? iters : std::max(1, iters / 10);
      const double fwd = time_ms(cuda, attention_iters, [&] {
        backend.attention_forward(p(0), p(1), p(2), p(3), lse.data<float>(), shape);
      });
      const double bwd = time_ms(cuda, attention_iters, [&] {
        backend.attention_backward(p(4), p(0), p(1), p(2), p(3), lse.data<float>(), p(5), p(6),
                                   p(7), shape);
      });
      std::printf("%-16s %5lld %5lld %5lld %5lld %10.1f %9.1f %10.1f %9.1f\n", engine.name,
                  static_cast<long long>(shape.batch), static_cast<long long>(shape.seq),
                  static_cast<long long>(shape.heads), static_cast<long long>(shape.head_dim),
                  fwd * 1e3, flops / (fwd * 1e-3) / 1e12, bwd * 1e3,
                  2.5 * flops / (bwd * 1e-3) / 1e12);
    }
    cuda.use_attention_engine(nullptr);
  }
  cuda.synchronize();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 20;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      iters = 3;
    } else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--iters N] [--quick]\n", argv[0]);
      return 2;
    }
  }
  if (iters < 1) iters = 1;
  const kept::cuda::DeviceProbe probe = kept::cuda::probe_devices();
  if (probe.count == 0) {
    std::printf("no CUDA device: skipped (%s)\n", probe.describe().c_str());
    return 0;
  }
  try {
    return run(iters);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_cuda_ops: %s\n", error.what());
    return 1;
  }
}
