// The attention engine for test_cudnn_attention.cu and bench/bench_cuda_ops.cu
// (kept/backend/cuda/choose_attention.hpp), built here by g++ so that the cuDNN frontend stays
// out of nvcc's translation units, and once (the kept_cudnn_engine library).
#include "kept/backend/cuda/choose_attention.hpp"

std::shared_ptr<kept::cuda::AttentionEngine> attention_engine_compiled_once(std::string& said) {
  return kept::cuda::choose_attention_engine(said);
}
