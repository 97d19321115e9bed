// tests/ops/op_cases.cpp: the registry's cases, one block per op of the contract; the bound of
// each is derived in the comment above it (notation in tests/ops/op_cases.hpp).
#include "ops/op_cases.hpp"

#include <cstdio>
#include <type_traits>

namespace kept::ops {
namespace {

template <class Fn>
void set_runners(OpCase& c, Fn fn) {
  c.run32 = [fn](Cpu& b, const std::vector<const float*>& in, const std::vector<float*>& out) {
    fn(b, in, out);
  };
  c.run64 = [fn](Cpu64& b, const std::vector<const double*>& in, const std::vector<double*>& out) {
    fn(b, in, out);
  };
  c.run_bf16 = [fn](CpuBf16& b, const std::vector<Slot<true>>& in,
                    const std::vector<Slot<false>>& out) { fn(b, in, out); };
#if defined(KEPT_OPS_WITH_CUDA)
  c.run_cuda = [fn](cuda::CudaBackend& b, const std::vector<Slot<true>>& in,
                    const std::vector<Slot<false>>& out) { fn(b, in, out); };
#endif
}

// The token ids in the backend's memory (a device backend reads them there).
template <class B>
Tensor backend_tokens(B& b, const std::vector<std::int32_t>& tokens) {
  Tensor ids;
  b.upload_tokens(tokens, ids);
  return ids;
}

// The backend a generic runner was called with.
template <class B>
using BackendOf = std::remove_cvref_t<B>;

// ---- elementwise -----------------------------------------------------------------------------
// add: out = a + b, one rounding: n = 1, M = |a| + |b|. accumulate: out += a, M = |a| + |out0|.

void add_cases(std::vector<OpCase>& cases) {
  for (std::int64_t n : {1, 1000, 4099}) {
    OpCase c{"add", shape_text({{"n", n}}), {"a", "b"}, {"out"}, {}, {}, {}, {}};
    c.generate = [n](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, n, 1.0), draw(r, n, 1.0)};
      out = {draw(r, n, 1.0)};
    };
    set_runners(c,
                [n](auto& b, const auto& in, const auto& out) { b.add(in[0], in[1], out[0], n); });
    c.bound = [](const Buffers& in, const Buffers&, const Buffers& ref) {
      return Buffers{scaled_bound(abs_sum(in[0], in[1]), 1, ref[0])};
    };
    cases.push_back(c);

    OpCase d{"accumulate", shape_text({{"n", n}}), {"a"}, {"out"}, {}, {}, {}, {}};
    d.generate = [n](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, n, 1.0)};
      out = {draw(r, n, 1.0)};
    };
    set_runners(d,
                [n](auto& b, const auto& in, const auto& out) { b.accumulate(in[0], out[0], n); });
    d.bound = [](const Buffers& in, const Buffers& init, const Buffers& ref) {
      return Buffers{scaled_bound(abs_sum(in[0], init[0]), 1, ref[0])};
    };
    cases.push_back(d);
  }
}

// fill_uniform: p[i] = uniform_symmetric(seed, i, bound), an fp32 value every backend computes
// exactly (kept/core/element_math.hpp) and then stores: one rounding, n = 1, M = |p|.
void fill_uniform_cases(std::vector<OpCase>& cases) {
  for (std::int64_t n : {1, 1000, 4099}) {
    OpCase c{"fill_uniform", shape_text({{"n", n}}), {}, {"values"}, {}, {}, {}, {}};
    c.generate = [n](Random& r, Buffers& in, Buffers& out) {
      in = {};
      out = {draw(r, n, 1.0)};
    };
    set_runners(c, [n](auto& b, const auto&, const auto& out) {
      b.fill_uniform(out[0], n, std::uint64_t{1234567} + static_cast<std::uint64_t>(n), 0.5f);
    });
    c.bound = [](const Buffers&, const Buffers&, const Buffers& ref) {
      std::vector<double> m(ref[0].size());
      for (std::size_t i = 0; i < m.size(); ++i)
        m[i] = std::abs(ref[0][i]);
      return Buffers{scaled_bound(m, 1, ref[0])};
    };
    cases.push_back(c);
  }
}

// add_bias: out[r, c] += bias[c]: n = 1, M = |out0| + |bias|.
// bias_backward: d_bias[c] += sum_r d_out[r, c]: n = R + 1, M = |d_bias0| + sum_r |d_out|.
void bias_cases(std::vector<OpCase>& cases) {
  for (auto [rows, cols] : {std::pair<std::int64_t, std::int64_t>{1, 1}, {7, 33}, {130, 65}}) {
    OpCase c{
        "add_bias", shape_text({{"rows", rows}, {"cols", cols}}), {"bias"}, {"out"}, {}, {}, {},
        {}};
    c.generate = [rows, cols](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, cols, 1.0)};
      out = {draw(r, rows * cols, 1.0)};
    };
    set_runners(c, [rows, cols](auto& b, const auto& in, const auto& out) {
      using B = BackendOf<decltype(b)>;
      b.add_bias(MatrixView<typename B::Activation>(out[0], rows, cols), in[0]);
    });
    c.bound = [rows, cols](const Buffers& in, const Buffers& init, const Buffers& ref) {
      std::vector<double> m(static_cast<std::size_t>(rows * cols));
      for (std::int64_t i = 0; i < rows * cols; ++i)
        m[i] = std::abs(init[0][i]) + std::abs(in[0][i % cols]);
      return Buffers{scaled_bound(m, 1, ref[0])};
    };
    cases.push_back(c);

    OpCase d{"bias_backward", c.params, {"d_out"}, {"d_bias"}, {}, {}, {}, {}};
    d.generate = [rows, cols](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, rows * cols, 1.0)};
      out = {draw(r, cols, 1.0)};
    };
    set_runners(d, [rows, cols](auto& b, const auto& in, const auto& out) {
      using B = BackendOf<decltype(b)>;
      b.bias_backward(MatrixView<const typename B::Activation>(in[0], rows, cols), out[0]);
    });
    d.bound = [rows, cols](const Buffers& in, const Buffers& init, const Buffers& ref) {
      std::vector<double> m(static_cast<std::size_t>(cols));
      for (std::int64_t c2 = 0; c2 < cols; ++c2) {
        m[c2] = std::abs(init[0][c2]);
        for (std::int64_t r = 0; r < rows; ++r)
          m[c2] += std::abs(in[0][r * cols + c2]);
      }
      return Buffers{scaled_bound(m, static_cast<double>(rows + 1), ref[0])};
    };
    cases.push_back(d);
  }
}

// ---- GEMM ------------------------------------------------------------------------------------
// c = alpha op(a) op(b) + beta c, with a and b stored with a padded row stride (stride = cols +
// 3) to exercise strides. Each element is a dot product of k terms plus the beta term:
// n = k + 2, M_ij = |alpha| sum_l |op(a)_il| |op(b)_lj| + |beta| |c0_ij| (blocked and FMA
// summation orders are within gamma(k) of the exact sum too).
void gemm_cases(std::vector<OpCase>& cases) {
  struct Dims {
    std::int64_t m, n, k;
    bool ta, tb;
    double alpha, beta;
  };
  const Dims all[] = {{1, 1, 1, false, false, 1, 0},
                      {17, 33, 65, false, true, 1, 0},
                      {17, 33, 65, true, false, 0.5, 1},
                      {31, 9, 130, true, true, 1, -1},
                      {64, 96, 48, false, false, 1, 0.25}};
  for (const Dims& d : all) {
    char flags[64];
    std::snprintf(flags, sizeof flags, " ta=%c tb=%c alpha=%g beta=%g", d.ta ? 'T' : 'N',
                  d.tb ? 'T' : 'N', d.alpha, d.beta);
    const std::string params = shape_text({{"m", d.m}, {"n", d.n}, {"k", d.k}}) + flags;
    // Stored shapes: a is [m, k] or, transposed, [k, m]; b is [k, n] or [n, k].
    const std::int64_t a_rows = d.ta ? d.k : d.m, a_cols = d.ta ? d.m : d.k;
    const std::int64_t b_rows = d.tb ? d.n : d.k, b_cols = d.tb ? d.k : d.n;
    const std::int64_t pad = 3;
    OpCase c{"gemm", params, {"a", "b"}, {"c"}, {}, {}, {}, {}};
    c.generate = [=](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, a_rows * (a_cols + pad), 1.0), draw(r, b_rows * (b_cols + pad), 1.0)};
      out = {draw(r, d.m * d.n, 1.0)};
    };
    set_runners(c, [=](auto& b, const auto& in, const auto& out) {
      // The linear layer's forward types: Activation x Param -> Activation.
      using B = BackendOf<decltype(b)>;
      using A = typename B::Activation;
      using S = typename B::Stat;
      b.gemm(MatrixView<const A>(in[0], a_rows, a_cols, a_cols + pad),
             d.ta ? Transpose::Yes : Transpose::No,
             MatrixView<const typename B::Param>(in[1], b_rows, b_cols, b_cols + pad),
             d.tb ? Transpose::Yes : Transpose::No, MatrixView<A>(out[0], d.m, d.n),
             static_cast<S>(d.alpha), static_cast<S>(d.beta));
    });
    c.bound = [=](const Buffers& in, const Buffers& init, const Buffers& ref) {
      auto a = [&](std::int64_t i, std::int64_t l) {
        return d.ta ? in[0][l * (a_cols + pad) + i] : in[0][i * (a_cols + pad) + l];
      };
      auto bb = [&](std::int64_t l, std::int64_t j) {
        return d.tb ? in[1][j * (b_cols + pad) + l] : in[1][l * (b_cols + pad) + j];
      };
      std::vector<double> m(static_cast<std::size_t>(d.m * d.n));
      for (std::int64_t i = 0; i < d.m; ++i)
        for (std::int64_t j = 0; j < d.n; ++j) {
          double s = 0;
          for (std::int64_t l = 0; l < d.k; ++l)
            s += std::abs(a(i, l) * bb(l, j));
          m[i * d.n + j] =
              std::abs(d.alpha) * s + std::abs(d.beta) * std::abs(init[0][i * d.n + j]);
        }
      return Buffers{scaled_bound(m, static_cast<double>(d.k + 2), ref[0])};
    };
    cases.push_back(c);
  }
}

// ---- norms -----------------------------------------------------------------------------------
// LayerNorm forward, per row of C values: mean (n = C, M = mean|x|), variance of (x - mean) and
// rstd. The computed mean is off by up to gamma(C) mean|x|, which enters x - mean; relative to
// sigma that is kappa = 1 + mean|x| rstd, so rstd carries gamma(2C + 10) kappa relative error
// and y_i = w_i xhat_i + b_i carries gamma(2C + 10) kappa |w_i| (|xhat_i| + 1) + u |b_i|.
// The inputs have mean 0.5 and sd 1, so kappa is a few: the bound is not vacuous.
// LayerNorm backward gets mean and rstd as inputs (the fp32 rounding of the float64 forward), so
// xhat = (x - mean) rstd has relative error 2u and no kappa:
//   dx_i += rstd (g_i - mean(g) - xhat_i mean(g xhat)),  g = dy w:
//   M = |dx0| + rstd (|g_i| + mean|g| + |xhat_i| mean|g xhat|), n = C + 10;
//   dw += sum_r dy xhat: M = |dw0| + sum |dy xhat|, n = R + 6; db: M = |db0| + sum |dy|.
// RMSNorm: the same without the mean (kappa = 1); y = x rstd w.
struct Rows {
  std::int64_t rows, cols;
};
// {40, 64} and {21, 256}: columns a multiple of 8 (the CUDA kernels' 16-byte packs), more rows than
// the backward's blocks (each block then sums several rows' parameter-gradient partials).
const Rows kNormShapes[] = {{1, 1}, {3, 7}, {9, 33}, {5, 1027}, {40, 64}, {21, 256}};

void norm_forward_reference(const Buffers& in, std::int64_t rows, std::int64_t cols, bool layer,
                            std::vector<double>& mean, std::vector<double>& rstd) {
  mean.assign(static_cast<std::size_t>(rows), 0.0);
  rstd.assign(static_cast<std::size_t>(rows), 0.0);
  for (std::int64_t r = 0; r < rows; ++r) {
    const double* x = in[0].data() + r * cols;
    double m = 0;
    if (layer) {
      for (std::int64_t c = 0; c < cols; ++c)
        m += x[c];
      m /= static_cast<double>(cols);
    }
    double v = 0;
    for (std::int64_t c = 0; c < cols; ++c)
      v += (x[c] - m) * (x[c] - m);
    mean[r] = m;
    rstd[r] = 1.0 / std::sqrt(v / static_cast<double>(cols) + 1e-5);
  }
}

void norm_cases(std::vector<OpCase>& cases) {
  for (const Rows s : kNormShapes) {
    const auto [rows, cols] = s;
    const std::string params = shape_text({{"rows", rows}, {"cols", cols}});
    for (const bool layer : {true, false}) {
      // forward
      OpCase f{layer ? "layernorm_forward" : "rmsnorm_forward",
               params,
               layer ? std::vector<std::string>{"x", "weight", "bias"}
                     : std::vector<std::string>{"x", "weight"},
               layer ? std::vector<std::string>{"y", "mean", "rstd"}
                     : std::vector<std::string>{"y", "rstd"},
               {},
               {},
               {},
               {}};
      f.generate = [=](Random& r, Buffers& in, Buffers& out) {
        in = {draw(r, rows * cols, 1.0, 0.5), draw(r, cols, 0.3, 1.0)};
        if (layer) in.push_back(draw(r, cols, 0.3));
        out = {draw(r, rows * cols, 1.0), draw(r, rows, 1.0)};
        if (layer) out.push_back(draw(r, rows, 1.0));
      };
      set_runners(f, [=](auto& b, const auto& in, const auto& out) {
        using T = typename BackendOf<decltype(b)>::Stat;
        if (layer)
          b.layernorm_forward(in[0], in[1], in[2], out[0], out[1], out[2], rows, cols, T(1e-5));
        else
          b.rmsnorm_forward(in[0], in[1], out[0], out[1], rows, cols, T(1e-5));
      });
      f.bound = [=](const Buffers& in, const Buffers&, const Buffers& ref) {
        std::vector<double> mean, rstd;
        norm_forward_reference(in, rows, cols, layer, mean, rstd);
        Buffers bounds(ref.size());
        std::vector<double> my(static_cast<std::size_t>(rows * cols)), mm(rows), mr(rows);
        const double n = layer ? 2.0 * cols + 10 : cols + 10.0;
        for (std::int64_t r = 0; r < rows; ++r) {
          double mean_abs = 0;
          for (std::int64_t c = 0; c < cols; ++c)
            mean_abs += std::abs(in[0][r * cols + c]);
          mean_abs /= static_cast<double>(cols);
          const double kappa = layer ? 1 + mean_abs * rstd[r] : 1.0;
          for (std::int64_t c = 0; c < cols; ++c) {
            const double xhat = (in[0][r * cols + c] - mean[r]) * rstd[r];
            my[r * cols + c] = kappa * std::abs(in[1][c]) * (std::abs(xhat) + (layer ? 1 : 0)) +
                               (layer ? std::abs(in[2][c]) * gamma(1) / gamma(n) : 0.0);
          }
          mm[r] = mean_abs;
          mr[r] = kappa * rstd[r];
        }
        bounds[0] = scaled_bound(my, n, ref[0]);
        if (layer) {
          bounds[1] = scaled_bound(mm, cols, ref[1]);
          bounds[2] = scaled_bound(mr, n, ref[2]);
        } else {
          bounds[1] = scaled_bound(mr, n, ref[1]);
        }
        return bounds;
      };
      cases.push_back(f);

      // backward: inputs dy, x, weight, (mean,) rstd from the float64 forward
      OpCase g{layer ? "layernorm_backward" : "rmsnorm_backward",
               params,
               layer ? std::vector<std::string>{"dy", "x", "weight", "mean", "rstd"}
                     : std::vector<std::string>{"dy", "x", "weight", "rstd"},
               layer ? std::vector<std::string>{"dx", "dweight", "dbias"}
                     : std::vector<std::string>{"dx", "dweight"},
               {},
               {},
               {},
               {}};
      g.generate = [=](Random& r, Buffers& in, Buffers& out) {
        Buffers fwd = {draw(r, rows * cols, 1.0, 0.5), draw(r, cols, 0.3, 1.0)};
        std::vector<double> mean, rstd;
        norm_forward_reference(fwd, rows, cols, layer, mean, rstd);
        for (double& v : mean)
          v = fp32(v);
        for (double& v : rstd)
          v = fp32(v);
        in = {draw(r, rows * cols, 1.0), fwd[0], fwd[1]};
        if (layer) in.push_back(mean);
        in.push_back(rstd);
        out = {draw(r, rows * cols, 1.0), draw(r, cols, 1.0)};
        if (layer) out.push_back(draw(r, cols, 1.0));
      };
      set_runners(g, [=](auto& b, const auto& in, const auto& out) {
        if (layer)
          b.layernorm_backward(in[0], in[1], in[2], in[3], in[4], out[0], out[1], out[2], rows,
                               cols);
        else
          b.rmsnorm_backward(in[0], in[1], in[2], in[3], out[0], out[1], rows, cols);
      });
      g.bound = [=](const Buffers& in, const Buffers& init, const Buffers& ref) {
        const std::vector<double>& dy = in[0];
        const std::vector<double>& x = in[1];
        const std::vector<double>& w = in[2];
        const std::vector<double>& rstd = in[layer ? 4 : 3];
        std::vector<double> mdx(static_cast<std::size_t>(rows * cols)), mdw(cols), mdb(cols);
        for (std::int64_t c = 0; c < cols; ++c) {
          mdw[c] = std::abs(init[1][c]);
          if (layer) mdb[c] = std::abs(init[2][c]);
        }
        for (std::int64_t r = 0; r < rows; ++r) {
          double mean_g = 0, mean_gx = 0;
          for (std::int64_t c = 0; c < cols; ++c) {
            const double xhat = (x[r * cols + c] - (layer ? in[3][r] : 0.0)) * rstd[r];
            mean_g += std::abs(dy[r * cols + c] * w[c]);
            mean_gx += std::abs(dy[r * cols + c] * w[c] * xhat);
            mdw[c] += std::abs(dy[r * cols + c] * xhat);
            if (layer) mdb[c] += std::abs(dy[r * cols + c]);
          }
          mean_g /= static_cast<double>(cols);
          mean_gx /= static_cast<double>(cols);
          for (std::int64_t c = 0; c < cols; ++c) {
            const double xhat = (x[r * cols + c] - (layer ? in[3][r] : 0.0)) * rstd[r];
            mdx[r * cols + c] = std::abs(init[0][r * cols + c]) +
                                rstd[r] * (std::abs(dy[r * cols + c] * w[c]) +
                                           (layer ? mean_g : 0.0) + std::abs(xhat) * mean_gx);
          }
        }
        Buffers bounds = {scaled_bound(mdx, cols + 10.0, ref[0]),
                          scaled_bound(mdw, rows + 6.0, ref[1])};
        if (layer) bounds.push_back(scaled_bound(mdb, rows + 1.0, ref[2]));
        return bounds;
      };
      cases.push_back(g);
    }
  }
}

// ---- RoPE ------------------------------------------------------------------------------------
// out_i = x_i cos - x_{i+half} sin (and the pair): two products and a sum, with the fp32 table
// the rounding of the float64 one's values: n = 4, M = |x_i| + |x_pair|. In place: the runner
// copies x into the output first.
void rope_cases(std::vector<OpCase>& cases) {
  struct Dims {
    std::int64_t batch, seq, heads, head_dim;
  };
  for (const Dims d : {Dims{1, 1, 1, 2}, Dims{2, 7, 3, 8}, Dims{1, 67, 2, 16}}) {
    for (const int direction : {1, -1}) {
      const std::int64_t count = d.batch * d.seq * d.heads * d.head_dim;
      OpCase c{"rope",
               shape_text({{"batch", d.batch},
                           {"seq", d.seq},
                           {"heads", d.heads},
                           {"head_dim", d.head_dim},
                           {"direction", direction}}),
               {"x"},
               {"out"},
               {},
               {},
               {},
               {}};
      c.generate = [=](Random& r, Buffers& in, Buffers& out) {
        in = {draw(r, count, 1.0)};
        out = {std::vector<double>(static_cast<std::size_t>(count), 0.0)};
      };
      set_runners(c, [=](auto& b, const auto& in, const auto& out) {
        using B = std::remove_cvref_t<decltype(b)>;
        b.copy(in[0], out[0], count);
        const typename B::RopeTable table = b.rope_table(d.head_dim, 1e4, d.seq);
        b.rope(out[0], d.batch, d.seq, d.heads, table, direction);
      });
      c.bound = [=](const Buffers& in, const Buffers&, const Buffers& ref) {
        std::vector<double> m(static_cast<std::size_t>(count));
        const std::int64_t half = d.head_dim / 2;
        for (std::int64_t i = 0; i < count; ++i) {
          const std::int64_t within = i % d.head_dim;
          const std::int64_t pair = within < half ? i + half : i - half;
          m[i] = std::abs(in[0][i]) + std::abs(in[0][pair]);
        }
        return Buffers{scaled_bound(m, 4, ref[0])};
      };
      cases.push_back(c);
    }
  }
}

// ---- SwiGLU ----------------------------------------------------------------------------------
// out = g sigmoid(g) up. sigmoid from e^-|g| (within 1 ulp), one add, one divide, two products:
// n = 8, M = |out|. Backward: d_up = d_out silu(g) (n = 8, M = |d_up|); d_gate = d_out up
// sigmoid (1 + g (1 - sigmoid)), which cancels near g = -1.28, so M = |d_out up| sigmoid
// (1 + |g| (1 - sigmoid)), n = 10.
double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

void swiglu_cases(std::vector<OpCase>& cases) {
  for (std::int64_t n : {1, 37, 1024, 4099}) {  // 1024: whole 16-byte packs on CUDA
    OpCase f{"swiglu_forward", shape_text({{"n", n}}), {"gate", "up"}, {"out"}, {}, {}, {}, {}};
    f.generate = [n](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, n, 3.0), draw(r, n, 1.0)};
      out = {draw(r, n, 1.0)};
    };
    set_runners(f, [n](auto& b, const auto& in, const auto& out) {
      b.swiglu_forward(in[0], in[1], out[0], n);
    });
    f.bound = [](const Buffers&, const Buffers&, const Buffers& ref) {
      std::vector<double> m(ref[0].size());
      for (std::size_t i = 0; i < m.size(); ++i)
        m[i] = std::abs(ref[0][i]);
      return Buffers{scaled_bound(m, 8, ref[0])};
    };
    cases.push_back(f);

    OpCase g{
        "swiglu_backward", f.params, {"d_out", "gate", "up"}, {"d_gate", "d_up"}, {}, {}, {}, {}};
    g.generate = [n](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, n, 1.0), draw(r, n, 3.0), draw(r, n, 1.0)};
      out = {draw(r, n, 1.0), draw(r, n, 1.0)};
    };
    set_runners(g, [n](auto& b, const auto& in, const auto& out) {
      b.swiglu_backward(in[0], in[1], in[2], out[0], out[1], n);
    });
    g.bound = [](const Buffers& in, const Buffers&, const Buffers& ref) {
      std::vector<double> mg(ref[0].size()), mu(ref[1].size());
      for (std::size_t i = 0; i < mg.size(); ++i) {
        const double s = sigmoid(in[1][i]);
        mg[i] = std::abs(in[0][i] * in[2][i]) * s * (1 + std::abs(in[1][i]) * (1 - s));
        mu[i] = std::abs(ref[1][i]);
      }
      return Buffers{scaled_bound(mg, 10, ref[0]), scaled_bound(mu, 8, ref[1])};
    };
    cases.push_back(g);
  }
}

// ---- embedding -------------------------------------------------------------------------------
// Forward is a gather: exact (bound 0). Backward is a scatter-add in token order:
// d_table[v] += sum over t with token v of d_out[t]: n = count + 1, M = |d0| + sum |d_out|.
void embedding_cases(std::vector<OpCase>& cases) {
  for (auto [count, vocab, dim] :
       {std::tuple<std::int64_t, std::int64_t, std::int64_t>{1, 1, 1}, {13, 7, 5}, {100, 37, 33}}) {
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(count));
    for (std::int64_t t = 0; t < count; ++t)  // repeats, and the first and last ids
      tokens[t] = static_cast<std::int32_t>((t * 5 + t / 3) % vocab);
    tokens.back() = static_cast<std::int32_t>(vocab - 1);
    const std::string params = shape_text({{"count", count}, {"vocab", vocab}, {"dim", dim}});
    OpCase f{"embedding_forward", params, {"table"}, {"out"}, {}, {}, {}, {}};
    f.generate = [=](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, vocab * dim, 1.0)};
      out = {draw(r, count * dim, 1.0)};
    };
    set_runners(f, [=](auto& b, const auto& in, const auto& out) {
      const Tensor ids = backend_tokens(b, tokens);
      b.embedding_forward(ids.data<std::int32_t>(), count, in[0], vocab, dim, out[0]);
    });
    f.bound = [](const Buffers&, const Buffers&, const Buffers& ref) {
      return Buffers{std::vector<double>(ref[0].size(), 0.0)};
    };
    cases.push_back(f);

    OpCase g{"embedding_backward", params, {"d_out"}, {"d_table"}, {}, {}, {}, {}};
    g.generate = [=](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, count * dim, 1.0)};
      out = {draw(r, vocab * dim, 1.0)};
    };
    set_runners(g, [=](auto& b, const auto& in, const auto& out) {
      const Tensor ids = backend_tokens(b, tokens);
      b.embedding_backward(ids.data<std::int32_t>(), count, in[0], dim, out[0]);
    });
    g.bound = [=](const Buffers& in, const Buffers& init, const Buffers& ref) {
      std::vector<double> m(init[0].size());
      for (std::size_t i = 0; i < m.size(); ++i)
        m[i] = std::abs(init[0][i]);
      for (std::int64_t t = 0; t < count; ++t)
        for (std::int64_t c = 0; c < dim; ++c)
          m[tokens[t] * dim + c] += std::abs(in[0][t * dim + c]);
      return Buffers{scaled_bound(m, static_cast<double>(count + 1), ref[0])};
    };
    cases.push_back(g);
  }
}

// ---- attention -------------------------------------------------------------------------------
// Forward, per query row i of one head: S_ij = scale q_i . k_j has error at most
// Delta_i = gamma(D + 2) scale max_j |q_i| . |k_j|; exp and the sum move P_ij by at most
// P_ij (2 Delta_i + gamma(T + 8)); so
//   |d o_id| <= (2 Delta_i + gamma(T + 8)) sum_j P_ij |v_jd|   and   |d lse_i| <= Delta_i +
//   gamma(T + 8) (1 + |lse_i|).
// Backward gets o and lse (fp32 roundings of the float64 forward): P = exp(S - lse) is within
// P (2 Delta_i + gamma(8)); with A_ij = P_ij (|dO_i| . |v_j| + |delta_i|), delta_i = dO_i . o_i,
//   dV_j: sum_i P_ij |dO_i|;  dQ_i: scale sum_j A_ij |k_j|;  dK_j: scale sum_i A_ij |q_i|,
// each with relative error (3 Delta + gamma(T + D + 10)), plus |initial| u (they accumulate).
struct AttentionDims {
  std::int64_t batch, seq, heads, head_dim;
};

struct AttentionReference {
  // P per (b, h): [seq, seq]; lse per (b, h, i)
  std::vector<double> p, lse, delta_i;
};

AttentionReference attention_reference(const Buffers& in, const AttentionDims& d) {
  const std::int64_t stride = d.heads * d.head_dim;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.head_dim));
  AttentionReference ref;
  ref.p.assign(static_cast<std::size_t>(d.batch * d.heads * d.seq * d.seq), 0.0);
  ref.lse.assign(static_cast<std::size_t>(d.batch * d.heads * d.seq), 0.0);
  ref.delta_i.assign(ref.lse.size(), 0.0);
  for (std::int64_t b = 0; b < d.batch; ++b)
    for (std::int64_t h = 0; h < d.heads; ++h)
      for (std::int64_t i = 0; i < d.seq; ++i) {
        const double* q = in[0].data() + (b * d.seq + i) * stride + h * d.head_dim;
        std::vector<double> s(static_cast<std::size_t>(i + 1));
        double max = -1e300, scale_bound = 0;
        for (std::int64_t j = 0; j <= i; ++j) {
          const double* k = in[1].data() + (b * d.seq + j) * stride + h * d.head_dim;
          double dot = 0, abs_dot = 0;
          for (std::int64_t c = 0; c < d.head_dim; ++c) {
            dot += q[c] * k[c];
            abs_dot += std::abs(q[c] * k[c]);
          }
          s[j] = scale * dot;
          max = std::max(max, s[j]);
          scale_bound = std::max(scale_bound, scale * abs_dot);
        }
        double sum = 0;
        for (std::int64_t j = 0; j <= i; ++j)
          sum += std::exp(s[j] - max);
        const std::int64_t bh = b * d.heads + h;
        ref.lse[bh * d.seq + i] = max + std::log(sum);
        ref.delta_i[bh * d.seq + i] = gamma(static_cast<double>(d.head_dim + 2)) * scale_bound;
        for (std::int64_t j = 0; j <= i; ++j)
          ref.p[(bh * d.seq + i) * d.seq + j] = std::exp(s[j] - ref.lse[bh * d.seq + i]);
      }
  return ref;
}

void attention_cases(std::vector<OpCase>& cases) {
  for (const AttentionDims d :
       {AttentionDims{1, 1, 1, 2}, AttentionDims{2, 9, 3, 8}, AttentionDims{1, 133, 2, 16}}) {
    const std::int64_t rows = d.batch * d.seq, stride = d.heads * d.head_dim;
    const std::int64_t count = rows * stride, lse_count = d.batch * d.heads * d.seq;
    const AttentionShape shape{d.batch, d.seq, d.heads, d.head_dim};
    const std::string params = shape_text(
        {{"batch", d.batch}, {"seq", d.seq}, {"heads", d.heads}, {"head_dim", d.head_dim}});
    const double gamma_t = gamma(static_cast<double>(d.seq + 8));

    OpCase f{"attention_forward", params, {"q", "k", "v"}, {"o", "lse"}, {}, {}, {}, {}};
    f.generate = [=](Random& r, Buffers& in, Buffers& out) {
      in = {draw(r, count, 1.0), draw(r, count, 1.0), draw(r, count, 1.0)};
      out = {draw(r, count, 1.0), draw(r, lse_count, 1.0)};
    };
    set_runners(f, [=](auto& b, const auto& in, const auto& out) {
      b.attention_forward(in[0], in[1], in[2], out[0], out[1], shape);
    });
    f.bound = [=](const Buffers& in, const Buffers&, const Buffers& ref) {
      const AttentionReference a = attention_reference(in, d);
      std::vector<double> bo(static_cast<std::size_t>(count)),
          bl(static_cast<std::size_t>(lse_count));
      for (std::int64_t b = 0; b < d.batch; ++b)
        for (std::int64_t h = 0; h < d.heads; ++h)
          for (std::int64_t i = 0; i < d.seq; ++i) {
            const std::int64_t bhi = (b * d.heads + h) * d.seq + i;
            const double rel = 2 * a.delta_i[bhi] + gamma_t;
            for (std::int64_t c = 0; c < d.head_dim; ++c) {
              double m = 0;
              for (std::int64_t j = 0; j <= i; ++j)
                m += a.p[bhi * d.seq + j] *
                     std::abs(in[2][(b * d.seq + j) * stride + h * d.head_dim + c]);
              const std::int64_t at = (b * d.seq + i) * stride + h * d.head_dim + c;
              bo[at] = 4 * rel * m + 2 * kUnit * std::abs(ref[0][at]);
            }
            bl[bhi] = 4 * (a.delta_i[bhi] + gamma_t * (1 + std::abs(ref[1][bhi])));
          }
      return Buffers{bo, bl};
    };
    cases.push_back(f);

    OpCase g{"attention_backward",
             params,
             {"d_o", "q", "k", "v", "o", "lse"},
             {"dq", "dk", "dv"},
             {},
             {},
             {},
             {}};
    g.generate = [=](Random& r, Buffers& in, Buffers& out) {
      Buffers qkv = {draw(r, count, 1.0), draw(r, count, 1.0), draw(r, count, 1.0)};
      // o and lse: the float64 forward, rounded to fp32
      Cpu64 cpu64;
      std::vector<double> o(static_cast<std::size_t>(count)),
          lse(static_cast<std::size_t>(lse_count));
      cpu64.attention_forward(qkv[0].data(), qkv[1].data(), qkv[2].data(), o.data(), lse.data(),
                              shape);
      for (double& v : o)
        v = fp32(v);
      for (double& v : lse)
        v = fp32(v);
      in = {draw(r, count, 1.0), qkv[0], qkv[1], qkv[2], o, lse};
      out = {draw(r, count, 1.0), draw(r, count, 1.0), draw(r, count, 1.0)};
    };
    set_runners(g, [=](auto& b, const auto& in, const auto& out) {
      b.attention_backward(in[0], in[1], in[2], in[3], in[4], in[5], out[0], out[1], out[2], shape);
    });
    g.bound = [=](const Buffers& in, const Buffers& init, const Buffers& ref) {
      const Buffers qkv = {in[1], in[2], in[3]};
      const AttentionReference a = attention_reference(qkv, d);
      const double scale = 1.0 / std::sqrt(static_cast<double>(d.head_dim));
      const double gamma_b = gamma(static_cast<double>(d.seq + d.head_dim + 10));
      std::vector<double> mq(static_cast<std::size_t>(count), 0.0), mk = mq, mv = mq;
      std::vector<double> rel_row(static_cast<std::size_t>(rows * d.heads), 0.0);
      auto at = [&](std::int64_t b, std::int64_t i, std::int64_t h) {
        return (b * d.seq + i) * stride + h * d.head_dim;
      };
      for (std::int64_t b = 0; b < d.batch; ++b)
        for (std::int64_t h = 0; h < d.heads; ++h)
          for (std::int64_t i = 0; i < d.seq; ++i) {
            const std::int64_t bhi = (b * d.heads + h) * d.seq + i;
            double delta = 0;
            for (std::int64_t c = 0; c < d.head_dim; ++c)
              delta += std::abs(in[0][at(b, i, h) + c] * in[4][at(b, i, h) + c]);
            for (std::int64_t j = 0; j <= i; ++j) {
              const double p = a.p[bhi * d.seq + j];
              double do_v = 0;
              for (std::int64_t c = 0; c < d.head_dim; ++c)
                do_v += std::abs(in[0][at(b, i, h) + c] * in[3][at(b, j, h) + c]);
              const double amp = p * (do_v + delta);
              const double rel = 3 * a.delta_i[bhi] + gamma_b;
              for (std::int64_t c = 0; c < d.head_dim; ++c) {
                mv[at(b, j, h) + c] += rel * p * std::abs(in[0][at(b, i, h) + c]);
                mq[at(b, i, h) + c] += rel * scale * amp * std::abs(in[2][at(b, j, h) + c]);
                mk[at(b, j, h) + c] += rel * scale * amp * std::abs(in[1][at(b, i, h) + c]);
              }
            }
          }
      Buffers bounds = {mq, mk, mv};
      for (int o = 0; o < 3; ++o)
        for (std::int64_t e = 0; e < count; ++e)
          bounds[o][e] =
              4 * bounds[o][e] + 2 * kUnit * (std::abs(ref[o][e]) + std::abs(init[o][e]));
      return bounds;
    };
    cases.push_back(g);
  }
}

}  // namespace

std::vector<OpCase> all_op_cases() {
  std::vector<OpCase> cases;
  add_cases(cases);
  fill_uniform_cases(cases);
  bias_cases(cases);
  gemm_cases(cases);
  norm_cases(cases);
  rope_cases(cases);
  swiglu_cases(cases);
  embedding_cases(cases);
  attention_cases(cases);
  return cases;
}

}  // namespace kept::ops
