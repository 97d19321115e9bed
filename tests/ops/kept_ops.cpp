// kept_ops: the op registry's driver (ggml's test-backend-ops, with kept's a-priori bounds).
//
//   kept_ops              every op case on every available backend against Cpu64: the fp32
//                         and bf16 backends (Cpu, CpuBf16) within the case's derived bound
//                         (tests/ops/op_cases.hpp), every
//                         backend bit-identical when run twice, no input written, and guard
//                         elements before and after every buffer untouched
//   kept_ops --grad       finite-difference gradient checks in float64 of every differentiable op
//   kept_ops --list       one line per (op case, backend)
//   kept_ops --bench      the ops timed at model sizes beside this machine's limits and PyTorch
//                         CPU in the same run (tests/ops/ops_bench.cpp; options: --help)
//   --filter TEXT         only cases whose name contains TEXT;  --seed N: another draw
//   --inject error|guard  the harness's own test: perturbs the fp32 backend's first output
//                         (by 1e-3 of its size) or writes one element past its end; every fp32
//                         case must then fail
// Ends with the line `N passed, M failed`; exits 1 if anything failed.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kept/backend/cpu/blas_core.hpp"
#include "ops/op_cases.hpp"

namespace kept::ops {
std::vector<OpCase> all_op_cases();
}

namespace {

using kept::ops::Buffers;
using kept::ops::GradCase;
using kept::ops::OpCase;

constexpr std::size_t kGuard = 16;

template <class T>
T from_double(double value) {
  if constexpr (std::is_same_v<T, kept::bf16>)
    return kept::to_bf16(static_cast<float>(value));
  else
    return static_cast<T>(value);
}
template <class T>
double to_double(T value) {
  if constexpr (std::is_same_v<T, kept::bf16>)
    return static_cast<double>(kept::to_float(value));
  else
    return static_cast<double>(value);
}

// A buffer with guard elements on both sides, filled with a byte pattern no op writes.
template <class T>
class Guarded {
 public:
  explicit Guarded(const std::vector<double>& values) : storage_(values.size() + 2 * kGuard) {
    std::memset(static_cast<void*>(storage_.data()), 0xA5, storage_.size() * sizeof(T));
    for (std::size_t i = 0; i < values.size(); ++i)
      storage_[kGuard + i] = from_double<T>(values[i]);
  }
  T* data() { return storage_.data() + kGuard; }
  std::size_t size() const { return storage_.size() - 2 * kGuard; }
  // The whole storage, guards included (mirrored to and from a device).
  void* storage() { return storage_.data(); }
  std::size_t storage_bytes() const { return storage_.size() * sizeof(T); }
  bool guards_intact() const {
    const auto* bytes = reinterpret_cast<const unsigned char*>(storage_.data());
    const std::size_t guard_bytes = kGuard * sizeof(T);
    const std::size_t tail = (kGuard + size()) * sizeof(T);
    for (std::size_t i = 0; i < guard_bytes; ++i)
      if (bytes[i] != 0xA5 || bytes[tail + i] != 0xA5) return false;
    return true;
  }
  std::vector<double> values() const {
    std::vector<double> out;
    for (std::size_t i = kGuard; i < kGuard + size(); ++i)
      out.push_back(to_double(storage_[i]));
    return out;
  }

 private:
  std::vector<T> storage_;
};

// A guarded buffer of the bf16 run: bf16 or fp32 by its role.
class RoleBuffer {
 public:
  RoleBuffer(const std::vector<double>& values, bool bf16) {
    if (bf16)
      half_.emplace(values);
    else
      single_.emplace(values);
  }
  void* data() { return half_ ? static_cast<void*>(half_->data()) : single_->data(); }
  void* storage() { return half_ ? half_->storage() : single_->storage(); }
  std::size_t storage_bytes() const {
    return half_ ? half_->storage_bytes() : single_->storage_bytes();
  }
  std::size_t guard_bytes() const { return kGuard * (half_ ? 2 : 4); }
  kept::DType dtype() const { return half_ ? kept::DType::BF16 : kept::DType::F32; }
  bool guards_intact() const { return half_ ? half_->guards_intact() : single_->guards_intact(); }
  std::vector<double> values() const { return half_ ? half_->values() : single_->values(); }

 private:
  std::optional<Guarded<kept::bf16>> half_;
  std::optional<Guarded<float>> single_;
};

struct Run {
  Buffers outputs;
  std::string problem;  // "" when the buffers are sound
};

// Guards intact, inputs unchanged; collects the outputs.
template <class Buffer>
Run inspect(const OpCase& op, const std::vector<Buffer>& in, const std::vector<Buffer>& out,
            const Buffers& inputs) {
  Run run;
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (!in[i].guards_intact())
      run.problem += "guard around input " + op.input_names[i] + " written; ";
    const std::vector<double> after = in[i].values();
    for (std::size_t e = 0; e < after.size(); ++e)
      if (std::memcmp(&after[e], &inputs[i][e], sizeof(double)) != 0 &&
          !(std::isnan(after[e]) && std::isnan(inputs[i][e]))) {
        run.problem += "input " + op.input_names[i] + " modified; ";
        break;
      }
  }
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (!out[i].guards_intact())
      run.problem += "guard around output " + op.output_names[i] + " written (out of bounds); ";
    run.outputs.push_back(out[i].values());
  }
  return run;
}

template <class T, class Backend, class Runner>
Run run_case(Backend& backend, const Runner& runner, const OpCase& op, const Buffers& inputs,
             const Buffers& initial) {
  std::vector<Guarded<T>> in, out;
  for (const auto& v : inputs)
    in.emplace_back(v);
  for (const auto& v : initial)
    out.emplace_back(v);
  std::vector<const T*> in_ptr;
  std::vector<T*> out_ptr;
  for (auto& g : in)
    in_ptr.push_back(g.data());
  for (auto& g : out)
    out_ptr.push_back(g.data());
  runner(backend, in_ptr, out_ptr);
  return inspect(op, in, out, inputs);
}

// The bf16 run's buffers: bf16 or fp32 by the role each name gives it.
std::vector<RoleBuffer> role_buffers(const OpCase& op, const std::vector<std::string>& names,
                                     const Buffers& values) {
  std::vector<RoleBuffer> buffers;
  for (std::size_t i = 0; i < values.size(); ++i)
    buffers.emplace_back(values[i], kept::ops::stored_bf16(kept::ops::role_of(op.op, names[i])));
  return buffers;
}

Run run_case_bf16(kept::CpuBf16& backend, const OpCase& op, const Buffers& inputs,
                  const Buffers& initial) {
  std::vector<RoleBuffer> in = role_buffers(op, op.input_names, inputs),
                          out = role_buffers(op, op.output_names, initial);
  std::vector<kept::ops::Slot<true>> in_slots;
  std::vector<kept::ops::Slot<false>> out_slots;
  for (auto& b : in)
    in_slots.push_back({b.data(), b.dtype()});
  for (auto& b : out)
    out_slots.push_back({b.data(), b.dtype()});
  op.run_bf16(backend, in_slots, out_slots);
  return inspect(op, in, out, inputs);
}

#if defined(KEPT_OPS_WITH_CUDA)
// The bf16 run's buffers mirrored into device memory, guards included: the op runs on the device
// copies, which come back before the same inspection (guards, inputs unchanged) as on the host.
Run run_case_cuda(kept::cuda::CudaBackend& backend, const OpCase& op, const Buffers& inputs,
                  const Buffers& initial) {
  std::vector<RoleBuffer> in = role_buffers(op, op.input_names, inputs),
                          out = role_buffers(op, op.output_names, initial);
  std::vector<kept::Tensor> device;
  const auto mirror = [&](RoleBuffer& buffer) {
    kept::Tensor copy =
        backend.zeros(kept::DType::U8, {static_cast<std::int64_t>(buffer.storage_bytes())});
    KEPT_CUDA_CHECK(
        cudaMemcpy(copy.raw(), buffer.storage(), buffer.storage_bytes(), cudaMemcpyHostToDevice));
    device.push_back(copy);
    return static_cast<unsigned char*>(copy.raw()) + buffer.guard_bytes();
  };
  std::vector<kept::ops::Slot<true>> in_slots;
  std::vector<kept::ops::Slot<false>> out_slots;
  for (auto& b : in)
    in_slots.push_back({mirror(b), b.dtype()});
  for (auto& b : out)
    out_slots.push_back({mirror(b), b.dtype()});
  op.run_cuda(backend, in_slots, out_slots);
  backend.context().synchronize();
  std::size_t next = 0;
  for (auto* buffers : {&in, &out})
    for (auto& b : *buffers)
      KEPT_CUDA_CHECK(
          cudaMemcpy(b.storage(), device[next++].raw(), b.storage_bytes(), cudaMemcpyDeviceToHost));
  return inspect(op, in, out, inputs);
}
#endif

bool same_bits(const Buffers& a, const Buffers& b) {
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(a[i].data(), b[i].data(), a[i].size() * sizeof(double)) != 0) return false;
  return true;
}

struct Tally {
  int passed = 0, failed = 0, fp32_passed = 0, fp32_failed = 0;
  void report(bool ok, const char* backend, const std::string& name, const std::string& detail) {
    (ok ? passed : failed)++;
    if (std::string(backend) == "cpu") (ok ? fp32_passed : fp32_failed)++;
    std::printf("%-4s %-8s %-62s %s\n", ok ? "ok" : "FAIL", backend, name.c_str(), detail.c_str());
  }
};

std::string g_inject;  // --inject

// The worst error/bound over all outputs, and where it is.
std::pair<double, std::string> worst_ratio(const OpCase& op, const Buffers& got,
                                           const Buffers& reference, const Buffers& bounds) {
  double worst = 0;
  std::string where;
  for (std::size_t o = 0; o < got.size(); ++o)
    for (std::size_t e = 0; e < got[o].size(); ++e) {
      const double error = std::abs(got[o][e] - reference[o][e]);
      const double ratio = error == 0 ? 0 : bounds[o][e] > 0 ? error / bounds[o][e] : INFINITY;
      if (!(ratio <= worst)) {
        worst = ratio;
        char text[200];
        std::snprintf(text, sizeof text, "%s[%zu]: |%.9g - %.9g| = %.3g vs bound %.3g",
                      op.output_names[o].c_str(), e, got[o][e], reference[o][e], error,
                      bounds[o][e]);
        where = text;
      }
    }
  return {worst, where};
}

// Runs a backend twice and checks it against the reference within `bounds`.
template <class Once>
void check_backend(const char* name, const OpCase& op, const Once& once, const Buffers& reference,
                   const Buffers& bounds, Tally& tally) {
  try {
    const Run got = once();
    const Run got_again = once();
    std::string problem = got.problem;
    if (!same_bits(got.outputs, got_again.outputs)) problem += "two runs differ; ";
    const auto [worst, where] = worst_ratio(op, got.outputs, reference, bounds);
    char summary[64];
    std::snprintf(summary, sizeof summary, "error/bound %.3f", worst);
    const bool ok = problem.empty() && worst <= 1.0;
    tally.report(ok, name, op.name(), ok ? summary : problem + (worst > 1.0 ? where : ""));
  } catch (const std::exception& error) {
    tally.report(false, name, op.name(), std::string("threw: ") + error.what());
  }
}

#if defined(KEPT_OPS_WITH_CUDA)
kept::cuda::Cuda* g_cuda = nullptr;  // the device context, when there is one

// CUDA against the float64 reference within the bf16 bound, and against CpuBf16 (which rounds at
// the same points) "tightly": the two differ only in fp32 summation order, so their fp32 values
// before a bf16 rounding differ by at most the two fp32 errors, and the rounding may fall on
// either side of a boundary for each: one bf16 ulp apart, at most 2 u_bf16 |y| (u_bf16 = 2^-8).
// No error from bf16 inputs (both saw the same ones):
//   |cuda - cpubf16| <= 2 b32 + 2 u_bf16 |y|   (bf16 outputs),   2 b32   (fp32 outputs).
void check_cuda(const OpCase& op, const Buffers& inputs16, const Buffers& initial16,
                const Buffers& reference16, const Buffers& bounds16, Tally& tally) {
  using kept::ops::kBf16Unit;
  using kept::ops::role_of;
  using kept::ops::stored_bf16;
  if (!g_cuda) return;
  kept::cuda::CudaBackend backend(*g_cuda);
  const auto once = [&] { return run_case_cuda(backend, op, inputs16, initial16); };
  check_backend("cuda", op, once, reference16, bounds16, tally);
  try {
    kept::CpuBf16 cpu_bf16;
    const Run twin = run_case_bf16(cpu_bf16, op, inputs16, initial16);
    const Buffers fp32 = op.bound(inputs16, initial16, reference16);
    Buffers tight = fp32;
    for (std::size_t o = 0; o < tight.size(); ++o)
      for (std::size_t e = 0; e < tight[o].size(); ++e)
        tight[o][e] = 2 * fp32[o][e] + (stored_bf16(role_of(op.op, op.output_names[o]))
                                            ? 2 * kBf16Unit * std::abs(twin.outputs[o][e])
                                            : 0.0);
    check_backend("cuda~bf16", op, once, twin.outputs, tight, tally);
  } catch (const std::exception& error) {
    tally.report(false, "cuda~bf16", op.name(), std::string("threw: ") + error.what());
  }
}
#endif

void check_case(OpCase op, std::uint64_t seed, Tally& tally) {
  using kept::ops::kBf16Unit;
  using kept::ops::role_of;
  using kept::ops::round_bf16;
  using kept::ops::stored_bf16;
  if (!g_inject.empty()) {
    auto runner = op.run32;
    op.run32 = [runner, op](kept::Cpu& b, const std::vector<const float*>& in,
                            const std::vector<float*>& out) {
      runner(b, in, out);
      if (g_inject == "error")
        out[0][0] += 1e-3f * (std::abs(out[0][0]) + 1.0f);
      else
        out[0][op.output_names.empty() ? 0 : -1] = 0.0f;  // the guard before it
    };
  }
  kept::Random random(seed ^ std::hash<std::string>{}(op.name()));
  Buffers inputs, initial;
  op.generate(random, inputs, initial);
  kept::Cpu64 cpu64;
  kept::Cpu cpu;
  kept::CpuBf16 cpu_bf16;
  Run reference;
  try {
    reference = run_case<double>(cpu64, op.run64, op, inputs, initial);
    const Run again = run_case<double>(cpu64, op.run64, op, inputs, initial);
    std::string problem = reference.problem;
    if (!same_bits(reference.outputs, again.outputs)) problem += "two runs differ; ";
    tally.report(problem.empty(), "cpu64", op.name(),
                 problem.empty() ? "guards, determinism" : problem);
  } catch (const std::exception& error) {
    tally.report(false, "cpu64", op.name(), std::string("threw: ") + error.what());
    return;
  }

  check_backend(
      "cpu", op, [&] { return run_case<float>(cpu, op.run32, op, inputs, initial); },
      reference.outputs, op.bound(inputs, initial, reference.outputs), tally);

  // bf16: round the bf16 buffers' values first; the reference runs on the rounded values.
  Buffers inputs16 = inputs, initial16 = initial;
  for (std::size_t i = 0; i < inputs16.size(); ++i)
    if (stored_bf16(role_of(op.op, op.input_names[i])))
      for (double& v : inputs16[i])
        v = round_bf16(v);
  for (std::size_t i = 0; i < initial16.size(); ++i)
    if (stored_bf16(role_of(op.op, op.output_names[i])))
      for (double& v : initial16[i])
        v = round_bf16(v);
  try {
    const Run reference16 = run_case<double>(cpu64, op.run64, op, inputs16, initial16);
    Buffers bounds = op.bound(inputs16, initial16, reference16.outputs);
    for (std::size_t o = 0; o < bounds.size(); ++o)
      if (stored_bf16(role_of(op.op, op.output_names[o])))
        for (std::size_t e = 0; e < bounds[o].size(); ++e)
          bounds[o][e] += kBf16Unit * (std::abs(reference16.outputs[o][e]) + bounds[o][e]);
    check_backend(
        "cpu-bf16", op, [&] { return run_case_bf16(cpu_bf16, op, inputs16, initial16); },
        reference16.outputs, bounds, tally);
#if defined(KEPT_OPS_WITH_CUDA)
    check_cuda(op, inputs16, initial16, reference16.outputs, bounds, tally);
#endif
  } catch (const std::exception& error) {
    tally.report(false, "cpu-bf16", op.name(), std::string("threw: ") + error.what());
  }
}

// ---- gradient checks -------------------------------------------------------------------------

std::vector<GradCase> all_grad_cases();

void grad_check(const GradCase& op, std::uint64_t seed, Tally& tally) {
  kept::Random random(seed ^ std::hash<std::string>{}(op.name()));
  kept::Cpu64 cpu64;
  Buffers inputs;
  op.generate(random, inputs);
  try {
    const Buffers outputs = op.forward(cpu64, inputs);
    Buffers d_outputs;
    for (std::size_t o = 0; o < outputs.size(); ++o) {
      bool statistic = false;
      for (int s : op.statistics)
        statistic |= static_cast<std::size_t>(s) == o;
      d_outputs.push_back(
          statistic ? std::vector<double>(outputs[o].size(), 0.0)
                    : kept::ops::draw(random, static_cast<std::int64_t>(outputs[o].size()), 1.0));
    }
    auto loss = [&](const Buffers& x) {
      const Buffers y = op.forward(cpu64, x);
      double sum = 0;
      for (std::size_t o = 0; o < y.size(); ++o)
        for (std::size_t e = 0; e < y[o].size(); ++e)
          sum += d_outputs[o][e] * y[o][e];
      return sum;
    };
    const Buffers grads = op.backward(cpu64, inputs, outputs, d_outputs);
    double worst = 0;
    std::string where;
    for (std::size_t g = 0; g < op.differentiable.size(); ++g) {
      const int k = op.differentiable[g];
      const std::size_t size = inputs[k].size();
      double scale = 1;
      for (double v : grads[g])
        scale = std::max(scale, std::abs(v));
      const std::size_t step = std::max<std::size_t>(1, size / 300);  // at most ~300 elements
      for (std::size_t e = 0; e < size; e += step) {
        Buffers plus = inputs, minus = inputs;
        const double h = 1e-6 * std::max(1.0, std::abs(inputs[k][e]));
        plus[k][e] += h;
        minus[k][e] -= h;
        const double numeric = (loss(plus) - loss(minus)) / (2 * h);
        const double ratio = std::abs(numeric - grads[g][e]) / (1e-6 * scale);
        if (ratio > worst) {
          worst = ratio;
          char text[200];
          std::snprintf(text, sizeof text, "d%s[%zu]: analytic %.10g, finite differences %.10g",
                        op.input_names[k].c_str(), e, grads[g][e], numeric);
          where = text;
        }
      }
    }
    char summary[64];
    std::snprintf(summary, sizeof summary, "error/(1e-6 max|grad|) %.3f", worst);
    tally.report(worst <= 1.0, "cpu64", op.name(), worst <= 1.0 ? summary : where);
  } catch (const std::exception& error) {
    tally.report(false, "cpu64", op.name(), std::string("threw: ") + error.what());
  }
}

}  // namespace

// The differentiable ops, forward and backward in float64 through the Cpu64 backend.
namespace {

using kept::ops::draw;

std::vector<GradCase> all_grad_cases() {
  std::vector<GradCase> cases;
  const std::int64_t rows = 5, cols = 7;
  for (const bool layer : {true, false}) {
    GradCase c{layer ? "layernorm" : "rmsnorm",
               "rows=5 cols=7",
               {"x", "weight", "bias"},
               layer ? std::vector<int>{0, 1, 2} : std::vector<int>{0, 1},
               layer ? std::vector<int>{1, 2} : std::vector<int>{1},
               {},
               {},
               {}};
    c.generate = [=](kept::Random& r, Buffers& in) {
      in = {draw(r, rows * cols, 1.0, 0.5), draw(r, cols, 0.3, 1.0), draw(r, cols, 0.3)};
    };
    c.forward = [=](kept::Cpu64& b, const Buffers& in) {
      Buffers out = {std::vector<double>(rows * cols), std::vector<double>(rows),
                     std::vector<double>(rows)};
      if (layer)
        b.layernorm_forward(in[0].data(), in[1].data(), in[2].data(), out[0].data(), out[1].data(),
                            out[2].data(), rows, cols, 1e-5);
      else
        b.rmsnorm_forward(in[0].data(), in[1].data(), out[0].data(), out[1].data(), rows, cols,
                          1e-5);
      if (!layer) out.pop_back();
      return out;
    };
    c.backward = [=](kept::Cpu64& b, const Buffers& in, const Buffers& out, const Buffers& dout) {
      Buffers g = {std::vector<double>(rows * cols), std::vector<double>(cols),
                   std::vector<double>(cols)};
      if (layer)
        b.layernorm_backward(dout[0].data(), in[0].data(), in[1].data(), out[1].data(),
                             out[2].data(), g[0].data(), g[1].data(), g[2].data(), rows, cols);
      else
        b.rmsnorm_backward(dout[0].data(), in[0].data(), in[1].data(), out[1].data(), g[0].data(),
                           g[1].data(), rows, cols);
      if (!layer) g.pop_back();
      return g;
    };
    cases.push_back(c);
  }
  {
    const std::int64_t batch = 2, seq = 5, heads = 2, dim = 4, count = batch * seq * heads * dim;
    GradCase c{"rope", "batch=2 seq=5 heads=2 head_dim=4", {"x"}, {0}, {}, {}, {}, {}};
    c.generate = [=](kept::Random& r, Buffers& in) { in = {draw(r, count, 1.0)}; };
    auto apply = [=](kept::Cpu64& b, std::vector<double> x, int direction) {
      const kept::Cpu64::RopeTable table(dim, 1e4, seq);
      b.rope(x.data(), batch, seq, heads, table, direction);
      return x;
    };
    c.forward = [=](kept::Cpu64& b, const Buffers& in) { return Buffers{apply(b, in[0], 1)}; };
    c.backward = [=](kept::Cpu64& b, const Buffers&, const Buffers&, const Buffers& dout) {
      return Buffers{apply(b, dout[0], -1)};
    };
    cases.push_back(c);
  }
  {
    const std::int64_t n = 40;
    GradCase c{"swiglu", "n=40", {"gate", "up"}, {0, 1}, {}, {}, {}, {}};
    c.generate = [=](kept::Random& r, Buffers& in) { in = {draw(r, n, 3.0), draw(r, n, 1.0)}; };
    c.forward = [=](kept::Cpu64& b, const Buffers& in) {
      Buffers out = {std::vector<double>(n)};
      b.swiglu_forward(in[0].data(), in[1].data(), out[0].data(), n);
      return out;
    };
    c.backward = [=](kept::Cpu64& b, const Buffers& in, const Buffers&, const Buffers& dout) {
      Buffers g = {std::vector<double>(n), std::vector<double>(n)};
      b.swiglu_backward(dout[0].data(), in[0].data(), in[1].data(), g[0].data(), g[1].data(), n);
      return g;
    };
    cases.push_back(c);
  }
  {
    const kept::AttentionShape shape{2, 6, 2, 4};
    const std::int64_t count = 2 * 6 * 2 * 4, lse = 2 * 2 * 6;
    GradCase c{
        "attention", "batch=2 seq=6 heads=2 head_dim=4", {"q", "k", "v"}, {0, 1, 2}, {1}, {}, {},
        {}};
    c.generate = [=](kept::Random& r, Buffers& in) {
      in = {draw(r, count, 1.0), draw(r, count, 1.0), draw(r, count, 1.0)};
    };
    c.forward = [=](kept::Cpu64& b, const Buffers& in) {
      Buffers out = {std::vector<double>(count), std::vector<double>(lse)};
      b.attention_forward(in[0].data(), in[1].data(), in[2].data(), out[0].data(), out[1].data(),
                          shape);
      return out;
    };
    c.backward = [=](kept::Cpu64& b, const Buffers& in, const Buffers& out, const Buffers& dout) {
      Buffers g(3, std::vector<double>(count, 0.0));
      b.attention_backward(dout[0].data(), in[0].data(), in[1].data(), in[2].data(), out[0].data(),
                           out[1].data(), g[0].data(), g[1].data(), g[2].data(), shape);
      return g;
    };
    cases.push_back(c);
  }
  {
    const std::int64_t count = 9, vocab = 5, dim = 3;
    const std::vector<std::int32_t> tokens = {0, 4, 2, 2, 1, 4, 0, 3, 2};
    GradCase c{"embedding", "count=9 vocab=5 dim=3", {"table"}, {0}, {}, {}, {}, {}};
    c.generate = [=](kept::Random& r, Buffers& in) { in = {draw(r, vocab * dim, 1.0)}; };
    c.forward = [=](kept::Cpu64& b, const Buffers& in) {
      Buffers out = {std::vector<double>(count * dim)};
      b.embedding_forward(tokens.data(), count, in[0].data(), vocab, dim, out[0].data());
      return out;
    };
    c.backward = [=](kept::Cpu64& b, const Buffers&, const Buffers&, const Buffers& dout) {
      Buffers g = {std::vector<double>(vocab * dim, 0.0)};
      b.embedding_backward(tokens.data(), count, dout[0].data(), dim, g[0].data());
      return g;
    };
    cases.push_back(c);
  }
  {
    // out = x + bias (row broadcast): add_bias forward, bias_backward for d_bias.
    const std::int64_t r = 4, n = 6;
    GradCase c{"add_bias", "rows=4 cols=6", {"x", "bias"}, {0, 1}, {}, {}, {}, {}};
    c.generate = [=](kept::Random& random, Buffers& in) {
      in = {draw(random, r * n, 1.0), draw(random, n, 1.0)};
    };
    c.forward = [=](kept::Cpu64& b, const Buffers& in) {
      Buffers out = {in[0]};
      b.add_bias(kept::MatrixView<double>(out[0].data(), r, n), in[1].data());
      return out;
    };
    c.backward = [=](kept::Cpu64& b, const Buffers&, const Buffers&, const Buffers& dout) {
      Buffers g = {dout[0], std::vector<double>(n, 0.0)};
      b.bias_backward(kept::MatrixView<const double>(dout[0].data(), r, n), g[1].data());
      return g;
    };
    cases.push_back(c);
  }
  {
    // y = x W^T (Linear's GEMM); backward dx = dy W, dW = dy^T x, both through gemm.
    const std::int64_t m = 5, k = 7, n = 3;
    GradCase c{"gemm", "m=5 k=7 n=3 (x W^T)", {"x", "w"}, {0, 1}, {}, {}, {}, {}};
    c.generate = [=](kept::Random& random, Buffers& in) {
      in = {draw(random, m * k, 1.0), draw(random, n * k, 1.0)};
    };
    using View = kept::MatrixView<double>;
    using Const = kept::MatrixView<const double>;
    c.forward = [=](kept::Cpu64& b, const Buffers& in) {
      Buffers out = {std::vector<double>(m * n)};
      b.gemm(Const(in[0].data(), m, k), kept::Transpose::No, Const(in[1].data(), n, k),
             kept::Transpose::Yes, View(out[0].data(), m, n));
      return out;
    };
    c.backward = [=](kept::Cpu64& b, const Buffers& in, const Buffers&, const Buffers& dout) {
      Buffers g = {std::vector<double>(m * k), std::vector<double>(n * k)};
      b.gemm(Const(dout[0].data(), m, n), kept::Transpose::No, Const(in[1].data(), n, k),
             kept::Transpose::No, View(g[0].data(), m, k));
      b.gemm(Const(dout[0].data(), m, n), kept::Transpose::Yes, Const(in[0].data(), m, k),
             kept::Transpose::No, View(g[1].data(), n, k));
      return g;
    };
    cases.push_back(c);
  }
  return cases;
}

}  // namespace

namespace kept::ops {
int run_bench(int argc, char** argv);  // tests/ops/ops_bench.cpp
}

int main(int argc, char** argv) {
  kept::cpu::use_openblas_kernels_for_this_cpu(argv);
  // --bench hands every other argument to the benchmark (its own options).
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--bench") {
      std::vector<char*> rest{argv[0]};
      for (int j = 1; j < argc; ++j)
        if (j != i) rest.push_back(argv[j]);
      return kept::ops::run_bench(static_cast<int>(rest.size()), rest.data());
    }
  bool list = false, grad = false;
  std::string filter;
  std::uint64_t seed = 2026;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--list")
      list = true;
    else if (arg == "--grad")
      grad = true;
    else if (arg == "--filter" && i + 1 < argc)
      filter = argv[++i];
    else if (arg == "--seed" && i + 1 < argc)
      seed = std::stoull(argv[++i]);
    else if (arg == "--inject" && i + 1 < argc)
      g_inject = argv[++i];
    else {
      std::fprintf(stderr,
                   "kept_ops: unknown argument '%s'\nusage: kept_ops [--list] [--grad] "
                   "[--filter TEXT] [--seed N] [--inject error|guard]\n",
                   arg.c_str());
      return 2;
    }
  }
  if (!g_inject.empty() && g_inject != "error" && g_inject != "guard") {
    std::fprintf(stderr, "kept_ops: --inject takes error or guard, not '%s'\n", g_inject.c_str());
    return 2;
  }
#if defined(KEPT_OPS_WITH_CUDA)
  // The CUDA backend runs where a device (or the emulator) is present; without one its cases
  // are skipped with a line saying why, unless KEPT_REQUIRE_CUDA=1 (scripts/device.sh).
  std::optional<kept::cuda::Cuda> cuda_context;
  if (!grad && !list) {
    const kept::cuda::DeviceProbe probe = kept::cuda::probe_devices();
    if (probe.count > 0) {
      cuda_context.emplace();
      g_cuda = &*cuda_context;
      std::printf("cuda: %s\n",
                  kept::cuda::kEmulated ? "emulated on the CPU (KEPT_CUDA_EMULATION)" : "device 0");
    } else {
      std::printf("cuda: skipped, no CUDA device (%s)\n", probe.describe().c_str());
      const char* require = std::getenv("KEPT_REQUIRE_CUDA");
      if (require && std::string(require) == "1") return 1;
    }
  }
#endif
  Tally tally;
  if (grad) {
    for (const GradCase& op : all_grad_cases()) {
      if (!filter.empty() && op.name().find(filter) == std::string::npos) continue;
      if (list)
        std::printf("%s cpu64 (grad)\n", op.name().c_str());
      else
        grad_check(op, seed, tally);
    }
  } else {
    for (const OpCase& op : kept::ops::all_op_cases()) {
      if (!filter.empty() && op.name().find(filter) == std::string::npos) continue;
      if (list) {
        for (const char* backend : {"cpu64", "cpu", "cpu-bf16"})
          std::printf("%s %s\n", op.name().c_str(), backend);
#if defined(KEPT_OPS_WITH_CUDA)
        std::printf("%s cuda\n%s cuda~bf16\n", op.name().c_str(), op.name().c_str());
#endif
        continue;
      }
      check_case(op, seed, tally);
    }
  }
  if (list) return 0;
  if (!g_inject.empty()) {
    // Expected: every fp32 case failed, every float64 case passed.
    const int float64_failed = tally.failed - tally.fp32_failed;
    const bool detected = tally.fp32_passed == 0 && tally.fp32_failed > 0 && float64_failed == 0;
    std::printf("injected %s: %d of %d fp32 cases caught, %d float64 cases failed: %s\n",
                g_inject.c_str(), tally.fp32_failed, tally.fp32_failed + tally.fp32_passed,
                float64_failed, detected ? "the harness works" : "THE HARNESS MISSED IT");
    std::printf("%d passed, %d failed\n", detected ? 1 : 0, detected ? 0 : 1);
    return detected ? 0 : 1;
  }
  std::printf("%d passed, %d failed\n", tally.passed, tally.failed);
  return tally.failed == 0 && tally.passed > 0 ? 0 : 1;
}
