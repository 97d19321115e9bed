// kept/backend/cpu_bf16.hpp: CpuBf16, the CPU model of bf16 training.
//
// bf16 activations and parameters, fp32 gradients, master weights, statistics and logit chunks
// (the policy table is in kept/backend/backend.hpp). Every op widens its bf16 inputs to fp32,
// runs the fp32 CPU kernel (the same code Cpu runs) and rounds each bf16 output once, to
// nearest even, where it is stored: the rounding points the CUDA backend has, so a CUDA result
// is checked tightly against CpuBf16 and loosely against Cpu64. It is a reference, not a fast
// path: the widening buffers cost a copy per operand.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <vector>

#include "kept/backend/backend.hpp"
#include "kept/backend/cpu.hpp"
#include "kept/backend/loss_kernels.hpp"
#include "kept/core/dtype.hpp"
#include "kept/core/rope_table.hpp"
#include "kept/core/tensor.hpp"

namespace kept {

class CpuBf16 : public UsesPrecision<Precision<bf16, bf16, float, float, float>> {
 public:
  using RopeTable = kept::RopeTable<float>;
  static constexpr MemorySpace space = MemorySpace::Host;
  static constexpr const char* name() { return "cpu-bf16"; }

  Tensor zeros(DType dtype, const Shape& shape) { return fp32_.zeros(dtype, shape); }
  void ensure(Tensor& tensor, DType dtype, const Shape& shape) {
    fp32_.ensure(tensor, dtype, shape);
  }
  void fill_zero(Tensor& tensor) { fp32_.fill_zero(tensor); }
  void upload(const Tensor& host, Tensor& destination) { fp32_.upload(host, destination); }
  Tensor download(const Tensor& source) { return fp32_.download(source); }
  void download_into(const Tensor& source, Tensor& host) { fp32_.download_into(source, host); }
  Tensor host_zeros(DType dtype, const Shape& shape) { return fp32_.host_zeros(dtype, shape); }
  void upload_behind(const Tensor& host, Tensor& destination) {
    fp32_.upload_behind(host, destination);
  }
  void await_uploads() {}
  void upload_tokens(std::span<const std::int32_t> tokens, Tensor& destination) {
    fp32_.upload_tokens(tokens, destination);
  }
  RopeTable rope_table(std::int64_t head_dim, double theta, std::int64_t positions) {
    return RopeTable(head_dim, theta, positions);
  }

  void copy(const bf16* source, bf16* destination, std::int64_t count) {
    if (count) std::memcpy(destination, source, sizeof(bf16) * static_cast<std::size_t>(count));
  }
  void add(const bf16* a, const bf16* b, bf16* out, std::int64_t count) {
    for (std::int64_t i = 0; i < count; ++i)
      out[i] = to_bf16(to_float(a[i]) + to_float(b[i]));
  }
  void accumulate(const bf16* a, bf16* out, std::int64_t count) { add(a, out, out, count); }

  template <class T>
  void add_bias(MatrixView<T> out, const bf16* bias) {
    for (std::int64_t r = 0; r < out.rows; ++r)
      for (std::int64_t c = 0; c < out.cols; ++c)
        out(r, c) = store<T>(load(out(r, c)) + to_float(bias[c]));
  }
  template <class T>
  void bias_backward(MatrixView<const T> d_out, float* d_bias) {
    for (std::int64_t r = 0; r < d_out.rows; ++r)
      for (std::int64_t c = 0; c < d_out.cols; ++c)
        d_bias[c] += load(d_out(r, c));
  }

  // Any mix of bf16 and fp32 operands; fp32 accumulation, C rounded once when it is bf16.
  template <class TA, class TB, class TC>
  void gemm(MatrixView<const TA> a, Transpose transpose_a, MatrixView<const TB> b,
            Transpose transpose_b, MatrixView<TC> c, float alpha = 1.0f, float beta = 0.0f) {
    const Widened wa = widen(a), wb = widen(b);
    if constexpr (std::is_same_v<TC, float>) {
      fp32_.gemm(wa.view, transpose_a, wb.view, transpose_b, c, alpha, beta);
    } else {
      std::vector<float> result(static_cast<std::size_t>(c.rows * c.cols));
      MatrixView<float> wc(result.data(), c.rows, c.cols);
      if (beta != 0.0f)
        for (std::int64_t r = 0; r < c.rows; ++r)
          for (std::int64_t col = 0; col < c.cols; ++col)
            wc(r, col) = load(c(r, col));
      fp32_.gemm(wa.view, transpose_a, wb.view, transpose_b, wc, alpha, beta);
      for (std::int64_t r = 0; r < c.rows; ++r)
        for (std::int64_t col = 0; col < c.cols; ++col)
          c(r, col) = to_bf16(wc(r, col));
    }
  }

  void layernorm_forward(const bf16* x, const bf16* weight, const bf16* bias, bf16* y, float* mean,
                         float* rstd, std::int64_t rows, std::int64_t cols, float eps) {
    const auto wx = widen(x, rows * cols), ww = widen(weight, cols), wb = widen(bias, cols);
    std::vector<float> wy(wx.size());
    fp32_.layernorm_forward(wx.data(), ww.data(), bias ? wb.data() : nullptr, wy.data(), mean, rstd,
                            rows, cols, eps);
    narrow(wy, y);
  }
  void layernorm_backward(const bf16* dy, const bf16* x, const bf16* weight, const float* mean,
                          const float* rstd, bf16* dx, float* dweight, float* dbias,
                          std::int64_t rows, std::int64_t cols) {
    const auto wdy = widen(dy, rows * cols), wx = widen(x, rows * cols), ww = widen(weight, cols);
    auto wdx = widen(dx, rows * cols);
    fp32_.layernorm_backward(wdy.data(), wx.data(), ww.data(), mean, rstd, wdx.data(), dweight,
                             dbias, rows, cols);
    narrow(wdx, dx);
  }
  void rmsnorm_forward(const bf16* x, const bf16* weight, bf16* y, float* rstd, std::int64_t rows,
                       std::int64_t cols, float eps) {
    const auto wx = widen(x, rows * cols), ww = widen(weight, cols);
    std::vector<float> wy(wx.size());
    fp32_.rmsnorm_forward(wx.data(), ww.data(), wy.data(), rstd, rows, cols, eps);
    narrow(wy, y);
  }
  void rmsnorm_backward(const bf16* dy, const bf16* x, const bf16* weight, const float* rstd,
                        bf16* dx, float* dweight, std::int64_t rows, std::int64_t cols) {
    const auto wdy = widen(dy, rows * cols), wx = widen(x, rows * cols), ww = widen(weight, cols);
    auto wdx = widen(dx, rows * cols);
    fp32_.rmsnorm_backward(wdy.data(), wx.data(), ww.data(), rstd, wdx.data(), dweight, rows, cols);
    narrow(wdx, dx);
  }

  void rope(bf16* x, std::int64_t batch, std::int64_t seq, std::int64_t heads,
            const RopeTable& table, int direction) {
    auto wx = widen(x, batch * seq * heads * table.head_dim());
    fp32_.rope(wx.data(), batch, seq, heads, table, direction);
    narrow(wx, x);
  }

  void attention_forward(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse,
                         const AttentionShape& shape) {
    const std::int64_t n = shape.batch * shape.seq * shape.row_stride();
    const auto wq = widen(q, n), wk = widen(k, n), wv = widen(v, n);
    std::vector<float> wo(static_cast<std::size_t>(n));
    fp32_.attention_forward(wq.data(), wk.data(), wv.data(), wo.data(), lse, shape);
    narrow(wo, o);
  }
  void attention_backward(const bf16* d_o, const bf16* q, const bf16* k, const bf16* v,
                          const bf16* o, const float* lse, bf16* dq, bf16* dk, bf16* dv,
                          const AttentionShape& shape) {
    const std::int64_t n = shape.batch * shape.seq * shape.row_stride();
    const auto wdo = widen(d_o, n), wq = widen(q, n), wk = widen(k, n), wv = widen(v, n),
               wo = widen(o, n);
    auto wdq = widen(dq, n), wdk = widen(dk, n), wdv = widen(dv, n);
    fp32_.attention_backward(wdo.data(), wq.data(), wk.data(), wv.data(), wo.data(), lse,
                             wdq.data(), wdk.data(), wdv.data(), shape);
    narrow(wdq, dq);
    narrow(wdk, dk);
    narrow(wdv, dv);
  }

  void swiglu_forward(const bf16* gate, const bf16* up, bf16* out, std::int64_t count) {
    const auto wg = widen(gate, count), wu = widen(up, count);
    std::vector<float> wo(wg.size());
    fp32_.swiglu_forward(wg.data(), wu.data(), wo.data(), count);
    narrow(wo, out);
  }
  void swiglu_backward(const bf16* d_out, const bf16* gate, const bf16* up, bf16* d_gate,
                       bf16* d_up, std::int64_t count) {
    const auto wd = widen(d_out, count), wg = widen(gate, count), wu = widen(up, count);
    std::vector<float> wdg(wg.size()), wdu(wg.size());
    fp32_.swiglu_backward(wd.data(), wg.data(), wu.data(), wdg.data(), wdu.data(), count);
    narrow(wdg, d_gate);
    narrow(wdu, d_up);
  }

  // A bf16 row copied is exact: no widening needed.
  void embedding_forward(const std::int32_t* tokens, std::int64_t count, const bf16* table,
                         std::int64_t vocab, std::int64_t dim, bf16* out) {
    cpu::embedding_forward<bf16>(tokens, count, table, vocab, dim, out);
  }
  void embedding_backward(const std::int32_t* tokens, std::int64_t count, const bf16* d_out,
                          std::int64_t dim, float* d_table) {
    const auto wd = widen(d_out, count * dim);
    fp32_.embedding_backward(tokens, count, wd.data(), dim, d_table);
  }

  double grad_sum_squares(const float* grad, std::int64_t count) {
    return fp32_.grad_sum_squares(grad, count);
  }
  void scale_grad(float* grad, std::int64_t count, float factor) {
    fp32_.scale_grad(grad, count, factor);
  }
  bool grad_finite(const float* grad, std::int64_t count) { return fp32_.grad_finite(grad, count); }
  void fill_uniform(bf16* values, std::int64_t count, std::uint64_t seed, float bound) {
    for (std::int64_t i = 0; i < count; ++i)
      values[i] = to_bf16(uniform_symmetric(seed, static_cast<std::uint64_t>(i), bound));
  }
  // master null: the bf16 value takes the update rounded stochastically.
  void adamw_update(bf16* value, float* master, const float* grad,
                    const AdamWMoments<float>& moments, std::int64_t count,
                    const AdamWScalars& scalars) {
    cpu::adamw_update(value, master, grad, moments, count, scalars);
  }

 private:
  static float load(float value) { return value; }
  static float load(bf16 value) { return to_float(value); }
  template <class T>
  static T store(float value) {
    if constexpr (std::is_same_v<T, bf16>)
      return to_bf16(value);
    else
      return value;
  }

  static std::vector<float> widen(const bf16* data, std::int64_t count) {
    std::vector<float> out(data ? static_cast<std::size_t>(count) : 0);
    for (std::size_t i = 0; i < out.size(); ++i)
      out[i] = to_float(data[i]);
    return out;
  }
  static void narrow(const std::vector<float>& values, bf16* out) {
    for (std::size_t i = 0; i < values.size(); ++i)
      out[i] = to_bf16(values[i]);
  }
  // A packed fp32 copy of a bf16 matrix view, or the fp32 view itself.
  struct Widened {
    std::vector<float> storage;
    MatrixView<const float> view;
  };
  static Widened widen(MatrixView<const float> m) { return {{}, m}; }
  static Widened widen(MatrixView<const bf16> m) {
    Widened w;
    w.storage.resize(static_cast<std::size_t>(m.rows * m.cols));
    for (std::int64_t r = 0; r < m.rows; ++r)
      for (std::int64_t c = 0; c < m.cols; ++c)
        w.storage[static_cast<std::size_t>(r * m.cols + c)] = to_float(m(r, c));
    w.view = MatrixView<const float>(w.storage.data(), m.rows, m.cols);
    return w;
  }

  Cpu fp32_;
};

static_assert(Backend<CpuBf16>, "CpuBf16 must satisfy kept::Backend");

// CpuBf16: logit chunks are fp32 (the Stat type), so the fp32 kernels run on them as they are;
// hidden states are bf16, widened for the squared error, and the gradient is rounded once.
template <>
struct LossKernels<CpuBf16> {
  using Backend = CpuBf16;
  using Fp32 = LossKernels<Cpu>;
  using RowBuffers = Fp32::RowBuffers;

  static void reset(Backend&, RowBuffers& buffers, std::int64_t rows) {
    Cpu cpu;
    Fp32::reset(cpu, buffers, rows);
  }
  static void update(Backend&, RowBuffers& buffers, MatrixView<const float> teacher,
                     MatrixView<const float> student, std::int64_t offset, float inv_temperature,
                     const std::int32_t* targets, bool with_sums) {
    Cpu cpu;
    Fp32::update(cpu, buffers, teacher, student, offset, inv_temperature, targets, with_sums);
  }
  static void finish(Backend&, RowBuffers& buffers) {
    Cpu cpu;
    Fp32::finish(cpu, buffers);
  }
  static ChunkSums reduce(Backend&, const RowBuffers& buffers, bool with_teacher, bool with_sums,
                          const float* weights, const std::int32_t* targets,
                          double* student_ce_rows, double* teacher_ce_rows) {
    Cpu cpu;
    return Fp32::reduce(cpu, buffers, with_teacher, with_sums, weights, targets, student_ce_rows,
                        teacher_ce_rows);
  }
  static void kl_gradient(Backend&, const RowBuffers& buffers, MatrixView<const float> teacher,
                          MatrixView<float> student, float temperature, const float* weights,
                          float scale) {
    Cpu cpu;
    Fp32::kl_gradient(cpu, buffers, teacher, student, temperature, weights, scale);
  }
  static void cross_entropy_gradient(Backend&, const RowBuffers& buffers, MatrixView<float> student,
                                     std::int64_t offset, const std::int32_t* targets,
                                     float scale) {
    Cpu cpu;
    Fp32::cross_entropy_gradient(cpu, buffers, student, offset, targets, scale);
  }
  static void squared_error(Backend&, RowBuffers& buffers, MatrixView<const float> teacher,
                            MatrixView<float> student, const float* weights, float scale,
                            bool write_gradient) {
    Cpu cpu;
    Fp32::squared_error(cpu, buffers, teacher, student, weights, scale, write_gradient);
  }
  static void sparse_kl_begin(Backend&, RowBuffers& buffers,
                              const SparseTeacherChunk<float>& chunk) {
    Cpu cpu;
    Fp32::sparse_kl_begin(cpu, buffers, chunk);
  }
  static void sparse_kl_update(Backend&, RowBuffers& buffers, MatrixView<const float> student,
                               std::int64_t offset, float inv_temperature) {
    Cpu cpu;
    Fp32::sparse_kl_update(cpu, buffers, student, offset, inv_temperature);
  }
  static void sparse_kl_gradient(Backend&, const RowBuffers& buffers, MatrixView<float> student,
                                 std::int64_t offset, float temperature, const float* weights,
                                 float scale) {
    Cpu cpu;
    Fp32::sparse_kl_gradient(cpu, buffers, student, offset, temperature, weights, scale);
  }
  static ChunkSums sparse_kl_reduce(Backend&, const RowBuffers& buffers, const float* weights) {
    Cpu cpu;
    return Fp32::sparse_kl_reduce(cpu, buffers, weights);
  }
  static double hidden_squared_error(Backend&, RowBuffers& buffers, MatrixView<const bf16> teacher,
                                     MatrixView<const bf16> student, MatrixView<bf16> grad,
                                     bool centre_teacher, const float* weights, float scale) {
    KEPT_CHECK(teacher.contiguous() && student.contiguous() && (!grad.data || grad.contiguous()),
               "loss kernels need contiguous hidden states");
    const std::int64_t count = student.rows * student.cols;
    auto widen = [&](const bf16* data) {
      std::vector<float> out(static_cast<std::size_t>(count));
      for (std::int64_t i = 0; i < count; ++i)
        out[static_cast<std::size_t>(i)] = to_float(data[i]);
      return out;
    };
    const std::vector<float> wt = widen(teacher.data), ws = widen(student.data);
    std::vector<float> wg(grad.data ? static_cast<std::size_t>(count) : 0);
    Cpu cpu;
    const double sum = Fp32::hidden_squared_error(
        cpu, buffers, MatrixView<const float>(wt.data(), student.rows, student.cols),
        MatrixView<const float>(ws.data(), student.rows, student.cols),
        MatrixView<float>(grad.data ? wg.data() : nullptr, student.rows, student.cols),
        centre_teacher, weights, scale);
    for (std::size_t i = 0; i < wg.size(); ++i)
      grad.data[i] = to_bf16(wg[i]);
    return sum;
  }
};

}  // namespace kept
