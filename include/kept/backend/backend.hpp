// kept/backend/backend.hpp: the backend contract, as a C++20 concept, and the precision policy.
//
// A backend is the object the layer, model, loss and optimizer templates call for memory and
// primitive ops (Norm<LayerNorm, Cpu>, Decoder<RMSNorm, CpuBf16>, xkd::logit_kl<Cpu>...).
// `kept::Backend<B>` names every op they call, with one signature for every backend, so a
// backend that lacks an op or spells it differently fails where it is named (a static_assert),
// not deep inside a layer template. The per-chunk loss kernels join the contract through the
// traits class LossKernels<B> (kept/backend/loss_kernels.hpp), which a backend specialises.
//
// Precision policy. One `Scalar` cannot serve bf16 training, so a backend names five types:
//
// clang-format off
//   type        what it stores                                 Cpu64   Cpu    CpuBf16  Cuda
//   Activation  layer inputs/outputs, residual stream, their   double  float  bf16     bf16
//               gradients, attention q/k/v/o
//   Param       parameter values the kernels read              double  float  bf16     bf16
//   Grad        parameter gradients (accumulated +=)           double  float  float    float
//   Master      master weights, AdamW moments, optimizer math  double  float  float    float
//   Stat        row statistics (mean, rstd, log-sum-exp),      double  float  float    float
//               LM-head logit chunks, GEMM alpha/beta, eps
// clang-format on
//
// Every reduction and every GEMM accumulates in Stat (fp32, or float64 on Cpu64). When Param
// and Master are one type the parameter value is its own master copy (Cpu, Cpu64).
//
// Rounding points (where a value is rounded to bf16 on CpuBf16, and on the CUDA backend):
//  - an op's Activation output is computed in fp32 from its fp32-widened inputs and rounded
//    once, to nearest even, when stored (GEMM: fp32 accumulation, C = round(alpha AB + beta C));
//  - accumulating ops (dx += ..., residual adds) read the bf16 value, add in fp32, round once;
//  - Grad and Stat outputs are fp32 and never rounded; logits chunks are fp32;
//  - a bf16 parameter is round(master) after each optimizer step, or, without master weights,
//    the fp32 update rounded stochastically (kept::bf16_stochastic with kept::rounding_bits).
// The per-element functions both sides share (rounding, silu, RoPE angles) are in
// kept/core/element_math.hpp.
//
// Conventions every op follows:
//  - Pointers and views address the backend's own memory (B::space); code above backend/ never
//    dereferences them; tokens, RoPE tables, weights and results cross through upload_tokens,
//    rope_table, upload and download.
//  - Matrices are row-major MatrixView<T> with a row stride; `Transpose::Yes` reads the view's
//    transpose. GEMM: c = alpha * op(a) op(b) + beta * c.
//  - Backward ops of the norms, attention, embedding and bias accumulate (+=) into every gradient
//    they produce; swiglu_backward overwrites (=) d_gate and d_up.
//  - Shapes are passed explicitly; `count` is an element count, `rows x cols` a row layout.
//  - A bad argument throws kept::Error naming the op (on CUDA also a failed launch, with the
//    CUDA status and, in the host emulation, what the emulator found).
//
// clang-format off
// Op                         | what it computes
// ---------------------------|--------------------------------------------------------------
// zeros, ensure, fill_zero   | allocate in a dtype (ensure reallocates only on a new shape/dtype)
// upload, download           | host -> backend (converting to the destination's dtype); backend -> host
// download_into              | backend -> an existing host tensor of the same dtype and shape
// host_zeros                 | zeroed host memory the backend copies to and from fastest (pinned)
// upload_behind              | host -> backend, same dtype, overlapping the work queued so far
//                            | (which it may overwrite: it starts when that work is done)
// await_uploads              | work queued from now on sees every upload_behind before it
// upload_tokens, rope_table  | token ids into backend memory; the RoPE cos/sin table
// copy, add, accumulate      | b = a; out = a + b; out += a   (Activation)
// add_bias, bias_backward    | out[r, :] += bias; d_bias += sum_r d_out[r, :]
// gemm                       | c = alpha op(a) op(b) + beta c, the six type combinations below
// layernorm_*, rmsnorm_*     | y = (x - mean) * rstd * w + b; y = x * rstd * w; and backward
// rope                       | rotate-half RoPE on [batch*seq, heads*head_dim], direction +1/-1
// attention_*                | causal softmax attention with saved log-sum-exp; and backward
// swiglu_*                   | out = silu(gate) * up; and backward
// embedding_*                | gather rows of a table by token id; scatter-add of the gradient
// grad_sum_squares           | sum of g^2 over a gradient range, in double (clipping)
// scale_grad, grad_finite    | g *= s; whether every g is finite
// fill_uniform               | p[i] = uniform_symmetric(seed, i, bound) (kept/core/element_math.hpp)
// adamw_update               | one AdamW update of a range (kept/train/adamw.hpp): torch-exact
//                            | with fp32 moments; or 8-bit blockwise moments; with fp32 master
//                            | weights, or bf16 weights rounded stochastically (master null)
// clang-format on
//
// GEMM type combinations (A = Activation, P = Param, G = Grad, S = Stat):
//   A x P^T -> A   linear forward            S x P -> A    LM-head chunk, d_hidden
//   A x P   -> A   linear backward, dx       S^T x A -> G  LM-head chunk, d_weight
//   A^T x A -> G   linear backward, dW       A x P^T -> S  LM-head chunk, logits
//
// The CPU backends (kept/backend/cpu.hpp: Cpu, Cpu64; kept/backend/cpu_bf16.hpp: CpuBf16)
// satisfy it; tests/unit/test_backend_contract.cpp instantiates the whole model, every objective,
// the optimizer step and evaluation for each, and tests/cuda/cuda_contract.cu does the same for
// the CUDA backend (kept/backend/cuda/backend.cuh) under nvcc and under the host emulation.
#pragma once

#include <concepts>
#include <cstdint>
#include <span>

#include "kept/core/attention_shape.hpp"
#include "kept/core/dtype.hpp"
#include "kept/core/shape.hpp"
#include "kept/core/tensor.hpp"

namespace kept {

template <class ActivationT, class ParamT, class GradT, class MasterT, class StatT>
struct Precision {
  using Activation = ActivationT;
  using Param = ParamT;
  using Grad = GradT;
  using Master = MasterT;
  using Stat = StatT;
  static constexpr DType activation = dtype_of_v<ActivationT>;
  static constexpr DType param = dtype_of_v<ParamT>;
  static constexpr DType grad = dtype_of_v<GradT>;
  static constexpr DType master = dtype_of_v<MasterT>;
  static constexpr DType stat = dtype_of_v<StatT>;
  // Whether the optimizer keeps a separate master copy of each parameter.
  static constexpr bool separate_master = !std::is_same_v<ParamT, MasterT>;
};

// A backend's type names, from its precision policy: inherit UsesPrecision<Precision<...>>.
template <class P>
struct UsesPrecision {
  using Precision = P;
  using Activation = typename P::Activation;
  using Param = typename P::Param;
  using Grad = typename P::Grad;
  using Master = typename P::Master;
  using Stat = typename P::Stat;
};

// download_into's preconditions, one message for every backend.
inline void require_download_into(const Tensor& source, const Tensor& host) {
  KEPT_CHECK(host.defined() && host.space() == MemorySpace::Host,
             "download_into: the destination is not a host tensor");
  KEPT_CHECK(source.dtype() == host.dtype() && source.shape() == host.shape(),
             "download_into: source ", dtype_name(source.dtype()), " ", source.shape(),
             " for a destination ", dtype_name(host.dtype()), " ", host.shape());
}

// upload_behind's preconditions: an exact copy (no conversion on the way).
inline void require_upload_behind(const Tensor& host, const Tensor& destination) {
  KEPT_CHECK(host.defined() && host.space() == MemorySpace::Host,
             "upload_behind: the source is not a host tensor");
  KEPT_CHECK(destination.defined() && host.dtype() == destination.dtype() &&
                 host.shape() == destination.shape(),
             "upload_behind: source ", dtype_name(host.dtype()), " ", host.shape(),
             " for a destination ", dtype_name(destination.dtype()), " ", destination.shape());
}

// The scalars of one AdamW update, formed on the host the way torch forms them
// (kept/train/adamw.hpp); the backend applies them to a range of elements.
struct AdamWScalars {
  float one_minus_beta1 = 0;        // f32(1 - b1)
  bool small_weight = true;         // |1 - b1| < 0.5: torch's lerp form
  float beta2 = 0;                  // f32(b2)
  float one_minus_beta2 = 0;        // f32(1 - b2)
  float eps = 0;                    // f32(eps)
  float bias_correction2_sqrt = 1;  // f32(sqrt(1 - b2^t))
  float neg_step = 0;               // f32(-lr / (1 - b1^t))
  float decay_keep = 1;             // f32(1 - lr * wd), applied when `decay`
  bool decay = false;
  // Bf16 weights without master copies: the key of the stochastic rounding bits
  // (kept::rounding_bits), one per parameter and step, so a resumed run draws the same bits.
  std::uint64_t rounding_key = 0;
  // The index of the range's first element within its parameter: the rounding bits are those of
  // (key, element index in the parameter), so a parameter updated in chunks (optimizer states
  // staged from host memory) draws the same bits as one updated whole.
  std::uint64_t first_element = 0;
};

// One range's AdamW moments: fp32 (exp_avg, exp_avg_sq; Master), bf16 (rounded stochastically
// after each update, with kept::moment_rounding_key's bits), or 8-bit blockwise (one code rank per
// element and one fp32 absmax per kQuantBlock elements from the range's start;
// kept/core/dynamic_code.hpp). Exactly one of the three forms is set.
template <class M>
struct AdamWMoments {
  M* exp_avg = nullptr;
  M* exp_avg_sq = nullptr;
  bf16* exp_avg_bf16 = nullptr;
  bf16* exp_avg_sq_bf16 = nullptr;
  std::uint8_t* exp_avg_codes = nullptr;
  std::uint8_t* exp_avg_sq_codes = nullptr;
  float* exp_avg_absmax = nullptr;
  float* exp_avg_sq_absmax = nullptr;

  bool quantized() const { return exp_avg_codes != nullptr; }
  bool bf16_moments() const { return exp_avg_bf16 != nullptr; }
};

// The RoPE cos/sin table a backend keeps for (head_dim, theta, positions).
template <class Table>
concept RopeTableOf = std::default_initializable<Table> && requires(const Table& table) {
  { table.head_dim() } -> std::convertible_to<std::int64_t>;
  { table.positions() } -> std::convertible_to<std::int64_t>;
};

// clang-format off
template <class B>
concept Backend = requires {
  typename B::Precision;
  typename B::Activation;
  typename B::Param;
  typename B::Grad;
  typename B::Master;
  typename B::Stat;
  typename B::RopeTable;
  { B::space } -> std::convertible_to<MemorySpace>;
  { B::name() } -> std::convertible_to<const char*>;
}
&& RopeTableOf<typename B::RopeTable>
&& requires(B& b, Tensor& tensor, const Tensor& host, DType dtype, const Shape& shape,
            std::int64_t n, double theta, Transpose t, const typename B::RopeTable& rope,
            const AttentionShape& attention, const std::int32_t* tokens,
            std::span<const std::int32_t> host_tokens,
            typename B::Activation* act, const typename B::Activation* cact,
            const typename B::Param* cparam, typename B::Param* param,
            typename B::Grad* grad, const typename B::Grad* cgrad,
            typename B::Master* master, typename B::Stat* stat, const typename B::Stat* cstat,
            typename B::Stat scalar, const AdamWScalars& adamw,
            const AdamWMoments<typename B::Master>& moments,
            MatrixView<typename B::Activation> act_m,
            MatrixView<const typename B::Activation> cact_m,
            MatrixView<const typename B::Param> cparam_m,
            MatrixView<typename B::Grad> grad_m,
            MatrixView<typename B::Stat> stat_m,
            MatrixView<const typename B::Stat> cstat_m) {
  // memory and transfers
  { b.zeros(dtype, shape) } -> std::same_as<Tensor>;
  b.ensure(tensor, dtype, shape);
  b.fill_zero(tensor);
  b.upload(host, tensor);
  { b.download(host) } -> std::same_as<Tensor>;
  b.download_into(host, tensor);
  { b.host_zeros(dtype, shape) } -> std::same_as<Tensor>;
  b.upload_behind(host, tensor);
  b.await_uploads();
  b.upload_tokens(host_tokens, tensor);
  { b.rope_table(n, theta, n) } -> std::same_as<typename B::RopeTable>;
  b.copy(cact, act, n);
  // elementwise
  b.add(cact, cact, act, n);
  b.accumulate(cact, act, n);
  b.add_bias(act_m, cparam);
  b.add_bias(stat_m, cparam);
  b.bias_backward(cact_m, grad);
  b.bias_backward(cstat_m, grad);
  // GEMM
  b.gemm(cact_m, t, cparam_m, t, act_m, scalar, scalar);
  b.gemm(cact_m, t, cact_m, t, grad_m, scalar, scalar);
  b.gemm(cact_m, t, cparam_m, t, stat_m, scalar, scalar);
  b.gemm(cstat_m, t, cparam_m, t, act_m, scalar, scalar);
  b.gemm(cstat_m, t, cact_m, t, grad_m, scalar, scalar);
  // norms: (x, weight, bias, y, mean, rstd, rows, cols, eps) and backward
  b.layernorm_forward(cact, cparam, cparam, act, stat, stat, n, n, scalar);
  b.layernorm_backward(cact, cact, cparam, cstat, cstat, act, grad, grad, n, n);
  b.rmsnorm_forward(cact, cparam, act, stat, n, n, scalar);
  b.rmsnorm_backward(cact, cact, cparam, cstat, act, grad, n, n);
  // RoPE: (x, batch, seq, heads, table, direction)
  b.rope(act, n, n, n, rope, 1);
  // attention: (q, k, v, o, lse, shape) and (d_o, q, k, v, o, lse, dq, dk, dv, shape)
  b.attention_forward(cact, cact, cact, act, stat, attention);
  b.attention_backward(cact, cact, cact, cact, cact, cstat, act, act, act, attention);
  // SwiGLU: (gate, up, out, count) and (d_out, gate, up, d_gate, d_up, count)
  b.swiglu_forward(cact, cact, act, n);
  b.swiglu_backward(cact, cact, cact, act, act, n);
  // embedding: (tokens, count, table, vocab, dim, out) and (tokens, count, d_out, dim, d_table)
  b.embedding_forward(tokens, n, cparam, n, n, act);
  b.embedding_backward(tokens, n, cact, n, grad);
  // optimizer: gradient norm, scaling, finiteness, and one AdamW update of a range
  // (value, master or null, grad, moments, count, scalars)
  { b.grad_sum_squares(cgrad, n) } -> std::convertible_to<double>;
  b.scale_grad(grad, n, 1.0f);
  { b.grad_finite(cgrad, n) } -> std::convertible_to<bool>;
  b.adamw_update(param, master, cgrad, moments, n, adamw);
  // seeded uniform values of a parameter range: (values, count, seed, bound)
  b.fill_uniform(param, n, std::uint64_t{0}, 1.0f);
};
// clang-format on

}  // namespace kept
