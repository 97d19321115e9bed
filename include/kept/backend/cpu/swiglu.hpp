// kept/backend/cpu/swiglu.hpp: the SwiGLU gate, out = silu(gate) * up, elementwise.
//
// silu(g) = g * sigmoid(g);  d silu / dg = sigmoid(g) * (1 + g * (1 - sigmoid(g))).
// Backward: d_gate = d_out * up * silu'(gate), d_up = d_out * silu(gate) (both overwrite).
// The projections around it (gate, up, down) are GEMMs in layers/swiglu.hpp.
#pragma once

#include <cmath>
#include <cstdint>

namespace kept::cpu {

template <class T>
inline T sigmoid(T value) {
  return T(1) / (T(1) + std::exp(-value));
}

template <class T>
inline void swiglu_forward(const T* gate, const T* up, T* out, std::int64_t count) {
#pragma omp parallel for simd schedule(static)
  for (std::int64_t i = 0; i < count; ++i)
    out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

template <class T>
inline void swiglu_backward(const T* d_out, const T* gate, const T* up, T* d_gate, T* d_up,
                            std::int64_t count) {
#pragma omp parallel for simd schedule(static)
  for (std::int64_t i = 0; i < count; ++i) {
    const T s = sigmoid(gate[i]);
    const T silu = gate[i] * s;
    d_gate[i] = d_out[i] * up[i] * s * (T(1) + gate[i] * (T(1) - s));
    d_up[i] = d_out[i] * silu;
  }
}

}  // namespace kept::cpu
