// reference/attention_engine.hpp: which attention the `--device cuda` runs use.
//
// KEPT_ATTENTION=auto (the default): cuDNN's fused attention when kept was built with it
// (KEPT_WITH_CUDNN) and cuDNN starts on this device, else kept's own kernels; =cudnn: cuDNN or a
// clear error; =kept: kept's kernels. attention_engine.cpp is compiled by g++ (the cuDNN
// frontend stays out of nvcc's translation units).
#pragma once

#include <memory>
#include <string>

#include "kept/backend/cuda/attention_engine.hpp"

namespace kept::cli {

// The engine to hand to cuda::Cuda::use_attention_engine, or null for kept's kernels; `said`
// gets a line for the run's output ("attention: ...").
std::shared_ptr<cuda::AttentionEngine> make_attention_engine(std::string& said);

}  // namespace kept::cli
