// bench/bench_opm.cpp: OPM solver throughput (kept/opm.hpp), beside this machine's copy
// bandwidth measured in the same run.
//
// For hidden sizes 1024, 4096 and 5120 (--dims): fp32 pre-norm activations in batches of 512
// tokens (--batch), one OpmAccumulator (a single norm site), add() called on a rotating pool of
// distinct batches (--pool; by default enough for >= 64 MiB, e.g. 8 batches = 84 MB at 5120,
// beyond the last-level cache, so the activations come from memory as they would from a
// calibration forward), for at least
// --seconds per size after one warmup batch; then solve(g, b) (median of several). Reported:
// tokens/s of add() (from the median batch time, and overall: all tokens / all time, which a
// loaded machine drags down through OpenMP barrier stalls), the effective read bandwidth of add()
// (activation bytes / time: each activation is read once from memory; add() makes three passes over
// a row, two of them from cache), fp64 GFLOP/s (~17 flops per element: 6 for the row statistics, 11
// for the five sums), and solve() milliseconds. The copy probe is a 256 MiB memcpy, best of 5, read
// + write bytes, on 1 thread and split across all threads (as kept_ops --bench measures it).
//
// The activations are realistic in the ways OPM cares about: unit-scale Gaussian-like values,
// a per-token mean offset (so mu_t != 0) and a few "massive activation" coordinates.
//
// Usage: bench_opm [--dims 1024,4096,5120] [--batch 512] [--pool N] [--seconds 2]
//                  [--threads N] [--json PATH]
#include <omp.h>

#include <algorithm>
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
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "kept/core/random.hpp"
#include "kept/opm.hpp"

#ifndef KEPT_BENCH_FLAGS
#define KEPT_BENCH_FLAGS ""
#endif

namespace {

using json = nlohmann::json;
using namespace kept::bench;
using Clock = std::chrono::steady_clock;

struct Options {
  std::vector<std::int64_t> dims{1024, 4096, 5120};
  std::int64_t batch = 512;
  std::int64_t pool = 0;  // 0: enough distinct batches for >= 64 MiB (at least 4)
  double seconds = 2.0;
  int threads = 0;  // 0: OpenMP's default
  std::string json_path;
};

double uniform01(std::uint64_t bits) {
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// [tokens, dim] fp32: sum of 4 uniforms (roughly Gaussian, std 1), a per-token offset, and
// massive activations (x40) in a handful of fixed coordinates.
std::vector<float> activations(std::int64_t tokens, std::int64_t dim, std::uint64_t seed) {
  std::vector<float> x(static_cast<std::size_t>(tokens * dim));
  const std::int64_t massive[] = {7, dim / 3, dim - 5};
#pragma omp parallel for schedule(static)
  for (std::int64_t t = 0; t < tokens; ++t) {
    const double offset = 0.5 * (uniform01(kept::Random::hash(seed ^ (0xabcdull + t))) - 0.5);
    for (std::int64_t i = 0; i < dim; ++i) {
      const std::uint64_t k = seed + static_cast<std::uint64_t>(t * dim + i) * 4;
      double v = 0;
      for (int j = 0; j < 4; ++j)
        v += uniform01(kept::Random::hash(k + j)) - 0.5;
      v = v * std::sqrt(3.0) + offset;
      for (std::int64_t m : massive)
        if (i == m) v *= 40.0;
      x[static_cast<std::size_t>(t * dim + i)] = static_cast<float>(v);
    }
  }
  return x;
}

struct CopyProbe {
  double gbs_1t = 0;   // read + write, 1 thread
  double gbs_all = 0;  // read + write, all threads
};

CopyProbe copy_probe() {
  const std::size_t bytes = std::size_t(256) << 20;
  std::unique_ptr<char[]> src(new char[bytes]), dst(new char[bytes]);
  std::memset(src.get(), 1, bytes);
  std::memset(dst.get(), 2, bytes);
  auto best_of = [](int n, const std::function<void()>& fn) {
    double best = 1e30;
    for (int i = 0; i < n; ++i) {
      const double t0 = now_s();
      fn();
      best = std::min(best, now_s() - t0);
    }
    return best;
  };
  const double t1 = best_of(5, [&] { std::memcpy(dst.get(), src.get(), bytes); });
  const double tn = best_of(5, [&] { kept::bench::parallel_copy(dst.get(), src.get(), bytes); });
  CopyProbe probe;
  probe.gbs_1t = 2.0 * static_cast<double>(bytes) / t1 / 1e9;
  probe.gbs_all = 2.0 * static_cast<double>(bytes) / tn / 1e9;
  return probe;
}

struct DimResult {
  std::int64_t dim = 0;
  std::int64_t batches = 0;
  std::int64_t pool = 0;  // distinct batches cycled through
  double add_median_ms = 0, add_min_ms = 0, add_mean_ms = 0;
  double tokens_per_s = 0;          // from the median batch time
  double tokens_per_s_overall = 0;  // all timed tokens / all timed wall time (stalls included)
  double read_gbs = 0;              // activation bytes / median batch time
  double gflops = 0;                // fp64, ~17 flops per element, median batch time
  double solve_ms = 0;              // median
  double rel_err_paper = 0, rel_err_calibrated = 0;  // sanity: the solve did something
  std::string load_before, load_after;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

DimResult bench_dim(const Options& options, std::int64_t dim) {
  DimResult result;
  result.dim = dim;
  const std::int64_t batch_bytes = options.batch * dim * static_cast<std::int64_t>(sizeof(float));
  const std::int64_t pool_size =
      options.pool > 0 ? options.pool
                       : std::max<std::int64_t>(4, ((64ll << 20) + batch_bytes - 1) / batch_bytes);
  result.pool = pool_size;
  std::vector<std::vector<float>> pool;
  for (std::int64_t p = 0; p < pool_size; ++p)
    pool.push_back(activations(options.batch, dim, 0x0b5e55edull * (p + 1) + dim));
  auto view = [&](std::int64_t i) {
    const std::vector<float>& x = pool[static_cast<std::size_t>(i % pool_size)];
    return kept::MatrixView<const float>(x.data(), options.batch, dim, dim);
  };
  kept::OpmAccumulator accumulator(dim, 1e-5);
  accumulator.add(view(0));  // warmup (page faults of the sums, OpenMP pool)

  result.load_before = loadavg();
  std::vector<double> times;
  const double start = now_s();
  std::int64_t i = 1;
  while (now_s() - start < options.seconds || times.size() < 5) {
    const double t0 = now_s();
    accumulator.add(view(i++));
    times.push_back(now_s() - t0);
  }
  const double total = now_s() - start;
  result.load_after = loadavg();
  result.batches = static_cast<std::int64_t>(times.size());
  result.add_median_ms = median(times) * 1e3;
  result.add_min_ms = *std::min_element(times.begin(), times.end()) * 1e3;
  result.add_mean_ms = total / static_cast<double>(times.size()) * 1e3;
  const double tokens = static_cast<double>(options.batch);
  const double batch_s = result.add_median_ms / 1e3;
  result.tokens_per_s = tokens / batch_s;
  result.tokens_per_s_overall = static_cast<double>(result.batches) * tokens / total;
  result.read_gbs = tokens * static_cast<double>(dim) * sizeof(float) / batch_s / 1e9;
  result.gflops = 17.0 * tokens * static_cast<double>(dim) / batch_s / 1e9;

  std::vector<double> g(static_cast<std::size_t>(dim)), b(static_cast<std::size_t>(dim));
  for (std::int64_t k = 0; k < dim; ++k) {
    g[static_cast<std::size_t>(k)] = 1.0 + 0.2 * (uniform01(kept::Random::hash(k)) - 0.5);
    b[static_cast<std::size_t>(k)] = 0.1 * (uniform01(kept::Random::hash(~k)) - 0.5);
  }
  std::vector<double> solve_times;
  kept::OpmSolution solution;
  for (int rep = 0; rep < 7; ++rep) {
    const double t0 = now_s();
    solution = accumulator.solve(g, b);
    solve_times.push_back(now_s() - t0);
  }
  result.solve_ms = median(solve_times) * 1e3;
  result.rel_err_paper = solution.rel_err_paper;
  result.rel_err_calibrated = solution.rel_err_calibrated;
  return result;
}

std::vector<std::int64_t> parse_dims(const std::string& text) {
  std::vector<std::int64_t> dims;
  for (const std::string& part : split_commas(text))
    dims.push_back(std::stoll(part));
  return dims;
}

int usage(const char* argv0) {
  return kept::bench::usage(argv0,
                            "[--dims 1024,4096,5120] [--batch 512] [--pool N] [--seconds 2]\n"
                            "          [--threads N] [--json PATH]");
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) std::exit(usage(argv[0]));
      return argv[++i];
    };
    if (arg == "--dims")
      options.dims = parse_dims(value());
    else if (arg == "--batch")
      options.batch = std::stoll(value());
    else if (arg == "--pool")
      options.pool = std::stoll(value());
    else if (arg == "--seconds")
      options.seconds = std::stod(value());
    else if (arg == "--threads")
      options.threads = std::stoi(value());
    else if (arg == "--json")
      options.json_path = value();
    else if (arg == "-h" || arg == "--help")
      return usage(argv[0]), 0;
    else
      return usage(argv[0]);
  }
  if (options.batch < 1 || options.pool < 0 || options.dims.empty()) return usage(argv[0]);
  if (options.threads > 0) omp_set_num_threads(options.threads);
  try {
    json info;
    info["benchmark"] = "bench_opm";
    info["date_utc"] = kept::bench::date_utc();
    info["cpu"] = cpu_model();
    info["threads"] = omp_get_max_threads();
    info["compiler"] = "g++ " __VERSION__;
    info["flags"] = KEPT_BENCH_FLAGS;
    info["batch_tokens"] = options.batch;
    info["loadavg_start"] = loadavg();
    std::printf("kept bench_opm: %s, %d threads, batches of %lld fp32 tokens, load %s\n",
                info["cpu"].get<std::string>().c_str(), omp_get_max_threads(),
                static_cast<long long>(options.batch),
                info["loadavg_start"].get<std::string>().c_str());
    std::fflush(stdout);
    const CopyProbe copy = copy_probe();
    std::printf(
        "copy probe (memcpy 256 MiB, read+write): %.1f GB/s on %d threads, %.1f GB/s on "
        "1 thread\n",
        copy.gbs_all, omp_get_max_threads(), copy.gbs_1t);
    info["copy_gbs"] = copy.gbs_all;
    info["copy_gbs_1thread"] = copy.gbs_1t;

    std::vector<DimResult> results;
    for (std::int64_t dim : options.dims) {
      std::fprintf(stderr, "dim %lld...\n", static_cast<long long>(dim));
      results.push_back(bench_dim(options, dim));
    }
    info["loadavg_end"] = loadavg();

    std::printf("\n%6s %7s %11s %11s %10s %10s %9s %7s %9s %8s %s\n", "dim", "batches",
                "add ms med", "add ms mean", "tokens/s", "tok/s all", "read GB/s", "% copy",
                "fp64 GF/s", "solve ms", "load before / after");
    json sizes = json::array();
    for (const DimResult& r : results) {
      std::printf("%6lld %7lld %11.3f %11.3f %10.0f %10.0f %9.2f %6.1f%% %9.2f %8.3f %s / %s\n",
                  static_cast<long long>(r.dim), static_cast<long long>(r.batches), r.add_median_ms,
                  r.add_mean_ms, r.tokens_per_s, r.tokens_per_s_overall, r.read_gbs,
                  100 * r.read_gbs / copy.gbs_all, r.gflops, r.solve_ms, r.load_before.c_str(),
                  r.load_after.c_str());
      sizes.push_back({{"dim", r.dim},
                       {"batches", r.batches},
                       {"pool_batches", r.pool},
                       {"add_median_ms", r.add_median_ms},
                       {"add_min_ms", r.add_min_ms},
                       {"add_mean_ms", r.add_mean_ms},
                       {"tokens_per_s", r.tokens_per_s},
                       {"tokens_per_s_overall", r.tokens_per_s_overall},
                       {"read_gb_per_s", r.read_gbs},
                       {"read_over_copy", r.read_gbs / copy.gbs_all},
                       {"fp64_gflops", r.gflops},
                       {"solve_median_ms", r.solve_ms},
                       {"rel_err_paper", r.rel_err_paper},
                       {"rel_err_calibrated", r.rel_err_calibrated},
                       {"loadavg_before", r.load_before},
                       {"loadavg_after", r.load_after}});
    }
    info["sizes"] = sizes;
    std::printf(
        "\ntokens/s = batch tokens / median add() time (one site); tok/s all = all timed "
        "tokens / all timed wall time (includes stalls when the machine is loaded: OpenMP "
        "barriers wait for a descheduled thread); read GB/s = fp32 activation bytes / "
        "median add() time; %% copy = read GB/s over the copy probe's read+write GB/s; "
        "fp64 GF/s at ~17 flops per element. solve ms = median solve(g, b) with all "
        "diagnostics. Load average at end: %s\n",
        info["loadavg_end"].get<std::string>().c_str());
    if (!options.json_path.empty()) {
      std::ofstream(options.json_path) << info.dump(2) << "\n";
      std::printf("wrote %s\n", options.json_path.c_str());
    }
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_opm: %s\n", error.what());
    return 1;
  }
  return 0;
}
