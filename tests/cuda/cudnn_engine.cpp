// The cuDNN attention engine for test_cudnn_attention.cu, built here by g++: the cuDNN frontend
// stays out of nvcc's translation units (include/kept/backend/cuda/cudnn_attention.hpp).
#include <memory>

#include "kept/backend/cuda/cudnn_attention.hpp"

std::shared_ptr<kept::cuda::AttentionEngine> make_cudnn_attention_for_test() {
  return std::make_shared<kept::cuda::CudnnAttention>();
}
