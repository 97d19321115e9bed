// kept/train/schedule.hpp: linear warmup, then cosine annealing to a floor.
//
// lr(s) is the rate of the optimizer step taken after s completed steps (s = 0 is the first
// step), for W = warmup_steps, T = total_steps, P = peak_lr, I = warmup_init_lr, F = min_lr:
//
//   s <  W:       lr = I + (P - I) * (s / W)
//   W <= s < T:   progress = (s - W) / max(1, T - W)
//                 lr = F + (P - F) * max(0, 0.5 * (1 + cos(pi * progress)))
//   s >= T:       lr = F                       (the floor: training past the plan stays there)
//
// With I = 0 and F = 0 this is transformers' get_cosine_schedule_with_warmup (num_cycles = 0.5,
// the default) applied by torch's LambdaLR, lr = P * lambda(s), to the bit: the same divisions
// in double in the same order (s / max(1, W), then P * that), the same cos(pi * progress) (their
// pi * num_cycles * 2.0 * progress multiplies by 0.5 and 2.0, both exact) and the same
// max(0, 0.5 * (1 + cos)). With F > 0 it equals transformers'
// get_cosine_with_min_lr_schedule_with_warmup (P * (factor * (1 - F/P) + F/P)) up to rounding.
// Past T the two differ on purpose: transformers keeps evaluating the cosine, which rises again
// (progress > 1); kept clamps to the floor, since a few steps beyond the plan (a resumed run
// with a larger budget) should not raise the rate.
// Note that, as in transformers, lr(0) = I, so with the default I = 0 the first step is a no-op
// for the parameters (AdamW's moments still accumulate); set warmup_init_lr to avoid it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>

#include "kept/core/error.hpp"

namespace kept {

struct CosineSchedule {
  double peak_lr = 1e-3;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;
  double min_lr = 0.0;
  double warmup_init_lr = 0.0;

  void validate() const {
    KEPT_CHECK(warmup_steps >= 0, "schedule: warmup_steps must be >= 0, got ", warmup_steps);
    KEPT_CHECK(total_steps >= 1, "schedule: total_steps must be >= 1, got ", total_steps);
    KEPT_CHECK(warmup_steps <= total_steps, "schedule: warmup_steps (", warmup_steps,
               ") exceeds total_steps (", total_steps, ")");
    KEPT_CHECK(peak_lr >= 0 && min_lr >= 0 && warmup_init_lr >= 0,
               "schedule: learning rates must be >= 0");
    KEPT_CHECK(min_lr <= peak_lr, "schedule: min_lr (", min_lr, ") exceeds peak_lr (", peak_lr,
               ")");
  }

  double lr(std::int64_t step) const {
    KEPT_CHECK(step >= 0, "schedule: step must be >= 0, got ", step);
    if (step < warmup_steps) {
      const double fraction =
          static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(1, warmup_steps));
      return warmup_init_lr + (peak_lr - warmup_init_lr) * fraction;
    }
    if (step >= total_steps) return min_lr;
    const double progress =
        static_cast<double>(step - warmup_steps) /
        static_cast<double>(std::max<std::int64_t>(1, total_steps - warmup_steps));
    const double factor = std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
    return min_lr + (peak_lr - min_lr) * factor;
  }
};

}  // namespace kept
