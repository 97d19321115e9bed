// reference/progress.hpp: the progress line long commands print.
//
// One line, rewritten in place on a terminal ("\r"), or a new line every few seconds when
// stderr is a file or a pipe (CI logs), with the fraction done, the elapsed time and an ETA.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>

namespace kept::cli {

inline std::string format_bytes(std::uint64_t bytes) {
  char text[32];
  const double value = static_cast<double>(bytes);
  if (value >= 1e9)
    std::snprintf(text, sizeof text, "%.2f GB", value / 1e9);
  else if (value >= 1e6)
    std::snprintf(text, sizeof text, "%.1f MB", value / 1e6);
  else
    std::snprintf(text, sizeof text, "%.1f kB", value / 1e3);
  return text;
}

inline std::string format_duration(double seconds) {
  char text[32];
  const long total = static_cast<long>(seconds + 0.5);
  if (total >= 3600)
    std::snprintf(text, sizeof text, "%ldh%02ldm", total / 3600, total / 60 % 60);
  else
    std::snprintf(text, sizeof text, "%ldm%02lds", total / 60, total % 60);
  return text;
}

class ProgressLine {
 public:
  explicit ProgressLine(std::string label)
      : label_(std::move(label)), start_(Clock::now()), last_(start_), terminal_(::isatty(2)) {}

  void update(double fraction, const std::string& detail) {
    const auto now = Clock::now();
    const double since_last = std::chrono::duration<double>(now - last_).count();
    if (fraction < 1.0 && since_last < (terminal_ ? 0.2 : 5.0)) return;
    last_ = now;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const double eta = fraction > 0 ? elapsed * (1 - fraction) / fraction : 0;
    std::fprintf(stderr, "%s%s %5.1f%%  %s  elapsed %s  eta %s%s", terminal_ ? "\r" : "",
                 label_.c_str(), 100.0 * fraction, detail.c_str(), format_duration(elapsed).c_str(),
                 format_duration(eta).c_str(), terminal_ ? "\x1b[K" : "\n");
    std::fflush(stderr);
    printed_ = true;
  }
  void finish() {
    if (printed_ && terminal_) std::fprintf(stderr, "\n");
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::string label_;
  Clock::time_point start_, last_;
  bool terminal_;
  bool printed_ = false;
};

}  // namespace kept::cli
