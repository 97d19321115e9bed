// tests/ops/ops_bench.cpp: `kept_ops --bench`, the CPU backend's speed per op, beside this
// machine's limits and PyTorch CPU, all measured in the same run (formerly bench/bench_cpu_ops).
// See bench/README.md for what each number means.
//
// - Limits, measured first: a copy-bandwidth probe (memcpy of 256 MiB, far beyond the LLC, on
//   1 thread and split across all threads; best of N; read + write bytes) and OpenBLAS sgemm on
//   4096^3 (y = x w^T, the nn.Linear layout; best of N).
// - Ops, fp32, at tokens x hidden = 2048 x 1024, 1024 x 4096, 512 x 5120 (and attention at
//   batch x seq x heads x head_dim up to 1 x 2048 x 40 x 128): the GEMM of a linear layer,
//   LayerNorm and RMSNorm, attention (the causal kernel alone and the full layer with its
//   projections and RoPE), SwiGLU (the elementwise gate alone and the full MLP with its
//   projections), RoPE. Forward and backward. Warmup, then the median of several repetitions.
// - Memory-bound ops report GB/s over the bytes the op must read + write at minimum; GEMM-bound
//   ops report GFLOP/s. Each figure is shown as a percentage of the matching limit.
// - When torch is importable, bench_torch_ops.py (a child process for the whole run) times
//   each case in PyTorch CPU (same thread count, fp32) right after kept did, so both see the
//   same machine load, and the table shows kept/torch = torch time / kept time (> 1: kept is
//   faster).
//
// Usage: kept_ops --bench [--json PATH] [--filter SUBSTRINGS] [--quick] [--no-torch]
//                        [--python PATH] [--torch-script PATH] [--torch-cold-malloc]
#include <cblas.h>
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <dirent.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_common.hpp"
#include "kept/backend/cpu.hpp"
#include "kept/layers/attention.hpp"
#include "kept/layers/linear.hpp"
#include "kept/layers/swiglu.hpp"

#ifndef KEPT_BENCH_PYTHON
#define KEPT_BENCH_PYTHON "python3"
#endif
#ifndef KEPT_BENCH_TORCH_SCRIPT
#define KEPT_BENCH_TORCH_SCRIPT "bench_torch_ops.py"
#endif
#ifndef KEPT_BENCH_FLAGS
#define KEPT_BENCH_FLAGS ""
#endif

namespace {

using kept::Cpu;
using kept::MatrixView;
using kept::Tensor;
using kept::Transpose;
using json = nlohmann::json;
using namespace kept::bench;

// ---- options and timing ----------------------------------------------------------------------

struct Options {
  std::string json_path;
  std::string filter;
  std::string python = KEPT_BENCH_PYTHON;
  std::string torch_script = KEPT_BENCH_TORCH_SCRIPT;
  bool torch = true;
  bool torch_cold_malloc = false;  // --torch-cold-malloc: glibc's default malloc settings for torch
  bool quick = false;
  int min_reps = 5, max_reps = 25;
  double budget_s = 1.5;  // per case, after warmup
};

struct Timing {
  double median_ms = 0, min_ms = 0;
  int reps = 0;          // repetitions kept
  int discarded = 0;     // repetitions discarded as disturbed (see measure)
  bool noisy = false;    // too few undisturbed repetitions: all of them were used
  double cpu_share = 0;  // median over kept repetitions of cpu time / (wall time x threads)
};

// CPU time of each thread of this process, in seconds, read through the per-thread CPU-time
// clocks (Linux encodes the clock of thread `tid` as (~tid << 3) | 6: CPUCLOCK_SCHED and the
// per-thread flag). Unlike the process clock they include the time of a thread running right
// now on another core, to the nanosecond.
std::vector<std::pair<int, double>> thread_cpu_times() {
  std::vector<std::pair<int, double>> out;
  if (DIR* dir = ::opendir("/proc/self/task")) {
    while (const dirent* entry = ::readdir(dir)) {
      if (entry->d_name[0] == '.') continue;
      const int tid = std::atoi(entry->d_name);
      timespec ts{};
      const clockid_t clock = static_cast<clockid_t>((~tid) * 8 + 6);
      if (::clock_gettime(clock, &ts) == 0)
        out.emplace_back(tid,
                         static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec));
    }
    ::closedir(dir);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Share of `threads` cores this process had between two thread_cpu_times() snapshots taken
// `wall` seconds apart: the CPU time of its `threads` busiest threads / (threads x wall).
double cpu_share(const std::vector<std::pair<int, double>>& before,
                 const std::vector<std::pair<int, double>>& after, double wall, int threads) {
  std::vector<double> deltas;
  for (const auto& [tid, cpu] : after) {
    const auto it = std::lower_bound(before.begin(), before.end(), std::make_pair(tid, -1.0));
    deltas.push_back(it != before.end() && it->first == tid ? cpu - it->second : cpu);
  }
  std::sort(deltas.rbegin(), deltas.rend());
  double busy = 0;
  for (std::size_t i = 0; i < deltas.size() && i < static_cast<std::size_t>(threads); ++i)
    busy += deltas[i];
  return busy / (wall * threads);
}

// The machine is shared: another process running on one of the cores deschedules one of the
// OpenMP threads, and the others wait for it at the next barrier. Such a repetition shows in
// the threads' CPU time, which then falls short of wall time x threads (the threads of an
// OpenMP program keep running, or spinning, while they wait for each other otherwise).
// Repetitions with a CPU share below kMinCpuShare are discarded and redone; if fewer than
// min_reps undisturbed ones come within 4 x max_reps attempts, all are used and the timing is
// marked noisy. bench_torch_ops.py applies the same rule to torch's threads.
constexpr double kMinCpuShare = 0.97;

// Warmup (one call, two for calls under 50 ms), then repetitions until both min_reps and the
// time budget are reached (at most max_reps); the median and the minimum.
Timing measure(const Options& options, const std::function<void()>& fn) {
  double t0 = now_s();
  fn();
  double first = now_s() - t0;
  if (first < 0.05) fn();
  const int threads = omp_get_max_threads();
  std::vector<double> times, shares, all_times, all_shares;
  double spent = 0;
  int attempts = 0;
  while (static_cast<int>(times.size()) < options.max_reps &&
         (static_cast<int>(times.size()) < options.min_reps || spent < options.budget_s) &&
         attempts < 4 * options.max_reps) {
    ++attempts;
    const auto c0 = thread_cpu_times();
    t0 = now_s();
    fn();
    const double t = now_s() - t0;
    const double share = cpu_share(c0, thread_cpu_times(), t, threads);
    all_times.push_back(t);
    all_shares.push_back(share);
    if (share < kMinCpuShare) continue;
    times.push_back(t);
    shares.push_back(share);
    spent += t;
  }
  Timing timing;
  timing.discarded = static_cast<int>(all_times.size() - times.size());
  if (static_cast<int>(times.size()) < options.min_reps) {
    timing.noisy = true;
    times = all_times;
    shares = all_shares;
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  };
  timing.median_ms = 1e3 * median(times);
  timing.min_ms = 1e3 * *std::min_element(times.begin(), times.end());
  timing.reps = static_cast<int>(times.size());
  timing.cpu_share = median(shares);
  return timing;
}

// Deterministic values in [offset - scale, offset + scale).
void fill(float* data, std::int64_t count, std::uint32_t seed, float scale = 1.0f,
          float offset = 0.0f) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < count; ++i) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ (seed * 0x9e3779b9u);
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    data[i] = offset + scale * (static_cast<float>(h >> 8) * 0x1p-23f - 1.0f);
  }
}
Tensor random_tensor(const kept::Shape& shape, std::uint32_t seed, float scale = 1.0f,
                     float offset = 0.0f) {
  Tensor t = Tensor::empty(kept::DType::F32, shape);
  fill(t.data<float>(), t.numel(), seed, scale, offset);
  return t;
}
Tensor zeros(const kept::Shape& shape) {
  return Tensor::zeros(kept::DType::F32, shape);
}

// ---- cases -----------------------------------------------------------------------------------

enum class Unit { Bytes, Flops };

struct Case {
  std::string id;     // unique, e.g. "rmsnorm_bwd/1024x4096"
  std::string group;  // limit, gemm, norm, attention, swiglu, rope
  std::string op;     // e.g. "rmsnorm bwd"
  std::string shape;  // human-readable
  Unit unit = Unit::Bytes;
  double work = 0;  // bytes or FLOPs per call
  json params;      // what bench_torch_ops.py needs to rebuild the case
  Timing kept;
  Timing torch{std::numeric_limits<double>::quiet_NaN()};  // median_ms NaN: not measured
  double rate() const { return work / (kept.median_ms * 1e-3) / 1e9; }  // GB/s or GFLOP/s
};

Case make_case(std::string id, std::string group, std::string op, std::string shape, Unit unit,
               double work, json params) {
  Case c;
  c.id = std::move(id);
  c.group = std::move(group);
  c.op = std::move(op);
  c.shape = std::move(shape);
  c.unit = unit;
  c.work = work;
  c.params = std::move(params);
  return c;
}

// ---- torch -----------------------------------------------------------------------------------

// bench_torch_ops.py --serve as a child process, one JSON line per request and per answer, so
// each case runs in kept and then in torch right after it, under the same machine load.
class TorchWorker {
 public:
  // Starts the worker; on failure `status()` says why and `ready()` is false.
  TorchWorker(const std::string& python, const std::string& script, const Options& options) {
    int to_child[2], from_child[2];
    if (::pipe(to_child) != 0 || ::pipe(from_child) != 0) {
      status_ = "pipe() failed";
      return;
    }
    pid_ = ::fork();
    if (pid_ < 0) {
      status_ = "fork() failed";
      return;
    }
    if (pid_ == 0) {
      ::dup2(to_child[0], 0);
      ::dup2(from_child[1], 1);
      ::close(to_child[1]);
      ::close(from_child[0]);
      // torch allocates every op's output: with glibc's defaults each large tensor is a fresh
      // mmap that page-faults on every call (about 10x the op's time for elementwise ops
      // here). Keep freed memory in the heap instead (a warm allocator, as a caching
      // allocator or a training loop in steady state would have): the favourable setting.
      if (!options.torch_cold_malloc) {
        ::setenv("MALLOC_MMAP_MAX_", "0", 1);
        ::setenv("MALLOC_TRIM_THRESHOLD_", "1099511627776", 1);
      }
      const std::string threads = std::to_string(omp_get_max_threads());
      const std::string min_reps = std::to_string(options.min_reps);
      const std::string max_reps = std::to_string(options.max_reps);
      const std::string budget = std::to_string(options.budget_s);
      ::execl(python.c_str(), python.c_str(), script.c_str(), "--serve", "--threads",
              threads.c_str(), "--min-reps", min_reps.c_str(), "--max-reps", max_reps.c_str(),
              "--budget-s", budget.c_str(), static_cast<char*>(nullptr));
      std::fprintf(stderr, "bench_cpu_ops: cannot run %s: %s\n", python.c_str(),
                   std::strerror(errno));
      std::_Exit(127);
    }
    ::close(to_child[0]);
    ::close(from_child[1]);
    to_ = ::fdopen(to_child[1], "w");
    from_ = ::fdopen(from_child[0], "r");
    json hello;
    if (!read(hello)) {
      status_ = "the torch worker (" + python + " " + script + ") did not start";
      return;
    }
    if (hello.contains("error")) {
      status_ = hello["error"].get<std::string>();
      return;
    }
    info_ = hello["info"];
    status_ = "ok";
    ready_ = true;
  }
  TorchWorker(const TorchWorker&) = delete;
  TorchWorker& operator=(const TorchWorker&) = delete;
  ~TorchWorker() {
    if (to_) std::fclose(to_);
    if (from_) std::fclose(from_);
    if (pid_ > 0) ::waitpid(pid_, nullptr, 0);
  }
  bool ready() const { return ready_; }
  const std::string& status() const { return status_; }
  const json& info() const { return info_; }

  // The case's timing in torch; median_ms is NaN when it failed (the reason goes to stderr).
  Timing run(const std::string& id, const json& params) {
    Timing timing{std::nan("")};
    if (!ready_) return timing;
    const std::string line = json{{"id", id}, {"params", params}}.dump() + "\n";
    json answer;
    if (std::fputs(line.c_str(), to_) < 0 || std::fflush(to_) != 0 || !read(answer)) {
      ready_ = false;
      status_ = "the torch worker stopped";
      return timing;
    }
    if (answer.contains("error")) {
      std::fprintf(stderr, "torch %s: %s\n", id.c_str(),
                   answer["error"].get<std::string>().c_str());
      return timing;
    }
    timing.median_ms = answer["ms"].get<double>();
    timing.min_ms = answer["min_ms"].get<double>();
    timing.reps = answer["reps"].get<int>();
    timing.discarded = answer["discarded"].get<int>();
    timing.noisy = answer["noisy"].get<bool>();
    return timing;
  }

 private:
  bool read(json& out) {
    std::string line;
    int c;
    while ((c = std::fgetc(from_)) != EOF && c != '\n')
      line.push_back(static_cast<char>(c));
    if (line.empty()) return false;
    out = json::parse(line, nullptr, false);
    return !out.is_discarded();
  }
  pid_t pid_ = -1;
  std::FILE* to_ = nullptr;
  std::FILE* from_ = nullptr;
  bool ready_ = false;
  std::string status_ = "not started";
  json info_;
};

struct Bench {
  Options options;
  Cpu cpu;
  std::vector<Case> cases;
  double copy_gbs = 0;  // the limit: the best of the three probes below
  double copy_gbs_1t = 0, copy_gbs_threads = 0, copy_gbs_loop = 0, sgemm_gflops = 0;
  TorchWorker* torch = nullptr;

  // --filter is a comma-separated list of substrings; a case runs if its id contains one.
  bool wanted(const std::string& id) const {
    if (options.filter.empty()) return true;
    std::size_t begin = 0;
    while (begin <= options.filter.size()) {
      std::size_t end = options.filter.find(',', begin);
      if (end == std::string::npos) end = options.filter.size();
      const std::string part = options.filter.substr(begin, end - begin);
      if (!part.empty() && id.find(part) != std::string::npos) return true;
      begin = end + 1;
    }
    return false;
  }
  // Times the case in kept, then in torch. Cases under kRepeatBelowMs get a second round
  // (kept, torch) and keep, for each side, the lower of its two medians: a load spike from
  // another process then has to hit both rounds to show.
  static constexpr double kRepeatBelowMs = 200.0;
  // Two rounds of one case: the round with the lower median (a noisy round only if both are).
  static Timing merge_rounds(const Timing& a, const Timing& b) {
    if (std::isnan(a.median_ms)) return b;
    if (std::isnan(b.median_ms)) return a;
    if (a.noisy != b.noisy) return a.noisy ? b : a;
    Timing best = a.median_ms <= b.median_ms ? a : b;
    best.min_ms = std::min(a.min_ms, b.min_ms);
    best.discarded = a.discarded + b.discarded;
    return best;
  }
  void run(Case c, const std::function<void()>& fn) {
    if (!wanted(c.id)) return;
    std::fprintf(stderr, "  %-34s", c.id.c_str());
    c.kept = measure(options, fn);
    if (torch) c.torch = torch->run(c.id, c.params);
    if (!options.quick && c.kept.median_ms < kRepeatBelowMs) {
      const Timing again = measure(options, fn);
      c.kept = merge_rounds(c.kept, again);
      if (torch) c.torch = merge_rounds(c.torch, torch->run(c.id, c.params));
    }
    std::fprintf(stderr, " kept %9.3f ms (min %9.3f, %2d reps, %2d discarded%s)", c.kept.median_ms,
                 c.kept.min_ms, c.kept.reps, c.kept.discarded, c.kept.noisy ? ", NOISY" : "");
    if (torch)
      std::fprintf(stderr, "  torch %9.3f ms (%2d discarded%s)", c.torch.median_ms,
                   c.torch.discarded, c.torch.noisy ? ", NOISY" : "");
    std::fprintf(stderr, "\n");
    cases.push_back(std::move(c));
  }
};

std::string dims(std::initializer_list<std::int64_t> values) {
  std::string out;
  for (std::int64_t v : values) {
    if (!out.empty()) out.push_back('x');
    out.append(std::to_string(v));
  }
  return out;
}

// ---- limits ----------------------------------------------------------------------------------

// The copy probe; updates bench.copy_* with the best figures seen so far. It runs on three
// fresh pairs of buffers at the start and again at the end of the run: on this (virtual)
// machine the bandwidth a copy gets varies from one allocation to the next by up to 1.5x
// (where its pages land, the host's other tenants), so one probe can understate the limit.
void measure_copy_once(Bench& bench);
void measure_copy(Bench& bench) {
  for (int allocation = 0; allocation < 3; ++allocation)
    measure_copy_once(bench);
}
void measure_copy_once(Bench& bench) {
  const std::size_t bytes = std::size_t(256) << 20;
  std::unique_ptr<char[]> src(new char[bytes]), dst(new char[bytes]);
  std::memset(src.get(), 1, bytes);
  std::memset(dst.get(), 2, bytes);
  // Best (shortest) undisturbed repetition of each probe.
  Options probe_options = bench.options;
  probe_options.max_reps = std::max(probe_options.min_reps, 10);
  probe_options.budget_s = 0.3;
  auto best_of = [&](const std::function<void()>& fn) {
    return 1e-3 * measure(probe_options, fn).min_ms;
  };
  const double t1 = best_of([&] { std::memcpy(dst.get(), src.get(), bytes); });
  const double tn = best_of([&] { kept::bench::parallel_copy(dst.get(), src.get(), bytes); });
  // A plain copy loop (ordinary stores, which read each destination line before writing it;
  // glibc's memcpy uses non-temporal stores at this size): the pattern of most kernels.
  const std::int64_t floats = static_cast<std::int64_t>(bytes / sizeof(float));
  const float* source = reinterpret_cast<const float*>(src.get());
  float* destination = reinterpret_cast<float*>(dst.get());
  const double tl = best_of([&] {
#pragma omp parallel for simd schedule(static)
    for (std::int64_t i = 0; i < floats; ++i)
      destination[i] = source[i];
  });
  const double scale = 2.0 * static_cast<double>(bytes) / 1e9;
  bench.copy_gbs_1t = std::max(bench.copy_gbs_1t, scale / t1);
  bench.copy_gbs_threads = std::max(bench.copy_gbs_threads, scale / tn);
  bench.copy_gbs_loop = std::max(bench.copy_gbs_loop, scale / tl);
  bench.copy_gbs = std::max({bench.copy_gbs_1t, bench.copy_gbs_threads, bench.copy_gbs_loop});
  for (Case& c : bench.cases)
    if (c.id == "copy/256MiB") {
      c.kept.median_ms = c.kept.min_ms = c.work / bench.copy_gbs / 1e6;
    }
}

void measure_limits(Bench& bench) {
  const std::size_t bytes = std::size_t(256) << 20;
  measure_copy(bench);
  auto best_of = [&](const std::function<void()>& fn) {
    return 1e-3 * measure(bench.options, fn).min_ms;
  };

  const std::int64_t s = 4096;
  Tensor a = random_tensor({s, s}, 1), b = random_tensor({s, s}, 2), c = zeros({s, s});
  MatrixView<const float> av(a.data<float>(), s, s), bv(b.data<float>(), s, s);
  MatrixView<float> cv(c.data<float>(), s, s);
  auto gemm = [&] { kept::cpu::gemm<float>(av, Transpose::No, bv, Transpose::Yes, cv); };
  const double tg = best_of(gemm);
  bench.sgemm_gflops = 2.0 * s * s * s / tg / 1e9;

  // A limit row: measured here (best repetition), and in torch by its best repetition too (min,
  // not median).
  auto add_limit = [&](Case limit, double ms) {
    limit.kept.median_ms = ms;
    limit.kept.min_ms = ms;
    limit.kept.reps = bench.options.min_reps;
    if (bench.torch) {
      limit.torch = bench.torch->run(limit.id, limit.params);
      limit.torch.median_ms = limit.torch.min_ms;
    }
    bench.cases.push_back(limit);
  };
  const double copy_work = 2.0 * static_cast<double>(bytes);
  add_limit(make_case("copy/256MiB", "limit", "copy (best probe)", "256 MiB", Unit::Bytes,
                      copy_work, {{"kind", "copy"}, {"bytes", bytes}}),
            copy_work / bench.copy_gbs / 1e6);
  add_limit(make_case("sgemm/4096", "limit", "sgemm x w^T", "4096^3", Unit::Flops, 2.0 * s * s * s,
                      {{"kind", "sgemm"}, {"m", s}, {"n", s}, {"k", s}}),
            tg * 1e3);
}

// ---- ops -------------------------------------------------------------------------------------

struct TokenShape {
  std::int64_t tokens, hidden, intermediate;
};
// Llama-like MLP widths: 1024 -> 2816, 4096 -> 11008 (Llama-2 7B), 5120 -> 13824 (13B).
const std::vector<TokenShape> kTokenShapes = {
    {2048, 1024, 2816}, {1024, 4096, 11008}, {512, 5120, 13824}};

void bench_gemm(Bench& bench) {
  for (const TokenShape& ts : kTokenShapes) {
    const std::int64_t t = ts.tokens, h = ts.hidden;
    kept::Linear<Cpu> linear(bench.cpu, "linear", h, h, false);
    fill(linear.weight.value.data<float>(), h * h, 3, 0.02f);
    linear.weight.grad = zeros({h, h});
    Tensor x = random_tensor({t, h}, 4), y = zeros({t, h}), dy = random_tensor({t, h}, 5),
           dx = zeros({t, h});
    const std::string shape = dims({t, h, h});
    const json params = {{"kind", "linear"}, {"tokens", t}, {"in", h}, {"out", h}};
    Case fwd = make_case("linear_fwd/" + shape, "gemm", "linear fwd (x W^T)", shape, Unit::Flops,
                         2.0 * t * h * h, params);
    fwd.params["dir"] = "fwd";
    bench.run(fwd, [&] {
      linear.forward(bench.cpu, kept::as_matrix<const float>(x), kept::as_matrix<float>(y));
    });
    Case bwd = make_case("linear_bwd/" + shape, "gemm", "linear bwd (dx, dW)", shape, Unit::Flops,
                         4.0 * t * h * h, params);
    bwd.params["dir"] = "bwd";
    MatrixView<float> dxv = kept::as_matrix<float>(dx);
    bench.run(bwd, [&] {
      linear.backward(bench.cpu, kept::as_matrix<const float>(x), kept::as_matrix<const float>(dy),
                      &dxv);
    });
  }
}

void bench_norms(Bench& bench) {
  std::vector<TokenShape> shapes = kTokenShapes;
  shapes.push_back({4096, 5120, 0});  // 80 MiB a tensor: well beyond the LLC, DRAM-bound
  for (const TokenShape& ts : shapes) {
    const std::int64_t r = ts.tokens, c = ts.hidden;
    const double elems = static_cast<double>(r) * c, fr = 4.0 * r, fc = 4.0 * c;
    Tensor x = random_tensor({r, c}, 6, 1.0f, 0.3f), y = zeros({r, c});
    Tensor dy = random_tensor({r, c}, 7), dx = zeros({r, c});
    Tensor w = random_tensor({c}, 8, 0.2f, 1.0f), b = random_tensor({c}, 9, 0.1f);
    Tensor dw = zeros({c}), db = zeros({c}), mean = zeros({r}), rstd = zeros({r});
    const float eps = 1e-5f;
    const std::string shape = dims({r, c});
    const json params = {{"kind", "norm"}, {"rows", r}, {"cols", c}, {"eps", eps}};
    auto make = [&](const std::string& name, const std::string& dir, double bytes) {
      Case k = make_case(name + "_" + dir + "/" + shape, "norm", name + " " + dir, shape,
                         Unit::Bytes, bytes, params);
      k.params["norm"] = name;
      k.params["dir"] = dir;
      return k;
    };
    // Forward: read x, write y, read the parameters, write the row statistics.
    // Backward: read dy, x and dx, write dx (dx accumulates), read the weight and row
    // statistics, read and write the parameter gradients.
    bench.run(make("layernorm", "fwd", 8 * elems + 2 * fc + 2 * fr), [&] {
      kept::cpu::layernorm_forward<float>(x.data<float>(), w.data<float>(), b.data<float>(),
                                          y.data<float>(), mean.data<float>(), rstd.data<float>(),
                                          r, c, eps);
    });
    bench.run(make("layernorm", "bwd", 16 * elems + 5 * fc + 2 * fr), [&] {
      kept::cpu::layernorm_backward<float>(dy.data<float>(), x.data<float>(), w.data<float>(),
                                           mean.data<float>(), rstd.data<float>(), dx.data<float>(),
                                           dw.data<float>(), db.data<float>(), r, c);
    });
    bench.run(make("rmsnorm", "fwd", 8 * elems + fc + fr), [&] {
      kept::cpu::rmsnorm_forward<float>(x.data<float>(), w.data<float>(), y.data<float>(),
                                        rstd.data<float>(), r, c, eps);
    });
    bench.run(make("rmsnorm", "bwd", 16 * elems + 3 * fc + fr), [&] {
      kept::cpu::rmsnorm_backward<float>(dy.data<float>(), x.data<float>(), w.data<float>(),
                                         rstd.data<float>(), dx.data<float>(), dw.data<float>(), r,
                                         c);
    });
  }
}

struct AttnShape {
  std::int64_t batch, seq, heads, head_dim;
};

// Causal attention FLOPs: QK^T and PV over the visible (query, key) pairs, 2 FLOPs a MAC.
// Backward counts 2.5x the forward (five matrix products: S recomputed, dV, dP, dQ, dK).
double attention_flops(const AttnShape& s) {
  const double pairs = static_cast<double>(s.seq) * (s.seq + 1) / 2.0;
  return 4.0 * s.batch * s.heads * s.head_dim * pairs;
}

void bench_attention(Bench& bench) {
  const std::vector<AttnShape> shapes = {{4, 512, 8, 128},
                                         {2, 1024, 8, 128},
                                         {1, 2048, 8, 128},
                                         {1, 1024, 40, 128},
                                         {1, 2048, 40, 128}};
  for (const AttnShape& as : shapes) {
    const std::int64_t tokens = as.batch * as.seq, width = as.heads * as.head_dim;
    Tensor q = random_tensor({tokens, width}, 10), k = random_tensor({tokens, width}, 11),
           v = random_tensor({tokens, width}, 12), o = zeros({tokens, width}),
           d_o = random_tensor({tokens, width}, 13), dq = zeros({tokens, width}),
           dk = zeros({tokens, width}), dv = zeros({tokens, width}),
           lse = zeros({as.batch, as.heads, as.seq});
    const kept::AttentionShape shape{as.batch, as.seq, as.heads, as.head_dim};
    const std::string name = dims({as.batch, as.seq, as.heads, as.head_dim});
    const json params = {{"kind", "attention"},
                         {"batch", as.batch},
                         {"seq", as.seq},
                         {"heads", as.heads},
                         {"head_dim", as.head_dim}};
    const double flops = attention_flops(as);
    Case fwd = make_case("attention_fwd/" + name, "attention", "attention fwd (causal)", name,
                         Unit::Flops, flops, params);
    fwd.params["dir"] = "fwd";
    bench.run(fwd, [&] {
      kept::cpu::attention_forward<float>(q.data<float>(), k.data<float>(), v.data<float>(),
                                          o.data<float>(), lse.data<float>(), shape);
    });
    Case bwd = make_case("attention_bwd/" + name, "attention", "attention bwd (causal)", name,
                         Unit::Flops, 2.5 * flops, params);
    bwd.params["dir"] = "bwd";
    if (bench.wanted(bwd.id))
      kept::cpu::attention_forward<float>(q.data<float>(), k.data<float>(), v.data<float>(),
                                          o.data<float>(), lse.data<float>(), shape);
    bench.run(bwd, [&] {
      kept::cpu::attention_backward<float>(
          d_o.data<float>(), q.data<float>(), k.data<float>(), v.data<float>(), o.data<float>(),
          lse.data<float>(), dq.data<float>(), dk.data<float>(), dv.data<float>(), shape);
    });
  }
}

void bench_attention_layer(Bench& bench) {
  for (const TokenShape& ts : kTokenShapes) {
    const std::int64_t t = ts.tokens, h = ts.hidden, head_dim = 128, heads = h / head_dim;
    const std::int64_t batch = 1, seq = t;
    kept::Attention<kept::MHA, Cpu> attn(bench.cpu, "attn", h, heads, false);
    std::uint32_t seed = 20;
    for (auto* proj : {&attn.q_proj, &attn.k_proj, &attn.v_proj, &attn.o_proj}) {
      fill(proj->weight.value.data<float>(), h * h, seed++, 0.02f);
      proj->weight.grad = zeros({h, h});
    }
    const Cpu::RopeTable rope(head_dim, 10000.0, seq);
    Tensor x = random_tensor({t, h}, 30), y = zeros({t, h}), dy = random_tensor({t, h}, 31),
           dx = zeros({t, h});
    Tensor scratch[4];
    decltype(attn)::Cache cache;
    const std::string shape = dims({t, h});
    const AttnShape as{batch, seq, heads, head_dim};
    const double proj = 2.0 * t * h * h;
    const json params = {
        {"kind", "attention_layer"}, {"batch", batch},  {"seq", seq}, {"heads", heads},
        {"head_dim", head_dim},      {"theta", 10000.0}};
    Case fwd = make_case("attention_layer_fwd/" + shape, "attention", "attention layer fwd", shape,
                         Unit::Flops, 4 * proj + attention_flops(as), params);
    fwd.params["dir"] = "fwd";
    bench.run(fwd, [&] {
      attn.forward(bench.cpu, kept::as_matrix<const float>(x), batch, seq, rope,
                   kept::as_matrix<float>(y), cache);
    });
    Case bwd = make_case("attention_layer_bwd/" + shape, "attention", "attention layer bwd", shape,
                         Unit::Flops, 8 * proj + 2.5 * attention_flops(as), params);
    bwd.params["dir"] = "bwd";
    if (bench.wanted(bwd.id))
      attn.forward(bench.cpu, kept::as_matrix<const float>(x), batch, seq, rope,
                   kept::as_matrix<float>(y), cache);
    bench.run(bwd, [&] {
      attn.backward(bench.cpu, kept::as_matrix<const float>(x), batch, seq, rope,
                    kept::as_matrix<const float>(dy), kept::as_matrix<float>(dx), cache, scratch);
    });
  }
}

void bench_swiglu(Bench& bench) {
  for (const TokenShape& ts : kTokenShapes) {
    const std::int64_t t = ts.tokens, h = ts.hidden, inter = ts.intermediate;
    const std::int64_t n = t * inter;
    {
      Tensor g = random_tensor({t, inter}, 40, 4.0f), u = random_tensor({t, inter}, 41),
             out = zeros({t, inter}), dout = random_tensor({t, inter}, 42), dg = zeros({t, inter}),
             du = zeros({t, inter});
      const std::string shape = dims({t, inter});
      const json params = {{"kind", "swiglu"}, {"rows", t}, {"cols", inter}};
      Case fwd = make_case("swiglu_fwd/" + shape, "swiglu", "swiglu fwd (silu(g)*u)", shape,
                           Unit::Bytes, 12.0 * n, params);
      fwd.params["dir"] = "fwd";
      bench.run(fwd, [&] {
        kept::cpu::swiglu_forward<float>(g.data<float>(), u.data<float>(), out.data<float>(), n);
      });
      Case bwd = make_case("swiglu_bwd/" + shape, "swiglu", "swiglu bwd (dg, du)", shape,
                           Unit::Bytes, 20.0 * n, params);
      bwd.params["dir"] = "bwd";
      bench.run(bwd, [&] {
        kept::cpu::swiglu_backward<float>(dout.data<float>(), g.data<float>(), u.data<float>(),
                                          dg.data<float>(), du.data<float>(), n);
      });
    }
    {
      kept::SwiGLU<Cpu> mlp(bench.cpu, "mlp", h, inter, false);
      std::uint32_t seed = 50;
      for (auto* proj : {&mlp.gate_proj, &mlp.up_proj, &mlp.down_proj}) {
        fill(proj->weight.value.data<float>(), h * inter, seed++, 0.02f);
        proj->weight.grad = zeros(proj->weight.value.shape());
      }
      Tensor x = random_tensor({t, h}, 60), y = zeros({t, h}), dy = random_tensor({t, h}, 61),
             dx = zeros({t, h});
      Tensor scratch[3];
      decltype(mlp)::Cache cache;
      const std::string shape = dims({t, h, inter});
      const json params = {
          {"kind", "swiglu_layer"}, {"tokens", t}, {"hidden", h}, {"intermediate", inter}};
      const double proj = 2.0 * t * h * inter;
      Case fwd = make_case("swiglu_layer_fwd/" + shape, "swiglu", "swiglu MLP fwd", shape,
                           Unit::Flops, 3 * proj, params);
      fwd.params["dir"] = "fwd";
      bench.run(fwd, [&] {
        mlp.forward(bench.cpu, kept::as_matrix<const float>(x), kept::as_matrix<float>(y), cache);
      });
      Case bwd = make_case("swiglu_layer_bwd/" + shape, "swiglu", "swiglu MLP bwd", shape,
                           Unit::Flops, 6 * proj, params);
      bwd.params["dir"] = "bwd";
      if (bench.wanted(bwd.id))
        mlp.forward(bench.cpu, kept::as_matrix<const float>(x), kept::as_matrix<float>(y), cache);
      bench.run(bwd, [&] {
        mlp.backward(bench.cpu, kept::as_matrix<const float>(x), kept::as_matrix<const float>(dy),
                     kept::as_matrix<float>(dx), cache, scratch);
      });
    }
  }
}

void bench_rope(Bench& bench) {
  for (const TokenShape& ts : kTokenShapes) {
    const std::int64_t t = ts.tokens, h = ts.hidden, head_dim = 128, heads = h / head_dim;
    const Cpu::RopeTable table(head_dim, 10000.0, t);
    Tensor q = random_tensor({t, h}, 70);
    const std::string shape = dims({t, h});
    // Read and write q; read the cos and sin tables once.
    const double bytes = 8.0 * t * h + 2.0 * 4.0 * t * (head_dim / 2);
    Case fwd{"rope_fwd/" + shape,
             "rope",
             "rope (q, in place)",
             shape,
             Unit::Bytes,
             bytes,
             {{"kind", "rope"},
              {"tokens", t},
              {"heads", heads},
              {"head_dim", head_dim},
              {"theta", 10000.0},
              {"dir", "fwd"}},
             {},
             std::nan("")};
    bench.run(fwd, [&] { kept::cpu::rope_apply<float>(q.data<float>(), 1, t, heads, table, +1); });
  }
}

// ---- report ----------------------------------------------------------------------------------

std::string mem_total() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("MemTotal", 0) == 0) {
      std::istringstream fields(line.substr(9));
      double kib = 0;
      fields >> kib;
      char buffer[32];
      std::snprintf(buffer, sizeof buffer, "%.1f GiB", kib / 1024 / 1024);
      return buffer;
    }
  return "unknown";
}

void print_table(const Bench& bench) {
  std::printf("\n%-24s %-16s %10s %10s %7s %10s %9s\n", "op", "shape", "kept ms", "rate", "%limit",
              "torch ms", "kept/torch");
  std::printf(
      "(ms: median; rate: kept's GB/s or GFLOP/s; %%limit: of the copy or sgemm limit; "
      "kept/torch > 1: kept is faster; *: noisy, too few undisturbed repetitions)\n");
  std::string group;
  for (const Case& c : bench.cases) {
    if (c.group != group) {
      group = c.group;
      std::printf("%s\n", std::string(93, '-').c_str());
    }
    const double limit = c.unit == Unit::Bytes ? bench.copy_gbs : bench.sgemm_gflops;
    char rate[32], ratio[32], torch_ms[32];
    std::snprintf(rate, sizeof rate, "%.1f %s", c.rate(), c.unit == Unit::Bytes ? "GB/s" : "GF/s");
    if (std::isnan(c.torch.median_ms)) {
      std::snprintf(torch_ms, sizeof torch_ms, "-");
      std::snprintf(ratio, sizeof ratio, "-");
    } else {
      std::snprintf(torch_ms, sizeof torch_ms, "%.3f%s", c.torch.median_ms,
                    c.torch.noisy ? "*" : "");
      std::snprintf(ratio, sizeof ratio, "%.2f", c.torch.median_ms / c.kept.median_ms);
    }
    char kept_ms[32];
    std::snprintf(kept_ms, sizeof kept_ms, "%.3f%s", c.kept.median_ms, c.kept.noisy ? "*" : "");
    std::printf("%-24s %-16s %10s %10s %6.0f%% %10s %9s\n", c.op.c_str(), c.shape.c_str(), kept_ms,
                rate, 100.0 * c.rate() / limit, torch_ms, ratio);
  }
}

json to_json(const Bench& bench, const json& info) {
  json out = info;
  out["limits"] = {{"copy_gbs", bench.copy_gbs},
                   {"copy_gbs_memcpy_1thread", bench.copy_gbs_1t},
                   {"copy_gbs_memcpy_threads", bench.copy_gbs_threads},
                   {"copy_gbs_loop_threads", bench.copy_gbs_loop},
                   {"sgemm_gflops", bench.sgemm_gflops}};
  json cases = json::array();
  for (const Case& c : bench.cases) {
    const bool bytes = c.unit == Unit::Bytes;
    const double limit = bytes ? bench.copy_gbs : bench.sgemm_gflops;
    json j = {{"id", c.id},
              {"group", c.group},
              {"op", c.op},
              {"shape", c.shape},
              {"unit", bytes ? "GB/s" : "GFLOP/s"},
              {bytes ? "bytes" : "flops", c.work},
              {"kept_ms", c.kept.median_ms},
              {"kept_min_ms", c.kept.min_ms},
              {"rate", c.rate()},
              {"fraction_of_limit", c.rate() / limit},
              {"params", c.params}};
    j["kept_reps"] = c.kept.reps;
    j["kept_discarded"] = c.kept.discarded;
    j["kept_noisy"] = c.kept.noisy;
    if (!std::isnan(c.torch.median_ms)) {
      j["torch_ms"] = c.torch.median_ms;
      j["torch_min_ms"] = c.torch.min_ms;
      j["torch_reps"] = c.torch.reps;
      j["torch_discarded"] = c.torch.discarded;
      j["torch_noisy"] = c.torch.noisy;
      j["kept_over_torch"] = c.torch.median_ms / c.kept.median_ms;
    } else {
      j["torch_ms"] = nullptr;
      j["kept_over_torch"] = nullptr;
    }
    cases.push_back(j);
  }
  out["cases"] = cases;
  return out;
}

int usage(const char* argv0) {
  return kept::bench::usage(
      argv0,
      "--bench [--json PATH] [--filter SUBSTRINGS] [--quick] [--no-torch]\n"
      "          [--python PATH] [--torch-script PATH] [--torch-cold-malloc]");
}

}  // namespace

namespace kept::ops {
// argv[0] is the program; the arguments after --bench follow.
int run_bench(int argc, char** argv);
}  // namespace kept::ops

int kept::ops::run_bench(int argc, char** argv) {
  Bench bench;
  Options& options = bench.options;
  if (const char* python = std::getenv("KEPT_PYTHON"); python && *python) options.python = python;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", arg.c_str());
        std::exit(usage(argv[0]));
      }
      return argv[++i];
    };
    if (arg == "--json")
      options.json_path = value();
    else if (arg == "--filter")
      options.filter = value();
    else if (arg == "--python")
      options.python = value();
    else if (arg == "--torch-script")
      options.torch_script = value();
    else if (arg == "--no-torch")
      options.torch = false;
    else if (arg == "--torch-cold-malloc")
      options.torch_cold_malloc = true;
    else if (arg == "--quick")
      options.quick = true;
    else if (arg == "-h" || arg == "--help")
      return usage(argv[0]), 0;
    else
      return usage(argv[0]);
  }
  if (options.quick) {
    options.min_reps = 2;
    options.max_reps = 3;
    options.budget_s = 0.0;
  }
  try {
    json info;
    info["date_utc"] = kept::bench::date_utc();
    info["cpu"] = cpu_model();
    info["threads"] = omp_get_max_threads();
    info["memory"] = mem_total();
    info["compiler"] = "g++ " __VERSION__;
    info["flags"] = std::string(KEPT_BENCH_FLAGS)
#ifdef KEPT_BENCH_NATIVE
                    + " -mavx2 -mfma"
#endif
        ;
    info["openblas"] = std::string(openblas_get_config()) + " core=" + openblas_get_corename();
    info["loadavg_start"] = read_first_line("/proc/loadavg");
    std::printf("kept_ops --bench: %s, %d threads, %s\n", info["cpu"].get<std::string>().c_str(),
                omp_get_max_threads(), info["memory"].get<std::string>().c_str());
    std::printf("compiler: %s, flags: %s\nOpenBLAS: %s\nload average at start: %s\n",
                info["compiler"].get<std::string>().c_str(),
                info["flags"].get<std::string>().c_str(),
                info["openblas"].get<std::string>().c_str(),
                info["loadavg_start"].get<std::string>().c_str());
    std::fflush(stdout);

    std::unique_ptr<TorchWorker> torch;
    std::string torch_status = "disabled (--no-torch)";
    if (options.torch) {
      torch = std::make_unique<TorchWorker>(options.python, options.torch_script, options);
      torch_status = torch->status();
      if (torch->ready()) bench.torch = torch.get();
      std::fprintf(stderr, "torch: %s\n", torch_status.c_str());
    }
    std::fprintf(stderr, "limits...\n");
    measure_limits(bench);
    std::fprintf(stderr, "ops (kept, then torch on the same case):\n");
    bench_gemm(bench);
    bench_norms(bench);
    bench_rope(bench);
    bench_swiglu(bench);
    bench_attention(bench);
    info["loadavg_middle"] = read_first_line("/proc/loadavg");
    bench_attention_layer(bench);
    std::fprintf(stderr, "copy probe again...\n");
    measure_copy(bench);
    json torch_info;
    if (torch) {
      torch_status = torch->status();
      torch_info = torch->info();
      torch.reset();
    }
    info["torch"] = torch_info;
    info["torch_status"] = torch_status;
    info["torch_malloc"] = options.torch_cold_malloc
                               ? "glibc defaults"
                               : "MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1TiB (warm heap)";
    info["loadavg_end"] = read_first_line("/proc/loadavg");

    std::printf(
        "limits: copy %.1f GB/s read+write (best of: memcpy 1 thread %.1f, memcpy %d threads "
        "%.1f, copy loop %d threads %.1f); sgemm %.1f GFLOP/s\n",
        bench.copy_gbs, bench.copy_gbs_1t, omp_get_max_threads(), bench.copy_gbs_threads,
        omp_get_max_threads(), bench.copy_gbs_loop, bench.sgemm_gflops);
    std::printf("torch: %s%s\n", torch_status.c_str(),
                torch_info.is_object() && torch_info.contains("version")
                    ? (" (torch " + torch_info["version"].get<std::string>() + ")").c_str()
                    : "");
    print_table(bench);
    std::printf("\nload average (/proc/loadavg): start %s | middle %s | end %s\n",
                info["loadavg_start"].get<std::string>().c_str(),
                info["loadavg_middle"].get<std::string>().c_str(),
                info["loadavg_end"].get<std::string>().c_str());
    if (!options.json_path.empty()) {
      std::ofstream(options.json_path) << to_json(bench, info).dump(2) << "\n";
      std::printf("wrote %s\n", options.json_path.c_str());
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_cpu_ops: %s\n", error.what());
    return 1;
  }
  return 0;
}
