// kept/xkd/xkd.hpp: the XKD objectives in one include.
//
//   logit_kl       the paper's default: T^2 KL(teacher || student) on the LM-head outputs
//   logit_mse      option xkd-logit-mse: squared error on raw logits
//   hidden_mse     the paper's Eq. 1: squared error of the L+1 residual-stream states
//   sparse_logit_kl  logit_kl against an offline teacher's top-k log-probs + tail mass
//   cross_entropy  next-token CE (the uptraining baseline, pretraining)
//   accumulate_eval  KL, top-1 agreement and both models' CE / perplexity, no gradients
// The logit objectives share one chunked driver (chunked_logits.hpp) and differ only in their
// per-chunk math (loss_kernels.hpp, backend/cpu/softmax_losses.hpp).
#pragma once

#include "kept/xkd/chunked_logits.hpp"
#include "kept/xkd/cross_entropy.hpp"
#include "kept/xkd/hidden_mse.hpp"
#include "kept/xkd/logit_kl.hpp"
#include "kept/xkd/logit_mse.hpp"
#include "kept/xkd/loss_kernels.hpp"
#include "kept/xkd/metrics.hpp"
#include "kept/xkd/opm_l2.hpp"
#include "kept/xkd/sparse_kl.hpp"
