// reference/train_metrics.hpp: the trainer's metrics.jsonl log (one JSON object per line),
// which survives a kill and a resume without duplicate or torn lines.
#pragma once

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

namespace kept::cli {

// A double with all 17 significant digits, for values that must round-trip through JSON text.
std::string format_double(double value);

// metrics.jsonl: one JSON object per line. On resume the lines past the checkpoint's step are
// dropped (those steps run again), and so is a line cut short by a kill. So is the final
// evaluation when the checkpoint is the last step: it is logged after that checkpoint and runs
// again (an intermediate evaluation at a checkpoint step comes before the checkpoint and stays).
class MetricsLog {
 public:
  MetricsLog(std::filesystem::path path, std::optional<std::int64_t> resume_step,
             std::int64_t final_step);
  MetricsLog(const MetricsLog&) = delete;
  MetricsLog& operator=(const MetricsLog&) = delete;
  ~MetricsLog() {
    if (file_) std::fclose(file_);
  }
  // Appends `record` as one line and flushes it.
  void write(const nlohmann::json& record);

 private:
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

}  // namespace kept::cli
