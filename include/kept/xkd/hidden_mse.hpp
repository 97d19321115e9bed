// kept/xkd/hidden_mse.hpp: the hidden-state XKD objective, the paper's Eq. 1.
//
// With h^l_{S,i}, h^l_{T,i} the student's and teacher's residual-stream states at position i
// and slot l (l = 0: embedding output, l = 1..L: each layer's output; Decoder's `states`):
//   loss = (1 / N) sum_i w_i sum_{l=0..L} || h^l_{S,i} - h'^l_{T,i} ||^2
//   dloss / dh^l_{S,i} = (w_i / N) 2 (h^l_{S,i} - h'^l_{T,i})
// N = sum_i w_i (the number of positions for unit weights) unless HiddenMseOptions::normalizer
// sets it. The squared norm is summed over the hidden dimension, not averaged, as in Eq. 1.
//
// h'_T = h_T by default. With `centre_teacher`, h'_T = h_T - mean_c(h_T) per token: the exact
// (centred) LayerNorm -> RMSNorm conversion yields a student whose residual stream equals the
// *centred* teacher stream, so that is the target it must be compared against; without
// centring such a student would start from a non-zero loss it cannot (and should not) reduce.
//
// The gradients are written (overwritten, one [tokens, hidden] tensor per slot, allocated
// through the backend) into d_states, the layout Decoder::backward takes as its `d_states`.
// No chunking is needed: the states already exist at [tokens, hidden] each.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/xkd/chunked_logits.hpp"
#include "kept/xkd/loss_kernels.hpp"

namespace kept::xkd {

struct HiddenMseOptions {
  bool centre_teacher = false;  // compare against h_T - mean_c(h_T) (exact/centred conversion)
  double normalizer = 0;        // the mean's denominator; 0 = sum of the token weights
};

struct HiddenMseResult {
  double loss = 0;
  std::vector<double> slot_loss;  // each slot's share of `loss` (they sum to it)
  double weight_sum = 0;          // sum of the token weights
};

// Eq. 1 over the L+1 residual-stream slots. `teacher_states` and `student_states` have one
// [tokens, hidden] tensor per slot, in the backend's dtype; `d_states` (may be null) receives
// one gradient tensor per slot. `token_weights` is empty (all 1) or one weight >= 0 per token.
template <class Backend>
HiddenMseResult hidden_mse(Backend& backend, std::span<const Tensor> teacher_states,
                           std::span<const Tensor> student_states, std::vector<Tensor>* d_states,
                           const HiddenMseOptions& options = {},
                           std::span<const float> token_weights = {}) {
  using Act = typename Backend::Activation;
  using Stat = typename Backend::Stat;
  KEPT_CHECK(teacher_states.size() == student_states.size(), "the teacher has ",
             teacher_states.size(), " residual-stream slots, the student ", student_states.size(),
             " (both need L+1: kept all states in the forward pass?)");
  KEPT_CHECK(!student_states.empty(), "hidden_mse needs at least one residual-stream slot");
  const Shape shape = student_states[0].shape();
  KEPT_CHECK(shape.rank() == 2, "residual-stream states must be [tokens, hidden], got ", shape);
  for (std::size_t l = 0; l < student_states.size(); ++l) {
    KEPT_CHECK(student_states[l].shape() == shape, "student state ", l, " has shape ",
               student_states[l].shape(), ", state 0 has ", shape);
    KEPT_CHECK(
        teacher_states[l].shape() == shape, "teacher state ", l, " has shape ",
        teacher_states[l].shape(), " but the student's is ", shape, " (hidden sizes: teacher ",
        teacher_states[l].rank() == 2 ? teacher_states[l].dim(1) : -1, ", student ", shape[1], ")");
  }
  const double weight_sum = detail::check_weights(token_weights, shape[0]);
  const double n = detail::denominator(options.normalizer, weight_sum);
  const Stat scale = static_cast<Stat>(n > 0 ? 1.0 / n : 0.0);
  const float* weights = token_weights.empty() ? nullptr : token_weights.data();

  HiddenMseResult result;
  result.weight_sum = weight_sum;
  if (d_states) d_states->resize(student_states.size());
  typename LossKernels<Backend>::RowBuffers buffers;
  for (std::size_t l = 0; l < student_states.size(); ++l) {
    MatrixView<Act> grad;
    if (d_states) {
      backend.ensure((*d_states)[l], Backend::Precision::activation, shape);
      grad = as_matrix<Act>((*d_states)[l]);
    }
    const double sum = LossKernels<Backend>::hidden_squared_error(
        backend, buffers, as_matrix<Act>(teacher_states[l]), as_matrix<Act>(student_states[l]),
        grad, options.centre_teacher, weights, scale);
    result.slot_loss.push_back(n > 0 ? sum / n : 0.0);
    result.loss += result.slot_loss.back();
  }
  return result;
}

}  // namespace kept::xkd
