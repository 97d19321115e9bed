// Every kept kernel, instantiated for sm_90 on its own so tests/cuda/static_checks.sh can read what
// ptxas and the SASS say about it: no register spills in any kernel, and 128-bit global loads
// (LDG.E.128) in the memory-bound ones when their operands are 16-byte packs.
#include "kept/backend/cuda/attention.cuh"
#include "kept/backend/cuda/elementwise.cuh"
#include "kept/backend/cuda/embedding.cuh"
#include "kept/backend/cuda/norm.cuh"
#include "kept/backend/cuda/optimizer.cuh"
#include "kept/backend/cuda/rope.cuh"
#include "kept/backend/cuda/softmax_losses.cuh"
#include "kept/backend/cuda/sparse_kl.cuh"
#include "kept/backend/cuda/swiglu.cuh"

namespace kc = kept::cuda;
using bf = __nv_bfloat16;

// Never called: taking the launchers' addresses instantiates every kernel they launch.
void kept_static_check_instantiations() {
  bf* h = nullptr;
  float* f = nullptr;
  double* d = nullptr;
  const std::int32_t* tokens = nullptr;
  kc::LossRowState* states = nullptr;
  cudaStream_t s = nullptr;
  (void)kc::launch_add<bf>(h, h, h, 0, s);
  (void)kc::launch_accumulate<bf>(h, h, 0, s);
  (void)kc::launch_add_bias<bf, bf>(h, 0, 0, 0, h, s);
  (void)kc::launch_add_bias<float, bf>(f, 0, 0, 0, h, s);
  (void)kc::detail::launch_column_sum<bf>(h, 0, 0, 0, f, s);
  (void)kc::detail::launch_column_sum<float>(f, 0, 0, 0, f, s);
  (void)kc::launch_scale(f, 0, 1.0f, s);
  (void)kc::launch_convert<bf, float>(h, 0, 0, 0, f, s);
  (void)kc::launch_fill_matrix<bf>(h, 0, 0, 0, 0.0f, s);
  (void)kc::launch_fill_matrix<float>(f, 0, 0, 0, 0.0f, s);
  (void)kc::launch_norm_forward<true, bf, bf>(h, h, h, h, f, f, 0, 0, 0.0f, s);
  (void)kc::launch_norm_forward<false, bf, bf>(h, h, h, h, f, f, 0, 0, 0.0f, s);
  (void)kc::launch_norm_backward<true, bf, bf>(h, h, h, f, f, h, f, f, f, 1, 0, 0, s);
  (void)kc::launch_norm_backward<false, bf, bf>(h, h, h, f, f, h, f, f, f, 1, 0, 0, s);
  (void)kc::launch_rope<bf>(h, 0, 0, 0, 0, f, f, 1, s);
  (void)kc::launch_swiglu_forward<bf>(h, h, h, 0, s);
  (void)kc::launch_swiglu_backward<bf>(h, h, h, h, h, 0, s);
  (void)kc::launch_embedding_forward<bf>(tokens, 0, h, 0, h, s);
  (void)kc::launch_embedding_backward<bf>(tokens, 0, h, 0, f, s);
  (void)kc::launch_attention_forward<bf>(h, h, h, h, f, 0, 0, 0, 0, 1.0f, s);
  (void)kc::launch_attention_backward<bf>(h, h, h, h, h, f, h, h, h, f, 0, 0, 0, 0, 1.0f, s);
  (void)kc::launch_sum_squares(f, 0, d, s);
  (void)kc::launch_adamw<bf>(h, f, f, kept::AdamWMoments<float>{}, f, 0, kept::AdamWScalars{}, s);
  (void)kc::launch_rows_reset(states, 0, s);
  (void)kc::launch_rows_finish(states, 0, s);
  (void)kc::launch_rows_update(f, f, 0, 0, 0, 1.0f, tokens, true, states, s);
  (void)kc::launch_kl_gradient(f, f, 0, 0, 1.0f, f, 1.0f, states, s);
  (void)kc::launch_cross_entropy_gradient(f, 0, 0, 0, tokens, 1.0f, states, s);
  (void)kc::launch_squared_error(f, f, 0, 0, f, 1.0f, true, states, s);
  (void)kc::launch_hidden_squared_error<bf>(h, h, h, 0, 0, true, f, 1.0f, d, s);
  (void)kc::launch_sparse_kl_update(f, 0, 0, 0, 1.0f, tokens, f, 1, states, s);
  (void)kc::launch_sparse_kl_gradient(f, 0, 0, 0, 1.0f, f, 1.0f, tokens, f, f, 1, f, states, s);
}
