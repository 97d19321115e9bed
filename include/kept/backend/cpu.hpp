// kept/backend/cpu.hpp: the CPU backend, kept's reference.
//
// A backend is the object the layer templates call for memory and primitive ops; layers are
// written once as templates over it (Norm<LayerNorm, Cpu>, ...), and kept/backend/backend.hpp
// states the contract as a concept. The CPU
// backend computes with OpenBLAS GEMM and OpenMP threads, and every CUDA kernel is tested
// against it. It comes in two precisions: Cpu (fp32, what jobs run) and Cpu64 (float64, the
// reference that gradient checks and numerics reports compare against). The kernels live one
// op family per header in backend/cpu/ and take raw pointers, so they can be called without
// any kept type.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>

#include "kept/backend/backend.hpp"
#include "kept/backend/cpu/attention.hpp"
#include "kept/backend/cpu/blas_core.hpp"
#include "kept/backend/cpu/embedding.hpp"
#include "kept/backend/cpu/gemm.hpp"
#include "kept/backend/cpu/loss_kernels.hpp"
#include "kept/backend/cpu/norm.hpp"
#include "kept/backend/cpu/optimizer.hpp"
#include "kept/backend/cpu/rope.hpp"
#include "kept/backend/cpu/swiglu.hpp"
#include "kept/core/element_math.hpp"
#include "kept/core/rope_table.hpp"
#include "kept/core/tensor.hpp"

namespace kept {

template <class T>
// One type for everything: fp32 (Cpu) or float64 (Cpu64). See the policy in backend.hpp.
struct CpuBackend : UsesPrecision<Precision<T, T, T, T, T>> {
  using RopeTable = kept::RopeTable<T>;
  static constexpr MemorySpace space = MemorySpace::Host;
  static constexpr const char* name() { return std::is_same_v<T, double> ? "cpu64" : "cpu"; }

  Tensor zeros(DType dtype, const Shape& shape) { return Tensor::zeros(dtype, shape); }

  // Makes `tensor` a tensor of `dtype` and `shape`, reallocating only when either changed, so
  // activation buffers are reused from step to step.
  void ensure(Tensor& tensor, DType dtype, const Shape& shape) {
    if (!tensor.defined() || !(tensor.shape() == shape) || tensor.dtype() != dtype)
      tensor = Tensor::empty(dtype, shape);
  }
  void fill_zero(Tensor& tensor) {
    if (tensor.nbytes()) std::memset(tensor.raw(), 0, tensor.nbytes());
  }
  // Host memory is this backend's memory: upload converts into the destination's dtype (the
  // shapes must match), download copies.
  void upload(const Tensor& host, Tensor& destination) {
    KEPT_CHECK(destination.defined() && host.shape() == destination.shape(),
               "upload: source of shape ", host.shape(), " for a destination of shape ",
               destination.shape());
    KEPT_CHECK(destination.space() == MemorySpace::Host, "upload: destination is not host memory");
    const Tensor converted =
        host.dtype() == destination.dtype() ? host : host.to(destination.dtype());
    if (converted.nbytes()) std::memcpy(destination.raw(), converted.raw(), converted.nbytes());
  }
  Tensor download(const Tensor& source) { return source.clone(); }
  Tensor host_zeros(DType dtype, const Shape& shape) { return Tensor::zeros(dtype, shape); }
  // Nothing runs behind the caller's back here: the copy is done when this returns.
  void upload_behind(const Tensor& host, Tensor& destination) {
    require_upload_behind(host, destination);
    upload(host, destination);
  }
  void await_uploads() {}
  void download_into(const Tensor& source, Tensor& host) {
    require_download_into(source, host);
    if (source.nbytes()) std::memmove(host.raw(), source.raw(), source.nbytes());
  }
  void upload_tokens(std::span<const std::int32_t> tokens, Tensor& destination) {
    ensure(destination, DType::I32, {static_cast<std::int64_t>(tokens.size())});
    if (!tokens.empty()) std::memcpy(destination.raw(), tokens.data(), tokens.size_bytes());
  }
  RopeTable rope_table(std::int64_t head_dim, double theta, std::int64_t positions) {
    return RopeTable(head_dim, theta, positions);
  }

  void copy(const T* source, T* destination, std::int64_t count) {
    if (count) std::memcpy(destination, source, sizeof(T) * static_cast<std::size_t>(count));
  }
  // out = a + b (elementwise; out may alias a or b).
  void add(const T* a, const T* b, T* out, std::int64_t count) {
#pragma omp parallel for simd schedule(static)
    for (std::int64_t i = 0; i < count; ++i)
      out[i] = a[i] + b[i];
  }
  // out += a
  void accumulate(const T* a, T* out, std::int64_t count) {
#pragma omp parallel for simd schedule(static)
    for (std::int64_t i = 0; i < count; ++i)
      out[i] += a[i];
  }
  // Row-broadcast bias: out[r, c] += bias[c].
  void add_bias(MatrixView<T> out, const T* bias) {
#pragma omp parallel for schedule(static)
    for (std::int64_t r = 0; r < out.rows; ++r) {
      T* row = out.row(r);
      for (std::int64_t c = 0; c < out.cols; ++c)
        row[c] += bias[c];
    }
  }
  // d_bias[c] += sum_r d_out[r, c], summed in row order (deterministic).
  void bias_backward(MatrixView<const T> d_out, T* d_bias) {
    for (std::int64_t r = 0; r < d_out.rows; ++r) {
      const T* row = d_out.row(r);
      for (std::int64_t c = 0; c < d_out.cols; ++c)
        d_bias[c] += row[c];
    }
  }

  void gemm(MatrixView<const T> a, Transpose transpose_a, MatrixView<const T> b,
            Transpose transpose_b, MatrixView<T> c, T alpha = T(1), T beta = T(0)) {
    cpu::gemm<T>(a, transpose_a, b, transpose_b, c, alpha, beta);
  }

  void layernorm_forward(const T* x, const T* weight, const T* bias, T* y, T* mean, T* rstd,
                         std::int64_t rows, std::int64_t cols, T eps) {
    cpu::layernorm_forward<T>(x, weight, bias, y, mean, rstd, rows, cols, eps);
  }
  void layernorm_backward(const T* dy, const T* x, const T* weight, const T* mean, const T* rstd,
                          T* dx, T* dweight, T* dbias, std::int64_t rows, std::int64_t cols) {
    cpu::layernorm_backward<T>(dy, x, weight, mean, rstd, dx, dweight, dbias, rows, cols);
  }
  void rmsnorm_forward(const T* x, const T* weight, T* y, T* rstd, std::int64_t rows,
                       std::int64_t cols, T eps) {
    cpu::rmsnorm_forward<T>(x, weight, y, rstd, rows, cols, eps);
  }
  void rmsnorm_backward(const T* dy, const T* x, const T* weight, const T* rstd, T* dx, T* dweight,
                        std::int64_t rows, std::int64_t cols) {
    cpu::rmsnorm_backward<T>(dy, x, weight, rstd, dx, dweight, rows, cols);
  }

  void rope(T* x, std::int64_t batch, std::int64_t seq, std::int64_t heads, const RopeTable& table,
            int direction) {
    cpu::rope_apply<T>(x, batch, seq, heads, table, direction);
  }

  void attention_forward(const T* q, const T* k, const T* v, T* o, T* lse,
                         const AttentionShape& shape) {
    cpu::attention_forward<T>(q, k, v, o, lse, shape);
  }
  void attention_backward(const T* d_o, const T* q, const T* k, const T* v, const T* o,
                          const T* lse, T* dq, T* dk, T* dv, const AttentionShape& shape) {
    cpu::attention_backward<T>(d_o, q, k, v, o, lse, dq, dk, dv, shape);
  }

  void swiglu_forward(const T* gate, const T* up, T* out, std::int64_t count) {
    cpu::swiglu_forward<T>(gate, up, out, count);
  }
  void swiglu_backward(const T* d_out, const T* gate, const T* up, T* d_gate, T* d_up,
                       std::int64_t count) {
    cpu::swiglu_backward<T>(d_out, gate, up, d_gate, d_up, count);
  }

  void embedding_forward(const std::int32_t* tokens, std::int64_t count, const T* table,
                         std::int64_t vocab, std::int64_t dim, T* out) {
    cpu::embedding_forward<T>(tokens, count, table, vocab, dim, out);
  }
  void embedding_backward(const std::int32_t* tokens, std::int64_t count, const T* d_out,
                          std::int64_t dim, T* d_table) {
    cpu::embedding_backward<T>(tokens, count, d_out, dim, d_table);
  }

  // The optimizer's range ops (kept/train/adamw.hpp has the math and why it is torch-exact).
  double grad_sum_squares(const T* grad, std::int64_t count) {
    return cpu::sum_squares(grad, count);
  }
  void scale_grad(T* grad, std::int64_t count, float factor) {
    cpu::scale(grad, count, static_cast<T>(factor));
  }
  bool grad_finite(const T* grad, std::int64_t count) {
    return cpu::all_finite(grad, count);
  }
  void fill_uniform(T* values, std::int64_t count, std::uint64_t seed, float bound) {
    for (std::int64_t i = 0; i < count; ++i)
      values[i] = static_cast<T>(uniform_symmetric(seed, static_cast<std::uint64_t>(i), bound));
  }
  // master is null: the value is its own master copy.
  void adamw_update(T* value, T* master, const T* grad, const AdamWMoments<T>& moments,
                    std::int64_t count, const AdamWScalars& scalars) {
    KEPT_CHECK(master == nullptr, "adamw_update on ", name(), ": no separate master weights");
    cpu::adamw_update(value, master, grad, moments, count, scalars);
  }
};

using Cpu = CpuBackend<float>;
using Cpu64 = CpuBackend<double>;
static_assert(Backend<Cpu> && Backend<Cpu64>, "the CPU backend must satisfy kept::Backend");

}  // namespace kept
