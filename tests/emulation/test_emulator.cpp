// The host emulation of CUDA (include/kept/backend/cuda/emulation): kernels run with the
// semantics kept relies on (block barriers, warp shuffles, shared memory, the grid), and the
// classic kernel bugs are caught with a message that names the kernel, the thread and the place:
// threads that do not all reach one __syncthreads(), a missing __syncthreads() between a
// shared-memory write and a read, an out-of-bounds global write; plus host pointers handed to a
// kernel and transfers outside device memory.
#include <catch2/catch.hpp>

#include <cstdint>
#include <initializer_list>
#include <numeric>
#include <string>
#include <vector>

#include "kept/backend/cuda/optimizer.cuh"
#include "kept/backend/cuda/platform.cuh"
#include "kept/backend/cuda/runtime.cuh"

namespace {

using kept::cuda::launch;

// A device buffer for a test: uploaded from / downloaded to a host vector.
template <class T>
struct DeviceVector {
  explicit DeviceVector(const std::vector<T>& host) : size(host.size()) {
    REQUIRE(cudaMalloc(&data, host.size() * sizeof(T)) == cudaSuccess);
    REQUIRE(cudaMemcpy(data, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) ==
            cudaSuccess);
  }
  ~DeviceVector() { (void)cudaFree(data); }
  std::vector<T> get() const {
    std::vector<T> host(size);
    REQUIRE(cudaMemcpy(host.data(), data, size * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return host;
  }
  T* data = nullptr;
  std::size_t size;
};

std::string failure(cudaError_t status) {
  return std::string(cudaGetErrorName(status)) + ": " + cudaGetErrorString(status);
}

// A launch that failed as a kernel fault, with every one of `parts` in its message.
void check_fault(cudaError_t status, std::initializer_list<const char*> parts) {
  CHECK(status == cudaErrorLaunchFailure);
  const std::string message = failure(status);
  for (const char* part : parts)
    CHECK_THAT(message, Catch::Contains(part));
}

// ---- correct kernels ------------------------------------------------------------------------

template <int kBlock>
__global__ void block_sums(const float* in, float* out, int n) {
  float value = 0.0f;
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kBlock)
    value += in[blockIdx.x * n + i];
  const float sum = kept::cuda::block_sum<kBlock>(value);
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

__global__ void warp_rotate(const int* in, int* out) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, in[threadIdx.x], (lane + 1) % 32);
}

__global__ void reverse_in_shared(const float* in, float* out) {
  float* tile = kept::cuda::dynamic_shared<float>();
  tile[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = tile[blockDim.x - 1 - threadIdx.x];
}

// ---- planted bugs ---------------------------------------------------------------------------

// Only half the block reaches the barrier.
__global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1.0f;
}
// Two different barriers for the two halves.
__global__ void split_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 2.0f;
}
// The shared-memory write and the neighbour's read with no barrier between them.
__global__ void missing_barrier(const float* in, float* out) {
  float* tile = kept::cuda::dynamic_shared<float>();
  tile[threadIdx.x] = in[threadIdx.x];
  out[threadIdx.x] = tile[(threadIdx.x + 1) % blockDim.x];
}
// One thread too many writes past the end.
__global__ void out_of_bounds(float* out) {
  out[threadIdx.x] = 3.0f;
}
// Memory reached through a struct argument would escape every check (the emulator sees memory
// through pointer arguments): launch() refuses such a kernel at compile time.
struct HiddenPointer {
  float* out;
  int count;
};
static_assert(!kept::cuda::kernel_argument_v<HiddenPointer>);
static_assert(kept::cuda::kernel_argument_v<float*> && kept::cuda::kernel_argument_v<int> &&
              kept::cuda::kernel_argument_v<kept::AdamWScalars>);
// Two threads race on one address with different values.
__global__ void racing_writes(int* out) {
  out[0] = static_cast<int>(threadIdx.x);
}

}  // namespace

TEST_CASE("emulated kernels: block sums, shuffles and shared memory compute what CUDA would",
          "[emulation]") {
  const int blocks = 3, n = 1000;
  std::vector<float> host(blocks * n);
  std::iota(host.begin(), host.end(), 0.0f);
  DeviceVector<float> in(host), out(std::vector<float>(blocks, -1.0f));
  REQUIRE(launch("block_sums", block_sums<256>, dim3(blocks), dim3(256), 0, nullptr, in.data,
                 out.data, n) == cudaSuccess);
  const std::vector<float> sums = out.get();
  for (int b = 0; b < blocks; ++b) {
    double expected = 0;
    for (int i = 0; i < n; ++i)
      expected += host[b * n + i];
    CHECK(sums[b] == Approx(expected).epsilon(1e-6));
  }

  std::vector<int> ids(64);
  std::iota(ids.begin(), ids.end(), 0);
  DeviceVector<int> lanes(ids), rotated(std::vector<int>(64, -1));
  REQUIRE(launch("warp_rotate", warp_rotate, dim3(1), dim3(64), 0, nullptr, lanes.data,
                 rotated.data) == cudaSuccess);
  const std::vector<int> got = rotated.get();
  for (int t = 0; t < 64; ++t)
    CHECK(got[t] == (t / 32) * 32 + (t % 32 + 1) % 32);

  DeviceVector<float> values(host), reversed(std::vector<float>(blocks * 128));
  REQUIRE(launch("reverse_in_shared", reverse_in_shared, dim3(blocks), dim3(128),
                 128 * sizeof(float), nullptr, values.data, reversed.data) == cudaSuccess);
  const std::vector<float> r = reversed.get();
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < 128; ++t)
      CHECK(r[b * 128 + t] == host[b * 128 + 127 - t]);
}

TEST_CASE("the emulator catches threads that do not all reach one __syncthreads()", "[emulation]") {
  DeviceVector<float> out(std::vector<float>(64));
  check_fault(
      launch("divergent_barrier", divergent_barrier, dim3(1), dim3(64), 0, nullptr, out.data),
      {"kernel divergent_barrier: barrier divergence", "exited", "test_emulator.cpp"});
  check_fault(launch("split_barrier", split_barrier, dim3(1), dim3(64), 0, nullptr, out.data),
              {"barrier divergence", "waits at __syncthreads() at"});
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);  // sticky until read, as in CUDA
  CHECK(cudaGetLastError() == cudaSuccess);
}

TEST_CASE("the emulator catches a missing __syncthreads() between a shared write and a read",
          "[emulation]") {
  std::vector<float> host(64);
  std::iota(host.begin(), host.end(), 1.0f);
  DeviceVector<float> in(host), out(std::vector<float>(64));
  check_fault(launch("missing_barrier", missing_barrier, dim3(1), dim3(64), 64 * sizeof(float),
                     nullptr, in.data, out.data),
              {"kernel missing_barrier", "output depends on the order threads run",
               "missing __syncthreads()"});
  DeviceVector<int> target(std::vector<int>(1));
  check_fault(launch("racing_writes", racing_writes, dim3(1), dim3(32), 0, nullptr, target.data),
              {"racing_writes: output depends on the order"});
}

TEST_CASE("the emulator catches an out-of-bounds global write and host pointers", "[emulation]") {
  DeviceVector<float> out(std::vector<float>(64));
  check_fault(launch("out_of_bounds", out_of_bounds, dim3(1), dim3(65), 0, nullptr, out.data),
              {"kernel out_of_bounds", "byte 256 of device allocation", "out of bounds"});
  std::vector<float> host(64);
  const cudaError_t host_pointer =
      launch("out_of_bounds", out_of_bounds, dim3(1), dim3(64), 0, nullptr, host.data());
  CHECK_THAT(failure(host_pointer), Catch::Contains("is not device memory"));
  float* device = nullptr;
  REQUIRE(cudaMalloc(&device, 16) == cudaSuccess);
  const cudaError_t copy = cudaMemcpy(device, host.data(), 64, cudaMemcpyHostToDevice);
  CHECK(copy == cudaErrorInvalidValue);
  CHECK_THAT(failure(copy), Catch::Contains("not inside a device allocation"));
  CHECK(cudaFree(device) == cudaSuccess);
  CHECK(cudaFree(device) == cudaErrorInvalidDevicePointer);
  const cudaError_t config =
      launch("out_of_bounds", out_of_bounds, dim3(1), dim3(2048), 0, nullptr, out.data);
  CHECK(config == cudaErrorInvalidConfiguration);
  CHECK_THAT(failure(config), Catch::Contains("1 to 1024 allowed"));
}

TEST_CASE("KEPT_CUDA_EMULATION_ORDERS: one order runs once and skips the order check",
          "[emulation]") {
  auto& emulator = kept::cuda::emulation::emulator();
  const int saved = emulator.orders();
  emulator.set_orders(1);
  DeviceVector<int> target(std::vector<int>(1));
  CHECK(launch("racing_writes", racing_writes, dim3(1), dim3(32), 0, nullptr, target.data) ==
        cudaSuccess);
  emulator.set_orders(saved);
}
