// kept/backend/cuda/backend.cuh: the CUDA backend as kept::Backend sees it.
//
// CudaBackend puts the backend contract (kept/backend/backend.hpp) on a Cuda context
// (runtime.cuh): bf16 activations and parameters, fp32 gradients, master weights and statistics,
// everything in device memory; tokens, RoPE tables, weights and results cross through
// upload_tokens, rope_table, upload and download. Each op checks its arguments, launches kept's
// kernel (or the cuBLASLt GEMM) on the context's stream and throws kept::Error naming the op and
// the CUDA status when a launch fails. The rounding points are those of CpuBf16
// (kept/backend/cpu_bf16.hpp), so the op registry (tests/ops) checks CUDA tightly against it.
// Compiled by nvcc for a GPU, or by g++ against the host emulation (KEPT_CUDA_EMULATION), where
// the same kernels run on the CPU under the emulator's checks.
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "kept/backend/backend.hpp"
#include "kept/backend/cuda/attention.cuh"
#include "kept/backend/cuda/elementwise.cuh"
#include "kept/backend/cuda/embedding.cuh"
#include "kept/backend/cuda/gemm.cuh"
#include "kept/backend/cuda/norm.cuh"
#include "kept/backend/cuda/optimizer.cuh"
#include "kept/backend/cuda/rope.cuh"
#include "kept/backend/cuda/runtime.cuh"
#include "kept/backend/cuda/softmax_losses.cuh"
#include "kept/backend/cuda/sparse_kl.cuh"
#include "kept/backend/cuda/swiglu.cuh"
#include "kept/backend/loss_kernels.hpp"
#include "kept/core/rope_table.hpp"
#include "kept/core/tensor.hpp"

namespace kept::cuda {

// Throws "<op>: CUDA launch failed: <name> (<code>): <description>" for a failed launcher.
inline void check_launch(cudaError_t status, const char* op) {
  if (status != cudaSuccess)
    fail(op, ": CUDA launch failed: ", cudaGetErrorName(status), " (", static_cast<int>(status),
         "): ", cudaGetErrorString(status));
}

class CudaBackend : public UsesPrecision<Precision<bf16, bf16, float, float, float>> {
 public:
  static constexpr MemorySpace space = MemorySpace::Cuda;
  static constexpr const char* name() { return "cuda"; }

  // The RoPE table in device memory: cos and sin [positions, head_dim / 2], fp32.
  class RopeTable {
   public:
    RopeTable() = default;
    RopeTable(Tensor cos, Tensor sin, std::int64_t head_dim, std::int64_t positions)
        : cos_(std::move(cos)), sin_(std::move(sin)), head_dim_(head_dim), positions_(positions) {}
    std::int64_t head_dim() const { return head_dim_; }
    std::int64_t positions() const { return positions_; }
    const float* cos() const { return cos_.data<float>(); }
    const float* sin() const { return sin_.data<float>(); }

   private:
    Tensor cos_, sin_;
    std::int64_t head_dim_ = 0, positions_ = 0;
  };

  explicit CudaBackend(Cuda& context) : context_(&context) {}

  // ---- memory and transfers -------------------------------------------------------------------
  Tensor zeros(DType dtype, const Shape& shape) { return context_->zeros(dtype, shape); }
  void ensure(Tensor& tensor, DType dtype, const Shape& shape) {
    if (!tensor.defined() || !(tensor.shape() == shape) || tensor.dtype() != dtype ||
        tensor.space() != MemorySpace::Cuda)
      tensor = context_->empty(dtype, shape);
  }
  void fill_zero(Tensor& tensor) {
    if (tensor.nbytes())
      KEPT_CUDA_CHECK(cudaMemsetAsync(tensor.raw(), 0, tensor.nbytes(), context_->stream()));
  }
  // Converts on the host to the destination's dtype, then copies to the device.
  void upload(const Tensor& host, Tensor& destination) {
    KEPT_CHECK(destination.defined() && host.shape() == destination.shape(),
               "upload: source of shape ", host.shape(), " for a destination of shape ",
               destination.shape());
    const Tensor converted =
        host.dtype() == destination.dtype() ? host : host.to(destination.dtype());
    kept::cuda::copy(destination, converted);
  }
  Tensor download(const Tensor& source) { return context_->download(source); }
  void upload_behind(const Tensor& host, Tensor& destination) {
    require_upload_behind(host, destination);
    KEPT_CHECK(destination.space() == MemorySpace::Cuda,
               "upload_behind: the destination is not device memory");
    context_->upload_behind(destination.raw(), host.raw(), host.nbytes());
  }
  void await_uploads() { context_->await_uploads(); }
  Tensor host_zeros(DType dtype, const Shape& shape) {
    return kept::cuda::pinned_host_zeros(dtype, shape);
  }
  void download_into(const Tensor& source, Tensor& host) {
    require_download_into(source, host);
    kept::cuda::copy(host, source);
  }
  void upload_tokens(std::span<const std::int32_t> tokens, Tensor& destination) {
    ensure(destination, DType::I32, {static_cast<std::int64_t>(tokens.size())});
    if (!tokens.empty())
      KEPT_CUDA_CHECK(cudaMemcpy(destination.raw(), tokens.data(), tokens.size_bytes(),
                                 cudaMemcpyHostToDevice));
  }
  RopeTable rope_table(std::int64_t head_dim, double theta, std::int64_t positions) {
    const kept::RopeTable<float> host(head_dim, theta, positions);
    const Shape shape{positions, head_dim / 2};
    Tensor cos = context_->empty(DType::F32, shape), sin = context_->empty(DType::F32, shape);
    const std::size_t bytes = static_cast<std::size_t>(positions * (head_dim / 2)) * sizeof(float);
    if (bytes) {
      KEPT_CUDA_CHECK(cudaMemcpy(cos.raw(), host.cos(0), bytes, cudaMemcpyHostToDevice));
      KEPT_CUDA_CHECK(cudaMemcpy(sin.raw(), host.sin(0), bytes, cudaMemcpyHostToDevice));
    }
    return RopeTable(std::move(cos), std::move(sin), head_dim, positions);
  }

  // ---- elementwise ----------------------------------------------------------------------------
  void copy(const bf16* source, bf16* destination, std::int64_t count) {
    check_count("copy", count);
    if (count)
      KEPT_CUDA_CHECK(cudaMemcpyAsync(destination, source,
                                      sizeof(bf16) * static_cast<std::size_t>(count),
                                      cudaMemcpyDeviceToDevice, context_->stream()));
  }
  void add(const bf16* a, const bf16* b, bf16* out, std::int64_t count) {
    check_count("add", count);
    check_launch(launch_add(device_ptr(a), device_ptr(b), device_ptr(out), count, stream()), "add");
  }
  void accumulate(const bf16* a, bf16* out, std::int64_t count) {
    check_count("accumulate", count);
    check_launch(launch_accumulate(device_ptr(a), device_ptr(out), count, stream()), "accumulate");
  }
  template <class T>
  void add_bias(MatrixView<T> out, const bf16* bias) {
    check_matrix("add_bias", out.rows, out.cols, out.stride);
    check_launch(launch_add_bias(device_ptr(out.data), out.rows, out.cols, out.stride,
                                 device_ptr(bias), stream()),
                 "add_bias");
  }
  template <class T>
  void bias_backward(MatrixView<const T> d_out, float* d_bias) {
    check_matrix("bias_backward", d_out.rows, d_out.cols, d_out.stride);
    check_launch(detail::launch_column_sum(device_ptr(d_out.data), d_out.rows, d_out.cols,
                                           d_out.stride, d_bias, stream()),
                 "bias_backward");
  }

  // ---- GEMM: cuBLASLt, fp32 accumulation; a mixed fp32/bf16 pair is widened to fp32 first ------
  template <class TA, class TB, class TC>
  void gemm(MatrixView<const TA> a, Transpose transpose_a, MatrixView<const TB> b,
            Transpose transpose_b, MatrixView<TC> c, float alpha = 1.0f, float beta = 0.0f) {
    context_->matmul(a, transpose_a == Transpose::Yes, b, transpose_b == Transpose::Yes, c, alpha,
                     beta);
  }

  // ---- norms ----------------------------------------------------------------------------------
  void layernorm_forward(const bf16* x, const bf16* weight, const bf16* bias, bf16* y, float* mean,
                         float* rstd, std::int64_t rows, std::int64_t cols, float eps) {
    check_rows("layernorm_forward", rows, cols);
    check_launch(launch_norm_forward<true>(device_ptr(x), device_ptr(weight), device_ptr(bias),
                                           device_ptr(y), mean, rstd, rows, cols, eps, stream()),
                 "layernorm_forward");
  }
  void layernorm_backward(const bf16* dy, const bf16* x, const bf16* weight, const float* mean,
                          const float* rstd, bf16* dx, float* dweight, float* dbias,
                          std::int64_t rows, std::int64_t cols) {
    check_rows("layernorm_backward", rows, cols);
    const int parts = norm_backward_parts(rows, context_->sm_count());
    float* partials = (dweight || dbias) ? norm_scratch(parts, cols) : nullptr;
    check_launch(launch_norm_backward<true>(device_ptr(dy), device_ptr(x), device_ptr(weight), mean,
                                            rstd, device_ptr(dx), dweight, dbias, partials, parts,
                                            rows, cols, stream()),
                 "layernorm_backward");
  }
  void rmsnorm_forward(const bf16* x, const bf16* weight, bf16* y, float* rstd, std::int64_t rows,
                       std::int64_t cols, float eps) {
    check_rows("rmsnorm_forward", rows, cols);
    check_launch(launch_norm_forward<false>(
                     device_ptr(x), device_ptr(weight), static_cast<const __nv_bfloat16*>(nullptr),
                     device_ptr(y), static_cast<float*>(nullptr), rstd, rows, cols, eps, stream()),
                 "rmsnorm_forward");
  }
  void rmsnorm_backward(const bf16* dy, const bf16* x, const bf16* weight, const float* rstd,
                        bf16* dx, float* dweight, std::int64_t rows, std::int64_t cols) {
    check_rows("rmsnorm_backward", rows, cols);
    const int parts = norm_backward_parts(rows, context_->sm_count());
    float* partials = dweight ? norm_scratch(parts, cols) : nullptr;
    check_launch(launch_norm_backward<false>(device_ptr(dy), device_ptr(x), device_ptr(weight),
                                             static_cast<const float*>(nullptr), rstd,
                                             device_ptr(dx), dweight, static_cast<float*>(nullptr),
                                             partials, parts, rows, cols, stream()),
                 "rmsnorm_backward");
  }

  // ---- RoPE, attention, SwiGLU, embedding ------------------------------------------------------
  void rope(bf16* x, std::int64_t batch, std::int64_t seq, std::int64_t heads,
            const RopeTable& table, int direction) {
    KEPT_CHECK(seq <= table.positions(), "rope: sequence of ", seq,
               " tokens exceeds the RoPE table of ", table.positions(), " positions");
    KEPT_CHECK(batch >= 0 && seq >= 0 && heads >= 0, "rope: bad shape batch ", batch, ", seq ", seq,
               ", heads ", heads);
    check_launch(launch_rope(device_ptr(x), batch, seq, heads, table.head_dim(), table.cos(),
                             table.sin(), direction, stream()),
                 "rope");
  }
  void attention_forward(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                         const AttentionShape& shape) {
    check_attention("attention_forward", shape);
    if (AttentionEngine* engine = context_->attention_engine()) {
      engine->forward(q, k, v, o, lse, shape, stream());
      return;
    }
    check_launch(launch_attention_forward(device_ptr(q), device_ptr(k), device_ptr(v),
                                          device_ptr(o), lse, shape.batch, shape.seq, shape.heads,
                                          shape.head_dim, shape.scale<float>(), stream()),
                 "attention_forward");
  }
  void attention_backward(const bf16* d_o, const bf16* q, const bf16* k, const bf16* v,
                          const bf16* o, const float* lse, bf16* dq, bf16* dk, bf16* dv,
                          const AttentionShape& shape) {
    check_attention("attention_backward", shape);
    if (AttentionEngine* engine = context_->attention_engine()) {
      // The engine writes fresh gradients; the contract accumulates them.
      const std::int64_t count = shape.batch * shape.seq * shape.row_stride();
      auto* fresh = static_cast<bf16*>(
          context_->attention_scratch(3 * sizeof(bf16) * static_cast<std::size_t>(count)));
      engine->backward(d_o, q, k, v, o, lse, fresh, fresh + count, fresh + 2 * count, shape,
                       stream());
      accumulate(fresh, dq, count);
      accumulate(fresh + count, dk, count);
      accumulate(fresh + 2 * count, dv, count);
      return;
    }
    float* delta = static_cast<float*>(context_->scratch(
        sizeof(float) * static_cast<std::size_t>(shape.batch * shape.heads * shape.seq)));
    check_launch(launch_attention_backward(
                     device_ptr(d_o), device_ptr(q), device_ptr(k), device_ptr(v), device_ptr(o),
                     lse, device_ptr(dq), device_ptr(dk), device_ptr(dv), delta, shape.batch,
                     shape.seq, shape.heads, shape.head_dim, shape.scale<float>(), stream()),
                 "attention_backward");
  }
  void swiglu_forward(const bf16* gate, const bf16* up, bf16* out, std::int64_t count) {
    check_count("swiglu_forward", count);
    check_launch(
        launch_swiglu_forward(device_ptr(gate), device_ptr(up), device_ptr(out), count, stream()),
        "swiglu_forward");
  }
  void swiglu_backward(const bf16* d_out, const bf16* gate, const bf16* up, bf16* d_gate,
                       bf16* d_up, std::int64_t count) {
    check_count("swiglu_backward", count);
    check_launch(launch_swiglu_backward(device_ptr(d_out), device_ptr(gate), device_ptr(up),
                                        device_ptr(d_gate), device_ptr(d_up), count, stream()),
                 "swiglu_backward");
  }
  // Token ids are checked on the host first (a kernel cannot name the bad one).
  void embedding_forward(const std::int32_t* tokens, std::int64_t count, const bf16* table,
                         std::int64_t vocab, std::int64_t dim, bf16* out) {
    check_count("embedding_forward", count);
    std::vector<std::int32_t> ids(static_cast<std::size_t>(count));
    if (count)
      KEPT_CUDA_CHECK(cudaMemcpy(ids.data(), tokens, ids.size() * sizeof(std::int32_t),
                                 cudaMemcpyDeviceToHost));
    for (std::int64_t t = 0; t < count; ++t)
      KEPT_CHECK(ids[static_cast<std::size_t>(t)] >= 0 && ids[static_cast<std::size_t>(t)] < vocab,
                 "token id ", ids[static_cast<std::size_t>(t)], " at position ", t,
                 " is outside the vocabulary of ", vocab);
    check_launch(
        launch_embedding_forward(tokens, count, device_ptr(table), dim, device_ptr(out), stream()),
        "embedding_forward");
  }
  void embedding_backward(const std::int32_t* tokens, std::int64_t count, const bf16* d_out,
                          std::int64_t dim, float* d_table) {
    check_count("embedding_backward", count);
    check_launch(
        launch_embedding_backward(tokens, count, device_ptr(d_out), dim, d_table, stream()),
        "embedding_backward");
  }

  // ---- optimizer ------------------------------------------------------------------------------
  double grad_sum_squares(const float* grad, std::int64_t count) {
    check_count("grad_sum_squares", count);
    if (count == 0) return 0.0;
    auto* parts = static_cast<double*>(context_->scratch(sizeof(double) * detail::kSumParts));
    check_launch(launch_sum_squares(grad, count, parts, stream()), "grad_sum_squares");
    double host[detail::kSumParts];
    KEPT_CUDA_CHECK(cudaMemcpy(host, parts, sizeof host, cudaMemcpyDeviceToHost));
    double sum = 0.0;
    for (double part : host)
      sum += part;
    return sum;
  }
  void scale_grad(float* grad, std::int64_t count, float factor) {
    check_count("scale_grad", count);
    check_launch(launch_scale(grad, count, factor, stream()), "scale_grad");
  }
  void fill_uniform(bf16* values, std::int64_t count, std::uint64_t seed, float bound) {
    check_count("fill_uniform", count);
    check_launch(launch_fill_uniform(device_ptr(values), count, seed, bound, stream()),
                 "fill_uniform");
  }
  // An fp32 square cannot overflow a double: the sum is finite iff every element is.
  bool grad_finite(const float* grad, std::int64_t count) {
    return std::isfinite(grad_sum_squares(grad, count));
  }
  // master null: the bf16 value takes the update rounded stochastically.
  void adamw_update(bf16* value, float* master, const float* grad,
                    const AdamWMoments<float>& moments, std::int64_t count,
                    const AdamWScalars& scalars) {
    check_count("adamw_update", count);
    const float* codes = moments.quantized() ? context_->dynamic_codes() : nullptr;
    check_launch(
        launch_adamw(device_ptr(value), master, grad, moments, codes, count, scalars, stream()),
        "adamw_update");
  }

  Cuda& context() const { return *context_; }
  cudaStream_t stream() const { return context_->stream(); }

 private:
  static void check_count(const char* op, std::int64_t count) {
    KEPT_CHECK(count >= 0, op, ": negative element count ", count);
  }
  static void check_rows(const char* op, std::int64_t rows, std::int64_t cols) {
    KEPT_CHECK(rows >= 0 && cols > 0 && rows <= INT_MAX, op, ": bad shape [", rows, ", ", cols,
               "] (need 0 <= rows <= 2^31-1, cols > 0)");
  }
  static void check_matrix(const char* op, std::int64_t rows, std::int64_t cols,
                           std::int64_t stride) {
    KEPT_CHECK(rows >= 0 && cols >= 0 && stride >= cols, op, ": bad matrix [", rows, ", ", cols,
               "] with row stride ", stride);
  }
  static void check_attention(const char* op, const AttentionShape& shape) {
    KEPT_CHECK(
        shape.batch >= 0 && shape.heads >= 0 && shape.head_dim > 0 && shape.head_dim % 2 == 0, op,
        ": bad shape batch ", shape.batch, ", heads ", shape.heads, ", head_dim ", shape.head_dim);
    KEPT_CHECK(shape.batch * shape.heads == 0 ||
                   attention_shape_supported(shape.batch, shape.seq, shape.heads),
               op, ": sequence length ", shape.seq, " with ", shape.heads, " heads and batch ",
               shape.batch, " is outside what kept's attention kernels handle (seq 1..6144)");
  }
  float* norm_scratch(int parts, std::int64_t cols) {
    return static_cast<float*>(
        context_->scratch(2 * sizeof(float) * static_cast<std::size_t>(parts * cols)));
  }

  Cuda* context_;
};

static_assert(Backend<CudaBackend>, "CudaBackend must satisfy kept::Backend");

}  // namespace kept::cuda

namespace kept {

// The chunked softmax-family losses and the hidden-state MSE on the GPU. Row states live in
// device memory; per-token weights and targets (host pointers, per the contract) are uploaded per
// call; reduce() downloads the states and sums them on the host with the shared
// kept::softmax_rows_reduce.
template <>
struct LossKernels<cuda::CudaBackend> {
  using Backend = cuda::CudaBackend;
  using State = cuda::LossRowState;
  static_assert(sizeof(State) % sizeof(double) == 0);

  struct RowBuffers {
    Tensor states, targets, weights, row_sums;
    // The sparse KL's chunk: the host view (for reduce) and its device copy, plus the gradient's
    // [rows, k] scratch for the kept columns.
    SparseTeacherChunk<float> sparse;
    Tensor sparse_ids, sparse_probs, sparse_tails, sparse_scratch;
    std::int64_t rows = 0;
    State* state_data() const { return static_cast<State*>(const_cast<void*>(states.raw())); }
  };

  static void reset(Backend& b, RowBuffers& buffers, std::int64_t rows) {
    b.ensure(buffers.states, DType::F64,
             {std::max<std::int64_t>(1, rows) * static_cast<std::int64_t>(sizeof(State) / 8)});
    buffers.rows = rows;
    cuda::check_launch(cuda::launch_rows_reset(buffers.state_data(), rows, b.stream()),
                       "softmax_rows_reset");
  }
  static void update(Backend& b, RowBuffers& buffers, MatrixView<const float> teacher,
                     MatrixView<const float> student, std::int64_t offset, float inv_temperature,
                     const std::int32_t* targets, bool with_sums) {
    check_contiguous(teacher, "teacher logits");
    check_contiguous(student, "student logits");
    const std::int64_t rows = student.data ? student.rows : teacher.rows;
    const std::int64_t cols = student.data ? student.cols : teacher.cols;
    check_rows(buffers, rows);
    const std::int32_t* device_targets = upload(b, buffers.targets, DType::I32, targets, rows);
    cuda::check_launch(
        cuda::launch_rows_update(teacher.data, student.data, rows, cols, offset, inv_temperature,
                                 device_targets, with_sums, buffers.state_data(), b.stream()),
        "softmax_rows_update");
  }
  static void finish(Backend& b, RowBuffers& buffers) {
    cuda::check_launch(cuda::launch_rows_finish(buffers.state_data(), buffers.rows, b.stream()),
                       "softmax_rows_finish");
  }
  static ChunkSums reduce(Backend& b, const RowBuffers& buffers, bool with_teacher, bool with_sums,
                          const float* weights, const std::int32_t* targets,
                          double* student_ce_rows, double* teacher_ce_rows) {
    std::vector<State> host(static_cast<std::size_t>(buffers.rows));
    if (!host.empty())
      KEPT_CUDA_CHECK(cudaMemcpy(host.data(), buffers.states.raw(), host.size() * sizeof(State),
                                 cudaMemcpyDeviceToHost));
    (void)b;
    return softmax_rows_reduce(host.data(), buffers.rows, with_teacher, with_sums, weights, targets,
                               student_ce_rows, teacher_ce_rows);
  }
  static void kl_gradient(Backend& b, const RowBuffers& buffers, MatrixView<const float> teacher,
                          MatrixView<float> student, float temperature, const float* weights,
                          float scale) {
    const float* device_weights = chunk_weights(b, buffers, teacher, student, weights);
    cuda::check_launch(cuda::launch_kl_gradient(teacher.data, student.data, student.rows,
                                                student.cols, temperature, device_weights, scale,
                                                buffers.state_data(), b.stream()),
                       "kl_logits_gradient");
  }
  static void cross_entropy_gradient(Backend& b, const RowBuffers& buffers,
                                     MatrixView<float> student, std::int64_t offset,
                                     const std::int32_t* targets, float scale) {
    auto& mutable_buffers = const_cast<RowBuffers&>(buffers);
    check_contiguous(MatrixView<const float>(student), "student logits");
    check_rows(buffers, student.rows);
    KEPT_CHECK(targets != nullptr, "cross_entropy_logits_gradient needs targets");
    const std::int32_t* device_targets =
        upload(b, mutable_buffers.targets, DType::I32, targets, student.rows);
    cuda::check_launch(cuda::launch_cross_entropy_gradient(student.data, student.rows, student.cols,
                                                           offset, device_targets, scale,
                                                           buffers.state_data(), b.stream()),
                       "cross_entropy_logits_gradient");
  }
  static void squared_error(Backend& b, RowBuffers& buffers, MatrixView<const float> teacher,
                            MatrixView<float> student, const float* weights, float scale,
                            bool write_gradient) {
    const float* device_weights = chunk_weights(b, buffers, teacher, student, weights);
    cuda::check_launch(cuda::launch_squared_error(teacher.data, student.data, student.rows,
                                                  student.cols, device_weights, scale,
                                                  write_gradient, buffers.state_data(), b.stream()),
                       "squared_error_logits");
  }
  // The sparse-teacher KL (kept/backend/loss_kernels.hpp; kernels: cuda/sparse_kl.cuh).
  static void sparse_kl_begin(Backend& b, RowBuffers& buffers,
                              const SparseTeacherChunk<float>& chunk) {
    check_rows(buffers, chunk.rows);
    buffers.sparse = chunk;
    const std::int64_t entries = chunk.rows * chunk.k;
    upload(b, buffers.sparse_ids, DType::I32, chunk.ids, entries);
    upload(b, buffers.sparse_probs, DType::F32, chunk.probs, entries);
    upload(b, buffers.sparse_tails, DType::F32, chunk.tail, chunk.rows);
    b.ensure(buffers.sparse_scratch, DType::F32, {std::max<std::int64_t>(1, entries)});
  }
  static void sparse_kl_update(Backend& b, RowBuffers& buffers, MatrixView<const float> student,
                               std::int64_t offset, float inv_temperature) {
    check_contiguous(student, "student logits");
    check_sparse_rows(buffers, student.rows);
    cuda::check_launch(
        cuda::launch_sparse_kl_update(student.data, student.rows, student.cols, offset,
                                      inv_temperature, buffers.sparse_ids.data<std::int32_t>(),
                                      buffers.sparse_probs.data<float>(), buffers.sparse.k,
                                      buffers.state_data(), b.stream()),
        "sparse_kl_rows_update");
  }
  static void sparse_kl_gradient(Backend& b, const RowBuffers& buffers, MatrixView<float> student,
                                 std::int64_t offset, float temperature, const float* weights,
                                 float scale) {
    check_sparse_rows(buffers, student.rows);
    const float* device_weights =
        chunk_weights(b, buffers, MatrixView<const float>(), student, weights);
    auto& mutable_buffers = const_cast<RowBuffers&>(buffers);
    cuda::check_launch(
        cuda::launch_sparse_kl_gradient(
            student.data, student.rows, student.cols, offset, temperature, device_weights, scale,
            buffers.sparse_ids.data<std::int32_t>(), buffers.sparse_probs.data<float>(),
            buffers.sparse_tails.data<float>(), buffers.sparse.k,
            mutable_buffers.sparse_scratch.data<float>(), buffers.state_data(), b.stream()),
        "sparse_kl_logits_gradient");
  }
  static ChunkSums sparse_kl_reduce(Backend&, const RowBuffers& buffers, const float* weights) {
    std::vector<State> host(static_cast<std::size_t>(buffers.rows));
    if (!host.empty())
      KEPT_CUDA_CHECK(cudaMemcpy(host.data(), buffers.states.raw(), host.size() * sizeof(State),
                                 cudaMemcpyDeviceToHost));
    return sparse_kl_rows_reduce(host.data(), buffers.sparse, weights);
  }
  static double hidden_squared_error(Backend& b, RowBuffers& buffers,
                                     MatrixView<const bf16> teacher, MatrixView<const bf16> student,
                                     MatrixView<bf16> grad, bool centre_teacher,
                                     const float* weights, float scale) {
    KEPT_CHECK(teacher.contiguous() && student.contiguous() && (!grad.data || grad.contiguous()),
               "loss kernels need contiguous hidden states");
    const std::int64_t rows = student.rows;
    const float* device_weights = upload(b, buffers.weights, DType::F32, weights, rows);
    b.ensure(buffers.row_sums, DType::F64, {std::max<std::int64_t>(1, rows)});
    cuda::check_launch(cuda::launch_hidden_squared_error(
                           cuda::device_ptr(teacher.data), cuda::device_ptr(student.data),
                           cuda::device_ptr(grad.data), rows, student.cols, centre_teacher,
                           device_weights, scale, buffers.row_sums.data<double>(), b.stream()),
                       "hidden_squared_error");
    std::vector<double> sums(static_cast<std::size_t>(rows));
    if (rows)
      KEPT_CUDA_CHECK(cudaMemcpy(sums.data(), buffers.row_sums.raw(), sums.size() * sizeof(double),
                                 cudaMemcpyDeviceToHost));
    double total = 0;
    for (std::int64_t r = 0; r < rows; ++r)
      total +=
          (weights ? static_cast<double>(weights[r]) : 1.0) * sums[static_cast<std::size_t>(r)];
    return total;
  }

 private:
  // The checks of a kernel over a teacher/student chunk, and the chunk's weights on the device
  // (null when the host's are).
  static const float* chunk_weights(Backend& b, const RowBuffers& buffers,
                                    MatrixView<const float> teacher, MatrixView<float> student,
                                    const float* weights) {
    check_contiguous(teacher, "teacher logits");
    check_contiguous(MatrixView<const float>(student), "student logits");
    check_rows(buffers, student.rows);
    return upload(b, const_cast<RowBuffers&>(buffers).weights, DType::F32, weights, student.rows);
  }
  static void check_contiguous(MatrixView<const float> view, const char* what) {
    KEPT_CHECK(!view.data || view.contiguous(), "loss kernels need contiguous ", what,
               ", got a view with row stride ", view.stride, " for ", view.cols, " columns");
  }
  static void check_sparse_rows(const RowBuffers& buffers, std::int64_t rows) {
    check_rows(buffers, rows);
    KEPT_CHECK(buffers.sparse.ids && buffers.sparse.rows == rows, "sparse KL: a logit chunk of ",
               rows, " rows for a teacher chunk of ", buffers.sparse.rows,
               " rows (sparse_kl_begin first)");
  }
  static void check_rows(const RowBuffers& buffers, std::int64_t rows) {
    KEPT_CHECK(rows == buffers.rows, "loss kernels: a chunk of ", rows,
               " rows for row states reset for ", buffers.rows);
  }
  // Copies `count` host values into `tensor` (device), or returns null for a null source.
  template <class T>
  static const T* upload(Backend& b, Tensor& tensor, DType dtype, const T* host,
                         std::int64_t count) {
    if (!host) return nullptr;
    b.ensure(tensor, dtype, {std::max<std::int64_t>(1, count)});
    if (count)
      KEPT_CUDA_CHECK(cudaMemcpy(tensor.raw(), host, sizeof(T) * static_cast<std::size_t>(count),
                                 cudaMemcpyHostToDevice));
    return tensor.data<T>();
  }
};

}  // namespace kept
