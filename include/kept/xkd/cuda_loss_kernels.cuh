// kept/xkd/cuda_loss_kernels.cuh: xkd::LossKernels for the CUDA backend (compile with nvcc).
//
// The chunked softmax-family losses and the hidden-state MSE on the GPU are the next stage's
// kernels; until then each entry throws "not implemented on cuda: <kernel>", so every objective
// instantiates for kept::cuda::CudaBackend (tests/cuda/cuda_contract.cu) and a job run on it
// fails at the first loss with the kernel's name.
#pragma once

#include <cstdint>

#include "kept/backend/cuda/backend.cuh"
#include "kept/xkd/loss_kernels.hpp"

namespace kept::xkd {

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

}  // namespace kept::xkd
