// kept/core/memory_meter.hpp: how many bytes kept holds in each memory space, its peak, and an
// optional cap.
//
// Every allocation kept makes for tensors and workspaces passes through one of two places:
// Storage::allocate_host (host tensors: all of the CPU backends' memory, and the CUDA backend's
// host staging) and the CUDA runtime's allocate_device / DeviceBuffer (device tensors, the GEMM
// workspace, scratch). Both report to the meter of their space, so `kept train` can print the
// peak it measured next to what `kept plan` predicted (reference/plan.hpp), and a cap can make
// a large GPU behave like a smaller one (`--gpu h100-80g` on an H200): an allocation that would
// pass the cap throws kept::Error naming the request, the bytes in use and the cap, before any
// memory is taken. File mappings (mmapped checkpoints) are not allocations and are not counted.
//
// Counts are requested bytes (not the allocator's rounding), so a prediction made from tensor
// shapes can match them exactly.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "kept/core/error.hpp"

namespace kept {

class MemoryMeter {
 public:
  explicit MemoryMeter(const char* space) : space_(space) {}
  MemoryMeter(const MemoryMeter&) = delete;
  MemoryMeter& operator=(const MemoryMeter&) = delete;

  // Records an allocation about to be made; throws (recording nothing) when it would pass the cap.
  void allocate(std::size_t bytes) {
    const std::int64_t size = static_cast<std::int64_t>(bytes);
    const std::int64_t now = current_.fetch_add(size) + size;
    const std::int64_t cap = cap_.load();
    if (cap > 0 && now > cap) {
      current_.fetch_sub(size);
      KEPT_CHECK(false, "memory cap: allocating ", mib(size), " of ", space_, " memory would hold ",
                 mib(now), ", over the cap of ", mib(cap), " (", cap_reason_,
                 "); `kept plan` shows what takes the memory and which plan fits");
    }
    std::int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
  }
  void release(std::size_t bytes) { current_.fetch_sub(static_cast<std::int64_t>(bytes)); }

  std::int64_t current() const { return current_.load(); }
  std::int64_t peak() const { return peak_.load(); }
  // Starts a new peak measurement from what is held now.
  void reset_peak() { peak_.store(current_.load()); }
  // 0 = no cap. `reason` is said in the error ("--gpu h100-80g").
  void set_cap(std::int64_t bytes, std::string reason) {
    cap_.store(bytes);
    cap_reason_ = std::move(reason);
  }
  std::int64_t cap() const { return cap_.load(); }

  static std::string mib(std::int64_t bytes) {
    char text[32];
    std::snprintf(text, sizeof text, "%.1f MiB", static_cast<double>(bytes) / (1 << 20));
    return text;
  }

 private:
  const char* space_;
  std::atomic<std::int64_t> current_{0}, peak_{0}, cap_{0};
  std::string cap_reason_;
};

// The meter of host memory and of device memory (one per process: kept drives one device).
inline MemoryMeter& host_memory_meter() {
  static MemoryMeter meter("host");
  return meter;
}
inline MemoryMeter& device_memory_meter() {
  static MemoryMeter meter("device");
  return meter;
}

}  // namespace kept
