// bench/bench_convert.cpp: conversion throughput and peak memory (RSS) of `kept convert` on
// a checkpoint with Orion-14B's exact tensor shapes and dtype, but fewer layers.
//
// What it does, in a scratch directory (--dir, default /tmp/kept-bench-convert, removed at the
// end unless --keep):
// 1. Checks free disk space (statvfs) and refuses below 3x the source size (the source, one
//    output at a time, and headroom).
// 2. A child process writes the SYNTHETIC source: an Orion config.json (vocab 84,608, hidden
//    5,120, intermediate 15,360, 40 heads, --layers N, default 2; bf16) and bf16 safetensors
//    shards with HF names, through kept's streaming writer (write_checkpoint with TensorSpecs and
//    a producer, so at most one tensor is in memory). The bytes are cheap and deterministic:
//    splitmix64 of the element index, as uniform values of std 0.02 for projections, an
//    embedding with a per-row offset (so centring has work to do), norm weights 1 +- 0.1 and
//    biases +- 0.05 (non-trivial LayerNorms, so exact mode computes real biases).
// 3. For each --modes entry (default paper,exact) a child process runs the conversion:
//    fork + exec `kept convert SRC DST --opm MODE` (the real command; --kept PATH), or with
//    --in-process, fork + convert_checkpoint() in the child. wait4() returns the child's own
//    rusage, so its peak RSS (ru_maxrss) is exact and belongs to that conversion alone. The
//    parent is kept small (it never touches tensor data) because a forked child's RSS starts at
//    its parent's; the parent's RSS at fork time is reported as the floor.
// 4. Reports per mode: bytes written, wall seconds (fork to exit, including validation and
//    the fsyncs of the atomic writer), the converter's own seconds, GB/s, peak RSS in MB and as
//    a multiple of the largest tensor (the 84,608 x 5,120 bf16 embedding / lm_head, 866 MB),
//    major page faults and block I/O, and whether the source was in the page cache (mincore()
//    on every source file right before the child starts; it is, just written, unless --cold,
//    which drops the source's clean pages with posix_fadvise(DONTNEED) first, so the
//    conversion reads from disk).
//
// The goal it checks (the issue): "peak memory of a few of its largest tensors, never the whole
// model": peak RSS / largest tensor should be a small constant independent of --layers.
//
// Usage: bench_convert [--dir DIR] [--layers N] [--modes paper,exact] [--cold] [--keep]
//                      [--kept PATH | --in-process] [--shard-bytes N] [--json PATH]
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "kept/convert/convert.hpp"
#include "kept/core/random.hpp"
#include "kept/io/checkpoint.hpp"
#include "kept/io/hf_config.hpp"
#include "kept/model/parameter_specs.hpp"

#ifndef KEPT_BENCH_KEPT
#define KEPT_BENCH_KEPT "kept"
#endif

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace kept::bench;
using Clock = std::chrono::steady_clock;

struct Options {
  fs::path dir = "/tmp/kept-bench-convert";
  std::int64_t layers = 2;
  std::vector<std::string> modes{"paper", "exact"};
  bool cold = false;
  bool keep = false;
  bool in_process = false;
  std::string kept = KEPT_BENCH_KEPT;
  std::uint64_t shard_bytes = 1'000'000'000ull;
  std::string json_path;
};

// Resident set of this process, bytes (VmRSS).
std::uint64_t self_rss_bytes() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.starts_with("VmRSS:")) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// ---- the synthetic source ----------------------------------------------------------------------

kept::ModelConfig orion_config(std::int64_t layers) {
  kept::ModelConfig config =
      kept::ModelConfig::decoder(kept::Architecture::Orion, 84608, 5120, 15360, layers, 40);
  config.max_position_embeddings = 4096;
  config.rope_theta = 10000;
  config.norm_eps = 1e-5;
  config.dtype = kept::DType::BF16;
  config.bos_token_id = 1;
  config.eos_token_id = 2;
  config.pad_token_id = 0;
  return config;
}

// Uniform in [-1, 1) from the top 24 bits.
float uniform_pm1(std::uint64_t bits) {
  return static_cast<float>(static_cast<double>(bits >> 40) / 8388608.0 - 1.0);
}

kept::Tensor synthetic_tensor(const kept::TensorSpec& spec, kept::ParamRole role,
                              std::uint64_t seed) {
  kept::Tensor tensor = kept::Tensor::empty(kept::DType::BF16, spec.shape);
  kept::bf16* out = tensor.data<kept::bf16>();
  const std::int64_t count = spec.shape.numel();
  const std::int64_t cols = spec.shape[spec.shape.rank() - 1];
  const bool embedding = spec.name == "model.embed_tokens.weight";
  constexpr float kHalfWidth = 0.0346410f;  // uniform std 0.02
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < count; ++i) {
    const float u = uniform_pm1(kept::Random::hash(seed ^ static_cast<std::uint64_t>(i)));
    float value;
    switch (role) {
      case kept::ParamRole::NormWeight:
        value = 1.0f + 0.1f * u;
        break;
      case kept::ParamRole::NormBias:
      case kept::ParamRole::Bias:
        value = 0.05f * u;
        break;
      default:
        value = kHalfWidth * u;
        if (embedding)  // a per-row offset: the rows have a clearly non-zero mean
          value +=
              0.01f * uniform_pm1(kept::Random::hash(~seed ^ static_cast<std::uint64_t>(i / cols)));
    }
    out[i] = kept::to_bf16(value);
  }
  return tensor;
}

// Runs in a child: writes config.json, generation_config.json and the shards.
void write_source(const fs::path& source, const kept::ModelConfig& config,
                  std::uint64_t shard_bytes) {
  fs::create_directories(source);
  kept::write_hf_config(source / "config.json", config);
  kept::write_generation_config(source / "generation_config.json", config);
  const std::vector<kept::ParameterSpec> params = kept::parameter_specs(config);
  std::vector<kept::TensorSpec> specs;
  for (const kept::ParameterSpec& p : params)
    specs.push_back({p.name, kept::DType::BF16, p.shape});
  kept::write_checkpoint(
      source, specs,
      [&](std::size_t i) { return synthetic_tensor(specs[i], params[i].role, 0x5eed0000ull + i); },
      shard_bytes);
}

// ---- child processes ---------------------------------------------------------------------------

struct ChildResult {
  int status = 0;
  double wall_s = 0;
  rusage usage{};
};

// Forks; the child runs `body` (its return value is the exit code; exceptions print and exit 1)
// with stdout and stderr sent to `log` when given.
ChildResult run_child(const std::function<int()>& body, const fs::path& log) {
  std::fflush(stdout);
  std::fflush(stderr);
  const auto start = Clock::now();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    if (!log.empty()) {
      const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd >= 0) {
        ::dup2(fd, 1);
        ::dup2(fd, 2);
      }
    }
    int code = 1;
    try {
      code = body();
    } catch (const std::exception& error) {
      std::fprintf(stderr, "error: %s\n", error.what());
    }
    std::fflush(stdout);
    std::fflush(stderr);
    ::_exit(code);
  }
  ChildResult result;
  while (::wait4(pid, &result.status, 0, &result.usage) < 0) {
    if (errno != EINTR) throw std::runtime_error(std::string("wait4: ") + std::strerror(errno));
  }
  result.wall_s = seconds_since(start);
  return result;
}

bool child_ok(const ChildResult& result) {
  return WIFEXITED(result.status) && WEXITSTATUS(result.status) == 0;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// ---- page cache --------------------------------------------------------------------------------

struct Residency {
  std::uint64_t resident = 0;
  std::uint64_t total = 0;
  double fraction() const { return total ? static_cast<double>(resident) / total : 0.0; }
};

// Bytes of `directory`'s weight files in the page cache (mincore; touches no page).
Residency page_cache_residency(const fs::path& directory) {
  Residency residency;
  const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  for (const auto& entry : fs::directory_iterator(directory)) {
    if (entry.path().extension() != ".safetensors") continue;
    const int fd = ::open(entry.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    struct stat info {};
    ::fstat(fd, &info);
    const auto size = static_cast<std::size_t>(info.st_size);
    if (size > 0) {
      void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
      if (base != MAP_FAILED) {
        std::vector<unsigned char> pages((size + page - 1) / page);
        if (::mincore(base, size, pages.data()) == 0) {
          for (unsigned char p : pages)
            residency.resident += (p & 1) ? page : 0;
          residency.total += pages.size() * page;
        }
        ::munmap(base, size);
      }
    }
    ::close(fd);
  }
  return residency;
}

// Drops the clean cached pages of `directory`'s files (they are fsynced by kept's writer).
void drop_page_cache(const fs::path& directory) {
  for (const auto& entry : fs::directory_iterator(directory)) {
    if (!entry.is_regular_file()) continue;
    const int fd = ::open(entry.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
}

std::uint64_t directory_bytes(const fs::path& directory) {
  std::uint64_t bytes = 0;
  for (const auto& entry : fs::directory_iterator(directory))
    if (entry.is_regular_file()) bytes += entry.file_size();
  return bytes;
}

// ---- one conversion ----------------------------------------------------------------------------

struct ModeResult {
  std::string mode;
  std::uint64_t bytes = 0;         // tensor bytes written
  std::uint64_t output_bytes = 0;  // files on disk (headers and configs too)
  double wall_s = 0;
  double converter_s = -1;  // the converter's own figure (report.seconds)
  double user_s = 0, sys_s = 0;
  std::uint64_t peak_rss = 0;  // bytes
  long major_faults = 0, minor_faults = 0, in_blocks = 0, out_blocks = 0;
  Residency cache;
  std::uint64_t parent_rss = 0;
  std::string load_before, load_after;
  std::string log_tail;
};

// "  bytes            3.1 GB in 4.2 s (0.74 GB/s)" -> 4.2
double parse_converter_seconds(const std::string& log) {
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);) {
    const std::size_t at = line.find("bytes ");
    const std::size_t in_pos = line.find(" in ");
    if (at == std::string::npos || in_pos == std::string::npos ||
        line.find("GB/s") == std::string::npos)
      continue;
    return std::atof(line.c_str() + in_pos + 4);
  }
  return -1;
}

ModeResult convert_once(const Options& options, const fs::path& source,
                        const kept::ModelConfig& config, const std::string& mode) {
  const fs::path destination = options.dir / ("llama-" + mode);
  const fs::path log = options.dir / ("convert-" + mode + ".log");
  std::error_code ignored;
  fs::remove_all(destination, ignored);

  ModeResult result;
  result.mode = mode;
  kept::ConversionOptions conversion;
  conversion.mode = *kept::parse_opm_mode(mode);
  for (const kept::ParameterSpec& spec :
       kept::parameter_specs(kept::llama_config_for(config, conversion)))
    result.bytes += static_cast<std::uint64_t>(spec.shape.numel()) * 2;  // bf16 throughout

  if (options.cold) drop_page_cache(source);
  result.cache = page_cache_residency(source);
  result.parent_rss = self_rss_bytes();
  result.load_before = loadavg();
  const fs::path result_file = options.dir / ("convert-" + mode + ".json");
  const ChildResult child = run_child(
      [&]() -> int {
        if (!options.in_process) {
          ::execl(options.kept.c_str(), options.kept.c_str(), "convert", source.c_str(),
                  destination.c_str(), "--opm", mode.c_str(), static_cast<char*>(nullptr));
          std::fprintf(stderr, "cannot run %s: %s\n", options.kept.c_str(), std::strerror(errno));
          return 127;
        }
        const kept::CheckpointReader reader = kept::CheckpointReader::open(source);
        fs::create_directories(destination);
        const kept::ConversionReport report =
            kept::convert_checkpoint(reader, config, destination, conversion);
        std::printf("  bytes            %llu in %.3f s (%.2f GB/s)\n",
                    static_cast<unsigned long long>(report.bytes), report.seconds,
                    static_cast<double>(report.bytes) / 1e9 / report.seconds);
        return 0;
      },
      log);
  result.load_after = loadavg();
  const std::string text = read_file(log);
  result.log_tail = text.size() > 2000 ? text.substr(text.size() - 2000) : text;
  if (!child_ok(child))
    throw std::runtime_error("conversion (" + mode + ") failed; its output:\n" + result.log_tail);
  (void)result_file;
  result.wall_s = child.wall_s;
  result.converter_s = parse_converter_seconds(text);
  result.user_s =
      static_cast<double>(child.usage.ru_utime.tv_sec) + child.usage.ru_utime.tv_usec * 1e-6;
  result.sys_s =
      static_cast<double>(child.usage.ru_stime.tv_sec) + child.usage.ru_stime.tv_usec * 1e-6;
  result.peak_rss = static_cast<std::uint64_t>(child.usage.ru_maxrss) * 1024;
  result.major_faults = child.usage.ru_majflt;
  result.minor_faults = child.usage.ru_minflt;
  result.in_blocks = child.usage.ru_inblock;
  result.out_blocks = child.usage.ru_oublock;
  result.output_bytes = directory_bytes(destination);
  if (!options.keep) fs::remove_all(destination, ignored);
  return result;
}

// ---- main --------------------------------------------------------------------------------------

int usage(const char* argv0) {
  return kept::bench::usage(
      argv0,
      "[--dir DIR] [--layers N] [--modes paper,exact] [--cold] [--keep]\n"
      "          [--kept PATH | --in-process] [--shard-bytes N] [--json PATH]");
}

double mb(std::uint64_t bytes) {
  return static_cast<double>(bytes) / 1e6;
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
    if (arg == "--dir")
      options.dir = value();
    else if (arg == "--layers")
      options.layers = std::stoll(value());
    else if (arg == "--modes")
      options.modes = split_commas(value());
    else if (arg == "--cold")
      options.cold = true;
    else if (arg == "--keep")
      options.keep = true;
    else if (arg == "--kept")
      options.kept = value();
    else if (arg == "--in-process")
      options.in_process = true;
    else if (arg == "--shard-bytes")
      options.shard_bytes = std::stoull(value());
    else if (arg == "--json")
      options.json_path = value();
    else if (arg == "-h" || arg == "--help")
      return usage(argv[0]), 0;
    else
      return usage(argv[0]);
  }
  for (const std::string& mode : options.modes) {
    if (!kept::parse_opm_mode(mode) || mode == "calibrated") {
      std::fprintf(stderr, "bench_convert: --modes takes paper and/or exact, not '%s'\n",
                   mode.c_str());
      return 2;
    }
  }
  if (options.layers < 1) return usage(argv[0]);
  if (!options.in_process && ::access(options.kept.c_str(), X_OK) != 0) {
    std::fprintf(stderr,
                 "bench_convert: the kept command '%s' is not executable; pass --kept PATH or "
                 "--in-process\n",
                 options.kept.c_str());
    return 2;
  }

  bool created_dir = false;
  try {
    const kept::ModelConfig config = orion_config(options.layers);
    std::uint64_t source_bytes = 0, largest = 0;
    std::size_t tensors = 0;
    for (const kept::ParameterSpec& spec : kept::parameter_specs(config)) {
      const std::uint64_t bytes = static_cast<std::uint64_t>(spec.shape.numel()) * 2;
      source_bytes += bytes;
      largest = std::max(largest, bytes);
      ++tensors;
    }

    // Disk space: the source, one output at a time, and headroom.
    std::error_code error;
    if (fs::exists(options.dir, error) && !fs::is_empty(options.dir, error)) {
      std::fprintf(stderr,
                   "bench_convert: %s exists and is not empty; remove it or pass another --dir\n",
                   options.dir.c_str());
      return 2;
    }
    fs::create_directories(options.dir);
    created_dir = true;
    struct statvfs fs_info {};
    if (::statvfs(options.dir.c_str(), &fs_info) != 0)
      throw std::runtime_error("statvfs " + options.dir.string() + ": " + std::strerror(errno));
    const std::uint64_t free_bytes =
        static_cast<std::uint64_t>(fs_info.f_bavail) * static_cast<std::uint64_t>(fs_info.f_frsize);
    if (free_bytes < 3 * source_bytes) {
      std::fprintf(
          stderr,
          "bench_convert: %s has %.1f GB free; a %lld-layer synthetic Orion-14B checkpoint "
          "is %.2f GB and the benchmark needs 3x that (%.1f GB). Free space, use fewer "
          "--layers, or pass another --dir.\n",
          options.dir.c_str(), free_bytes / 1e9, static_cast<long long>(options.layers),
          source_bytes / 1e9, 3 * source_bytes / 1e9);
      fs::remove_all(options.dir, error);
      return 3;
    }

    json info;
    info["benchmark"] = "bench_convert";
    info["date_utc"] = kept::bench::date_utc();
    info["cpu"] = cpu_model();
    info["nproc"] = ::sysconf(_SC_NPROCESSORS_ONLN);
    info["compiler"] = "g++ " __VERSION__;
    info["converter"] = options.in_process ? std::string("in-process convert_checkpoint (forked)")
                                           : "exec " + options.kept + " convert";
    info["model"] = {
        {"shapes", "Orion-14B (vocab 84608, hidden 5120, intermediate 15360, 40 heads)"},
        {"layers", options.layers},
        {"dtype", "bf16"},
        {"tensors", tensors},
        {"source_bytes", source_bytes},
        {"largest_tensor_bytes", largest},
        {"shard_bytes", options.shard_bytes}};
    info["dir"] = options.dir.string();
    info["free_disk_bytes"] = free_bytes;
    info["cold"] = options.cold;
    std::printf("kept bench_convert: %s, %ld cores; %s\n", info["cpu"].get<std::string>().c_str(),
                ::sysconf(_SC_NPROCESSORS_ONLN), info["converter"].get<std::string>().c_str());
    std::printf(
        "source: synthetic Orion-14B shapes, %lld layers, bf16, %zu tensors, %.3f GB "
        "(largest tensor %.1f MB), shards of <= %.2f GB, in %s (%.1f GB free)\n",
        static_cast<long long>(options.layers), tensors, source_bytes / 1e9, mb(largest),
        options.shard_bytes / 1e9, options.dir.c_str(), free_bytes / 1e9);
    std::fflush(stdout);

    // The source, written by a child (OpenMP and the tensors stay out of this process).
    const fs::path source = options.dir / "orion-synthetic";
    const std::string load_gen = loadavg();
    const ChildResult generated = run_child(
        [&] {
          write_source(source, config, options.shard_bytes);
          return 0;
        },
        options.dir / "generate.log");
    if (!child_ok(generated))
      throw std::runtime_error("writing the synthetic source failed:\n" +
                               read_file(options.dir / "generate.log"));
    const double generate_rss = generated.usage.ru_maxrss * 1024.0;
    std::printf(
        "wrote the source in %.1f s (%.2f GB/s incl. fsync), writer peak RSS %.0f MB "
        "(%.2fx the largest tensor), load %s\n",
        generated.wall_s, source_bytes / 1e9 / generated.wall_s, generate_rss / 1e6,
        generate_rss / static_cast<double>(largest), load_gen.c_str());
    info["generate"] = {
        {"seconds", generated.wall_s}, {"peak_rss_bytes", generate_rss}, {"loadavg", load_gen}};
    std::fflush(stdout);

    std::vector<ModeResult> results;
    for (const std::string& mode : options.modes) {
      std::fprintf(stderr, "converting (--opm %s)...\n", mode.c_str());
      results.push_back(convert_once(options, source, config, mode));
    }

    std::printf("\n%-6s %9s %8s %8s %7s %10s %8s %9s %8s %9s %s\n", "mode", "GB", "wall s",
                "conv s", "GB/s", "peakRSS MB", "x largest", "src cache", "majflt", "user+sys",
                "load before / after");
    json modes = json::array();
    for (const ModeResult& r : results) {
      const double seconds = r.converter_s > 0 ? r.converter_s : r.wall_s;
      std::printf("%-6s %9.3f %8.2f %8.2f %7.2f %10.0f %8.2fx %8.0f%% %8ld %9.1f %s / %s\n",
                  r.mode.c_str(), r.bytes / 1e9, r.wall_s, r.converter_s, r.bytes / 1e9 / seconds,
                  mb(r.peak_rss), static_cast<double>(r.peak_rss) / largest,
                  100 * r.cache.fraction(), r.major_faults, r.user_s + r.sys_s,
                  r.load_before.c_str(), r.load_after.c_str());
      modes.push_back({{"mode", r.mode},
                       {"bytes", r.bytes},
                       {"output_file_bytes", r.output_bytes},
                       {"wall_seconds", r.wall_s},
                       {"converter_seconds", r.converter_s},
                       {"gb_per_s", r.bytes / 1e9 / seconds},
                       {"gb_per_s_wall", r.bytes / 1e9 / r.wall_s},
                       {"user_seconds", r.user_s},
                       {"sys_seconds", r.sys_s},
                       {"peak_rss_bytes", r.peak_rss},
                       {"peak_rss_over_largest_tensor", static_cast<double>(r.peak_rss) / largest},
                       {"parent_rss_at_fork_bytes", r.parent_rss},
                       {"major_faults", r.major_faults},
                       {"minor_faults", r.minor_faults},
                       {"in_blocks_512B", r.in_blocks},
                       {"out_blocks_512B", r.out_blocks},
                       {"source_page_cache_fraction", r.cache.fraction()},
                       {"loadavg_before", r.load_before},
                       {"loadavg_after", r.load_after}});
    }
    info["modes"] = modes;
    const double source_cached = results.empty() ? 0.0 : results.front().cache.fraction();
    std::printf(
        "\nGB = tensor bytes written; conv s = the converter's own time (validation and process "
        "start excluded; wall s includes them); GB/s over conv s. Peak RSS is the child's "
        "ru_maxrss (wait4), mmapped source pages included; the parent's RSS at fork was %.1f MB. "
        "x largest = peak RSS / %.1f MB (the embedding). src cache = share of the source's pages "
        "in the page cache when the conversion started (%s).\n",
        results.empty() ? 0.0 : mb(results.front().parent_rss), mb(largest),
        options.cold ? "--cold: dropped with posix_fadvise(DONTNEED) first, so it reads from disk"
                     : (source_cached > 0.5 ? "it was just written, so reads hit memory; --cold "
                                              "to read from disk"
                                            : "mostly not cached"));
    if (!options.json_path.empty()) {
      std::ofstream(options.json_path) << info.dump(2) << "\n";
      std::printf("wrote %s\n", options.json_path.c_str());
    }
    if (!options.keep)
      fs::remove_all(options.dir, error);
    else
      std::printf("kept %s (--keep)\n", options.dir.c_str());
  } catch (const std::exception& error) {
    std::fprintf(stderr, "bench_convert: %s\n", error.what());
    std::error_code ignored;
    if (created_dir && !options.keep) fs::remove_all(options.dir, ignored);
    return 1;
  }
  return 0;
}
