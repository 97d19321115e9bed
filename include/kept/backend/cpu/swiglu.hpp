// kept/backend/cpu/swiglu.hpp: the SwiGLU gate, out = silu(gate) * up, elementwise.
//
// silu(g) = g * sigmoid(g);  d silu / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
// Backward: d_gate = d_out * up * silu'(gate), d_up = d_out * silu(gate) (both overwrite).
// The projections around it (gate, up, down) are GEMMs in layers/swiglu.hpp.
//
// Speed: the loops are memory-bound only if the sigmoid is cheap, so fp32 uses vsigmoid
// (vector_math.hpp: a vectorisable exp within 1 ulp, sigmoid from e^-|x| so nothing overflows)
// and the AVX2 or AVX-512 instantiation the CPU supports. float64 keeps std::exp (the
// reference).
// Each thread takes one contiguous chunk (static schedule).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kept/backend/cpu/parallel.hpp"
#include "kept/backend/cpu/vector_math.hpp"

namespace kept::cpu {

namespace detail {

template <class T>
KEPT_ALWAYS_INLINE void swiglu_forward_span(const T* __restrict gate, const T* __restrict up,
                                            T* __restrict out, std::int64_t begin,
                                            std::int64_t end) {
  KEPT_PRAGMA_SIMD
  for (std::int64_t i = begin; i < end; ++i) {
    const T g = gate[i];
    out[i] = g * vsigmoid(g) * up[i];
  }
}

template <class T>
KEPT_ALWAYS_INLINE void swiglu_backward_span(const T* __restrict d_out, const T* __restrict gate,
                                             const T* __restrict up, T* __restrict d_gate,
                                             T* __restrict d_up, std::int64_t begin,
                                             std::int64_t end) {
  KEPT_PRAGMA_SIMD
  for (std::int64_t i = begin; i < end; ++i) {
    const T g = gate[i], dy = d_out[i];
    const T s = vsigmoid(g);
    d_gate[i] = dy * up[i] * s * (T(1) + g * (T(1) - s));
    d_up[i] = dy * (g * s);
  }
}

KEPT_CPU_ENTRY_POINTS(swiglu_forward_span, swiglu_forward_span<float>,
                      (const float* gate, const float* up, float* out, std::int64_t begin,
                       std::int64_t end),
                      (gate, up, out, begin, end))
KEPT_CPU_ENTRY_POINTS(swiglu_backward_span, swiglu_backward_span<float>,
                      (const float* d_out, const float* gate, const float* up, float* d_gate,
                       float* d_up, std::int64_t begin, std::int64_t end),
                      (d_out, gate, up, d_gate, d_up, begin, end))

}  // namespace detail

template <class T>
inline void swiglu_forward(const T* gate, const T* up, T* out, std::int64_t count) {
  const CpuIsa isa = cpu_isa();
#pragma omp parallel
  {
    std::int64_t begin, end;
    detail::thread_share(count, 16, begin, end);
    bool dispatched = false;
    KEPT_CPU_DISPATCH_TO(T, isa, detail::swiglu_forward_span, (gate, up, out, begin, end))
    if (!dispatched) detail::swiglu_forward_span<T>(gate, up, out, begin, end);
  }
}

template <class T>
inline void swiglu_backward(const T* d_out, const T* gate, const T* up, T* d_gate, T* d_up,
                            std::int64_t count) {
  const CpuIsa isa = cpu_isa();
#pragma omp parallel
  {
    std::int64_t begin, end;
    detail::thread_share(count, 16, begin, end);
    bool dispatched = false;
    KEPT_CPU_DISPATCH_TO(T, isa, detail::swiglu_backward_span,
                         (d_out, gate, up, d_gate, d_up, begin, end))
    if (!dispatched) detail::swiglu_backward_span<T>(d_out, gate, up, d_gate, d_up, begin, end);
  }
}

}  // namespace kept::cpu
