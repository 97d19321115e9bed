// The attention engine for test_cudnn_attention.cu (kept/backend/cuda/choose_attention.hpp), built
// here by g++ so that the cuDNN frontend stays out of nvcc's translation units.
#include "kept/backend/cuda/choose_attention.hpp"

std::shared_ptr<kept::cuda::AttentionEngine> attention_engine_for_test(std::string& said) {
  return kept::cuda::choose_attention_engine(said);
}
