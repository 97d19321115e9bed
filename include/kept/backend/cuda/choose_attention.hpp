// kept/backend/cuda/choose_attention.hpp: which attention a GPU program hands its attention ops
// to (kept::cuda::Cuda::use_attention_engine), chosen by the environment variable KEPT_ATTENTION:
//   auto (the default)  cuDNN's fused attention when the build has it (KEPT_WITH_CUDNN) and
//                       cuDNN starts on this device; else kept's own kernels (null);
//   cudnn               cuDNN, or a clear error;
//   kept                kept's kernels.
// `said` gets one line for the program's output ("attention: ...").
//
// Include it from one g++ translation unit per program (the one the top-level CMakeLists.txt's
// kept_cudnn_source() gives the cuDNN frontend), which wraps it in a plain function for the nvcc
// side: the frontend stays out of nvcc's translation units.
#pragma once

#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>

#include "kept/backend/cuda/attention_engine.hpp"
#include "kept/core/error.hpp"

#if defined(KEPT_WITH_CUDNN)
#include "kept/backend/cuda/cudnn_attention.hpp"
#endif

namespace kept::cuda {

inline std::shared_ptr<AttentionEngine> choose_attention_engine(std::string& said) {
  const char* variable = std::getenv("KEPT_ATTENTION");
  const std::string_view choice = variable && *variable ? variable : "auto";
  KEPT_CHECK(choice == "auto" || choice == "cudnn" || choice == "kept",
             "KEPT_ATTENTION must be auto, cudnn or kept, got \"", choice, "\"");
  if (choice == "kept") {
    said = "attention: kept's kernels (KEPT_ATTENTION=kept)";
    return nullptr;
  }
#if defined(KEPT_WITH_CUDNN)
  try {
    auto engine = std::make_shared<CudnnAttention>();
    said = std::string("attention: ") + engine->name();
    return engine;
  } catch (const Error& error) {
    if (choice == "cudnn") throw;
    said = std::string("attention: kept's kernels (cuDNN did not start: ") + error.what() + ")";
    return nullptr;
  }
#else
  KEPT_CHECK(choice != "cudnn",
             "KEPT_ATTENTION=cudnn, but this program was built without cuDNN (a GPU build finds "
             "the cuDNN frontend headers from PyPI's nvidia-cudnn-frontend and libcudnn; see the "
             "top-level CMakeLists.txt)");
  said = "attention: kept's kernels (built without cuDNN)";
  return nullptr;
#endif
}

}  // namespace kept::cuda
