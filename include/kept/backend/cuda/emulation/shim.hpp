// kept/backend/cuda/emulation/shim.hpp: the part of CUDA that kept's kernels and the Cuda
// backend use, for g++ (host emulation; kept/backend/cuda/platform.cuh includes it when
// KEPT_CUDA_EMULATION is defined, instead of <cuda_runtime.h>, <cuda_bf16.h> and cuBLAS).
//
// Kernel side: __global__/__device__/__host__/__forceinline__/__launch_bounds__ vanish,
// __shared__ is `static` (blocks never overlap), threadIdx/blockIdx/blockDim/gridDim read the
// emulator's running fiber, __syncthreads()/__syncwarp()/__shfl_*_sync are emulator barriers,
// __nv_bfloat16 holds the same 16 bits as CUDA's with the same round-to-nearest-even conversion.
// Host side: the runtime calls kept uses (device discovery, malloc/free, memcpy/memset, streams,
// events, errors) on host memory with the emulator's checks; streams are synchronous. Launches go
// through kept::cuda::launch (kept/backend/cuda/launch.cuh), never <<< >>>.
// The error codes and names are CUDA's own, so messages read the same as on a GPU.
#pragma once

#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

#include "kept/backend/cuda/emulation/emulator.hpp"
#include "kept/core/element_math.hpp"

// ---- kernel-side keywords -------------------------------------------------------------------
// clang-format off
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __syncthreads() ::kept::cuda::emulation::emulator().sync_threads(__FILE__, __LINE__)
#define threadIdx (::kept::cuda::emulation::emulator().thread_idx())
#define blockIdx (::kept::cuda::emulation::emulator().block_idx())
#define blockDim (::kept::cuda::emulation::emulator().block_dim())
#define gridDim (::kept::cuda::emulation::emulator().grid_dim())
// clang-format on

inline constexpr int warpSize = ::kept::cuda::emulation::kWarpSize;

using dim3 = ::kept::cuda::emulation::Extent3;
using uint3 = ::kept::cuda::emulation::Index3;

struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) {
  return {x, y};
}

inline float rsqrtf(float x) {
  return 1.0f / std::sqrt(x);
}
inline float __expf(float x) {
  return std::exp(x);
}
inline float __logf(float x) {
  return std::log(x);
}
// One fp32 addition rounded to nearest: what the host's float addition is.
inline float __fadd_rn(float a, float b) {
  return a + b;
}

inline void __syncwarp(unsigned = 0xffffffffu) {
  ::kept::cuda::emulation::emulator().sync_warp();
}

namespace kept::cuda::emulation {
template <class T>
T shuffle(unsigned mask, T value, auto source_lane) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t) && std::is_trivially_copyable_v<T>);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = emulator().exchange(mask, bits, source_lane);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}
}  // namespace kept::cuda::emulation

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  return ::kept::cuda::emulation::shuffle(mask, value, [=](int lane) {
    const int target = lane ^ lane_mask;
    return (target / width == lane / width) ? target : lane;
  });
}
template <class T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize) {
  return ::kept::cuda::emulation::shuffle(mask, value, [=](int lane) {
    const int target = lane + static_cast<int>(delta);
    return (target / width == lane / width) ? target : lane;
  });
}
template <class T>
T __shfl_sync(unsigned mask, T value, int source, int width = warpSize) {
  return ::kept::cuda::emulation::shuffle(
      mask, value, [=](int lane) { return lane / width * width + source % width; });
}

// ---- bf16 -----------------------------------------------------------------------------------

struct __nv_bfloat16 {
  std::uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  return {::kept::bf16_from_float(value)};
}
inline float __bfloat162float(__nv_bfloat16 value) {
  return ::kept::float_from_bf16(value.bits);
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
  return {bits};
}

// ---- runtime --------------------------------------------------------------------------------

// The CUDA runtime errors the emulation reports: name, CUDA's number and CUDA's own text.
// clang-format off
#define KEPT_EMULATED_CUDA_ERRORS(X) \
  X(cudaSuccess, 0, "no error") \
  X(cudaErrorInvalidValue, 1, "invalid argument") \
  X(cudaErrorMemoryAllocation, 2, "out of memory") \
  X(cudaErrorInvalidConfiguration, 9, "invalid configuration argument") \
  X(cudaErrorInvalidDevicePointer, 17, "invalid device pointer") \
  X(cudaErrorInvalidMemcpyDirection, 21, "invalid copy direction for memcpy") \
  X(cudaErrorInsufficientDriver, 35, "CUDA driver version is insufficient for CUDA runtime version") \
  X(cudaErrorNoDevice, 100, "no CUDA-capable device is detected") \
  X(cudaErrorInvalidDevice, 101, "invalid device ordinal") \
  X(cudaErrorInvalidResourceHandle, 400, "invalid resource handle") \
  X(cudaErrorNotReady, 600, "device not ready") \
  X(cudaErrorLaunchFailure, 719, "unspecified launch failure")
// clang-format on

enum cudaError_t : int {
#define KEPT_ERROR_ENUM(name, code, text) name = code,
  KEPT_EMULATED_CUDA_ERRORS(KEPT_ERROR_ENUM)
#undef KEPT_ERROR_ENUM
};
// clang-format off
enum cudaMemcpyKind : int { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1,
                            cudaMemcpyDeviceToHost = 2, cudaMemcpyDeviceToDevice = 3,
                            cudaMemcpyDefault = 4 };
enum cudaDeviceAttr : int { cudaDevAttrMaxThreadsPerBlock = 1, cudaDevAttrMaxSharedMemoryPerBlock = 8,
                            cudaDevAttrMultiProcessorCount = 16,
                            cudaDevAttrComputeCapabilityMajor = 75,
                            cudaDevAttrComputeCapabilityMinor = 76,
                            cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
// clang-format on
enum cudaDataType_t : int { CUDA_R_32F = 0, CUDA_R_16BF = 14 };

struct CUstream_st {};
using cudaStream_t = CUstream_st*;
struct CUevent_st {
  std::chrono::steady_clock::time_point when;
};
using cudaEvent_t = CUevent_st*;

namespace kept::cuda::emulation {

inline constexpr int kEmulatedSms = 4;

struct RuntimeState {
  cudaError_t last = cudaSuccess;
  std::string detail;  // what the last failure found
};
inline RuntimeState& runtime_state() {
  static RuntimeState state;
  return state;
}
inline cudaError_t record(cudaError_t status, std::string detail) {
  RuntimeState& state = runtime_state();
  state.last = status;
  state.detail = std::move(detail);
  return status;
}

// True when [pointer, pointer + bytes) is inside one live device allocation.
inline bool is_device(const void* pointer, std::size_t bytes) {
  return emulator().memory().find(pointer, bytes) != nullptr;
}

inline cudaError_t check_device_range(const char* call, const void* pointer, std::size_t bytes,
                                      const char* side) {
  if (is_device(pointer, bytes)) return cudaSuccess;
  return record(cudaErrorInvalidValue, std::string(call) + ": the " + side + " range of " +
                                           std::to_string(bytes) +
                                           " bytes is not inside a device allocation");
}

}  // namespace kept::cuda::emulation

namespace kept::cuda::emulation {
struct ErrorText {
  cudaError_t status;
  const char* name;
  const char* text;  // CUDA's own description
};
inline constexpr ErrorText kErrorTexts[] = {
#define KEPT_ERROR_TEXT(name, code, text) {name, #name, text},
    KEPT_EMULATED_CUDA_ERRORS(KEPT_ERROR_TEXT)
#undef KEPT_ERROR_TEXT
};
inline const ErrorText* error_text(cudaError_t status) {
  for (const ErrorText& entry : kErrorTexts)
    if (entry.status == status) return &entry;
  return nullptr;
}
}  // namespace kept::cuda::emulation

inline const char* cudaGetErrorName(cudaError_t status) {
  const auto* entry = ::kept::cuda::emulation::error_text(status);
  return entry ? entry->name : "cudaErrorUnknown";
}

// CUDA's text, followed by what the emulator found when it reported this status last.
inline const char* cudaGetErrorString(cudaError_t status) {
  thread_local std::string text;
  const auto* entry = ::kept::cuda::emulation::error_text(status);
  text = entry ? entry->text : "unknown error";
  const auto& state = ::kept::cuda::emulation::runtime_state();
  if (status != cudaSuccess && !state.detail.empty())
    text += " (emulated CUDA: " + state.detail + ")";
  return text.c_str();
}

inline cudaError_t cudaGetLastError() {
  auto& state = ::kept::cuda::emulation::runtime_state();
  const cudaError_t status = state.last;
  state.last = cudaSuccess;
  return status;
}
inline cudaError_t cudaPeekAtLastError() {
  return ::kept::cuda::emulation::runtime_state().last;
}

inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess
                     : ::kept::cuda::emulation::record(cudaErrorInvalidDevice,
                                                       "the emulator has one device, 0");
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device) {
  if (device != 0) return cudaSetDevice(device);
  switch (attribute) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = 48 * 1024;
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = ::kept::cuda::emulation::kEmulatedSms;
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(::kept::cuda::emulation::kMaxSharedBytes);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
template <class Kernel>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, std::size_t) {
  *blocks = 2;
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(std::size_t* free, std::size_t* total) {
  *free = std::size_t{16} << 30;
  *total = std::size_t{16} << 30;
  return cudaSuccess;
}

inline cudaError_t cudaMalloc(void** pointer, std::size_t bytes) {
  *pointer = nullptr;
  if (bytes == 0) return cudaSuccess;
  *pointer = ::kept::cuda::emulation::emulator().memory().allocate(bytes);
  if (!*pointer)
    return ::kept::cuda::emulation::record(
        cudaErrorMemoryAllocation, "cudaMalloc of " + std::to_string(bytes) + " bytes failed");
  return cudaSuccess;
}
// Page-locked host memory: ordinary host memory here (the emulator has no DMA to speed up).
inline cudaError_t cudaMallocHost(void** pointer, std::size_t bytes) {
  *pointer = bytes ? std::malloc(bytes) : nullptr;
  if (bytes && !*pointer)
    return ::kept::cuda::emulation::record(
        cudaErrorMemoryAllocation, "cudaMallocHost of " + std::to_string(bytes) + " bytes failed");
  return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* pointer) {
  std::free(pointer);
  return cudaSuccess;
}
template <class T>
cudaError_t cudaMalloc(T** pointer, std::size_t bytes) {
  return cudaMalloc(reinterpret_cast<void**>(pointer), bytes);
}
inline cudaError_t cudaFree(void* pointer) {
  if (!pointer) return cudaSuccess;
  std::string damage;
  if (!::kept::cuda::emulation::emulator().memory().release(pointer, damage))
    return ::kept::cuda::emulation::record(cudaErrorInvalidDevicePointer,
                                           "cudaFree of a pointer that is not a live allocation");
  if (!damage.empty())
    return ::kept::cuda::emulation::record(cudaErrorLaunchFailure, "found at cudaFree: " + damage);
  return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void* destination, const void* source, std::size_t bytes,
                              cudaMemcpyKind kind) {
  using ::kept::cuda::emulation::check_device_range;
  using ::kept::cuda::emulation::is_device;
  if (bytes == 0) return cudaSuccess;
  const bool device_destination = kind == cudaMemcpyHostToDevice ||
                                  kind == cudaMemcpyDeviceToDevice ||
                                  (kind == cudaMemcpyDefault && is_device(destination, 0));
  const bool device_source = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice ||
                             (kind == cudaMemcpyDefault && is_device(source, 0));
  if (device_destination) {
    if (const cudaError_t s = check_device_range("cudaMemcpy", destination, bytes, "destination"))
      return s;
  }
  if (device_source) {
    if (const cudaError_t s = check_device_range("cudaMemcpy", source, bytes, "source")) return s;
  }
  std::memmove(destination, source, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* destination, const void* source, std::size_t bytes,
                                   cudaMemcpyKind kind, cudaStream_t = nullptr) {
  return cudaMemcpy(destination, source, bytes, kind);
}
inline cudaError_t cudaMemset(void* destination, int value, std::size_t bytes) {
  if (bytes == 0) return cudaSuccess;
  if (const cudaError_t s = ::kept::cuda::emulation::check_device_range("cudaMemset", destination,
                                                                        bytes, "destination"))
    return s;
  std::memset(destination, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* destination, int value, std::size_t bytes,
                                   cudaStream_t = nullptr) {
  return cudaMemset(destination, value, bytes);
}

inline cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  *stream = new CUstream_st{};
  return cudaSuccess;
}
// Every stream runs in issue order here, so a stream's flags and the waits between streams
// change nothing; kept's host logic around them (which stream, which event) still runs.
inline constexpr unsigned int cudaStreamNonBlocking = 1;
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  return cudaStreamCreate(stream);
}
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() {
  return cudaSuccess;
}
inline cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = new CUevent_st{};
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
inline cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t = nullptr) {
  event->when = std::chrono::steady_clock::now();
  return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) {
  return cudaSuccess;
}
inline constexpr unsigned int cudaEventDisableTiming = 2;
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  return cudaEventCreate(event);
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned int = 0) {
  return cudaSuccess;
}
inline cudaError_t cudaEventElapsedTime(float* milliseconds, cudaEvent_t start, cudaEvent_t end) {
  *milliseconds = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

// ---- cuBLAS status (kept's GEMM wrapper reports in these terms in both builds) ---------------

enum cublasStatus_t : int {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
inline const char* cublasLtGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
  }
  return "CUBLAS_STATUS_UNKNOWN";
}
inline const char* cublasLtGetStatusString(cublasStatus_t status) {
  return cublasLtGetStatusName(status);
}
