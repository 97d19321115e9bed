#include "attention_engine.hpp"

#include <cstdlib>
#include <string_view>

#include "kept/core/error.hpp"

#if defined(KEPT_WITH_CUDNN)
#include "kept/backend/cuda/cudnn_attention.hpp"
#endif

namespace kept::cli {

std::shared_ptr<cuda::AttentionEngine> make_attention_engine(std::string& said) {
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
    auto engine = std::make_shared<cuda::CudnnAttention>();
    said = std::string("attention: ") + engine->name();
    return engine;
  } catch (const Error& error) {
    if (choice == "cudnn") throw;
    said = std::string("attention: kept's kernels (cuDNN did not start: ") + error.what() + ")";
    return nullptr;
  }
#else
  KEPT_CHECK(choice != "cudnn",
             "KEPT_ATTENTION=cudnn, but this kept was built without cuDNN (the GPU build finds "
             "the cuDNN frontend headers from PyPI's nvidia-cudnn-frontend and libcudnn; see "
             "the top-level CMakeLists.txt)");
  said = "attention: kept's kernels (built without cuDNN)";
  return nullptr;
#endif
}

}  // namespace kept::cli
