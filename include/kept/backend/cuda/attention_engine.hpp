// kept/backend/cuda/attention_engine.hpp: an attention implementation the CUDA backend hands
// its two attention ops to, in place of kept's own kernels (kept/backend/cuda/attention.cuh).
//
// The one implementation is cuDNN's fused flash attention (kept/backend/cuda/cudnn_attention.hpp),
// whose code lives in g++-compiled translation units (the cuDNN frontend is a large C++ header
// library that nvcc need not see); this interface is all the nvcc side knows of it. Plain C++:
// pointers are device addresses, `stream` is the backend's cudaStream_t.
//
// Arguments mean what the contract's attention ops mean (kept/backend/backend.hpp): q, k, v, o
// and the gradients are bf16 [batch * seq, heads * head_dim] row-major; lse is fp32
// [batch, heads, seq], the natural-log log-sum-exp of each row of scaled scores. One difference:
// backward WRITES dq, dk and dv (cuDNN's kernels do not accumulate); CudaBackend gives it scratch
// and adds the result into the contract's accumulating gradients.
#pragma once

#include <memory>

#include "kept/core/attention_shape.hpp"

namespace kept::cuda {

class AttentionEngine {
 public:
  virtual ~AttentionEngine() = default;
  // For messages and the trainer's first line, e.g. "cuDNN SDPA (cuDNN 9.19, frontend 1.32)".
  virtual const char* name() const = 0;
  virtual void forward(const void* q, const void* k, const void* v, void* o, float* lse,
                       const AttentionShape& shape, void* stream) = 0;
  virtual void backward(const void* d_o, const void* q, const void* k, const void* v, const void* o,
                        const float* lse, void* dq, void* dk, void* dv, const AttentionShape& shape,
                        void* stream) = 0;
};

}  // namespace kept::cuda
