// The attention engine for bench_cuda_ops (kept/backend/cuda/choose_attention.hpp), built here by
// g++ so that the cuDNN frontend stays out of nvcc's translation units.
#include "kept/backend/cuda/choose_attention.hpp"

std::shared_ptr<kept::cuda::AttentionEngine> attention_engine_for_bench(std::string& said) {
  return kept::cuda::choose_attention_engine(said);
}
