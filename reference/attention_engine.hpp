// reference/attention_engine.hpp: the attention the `--device cuda` runs use
// (kept/backend/cuda/choose_attention.hpp: KEPT_ATTENTION=auto|cudnn|kept), from a g++
// translation unit (attention_engine.cpp) so that the cuDNN frontend stays out of nvcc's.
#pragma once

#include <memory>
#include <string>

#include "kept/backend/cuda/attention_engine.hpp"

namespace kept::cli {

// The engine for cuda::Cuda::use_attention_engine, or null for kept's kernels; `said` gets a
// line for the run's output ("attention: ...").
std::shared_ptr<cuda::AttentionEngine> make_attention_engine(std::string& said);

}  // namespace kept::cli
