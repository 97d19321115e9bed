// cuDNN's attention engine for bench_cuda_ops, built here by g++: the cuDNN frontend stays out
// of nvcc's translation units (include/kept/backend/cuda/cudnn_attention.hpp).
#include <memory>

#include "kept/backend/cuda/cudnn_attention.hpp"

std::shared_ptr<kept::cuda::AttentionEngine> make_bench_cudnn_attention() {
  return std::make_shared<kept::cuda::CudnnAttention>();
}
