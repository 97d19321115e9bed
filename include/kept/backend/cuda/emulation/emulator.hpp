// kept/backend/cuda/emulation/emulator.hpp: runs kept's CUDA kernels on the CPU (host emulation,
// -DKEPT_CUDA_EMULATION=ON), and makes the classic kernel bugs visible instead of hiding them.
//
// Execution model. A grid runs block after block on the calling thread. A block's threads are
// fibers (one stack each; a six-register switch on x86-64, ucontext elsewhere): the emulator
// resumes them one after another, each until it reaches a barrier (__syncthreads(), a warp shuffle
// or __syncwarp()) or returns. When every live thread waits, the barrier opens: a warp's shuffle
// when all its lanes posted their value,
// __syncthreads() when every thread of the block waits at the same call site. Static __shared__
// variables are function-local statics (blocks never run at the same time), dynamic shared memory
// is one buffer per launch, filled with a NaN pattern at every block start.
//
// What it checks, with a message naming the kernel, block and threads:
// - barrier divergence: threads that exit while others wait at a __syncthreads(), or that wait at
//   different __syncthreads() call sites, or a warp shuffle some lanes never reach;
// - order dependence (a missing __syncthreads(), a race): each launch runs the whole grid in
//   `orders()` thread orders (forward, reverse, then shuffled per barrier phase by a seed) from
//   the same starting memory and compares every byte the kernel could write (the device
//   allocations its non-const pointer arguments point into). CUDA promises no order, so a
//   correct kernel's output cannot depend on it;
// - out-of-bounds writes: every device allocation carries 256 guard bytes on each side, checked
//   after each launch (and at cudaFree); farther strays land in AddressSanitizer's redzones;
// - host/device mix-ups: every non-null pointer argument of a launch, and the device side of
//   every cudaMemcpy/cudaMemset, must lie inside a live device allocation.
// A fault makes the launch return cudaErrorLaunchFailure; cudaGetErrorString then returns
// "unspecified launch failure: <what was found>", so KEPT_CUDA_CHECK's kept::Error carries it.
//
// KEPT_CUDA_EMULATION_ORDERS (environment, default 3) sets the number of orders; 1 runs each
// launch once (fastest, no order check).
#pragma once

#include <ucontext.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define KEPT_EMULATION_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KEPT_EMULATION_ASAN 1
#endif
#endif
#if defined(KEPT_EMULATION_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

// ---- the fiber switch ----------------------------------------------------------------------
// ucontext's swapcontext makes a system call (the signal mask) per switch, and the emulator
// switches at every barrier of every thread. On x86-64 a switch saves the six callee-saved
// registers on the old stack and its stack pointer in *save, then resumes the new one (SysV ABI:
// everything else is caller-saved; kernels do not change the FP control words). Weak, so every
// translation unit may carry the definition.
#if defined(__x86_64__) && !defined(KEPT_EMULATION_UCONTEXT)
#define KEPT_EMULATION_FAST_SWITCH 1
extern "C" void kept_emulation_switch(void** save, void* resume);
asm(R"(
  .text
  .weak kept_emulation_switch
  .type kept_emulation_switch, @function
kept_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kept_emulation_switch, .-kept_emulation_switch
)");
#endif

namespace kept::cuda::emulation {

// A suspended execution context: a saved stack pointer (fast switch) or a ucontext.
struct Context {
#if defined(KEPT_EMULATION_FAST_SWITCH)
  void* stack_pointer = nullptr;
#else
  ucontext_t context{};
#endif
};

// Suspends `from` and resumes `to`.
inline void switch_context(Context& from, Context& to) {
#if defined(KEPT_EMULATION_FAST_SWITCH)
  kept_emulation_switch(&from.stack_pointer, to.stack_pointer);
#else
  swapcontext(&from.context, &to.context);
#endif
}

// Prepares `context` to start `entry` (which never returns) on [stack, stack + bytes).
[[gnu::noinline]] inline void start_context(Context& context, void* stack, std::size_t bytes,
                                            void (*entry)()) {
#if defined(KEPT_EMULATION_FAST_SWITCH)
  // The first switch pops six zero registers and "returns" into entry with rsp = top - 8, the
  // alignment a called function expects (rsp + 8 a multiple of 16).
  auto top = (reinterpret_cast<std::uintptr_t>(stack) + bytes) & ~std::uintptr_t{15};
  auto* frame = reinterpret_cast<void**>(top - 16);
  frame[0] = reinterpret_cast<void*>(entry);
  frame[1] = nullptr;
  for (int i = 1; i <= 6; ++i)
    frame[-i] = nullptr;
  context.stack_pointer = frame - 6;
#else
  getcontext(&context.context);
  context.context.uc_stack.ss_sp = stack;
  context.context.uc_stack.ss_size = bytes;
  context.context.uc_link = nullptr;
  makecontext(&context.context, entry, 0);
#endif
}

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};
struct Extent3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Extent3() = default;
  constexpr Extent3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr std::uint64_t count() const { return static_cast<std::uint64_t>(x) * y * z; }
};

inline constexpr int kWarpSize = 32;
inline constexpr unsigned kMaxBlockThreads = 1024;
inline constexpr std::size_t kMaxSharedBytes = 227 * 1024;  // sm_90's opt-in maximum
inline constexpr std::size_t kGuardBytes = 256;             // also the allocation alignment
inline constexpr unsigned char kGuardByte = 0xFD;

// ---- device memory --------------------------------------------------------------------------

struct Allocation {
  unsigned char* raw = nullptr;  // guard | data | guard
  std::size_t bytes = 0;
  std::uint64_t serial = 0;  // allocation number, for messages
  unsigned char* data() const { return raw + kGuardBytes; }
};

class DeviceMemory {
 public:
  ~DeviceMemory() {
    for (auto& [address, allocation] : live_)
      std::free(allocation.raw);
  }

  void* allocate(std::size_t bytes) {
    const std::size_t padded = (bytes + kGuardBytes - 1) / kGuardBytes * kGuardBytes;
    auto* raw =
        static_cast<unsigned char*>(std::aligned_alloc(kGuardBytes, padded + 2 * kGuardBytes));
    if (!raw) return nullptr;
    std::memset(raw, kGuardByte, kGuardBytes);
    std::memset(raw + kGuardBytes + bytes, kGuardByte, padded - bytes + kGuardBytes);
    // Fresh device memory is not zero on a GPU either: a kernel that reads before writing shows.
    std::memset(raw + kGuardBytes, 0xA5, bytes);
    const Allocation allocation{raw, bytes, ++serial_};
    live_.emplace(reinterpret_cast<std::uintptr_t>(allocation.data()), allocation);
    return allocation.data();
  }

  // The allocation holding [pointer, pointer + bytes), or nullptr.
  const Allocation* find(const void* pointer, std::size_t bytes = 0) const {
    const auto address = reinterpret_cast<std::uintptr_t>(pointer);
    auto found = live_.upper_bound(address);
    if (found == live_.begin()) return nullptr;
    --found;
    const Allocation& allocation = found->second;
    const std::uintptr_t end = found->first + allocation.bytes;
    if (address < found->first || address > end ||
        (address == end && allocation.bytes != 0 && bytes != 0) || bytes > end - address)
      return nullptr;
    return &allocation;
  }

  // "" when the guards are intact, else what was overwritten.
  static std::string check_guards(const Allocation& allocation) {
    const std::size_t padded = (allocation.bytes + kGuardBytes - 1) / kGuardBytes * kGuardBytes;
    const unsigned char* before = allocation.raw;
    const unsigned char* after = allocation.data() + allocation.bytes;
    const std::size_t after_bytes = padded - allocation.bytes + kGuardBytes;
    std::ostringstream out;
    for (std::size_t i = 0; i < kGuardBytes; ++i)
      if (before[i] != kGuardByte) {
        out << "a write " << (kGuardBytes - i) << " byte(s) before the start of device allocation #"
            << allocation.serial << " (" << allocation.bytes << " bytes)";
        return out.str();
      }
    for (std::size_t i = 0; i < after_bytes; ++i)
      if (after[i] != kGuardByte) {
        out << "a write at byte " << (allocation.bytes + i) << " of device allocation #"
            << allocation.serial << ", which has " << allocation.bytes << " bytes (out of bounds)";
        return out.str();
      }
    return {};
  }

  // Frees; returns "" or the guard damage found.
  bool release(void* pointer, std::string& damage) {
    auto found = live_.find(reinterpret_cast<std::uintptr_t>(pointer));
    if (found == live_.end()) return false;
    damage = check_guards(found->second);
    std::free(found->second.raw);
    live_.erase(found);
    return true;
  }

 private:
  std::map<std::uintptr_t, Allocation> live_;
  std::uint64_t serial_ = 0;
};

// ---- fibers ---------------------------------------------------------------------------------

enum class Wait : unsigned char { Ready, Block, Warp, Done };

struct Fiber {
  Context context;
  void* stack = nullptr;
  Wait wait = Wait::Done;
  const char* file = nullptr;  // where it waits at __syncthreads()
  int line = 0;
  unsigned shuffles = 0;  // warp exchanges posted, for the double-buffered slots
  Index3 index;
  unsigned linear = 0;
  void* fake_stack = nullptr;  // AddressSanitizer's bookkeeping for this stack
};

class Emulator {
 public:
  static constexpr std::size_t kStackBytes = std::size_t{256} << 10;

  Emulator() {
    if (const char* text = std::getenv("KEPT_CUDA_EMULATION_ORDERS")) {
      const int value = std::atoi(text);
      if (value >= 1 && value <= 64) orders_ = value;
    }
  }
  ~Emulator() {
    for (Fiber& fiber : fibers_)
      if (fiber.stack) munmap(fiber.stack, kStackBytes);
  }
  Emulator(const Emulator&) = delete;
  Emulator& operator=(const Emulator&) = delete;

  DeviceMemory& memory() { return memory_; }
  int orders() const { return orders_; }
  void set_orders(int orders) { orders_ = std::clamp(orders, 1, 64); }

  // The coordinates of the running thread (valid inside a kernel).
  const Index3& thread_idx() const { return current_->index; }
  const Index3& block_idx() const { return block_index_; }
  const Extent3& block_dim() const { return block_dim_; }
  const Extent3& grid_dim() const { return grid_dim_; }
  void* dynamic_shared() { return dynamic_shared_.data(); }
  bool in_kernel() const { return current_ != nullptr; }

  // __syncthreads(): wait until every thread of the block is here.
  void sync_threads(const char* file, int line) {
    Fiber& self = *current_;
    self.wait = Wait::Block;
    self.file = file;
    self.line = line;
    switch_to_scheduler(self, false);
  }

  // A warp exchange: posts `bits` and returns lane `source(lane)`'s posted value once every lane
  // of the warp has posted (__shfl_*_sync). `mask` must name every lane of the warp.
  template <class SourceLane>
  std::uint64_t exchange(unsigned mask, std::uint64_t bits, SourceLane source) {
    Fiber& self = *current_;
    const unsigned warp = self.linear / kWarpSize, lane = self.linear % kWarpSize;
    const unsigned lanes = warp_lanes(warp);
    const unsigned full = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    if (mask != full) {
      fault_here("a warp shuffle with mask 0x" + hex(mask) +
                 " (the emulator runs full warps only: 0x" + hex(full) + ")");
      return 0;
    }
    const unsigned parity = self.shuffles++ & 1u;
    slots_[(warp * 2 + parity) * kWarpSize + lane] = bits;
    self.wait = Wait::Warp;
    switch_to_scheduler(self, false);
    const int from = source(static_cast<int>(lane));
    if (from < 0 || static_cast<unsigned>(from) >= lanes) return bits;  // CUDA: own value
    return slots_[(warp * 2 + parity) * kWarpSize + static_cast<unsigned>(from)];
  }
  void sync_warp() {
    exchange(warp_full_mask(), 0, [](int lane) { return lane; });
  }
  unsigned warp_full_mask() const {
    const unsigned lanes = warp_lanes(current_->linear / kWarpSize);
    return lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
  }

  // Runs `body` for every thread of the grid, `orders()` times from the same memory; the
  // non-const pointer arguments' allocations are the bytes compared across orders and the
  // guards checked. Returns "" or the fault.
  std::string run(const char* kernel, Extent3 grid, Extent3 block, std::size_t shared_bytes,
                  const std::function<void()>& body, const std::vector<const void*>& written,
                  const std::vector<const void*>& read) {
    if (current_)
      return "kernel launched from inside a kernel (dynamic parallelism is not emulated)";
    std::ostringstream config;
    if (block.count() == 0 || block.count() > kMaxBlockThreads || block.z > 64)
      config << "block of " << block.x << "x" << block.y << "x" << block.z
             << " threads (1 to 1024 allowed, z <= 64)";
    else if (grid.count() == 0 || grid.y > 65535 || grid.z > 65535)
      config << "grid of " << grid.x << "x" << grid.y << "x" << grid.z << " blocks";
    else if (shared_bytes > kMaxSharedBytes)
      config << shared_bytes << " bytes of dynamic shared memory (at most " << kMaxSharedBytes
             << ")";
    if (!config.str().empty())
      return "kernel " + std::string(kernel) + ": invalid launch: " + config.str();

    std::vector<const Allocation*> targets;
    for (std::size_t i = 0; i < written.size() + read.size(); ++i) {
      const void* pointer = i < written.size() ? written[i] : read[i - written.size()];
      if (!pointer) continue;
      const Allocation* allocation = memory_.find(pointer);
      if (!allocation) {
        std::ostringstream out;
        out << "kernel " << kernel << ": pointer argument " << pointer
            << " is not device memory (a host pointer, or freed)";
        return out.str();
      }
      if (i < written.size() &&
          std::find(targets.begin(), targets.end(), allocation) == targets.end())
        targets.push_back(allocation);
    }

    kernel_ = kernel;
    grid_dim_ = grid;
    block_dim_ = block;
    dynamic_shared_.assign(shared_bytes, 0);
    prepare_fibers(static_cast<unsigned>(block.count()));

    std::vector<std::vector<unsigned char>> start, first;
    if (orders_ > 1) start = snapshot(targets);
    for (int order = 0; order < orders_; ++order) {
      if (order > 0) {
        if (order == 1) first = snapshot(targets);
        restore(targets, start);
      }
      std::string fault = run_grid(order, body);
      if (!fault.empty()) return fault;
      if (order > 0) {
        fault = compare(targets, first, order);
        if (!fault.empty()) return fault;
      }
    }
    for (const Allocation* allocation : targets) {
      const std::string damage = DeviceMemory::check_guards(*allocation);
      if (!damage.empty()) return "kernel " + std::string(kernel) + ": " + damage;
    }
    return {};
  }

 private:
  static std::string hex(unsigned value) {
    std::ostringstream out;
    out << std::hex << value;
    return out.str();
  }
  std::string where(const Fiber& fiber) const {
    std::ostringstream out;
    out << "thread (" << fiber.index.x << "," << fiber.index.y << "," << fiber.index.z
        << ") of block (" << block_index_.x << "," << block_index_.y << "," << block_index_.z
        << ")";
    return out.str();
  }
  unsigned warp_lanes(unsigned warp) const {
    const unsigned threads = static_cast<unsigned>(block_dim_.count());
    return std::min<unsigned>(kWarpSize, threads - warp * kWarpSize);
  }
  void fault_here(const std::string& what) {
    if (fault_.empty()) fault_ = "kernel " + kernel_ + ": " + where(*current_) + ": " + what;
  }

  void prepare_fibers(unsigned threads) {
    if (fibers_.size() < threads) fibers_.resize(threads);
    slots_.assign(static_cast<std::size_t>((threads + kWarpSize - 1) / kWarpSize) * 2 * kWarpSize,
                  0);
    for (unsigned i = 0; i < threads; ++i) {
      Fiber& fiber = fibers_[i];
      if (!fiber.stack) {
        fiber.stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (fiber.stack == MAP_FAILED) {
          fiber.stack = nullptr;
          throw std::bad_alloc();
        }
      }
    }
  }

  std::vector<std::vector<unsigned char>> snapshot(const std::vector<const Allocation*>& targets) {
    std::vector<std::vector<unsigned char>> copy;
    for (const Allocation* allocation : targets)
      copy.emplace_back(allocation->data(), allocation->data() + allocation->bytes);
    return copy;
  }
  static void restore(const std::vector<const Allocation*>& targets,
                      const std::vector<std::vector<unsigned char>>& copy) {
    for (std::size_t i = 0; i < targets.size(); ++i)
      if (!copy[i].empty()) std::memcpy(targets[i]->data(), copy[i].data(), copy[i].size());
  }
  std::string compare(const std::vector<const Allocation*>& targets,
                      const std::vector<std::vector<unsigned char>>& first, int order) const {
    for (std::size_t i = 0; i < targets.size(); ++i) {
      const unsigned char* now = targets[i]->data();
      for (std::size_t b = 0; b < first[i].size(); ++b)
        if (now[b] != first[i][b]) {
          std::ostringstream out;
          out << "kernel " << kernel_ << ": output depends on the order threads run: byte " << b
              << " of device allocation #" << targets[i]->serial << " (" << targets[i]->bytes
              << " bytes) differs between the forward order (0x" << std::hex << int{first[i][b]}
              << ") and the " << order_name(order) << " order (0x" << int{now[b]} << std::dec << ")"
              << " (a missing __syncthreads() between a shared-memory write and a read, "
                 "or threads racing on one address)";
          return out.str();
        }
    }
    return {};
  }
  static std::string order_name(int order) {
    return order == 0   ? "forward"
           : order == 1 ? "reverse"
                        : "shuffled #" + std::to_string(order - 1);
  }

  std::string run_grid(int order, const std::function<void()>& body) {
    body_ = &body;
    for (unsigned z = 0; z < grid_dim_.z; ++z)
      for (unsigned y = 0; y < grid_dim_.y; ++y)
        for (unsigned x = 0; x < grid_dim_.x; ++x) {
          block_index_ = {x, y, z};
          std::string fault = run_block(order);
          if (!fault.empty()) return fault;
        }
    return {};
  }

  std::string run_block(int order) {
    const unsigned threads = static_cast<unsigned>(block_dim_.count());
    std::fill(dynamic_shared_.begin(), dynamic_shared_.end(), 0xFF);  // NaN in fp32 and bf16
    for (unsigned i = 0; i < threads; ++i) {
      Fiber& fiber = fibers_[i];
      fiber.wait = Wait::Ready;
      fiber.shuffles = 0;
      fiber.linear = i;
      fiber.fake_stack = nullptr;
      fiber.index = {i % block_dim_.x, (i / block_dim_.x) % block_dim_.y,
                     i / (block_dim_.x * block_dim_.y)};
      start_fiber(fiber);
    }
    fault_.clear();
    std::vector<unsigned> sequence(threads);
    std::iota(sequence.begin(), sequence.end(), 0u);
    if (order == 1) std::reverse(sequence.begin(), sequence.end());
    std::uint64_t state = 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(order) ^
                          (static_cast<std::uint64_t>(block_index_.x) << 20) ^ block_index_.y;
    for (unsigned phase = 0;; ++phase) {
      if (order >= 2) shuffle(sequence, state);
      for (unsigned i : sequence)
        if (fibers_[i].wait == Wait::Ready) resume(fibers_[i]);
      if (!fault_.empty()) return fault_;
      // Every thread waits or is done: open what can open.
      bool released = false;
      for (unsigned warp = 0; warp * kWarpSize < threads; ++warp) {
        unsigned live = 0, waiting = 0;
        const unsigned lanes = warp_lanes(warp);
        for (unsigned lane = 0; lane < lanes; ++lane) {
          const Wait wait = fibers_[warp * kWarpSize + lane].wait;
          live += wait != Wait::Done;
          waiting += wait == Wait::Warp;
        }
        if (waiting == 0 || waiting != live) continue;
        if (live != lanes) {
          const Fiber& waiter = first_with(Wait::Warp, warp);
          return "kernel " + kernel_ + ": " + where(waiter) +
                 " waits at a warp shuffle that lanes of its warp never reach (they exited)";
        }
        for (unsigned lane = 0; lane < lanes; ++lane)
          fibers_[warp * kWarpSize + lane].wait = Wait::Ready;
        released = true;
      }
      if (released) continue;
      unsigned live = 0, at_block = 0;
      for (unsigned i = 0; i < threads; ++i) {
        live += fibers_[i].wait != Wait::Done;
        at_block += fibers_[i].wait == Wait::Block;
      }
      if (live == 0) return {};
      if (at_block == live) {
        const Fiber* waiter = &first_with(Wait::Block, ~0u);
        if (live != threads) {
          const Fiber& gone = first_with(Wait::Done, ~0u);
          std::ostringstream out;
          out << "kernel " << kernel_ << ": barrier divergence: " << where(gone) << " exited, but "
              << at_block << " thread(s), e.g. " << where(*waiter)
              << ", wait at __syncthreads() at " << waiter->file << ":" << waiter->line
              << " (every thread of a block must reach the same __syncthreads())";
          return out.str();
        }
        for (unsigned i = 0; i < threads; ++i)
          if (fibers_[i].line != waiter->line || std::strcmp(fibers_[i].file, waiter->file) != 0) {
            std::ostringstream out;
            out << "kernel " << kernel_ << ": barrier divergence: " << where(*waiter)
                << " waits at __syncthreads() at " << waiter->file << ":" << waiter->line << " but "
                << where(fibers_[i]) << " at " << fibers_[i].file << ":" << fibers_[i].line;
            return out.str();
          }
        for (unsigned i = 0; i < threads; ++i)
          fibers_[i].wait = Wait::Ready;
        continue;
      }
      const Fiber& shuffler = first_with(Wait::Warp, ~0u);
      const Fiber& syncer = first_with(Wait::Block, ~0u);
      std::ostringstream out;
      out << "kernel " << kernel_ << ": deadlock: " << where(shuffler)
          << " waits at a warp shuffle while " << where(syncer) << " waits at __syncthreads() at "
          << syncer.file << ":" << syncer.line;
      return out.str();
    }
  }

  const Fiber& first_with(Wait wait, unsigned warp) const {
    const unsigned threads = static_cast<unsigned>(block_dim_.count());
    for (unsigned i = 0; i < threads; ++i)
      if (fibers_[i].wait == wait && (warp == ~0u || i / kWarpSize == warp)) return fibers_[i];
    return fibers_[0];
  }

  static void shuffle(std::vector<unsigned>& sequence, std::uint64_t& state) {
    for (std::size_t i = sequence.size(); i > 1; --i) {
      state += 0x9E3779B97F4A7C15ull;
      std::uint64_t z = state;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      z ^= z >> 31;
      std::swap(sequence[i - 1], sequence[z % i]);
    }
  }

  static void start_fiber(Fiber& fiber) {
    start_context(fiber.context, fiber.stack, kStackBytes, &Emulator::fiber_main);
  }

  void resume(Fiber& fiber) {
    current_ = &fiber;
    void* fake = nullptr;
#if defined(KEPT_EMULATION_ASAN)
    __sanitizer_start_switch_fiber(&fake, fiber.stack, kStackBytes);
#endif
    switch_context(scheduler_, fiber.context);
#if defined(KEPT_EMULATION_ASAN)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    (void)fake;
    current_ = nullptr;
  }

  void switch_to_scheduler(Fiber& self, bool finished) {
#if defined(KEPT_EMULATION_ASAN)
    __sanitizer_start_switch_fiber(finished ? nullptr : &self.fake_stack, scheduler_bottom_,
                                   scheduler_size_);
#endif
    (void)finished;
    switch_context(self.context, scheduler_);
#if defined(KEPT_EMULATION_ASAN)
    __sanitizer_finish_switch_fiber(self.fake_stack, &scheduler_bottom_, &scheduler_size_);
#endif
  }

  static void fiber_main();

  DeviceMemory memory_;
  int orders_ = 3;
  std::vector<Fiber> fibers_;
  std::vector<std::uint64_t> slots_;  // [warp][parity][lane]
  std::vector<unsigned char> dynamic_shared_;
  Context scheduler_;
  const void* scheduler_bottom_ = nullptr;
  std::size_t scheduler_size_ = 0;
  Fiber* current_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  std::string kernel_, fault_;
  Index3 block_index_;
  Extent3 block_dim_, grid_dim_;
};

// The emulated device: one per process, driven by one host thread at a time (as kept's backends
// are). A static, not a thread_local, so it outlives every static object that allocated device
// memory after it (destruction runs in reverse order of construction).
inline Emulator& emulator() {
  static Emulator instance;
  return instance;
}

inline void Emulator::fiber_main() {
  Emulator& self = emulator();
  Fiber& fiber = *self.current_;
#if defined(KEPT_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &self.scheduler_bottom_, &self.scheduler_size_);
#endif
  try {
    (*self.body_)();
  } catch (const std::exception& error) {
    self.fault_here(std::string("exception: ") + error.what());
  } catch (...) {
    self.fault_here("unknown exception");
  }
  fiber.wait = Wait::Done;
  self.switch_to_scheduler(fiber, true);
  std::abort();  // a finished fiber is never resumed
}

}  // namespace kept::cuda::emulation
