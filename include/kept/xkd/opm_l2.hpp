// kept/xkd/opm_l2.hpp: OPM's objective as a training loss (the `norm-only` objective's
// "opm-l2"): fit an RMSNorm weight w to a LayerNorm (g, b) on the same inputs,
//   loss = (1 / N) sum_t || LN_{g,b}(x_t) - RMS_w(x_t) ||^2,
//   dloss / dw_i = (1 / N) sum_t 2 (z_ti - y_ti) x_ti rstd_t,   z = RMS_w(x), y = LN_{g,b}(x).
// Its minimiser is the closed-form w* of kept/opm.hpp (proofs/opm-derivation.md), which is what
// the trainer's norm-only tests check it converges to. The activations x are the teacher's own
// pre-norm inputs, so no gradient flows into x; d_weight accumulates (+=) like every parameter
// gradient. Everything goes through the backend: LayerNorm and RMSNorm forward, the squared
// error (LossKernels::hidden_squared_error) and the RMSNorm backward.
#pragma once

#include <cstdint>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/xkd/loss_kernels.hpp"

namespace kept::xkd {

// Buffers reused from site to site and step to step.
template <class Backend>
struct OpmL2Workspace {
  Tensor target, output, d_output, rstd, d_input;
  typename LossKernels<Backend>::RowBuffers rows;
};

// One norm site: x [tokens, hidden]; g, b the LayerNorm's, w the RMSNorm's weight and d_weight
// its gradient (accumulated). Returns the site's loss, divided by `normalizer` (> 0).
template <class Backend>
double opm_l2(Backend& backend, MatrixView<const typename Backend::Activation> x,
              const typename Backend::Param* g, const typename Backend::Param* b,
              typename Backend::Stat layernorm_eps, const typename Backend::Param* w,
              typename Backend::Stat rmsnorm_eps, typename Backend::Grad* d_weight,
              double normalizer, OpmL2Workspace<Backend>& workspace) {
  using Act = typename Backend::Activation;
  using Stat = typename Backend::Stat;
  constexpr DType kAct = Backend::Precision::activation;
  KEPT_CHECK(normalizer > 0, "opm_l2: the normalizer must be positive, got ", normalizer);
  KEPT_CHECK(x.contiguous(), "opm_l2: the activations must be contiguous");
  const std::int64_t rows = x.rows, cols = x.cols;
  backend.ensure(workspace.target, kAct, {rows, cols});
  backend.ensure(workspace.output, kAct, {rows, cols});
  backend.ensure(workspace.d_output, kAct, {rows, cols});
  backend.ensure(workspace.d_input, kAct, {rows, cols});
  backend.ensure(workspace.rstd, Backend::Precision::stat, {rows});
  Act* y = workspace.target.template data<Act>();
  Act* z = workspace.output.template data<Act>();
  Act* dz = workspace.d_output.template data<Act>();
  Stat* rstd = workspace.rstd.template data<Stat>();
  backend.layernorm_forward(x.data, g, b, y, nullptr, nullptr, rows, cols, layernorm_eps);
  backend.rmsnorm_forward(x.data, w, z, rstd, rows, cols, rmsnorm_eps);
  const double sum = LossKernels<Backend>::hidden_squared_error(
      backend, workspace.rows, MatrixView<const Act>(y, rows, cols),
      MatrixView<const Act>(z, rows, cols), MatrixView<Act>(dz, rows, cols),
      /*centre_teacher=*/false, nullptr, static_cast<Stat>(1.0 / normalizer));
  backend.fill_zero(workspace.d_input);  // dL/dx is computed by the kernel and not used
  backend.rmsnorm_backward(dz, x.data, w, rstd, workspace.d_input.template data<Act>(), d_weight,
                           rows, cols);
  return sum / normalizer;
}

}  // namespace kept::xkd
