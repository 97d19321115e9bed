#include "attention_engine.hpp"

#include "kept/backend/cuda/choose_attention.hpp"

namespace kept::cli {

std::shared_ptr<cuda::AttentionEngine> make_attention_engine(std::string& said) {
  return cuda::choose_attention_engine(said);
}

}  // namespace kept::cli
