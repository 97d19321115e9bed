#include "train_metrics.hpp"

#include <fstream>

#include "kept/core/error.hpp"
#include "kept/io/atomic_file.hpp"

namespace kept::cli {

std::string format_double(double value) {
  char text[40];
  std::snprintf(text, sizeof text, "%.17g", value);
  return text;
}

MetricsLog::MetricsLog(std::filesystem::path path, std::optional<std::int64_t> resume_step,
                       std::int64_t final_step)
    : path_(std::move(path)) {
  std::string kept_lines;
  if (resume_step) {
    std::ifstream in(path_);
    std::string line;
    while (std::getline(in, line)) {
      nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (record.is_discarded() || !record.is_object() || !record.contains("step")) continue;
      const std::int64_t step = record["step"].get<std::int64_t>();
      const bool final_eval = record.value("type", "") == "eval" && step >= final_step;
      if (step < *resume_step || (step == *resume_step && !final_eval)) kept_lines += line + "\n";
    }
  }
  write_file_atomically(path_, kept_lines);
  file_ = std::fopen(path_.c_str(), "a");
  KEPT_CHECK(file_ != nullptr, path_.string(), ": cannot open for appending");
}

void MetricsLog::write(const nlohmann::json& record) {
  const std::string line = record.dump() + "\n";
  KEPT_CHECK(
      std::fwrite(line.data(), 1, line.size(), file_) == line.size() && std::fflush(file_) == 0,
      path_.string(), ": write failed (disk full?)");
}

}  // namespace kept::cli
