// kept/backend/cuda/backend.cuh: the CUDA backend as kept::Backend sees it (compile with nvcc).
//
// CudaBackend puts the backend contract (kept/backend/backend.hpp) on a Cuda context
// (runtime.cuh): bf16 activations and parameters, fp32 gradients, master weights and statistics,
// everything in device memory; tokens, RoPE tables, weights and results cross through
// upload_tokens, rope_table, upload and download. This stage wires what the CUDA slice has
// (memory, transfers, the cuBLASLt GEMM for bf16 operands); every other op throws
// "not implemented on cuda: <op>" until its kernel lands, so the types line up and the whole
// model, every objective and the optimizer instantiate under nvcc today
// (tests/cuda/cuda_contract.cu), and a model run on it names the first missing op.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <span>
#include <type_traits>

#include "kept/backend/backend.hpp"
#include "kept/backend/cuda/gemm.cuh"
#include "kept/backend/cuda/runtime.cuh"
#include "kept/backend/loss_kernels.hpp"
#include "kept/core/rope_table.hpp"
#include "kept/core/tensor.hpp"

namespace kept::cuda {

// Not declared [[noreturn]] on purpose: callers' code after the call must stay reachable for
// nvcc's front end (it rejects the unreachable loops a noreturn stub would leave in the layers).
inline void not_implemented(const char* op) {
  fail("not implemented on cuda: ", op);
}

class CudaBackend : public UsesPrecision<Precision<bf16, bf16, float, float, float>> {
 public:
  static constexpr MemorySpace space = MemorySpace::Cuda;
  static constexpr const char* name() { return "cuda"; }

  // The RoPE table in device memory: cos and sin [positions, head_dim / 2], fp32.
  class RopeTable {
   public:
    RopeTable() = default;
    RopeTable(Tensor cos, Tensor sin, std::int64_t head_dim, std::int64_t positions)
        : cos_(std::move(cos)), sin_(std::move(sin)), head_dim_(head_dim), positions_(positions) {}
    std::int64_t head_dim() const { return head_dim_; }
    std::int64_t positions() const { return positions_; }
    const float* cos() const { return cos_.data<float>(); }
    const float* sin() const { return sin_.data<float>(); }

   private:
    Tensor cos_, sin_;
    std::int64_t head_dim_ = 0, positions_ = 0;
  };

  explicit CudaBackend(Cuda& context) : context_(&context) {}

  Tensor zeros(DType dtype, const Shape& shape) { return context_->zeros(dtype, shape); }
  void ensure(Tensor& tensor, DType dtype, const Shape& shape) {
    if (!tensor.defined() || !(tensor.shape() == shape) || tensor.dtype() != dtype ||
        tensor.space() != MemorySpace::Cuda)
      tensor = context_->empty(dtype, shape);
  }
  void fill_zero(Tensor& tensor) {
    if (tensor.nbytes())
      KEPT_CUDA_CHECK(cudaMemsetAsync(tensor.raw(), 0, tensor.nbytes(), context_->stream()));
  }
  // Converts on the host to the destination's dtype, then copies to the device.
  void upload(const Tensor& host, Tensor& destination) {
    KEPT_CHECK(destination.defined() && host.shape() == destination.shape(),
               "upload: source of shape ", host.shape(), " for a destination of shape ",
               destination.shape());
    const Tensor converted =
        host.dtype() == destination.dtype() ? host : host.to(destination.dtype());
    kept::cuda::copy(destination, converted);
  }
  Tensor download(const Tensor& source) { return context_->download(source); }
  void upload_tokens(std::span<const std::int32_t> tokens, Tensor& destination) {
    ensure(destination, DType::I32, {static_cast<std::int64_t>(tokens.size())});
    if (!tokens.empty())
      KEPT_CUDA_CHECK(cudaMemcpy(destination.raw(), tokens.data(), tokens.size_bytes(),
                                 cudaMemcpyHostToDevice));
  }
  RopeTable rope_table(std::int64_t head_dim, double theta, std::int64_t positions) {
    const kept::RopeTable<float> host(head_dim, theta, positions);
    const Shape shape{positions, head_dim / 2};
    Tensor cos = context_->empty(DType::F32, shape), sin = context_->empty(DType::F32, shape);
    const std::size_t bytes = static_cast<std::size_t>(positions * (head_dim / 2)) * sizeof(float);
    if (bytes) {
      KEPT_CUDA_CHECK(cudaMemcpy(cos.raw(), host.cos(0), bytes, cudaMemcpyHostToDevice));
      KEPT_CUDA_CHECK(cudaMemcpy(sin.raw(), host.sin(0), bytes, cudaMemcpyHostToDevice));
    }
    return RopeTable(std::move(cos), std::move(sin), head_dim, positions);
  }

  void copy(const bf16* source, bf16* destination, std::int64_t count) {
    if (count)
      KEPT_CUDA_CHECK(cudaMemcpyAsync(destination, source,
                                      sizeof(bf16) * static_cast<std::size_t>(count),
                                      cudaMemcpyDeviceToDevice, context_->stream()));
  }
  void add(const bf16*, const bf16*, bf16*, std::int64_t) { not_implemented("add"); }
  void accumulate(const bf16*, bf16*, std::int64_t) { not_implemented("accumulate"); }
  template <class T>
  void add_bias(MatrixView<T>, const bf16*) {
    not_implemented("add_bias");
  }
  template <class T>
  void bias_backward(MatrixView<const T>, float*) {
    not_implemented("bias_backward");
  }

  // cuBLASLt with bf16 operands (fp32 accumulation, bf16 or fp32 C); fp32 operands (the LM
  // head's fp32 logit chunks) wait for the chunked-loss kernels.
  template <class TA, class TB, class TC>
  void gemm(MatrixView<const TA> a, Transpose transpose_a, MatrixView<const TB> b,
            Transpose transpose_b, MatrixView<TC> c, float alpha = 1.0f, float beta = 0.0f) {
    if constexpr (std::is_same_v<TA, bf16> && std::is_same_v<TB, bf16>)
      context_->matmul(a, transpose_a == Transpose::Yes, b, transpose_b == Transpose::Yes, c, alpha,
                       beta);
    else
      not_implemented("gemm with an fp32 operand");
  }

  void layernorm_forward(const bf16*, const bf16*, const bf16*, bf16*, float*, float*, std::int64_t,
                         std::int64_t, float) {
    not_implemented("layernorm_forward with bf16 parameters");
  }
  void layernorm_backward(const bf16*, const bf16*, const bf16*, const float*, const float*, bf16*,
                          float*, float*, std::int64_t, std::int64_t) {
    not_implemented("layernorm_backward with bf16 parameters");
  }
  void rmsnorm_forward(const bf16*, const bf16*, bf16*, float*, std::int64_t, std::int64_t, float) {
    not_implemented("rmsnorm_forward with bf16 parameters");
  }
  void rmsnorm_backward(const bf16*, const bf16*, const bf16*, const float*, bf16*, float*,
                        std::int64_t, std::int64_t) {
    not_implemented("rmsnorm_backward with bf16 parameters");
  }
  void rope(bf16*, std::int64_t, std::int64_t, std::int64_t, const RopeTable&, int) {
    not_implemented("rope");
  }
  void attention_forward(const bf16*, const bf16*, const bf16*, bf16*, float*,
                         const AttentionShape&) {
    not_implemented("attention_forward");
  }
  void attention_backward(const bf16*, const bf16*, const bf16*, const bf16*, const bf16*,
                          const float*, bf16*, bf16*, bf16*, const AttentionShape&) {
    not_implemented("attention_backward");
  }
  void swiglu_forward(const bf16*, const bf16*, bf16*, std::int64_t) {
    not_implemented("swiglu_forward");
  }
  void swiglu_backward(const bf16*, const bf16*, const bf16*, bf16*, bf16*, std::int64_t) {
    not_implemented("swiglu_backward");
  }
  void embedding_forward(const std::int32_t*, std::int64_t, const bf16*, std::int64_t, std::int64_t,
                         bf16*) {
    not_implemented("embedding_forward");
  }
  void embedding_backward(const std::int32_t*, std::int64_t, const bf16*, std::int64_t, float*) {
    not_implemented("embedding_backward");
  }
  double grad_sum_squares(const float*, std::int64_t) {
    not_implemented("grad_sum_squares");
    return 0;
  }
  void scale_grad(float*, std::int64_t, float) { not_implemented("scale_grad"); }
  bool grad_finite(const float*, std::int64_t) {
    not_implemented("grad_finite");
    return false;
  }
  void adamw_update(bf16*, float*, const float*, float*, float*, std::int64_t,
                    const AdamWScalars&) {
    not_implemented("adamw_update");
  }

  Cuda& context() const { return *context_; }

 private:
  Cuda* context_;
};

static_assert(Backend<CudaBackend>, "CudaBackend must satisfy kept::Backend");

}  // namespace kept::cuda

namespace kept {

// The chunked softmax-family losses and the hidden-state MSE on the GPU are the next stage's
// kernels; until then each entry throws "not implemented on cuda: <kernel>", so every objective
// instantiates for CudaBackend and a job run on it fails at the first loss naming the kernel.
template <>
struct LossKernels<cuda::CudaBackend> {
  using Backend = cuda::CudaBackend;
  struct RowBuffers {};

  static void reset(Backend&, RowBuffers&, std::int64_t) {
    cuda::not_implemented("softmax_rows_reset");
  }
  static void update(Backend&, RowBuffers&, MatrixView<const float>, MatrixView<const float>,
                     std::int64_t, float, const std::int32_t*, bool) {
    cuda::not_implemented("softmax_rows_update");
  }
  static void finish(Backend&, RowBuffers&) { cuda::not_implemented("softmax_rows_finish"); }
  static ChunkSums reduce(Backend&, const RowBuffers&, bool, bool, const float*,
                          const std::int32_t*, double*, double*) {
    cuda::not_implemented("softmax_rows_reduce");
    return {};
  }
  static void kl_gradient(Backend&, const RowBuffers&, MatrixView<const float>, MatrixView<float>,
                          float, const float*, float) {
    cuda::not_implemented("kl_logits_gradient");
  }
  static void cross_entropy_gradient(Backend&, const RowBuffers&, MatrixView<float>, std::int64_t,
                                     const std::int32_t*, float) {
    cuda::not_implemented("cross_entropy_logits_gradient");
  }
  static void squared_error(Backend&, RowBuffers&, MatrixView<const float>, MatrixView<float>,
                            const float*, float, bool) {
    cuda::not_implemented("squared_error_logits");
  }
  static double hidden_squared_error(Backend&, RowBuffers&, MatrixView<const bf16>,
                                     MatrixView<const bf16>, MatrixView<bf16>, bool, const float*,
                                     float) {
    cuda::not_implemented("hidden_squared_error");
    return 0;
  }
};

}  // namespace kept
