// bench/bench_common.hpp: what every benchmark reports about the machine it ran on, and small
// helpers they share. Benchmarks only; not part of the library.
#pragma once

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace kept::bench {

// Prints "usage: ARGV0 OPTIONS" to stderr and returns 2 (a benchmark's exit status for bad
// arguments). `options` may span lines ("...\n          ...").
inline int usage(const char* argv0, const char* options) {
  std::fprintf(stderr, "usage: %s %s\n", argv0, options);
  return 2;
}

// The current UTC time as 2026-12-03T15:04:05Z, for a benchmark's record.
inline std::string date_utc() {
  char buffer[32];
  const std::time_t t = std::time(nullptr);
  std::strftime(buffer, sizeof buffer, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&t));
  return buffer;
}

// memcpy split over the OpenMP threads in cache-line-aligned chunks: the copy-bandwidth probe's
// parallel leg.
inline void parallel_copy(char* dst, const char* src, std::size_t bytes) {
#pragma omp parallel
  {
    const std::size_t threads = static_cast<std::size_t>(omp_get_num_threads());
    const std::size_t t = static_cast<std::size_t>(omp_get_thread_num());
    const std::size_t chunk = (bytes / threads + 63) / 64 * 64;
    const std::size_t begin = std::min(bytes, t * chunk), end = std::min(bytes, begin + chunk);
    std::memcpy(dst + begin, src + begin, end - begin);
  }
}

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline std::string read_first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// The load averages (the first three fields of /proc/loadavg).
inline std::string loadavg() {
  std::istringstream in(read_first_line("/proc/loadavg"));
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return one + " " + five + " " + fifteen;
}

inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);)
    if (line.starts_with("model name")) return line.substr(line.find(':') + 2);
  return "unknown";
}

// "a,b,,c" -> {"a", "b", "c"}
inline std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, ',');)
    if (!part.empty()) parts.push_back(part);
  return parts;
}

}  // namespace kept::bench
