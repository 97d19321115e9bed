// tests/support/tensors.hpp: tensors with reproducible contents, comparing tensors bit for
// bit, and a plain list of parameters that serves as a "model" for the parameter arena.
#pragma once

#include <cstddef>
#include <cstring>
#include <vector>

#include "kept/core/tensor.hpp"
#include "kept/layers/parameter.hpp"

namespace kept::test {

// A tensor whose byte i is (i * step + offset) mod 256: arbitrary but reproducible contents
// in which neighbouring bytes differ, whatever the dtype.
inline Tensor patterned_tensor(DType dtype, const Shape& shape, int step, int offset) {
  Tensor tensor = Tensor::empty(dtype, shape);
  auto* bytes = static_cast<unsigned char*>(tensor.raw());
  for (std::size_t i = 0; i < tensor.nbytes(); ++i)
    bytes[i] = static_cast<unsigned char>(i * static_cast<std::size_t>(step) +
                                          static_cast<std::size_t>(offset));
  return tensor;
}

// Same dtype, same shape, the same bytes.
inline bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || !(a.shape() == b.shape())) return false;
  const auto x = a.bytes(), y = b.bytes();
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size()) == 0);
}

// A "model" for the arena: anything with visit_parameters.
struct ParamList {
  std::vector<Parameter> ps;
  template <class Visitor>
  void visit_parameters(Visitor&& visitor) {
    for (Parameter& p : ps)
      visitor(p);
  }
};

}  // namespace kept::test
