// kept/layers/embedding.hpp: token embedding, h0[t] = E[token[t]], E [vocab, hidden].
// Backward scatters dh0 into dE (see backend/cpu/embedding.hpp).
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "kept/core/tensor.hpp"
#include "kept/layers/parameter.hpp"

namespace kept {

template <class Backend>
class Embedding {
 public:
  using Scalar = typename Backend::Scalar;

  Embedding() = default;
  Embedding(Backend& backend, std::string name, std::int64_t vocab, std::int64_t dim)
      : vocab_(vocab), dim_(dim) {
    weight.name = std::move(name) + ".weight";
    weight.value = backend.zeros({vocab, dim});
    weight.role = ParamRole::Embedding;
  }

  std::int64_t vocab() const { return vocab_; }

  void forward(Backend& backend, std::span<const std::int32_t> tokens,
               MatrixView<Scalar> out) const {
    backend.embedding_forward(tokens.data(), static_cast<std::int64_t>(tokens.size()),
                              weight.value.template data<Scalar>(), vocab_, dim_, out.data);
  }
  void backward(Backend& backend, std::span<const std::int32_t> tokens,
                MatrixView<const Scalar> d_out) {
    if (weight.has_grad())
      backend.embedding_backward(tokens.data(), static_cast<std::int64_t>(tokens.size()),
                                 d_out.data, dim_, weight.grad.template data<Scalar>());
  }

  template <class Visitor>
  void visit(Visitor&& visitor) {
    visitor(weight);
  }

  Parameter weight;

 private:
  std::int64_t vocab_ = 0;
  std::int64_t dim_ = 0;
};

}  // namespace kept
