// tests/support/backend_values.hpp: small host vectors into a backend's memory and back, and the
// float64 softmax the loss tests compare against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kept/core/tensor.hpp"

namespace kept::test {

// `values` in the backend's memory, stored as `dtype` (rounded once when it is narrower).
template <class B>
Tensor to_backend(B& b, const std::vector<float>& values, DType dtype = DType::F32) {
  Tensor host = Tensor::empty(DType::F32, {static_cast<std::int64_t>(values.size())});
  std::copy(values.begin(), values.end(), host.data<float>());
  Tensor out = b.zeros(dtype, host.shape());
  b.upload(host, out);
  return out;
}

// A backend tensor's values on the host, as floats.
template <class B>
std::vector<float> host_floats(B& b, const Tensor& t) {
  const Tensor h = b.download(t).to(DType::F32);
  return std::vector<float>(h.data<float>(), h.data<float>() + h.numel());
}

// softmax(logits / temperature) in float64, max-shifted.
inline std::vector<double> softmax(const std::vector<double>& logits, double temperature) {
  double max = -INFINITY;
  for (double x : logits)
    max = std::max(max, x / temperature);
  std::vector<double> p(logits.size());
  double sum = 0;
  for (std::size_t v = 0; v < logits.size(); ++v)
    sum += p[v] = std::exp(logits[v] / temperature - max);
  for (double& x : p)
    x /= sum;
  return p;
}

}  // namespace kept::test
