// kept/backend/backend.hpp: the backend contract, as a C++20 concept.
//
// A backend is the object the layer, model and loss templates call for memory and primitive
// ops (Norm<LayerNorm, Cpu>, Decoder<RMSNorm, Cpu64>, xkd::logit_kl<Cpu>...). `kept::Backend<B>`
// names every op they call, with one signature for every backend, so a backend that lacks an op
// or spells it differently fails at the point where it is named (a static_assert), not deep
// inside a layer template. The per-chunk loss kernels are part of the contract through the
// traits class xkd::LossKernels<B> (kept/xkd/loss_kernels.hpp), which a backend specialises.
//
// Conventions every op follows:
//  - Pointers and views address the backend's own memory space (B::space); a host-side caller
//    never dereferences them for a device backend.
//  - Element type: B::Scalar for activations, parameters, gradients and row statistics today.
//  - Matrices are row-major MatrixView<T> with a row stride; `Transpose::Yes` reads the view's
//    transpose. GEMM: c = alpha * op(a) op(b) + beta * c.
//  - Backward ops of the norms, attention, embedding and bias accumulate (+=) into every gradient
//    they produce; swiglu_backward overwrites (=) d_gate and d_up.
//  - Shapes are passed explicitly; `count` is an element count, `rows x cols` a row layout.
//  - A bad argument throws kept::Error naming the op.
//
// clang-format off
// Op                      | what it computes
// ------------------------|-----------------------------------------------------------------
// zeros, ensure           | allocate (ensure reallocates only when the shape changes)
// fill_zero, copy         | memset 0; count elements from source to destination
// add, accumulate         | out = a + b; out += a
// add_bias, bias_backward | out[r, :] += bias; d_bias += sum_r d_out[r, :]
// gemm                    | c = alpha op(a) op(b) + beta c
// layernorm_*, rmsnorm_*  | y = (x - mean) * rstd * w + b; y = x * rstd * w; and backward
// rope                    | rotate-half RoPE on [batch*seq, heads*head_dim], direction +1/-1
// attention_*             | causal softmax attention with saved log-sum-exp; and backward
// swiglu_*                | out = silu(gate) * up; and backward
// embedding_*             | gather rows of a table by token id; scatter-add of the gradient
// clang-format on
//
// The CPU backend (kept/backend/cpu.hpp) satisfies it in fp32 (Cpu) and float64 (Cpu64);
// tests/unit/test_backend_contract.cpp checks that and instantiates the whole model, every
// objective and the optimizer step for both.
#pragma once

#include <concepts>
#include <cstdint>

#include "kept/core/attention_shape.hpp"
#include "kept/core/dtype.hpp"
#include "kept/core/shape.hpp"
#include "kept/core/tensor.hpp"

namespace kept {

// The RoPE cos/sin table a backend keeps for (head_dim, theta, positions).
template <class Table>
concept RopeTableOf = std::default_initializable<Table> &&
    std::constructible_from<Table, std::int64_t, double, std::int64_t> &&
    requires(const Table& table) {
  { table.head_dim() } -> std::convertible_to<std::int64_t>;
  { table.positions() } -> std::convertible_to<std::int64_t>;
};

template <class B>
concept Backend = requires {
  typename B::Scalar;
  typename B::RopeTable;
  { B::space } -> std::convertible_to<MemorySpace>;
  { B::dtype } -> std::convertible_to<DType>;
}
&&RopeTableOf<typename B::RopeTable>&& requires(
    B& b, Tensor& tensor, const Shape& shape, typename B::Scalar* out, const typename B::Scalar* in,
    typename B::Scalar scalar, std::int64_t n, MatrixView<typename B::Scalar> matrix,
    MatrixView<const typename B::Scalar> const_matrix, Transpose transpose,
    const typename B::RopeTable& rope, const AttentionShape& attention,
    const std::int32_t* tokens) {
  // memory
  { b.zeros(shape) } -> std::same_as<Tensor>;
  b.ensure(tensor, shape);
  b.fill_zero(tensor);
  b.copy(in, out, n);
  // elementwise
  b.add(in, in, out, n);
  b.accumulate(in, out, n);
  b.add_bias(matrix, in);
  b.bias_backward(const_matrix, out);
  // GEMM
  b.gemm(const_matrix, transpose, const_matrix, transpose, matrix, scalar, scalar);
  // norms: (x, weight, bias, y, mean, rstd, rows, cols, eps) and backward
  b.layernorm_forward(in, in, in, out, out, out, n, n, scalar);
  b.layernorm_backward(in, in, in, in, in, out, out, out, n, n);
  b.rmsnorm_forward(in, in, out, out, n, n, scalar);
  b.rmsnorm_backward(in, in, in, in, out, out, n, n);
  // RoPE: (x, batch, seq, heads, table, direction)
  b.rope(out, n, n, n, rope, 1);
  // attention: (q, k, v, o, lse, shape) and (d_o, q, k, v, o, lse, dq, dk, dv, shape)
  b.attention_forward(in, in, in, out, out, attention);
  b.attention_backward(in, in, in, in, in, in, out, out, out, attention);
  // SwiGLU: (gate, up, out, count) and (d_out, gate, up, d_gate, d_up, count)
  b.swiglu_forward(in, in, out, n);
  b.swiglu_backward(in, in, in, out, out, n);
  // embedding: (tokens, count, table, vocab, dim, out) and (tokens, count, d_out, dim, d_table)
  b.embedding_forward(tokens, n, in, n, n, out);
  b.embedding_backward(tokens, n, in, n, out);
};

}  // namespace kept
