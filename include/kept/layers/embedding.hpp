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
  using Act = typename Backend::Activation;
  using Param = typename Backend::Param;
  using Grad = typename Backend::Grad;

  Embedding() = default;
  Embedding(Backend& backend, std::string name, std::int64_t vocab, std::int64_t dim)
      : vocab_(vocab), dim_(dim) {
    weight.name = std::move(name) + ".weight";
    weight.value = backend.zeros(Backend::Precision::param, {vocab, dim});
    weight.role = ParamRole::Embedding;
  }

  std::int64_t vocab() const { return vocab_; }

  // `tokens` is an I32 tensor in the backend's memory (Backend::upload_tokens).
  void forward(Backend& backend, const Tensor& tokens, MatrixView<Act> out) const {
    backend.embedding_forward(tokens.template data<std::int32_t>(), tokens.numel(),
                              weight.value.template data<Param>(), vocab_, dim_, out.data);
  }
  void backward(Backend& backend, const Tensor& tokens, MatrixView<const Act> d_out) {
    if (weight.has_grad())
      backend.embedding_backward(tokens.template data<std::int32_t>(), tokens.numel(), d_out.data,
                                 dim_, weight.grad.template data<Grad>());
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
