// kept/backend/cuda/runtime.cuh: CUDA error handling, device discovery, device tensors, and the
// `Cuda` backend context.
//
// Conventions of the CUDA backend (flashinfer style):
// - Kernels take raw pointers and are started by a host launcher that returns the cudaError_t of
//   the launch (never throws, never synchronises), so launchers compose in graphs and streams.
// - The `Cuda` struct is what layers use: its member functions have the same argument order as
//   the CPU reference (kept::cpu, e.g. layernorm_forward(x, weight, bias, y, mean, rstd, rows,
//   cols, eps)), validate their arguments, run on the context's stream, and throw kept::Error
//   naming the failed API call with file:line. Layers are templates over the backend and call
//   backend.matmul(...), backend.layernorm_forward(...), whatever the backend.
// - Device tensors are ordinary kept::Tensor objects whose Storage lives in MemorySpace::Cuda and
//   is released with cudaFree (which waits for the device, so freeing a tensor that a queued
//   kernel still reads is safe).
//
// In the host-emulation build (KEPT_CUDA_EMULATION, kept/backend/cuda/emulation/) the same
// code runs against the emulated runtime: one device, no cuBLASLt handle (the GEMM wrapper
// computes on the CPU), every check of the emulator on.
//
// Environment note: without a GPU (or without a driver), cudaGetDeviceCount returns
// cudaErrorInsufficientDriver (35) or cudaErrorNoDevice (100) and leaves the count unchanged;
// cuda_device_count() maps both to 0 devices, so callers can skip instead of failing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "kept/backend/cuda/attention_engine.hpp"
#include "kept/backend/cuda/platform.cuh"
#include "kept/core/dtype.hpp"
#include "kept/core/dynamic_code.hpp"
#include "kept/core/error.hpp"
#include "kept/core/shape.hpp"
#include "kept/core/tensor.hpp"

namespace kept::cuda {

// ---- errors -------------------------------------------------------------------------------------

[[noreturn]] inline void throw_error(cudaError_t status, const char* call, const char* file,
                                     int line) {
  fail(file, ":", line, ": ", call, " failed: ", cudaGetErrorName(status), " (",
       static_cast<int>(status), "): ", cudaGetErrorString(status));
}

[[noreturn]] inline void throw_error(cublasStatus_t status, const char* call, const char* file,
                                     int line) {
  fail(file, ":", line, ": ", call, " failed: ", cublasLtGetStatusName(status), " (",
       static_cast<int>(status), "): ", cublasLtGetStatusString(status));
}

inline void check(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess) throw_error(status, call, file, line);
}

inline void check(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_error(status, call, file, line);
}

}  // namespace kept::cuda

// KEPT_CUDA_CHECK(call): throws kept::Error "file:line: call failed: NAME (code): description"
// when `call` returns anything but cudaSuccess / CUBLAS_STATUS_SUCCESS.
#define KEPT_CUDA_CHECK(call) ::kept::cuda::check((call), #call, __FILE__, __LINE__)

namespace kept::cuda {

// ---- devices ------------------------------------------------------------------------------------

// The raw outcome of cudaGetDeviceCount, for messages ("no CUDA device (...)").
struct DeviceProbe {
  int count = 0;
  cudaError_t status = cudaSuccess;

  // "cudaGetDeviceCount: CUDA driver version is insufficient for CUDA runtime version (35)".
  std::string describe() const {
    return ::kept::detail::concat("cudaGetDeviceCount: ", cudaGetErrorString(status), " (",
                                  static_cast<int>(status), "), ", count, " device(s)");
  }
};

inline DeviceProbe probe_devices() {
  DeviceProbe probe;
  int count = 0;  // cudaGetDeviceCount leaves it unchanged on error 35
  probe.status = cudaGetDeviceCount(&count);
  if (probe.status != cudaSuccess) {
    (void)cudaGetLastError();  // do not leave the error for the next cudaGetLastError()
    count = 0;
  }
  probe.count = count;
  return probe;
}

// True for the statuses that mean "this machine has no usable GPU" rather than a fault.
constexpr bool is_no_device_status(cudaError_t status) {
  return status == cudaErrorInsufficientDriver || status == cudaErrorNoDevice;
}

// Number of CUDA devices; 0 when there is no GPU or no driver (errors 35 and 100). Any other
// failure of cudaGetDeviceCount throws.
inline int cuda_device_count() {
  const DeviceProbe probe = probe_devices();
  if (probe.status == cudaSuccess) return probe.count;
  if (is_no_device_status(probe.status)) return 0;
  throw_error(probe.status, "cudaGetDeviceCount(&count)", __FILE__, __LINE__);
}

// ---- element types ------------------------------------------------------------------------------

// kept::bf16 (host storage type) and __nv_bfloat16 (CUDA type) have the same bits; kernels take
// the CUDA type, the Cuda struct accepts either.
template <class T>
struct device_element {
  using type = T;
};
template <>
struct device_element<kept::bf16> {
  using type = __nv_bfloat16;
};
template <class T>
using device_element_t = typename device_element<std::remove_cv_t<T>>::type;

static_assert(sizeof(kept::bf16) == sizeof(__nv_bfloat16) &&
              alignof(kept::bf16) == alignof(__nv_bfloat16));

// The CUDA pointer for a kept pointer, constness preserved.
template <class T>
auto device_ptr(T* pointer) {
  using Element = device_element_t<T>;
  using Result = std::conditional_t<std::is_const_v<T>, const Element, Element>;
  return reinterpret_cast<Result*>(pointer);
}

// ---- device memory ------------------------------------------------------------------------------

// A cudaMalloc'd block owned by a kept::Storage (MemorySpace::Cuda, released with cudaFree).
// Counted by device_memory_meter() (kept/core/memory_meter.hpp), which also enforces a cap.
inline std::shared_ptr<Storage> allocate_device(std::size_t bytes) {
  MemoryMeter& meter = device_memory_meter();
  meter.allocate(bytes);
  void* data = nullptr;
  try {
    if (bytes) KEPT_CUDA_CHECK(cudaMalloc(&data, bytes));
    return std::make_shared<Storage>(data, bytes, MemorySpace::Cuda, [bytes](void* pointer) {
      if (pointer) (void)cudaFree(pointer);  // a destructor cannot throw; the error is sticky
      device_memory_meter().release(bytes);
    });
  } catch (...) {
    if (data) (void)cudaFree(data);
    meter.release(bytes);
    throw;
  }
}

// Zeroed page-locked host memory, which the copy engines read and write at the link's full rate
// (pageable memory goes through a bounce buffer at about half of it). Counted as host memory.
inline Tensor pinned_host_zeros(DType dtype, Shape shape) {
  const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * dtype_size(dtype);
  MemoryMeter& meter = host_memory_meter();
  meter.allocate(bytes);
  void* data = nullptr;
  try {
    if (bytes) KEPT_CUDA_CHECK(cudaMallocHost(&data, bytes));
    if (bytes) std::memset(data, 0, bytes);
    auto storage =
        std::make_shared<Storage>(data, bytes, MemorySpace::Host, [bytes](void* pointer) {
          if (pointer) (void)cudaFreeHost(pointer);
          host_memory_meter().release(bytes);
        });
    return Tensor::from_storage(dtype, shape, std::move(storage));
  } catch (...) {
    if (data) (void)cudaFreeHost(data);
    meter.release(bytes);
    throw;
  }
}

// Uninitialised device tensor on the current device (cudaMalloc alignment: 256 bytes).
inline Tensor device_empty(DType dtype, Shape shape) {
  const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * dtype_size(dtype);
  return Tensor::from_storage(dtype, shape, allocate_device(bytes));
}

inline Tensor device_zeros(DType dtype, Shape shape) {
  Tensor tensor = device_empty(dtype, shape);
  if (tensor.nbytes()) KEPT_CUDA_CHECK(cudaMemset(tensor.raw(), 0, tensor.nbytes()));
  return tensor;
}

// Copies between tensors of the same dtype and shape, in any memory spaces (synchronous with
// respect to the host; ordered after work queued on the legacy default stream and on blocking
// streams such as the one `Cuda` owns).
inline void copy(Tensor& destination, const Tensor& source) {
  KEPT_CHECK(destination.dtype() == source.dtype() && destination.shape() == source.shape(),
             "copy from ", dtype_name(source.dtype()), source.shape(), " to ",
             dtype_name(destination.dtype()), destination.shape(), ": dtype or shape differ");
  if (source.nbytes())
    KEPT_CUDA_CHECK(
        cudaMemcpy(destination.raw(), source.raw(), source.nbytes(), cudaMemcpyDefault));
}

// A device copy of a tensor (host or device).
inline Tensor to_device(const Tensor& tensor) {
  Tensor result = device_empty(tensor.dtype(), tensor.shape());
  copy(result, tensor);
  return result;
}

// A host copy of a tensor (device or host).
inline Tensor to_host(const Tensor& tensor) {
  Tensor result = Tensor::empty(tensor.dtype(), tensor.shape());
  copy(result, tensor);
  return result;
}

// ---- RAII for runtime objects
// ----------------------------------------------------------------------

// A grow-only device buffer (not a tensor: workspaces and scratch).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) { reserve(bytes); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    if (this != &other) {
      release();
      data_ = std::exchange(other.data_, nullptr);
      bytes_ = std::exchange(other.bytes_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  // Ensures at least `bytes`; the contents are lost when it grows. The caller must make sure no
  // queued work still uses the old block (cudaFree waits for the device anyway).
  void reserve(std::size_t bytes) {
    if (bytes <= bytes_) return;
    release();
    device_memory_meter().allocate(bytes);
    const cudaError_t status = cudaMalloc(&data_, bytes);
    if (status != cudaSuccess) {
      data_ = nullptr;
      device_memory_meter().release(bytes);
      ::kept::cuda::check(status, "cudaMalloc of a device buffer", __FILE__, __LINE__);
    }
    bytes_ = bytes;
  }
  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void release() noexcept {
    if (data_) {
      (void)cudaFree(data_);
      device_memory_meter().release(bytes_);
    }
    data_ = nullptr;
    bytes_ = 0;
  }
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

namespace detail {
struct StreamDeleter {
  void operator()(CUstream_st* stream) const noexcept { (void)cudaStreamDestroy(stream); }
};
struct EventDeleter {
  void operator()(CUevent_st* event) const noexcept { (void)cudaEventDestroy(event); }
};
#if !defined(KEPT_CUDA_EMULATION)
struct LtHandleDeleter {
  void operator()(cublasLtContext* handle) const noexcept { (void)cublasLtDestroy(handle); }
};
struct CublasHandleDeleter {
  void operator()(cublasContext* handle) const noexcept { (void)cublasDestroy(handle); }
};
// The cuBLASLt matmul plans (descriptors + chosen algorithm) per GEMM shape; defined in gemm.cuh.
struct GemmPlanCache;
#endif
}  // namespace detail
struct GemmProblem;  // one GEMM, type-erased; defined in gemm.cuh

// ---- the backend context
// ----------------------------------------------------------------------------

// One device, one stream, one cuBLASLt handle, one GEMM workspace, and scratch for the norms'
// parameter-gradient partial sums. Non-copyable and non-movable (kernels in flight hold its
// buffers). Every op is queued on stream(); call synchronize() before reading results on the host
// with anything but kept::cuda::copy/to_host (which wait for this blocking stream).
class Cuda {
 public:
  static constexpr std::size_t kDefaultWorkspaceBytes = std::size_t{32} << 20;  // 32 MiB

  explicit Cuda(int device = 0, std::size_t gemm_workspace_bytes = kDefaultWorkspaceBytes)
      : device_(device) {
    const int count = cuda_device_count();
    KEPT_CHECK(device >= 0 && device < count, "CUDA device ", device, " requested, but ", count,
               " device(s) are present (", probe_devices().describe(), ")");
    KEPT_CUDA_CHECK(cudaSetDevice(device));
    KEPT_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device));
    cudaStream_t stream = nullptr;
    KEPT_CUDA_CHECK(cudaStreamCreate(&stream));  // blocking: cudaMemcpy on stream 0 waits for it
    stream_.reset(stream);
#if !defined(KEPT_CUDA_EMULATION)
    cublasLtHandle_t lt = nullptr;
    KEPT_CUDA_CHECK(cublasLtCreate(&lt));
    lt_.reset(lt);
    workspace_.reserve(gemm_workspace_bytes);
#else
    (void)gemm_workspace_bytes;
#endif
  }
  Cuda(const Cuda&) = delete;
  Cuda& operator=(const Cuda&) = delete;
  Cuda(Cuda&&) = delete;
  Cuda& operator=(Cuda&&) = delete;
  ~Cuda() {
    if (transfer_) (void)cudaStreamSynchronize(transfer_.get());
    (void)cudaStreamSynchronize(stream_.get());
#if !defined(KEPT_CUDA_EMULATION)
    gemm_plans_.reset();  // descriptors first, then the handles they were used with
#endif
  }

  static constexpr const char* name() {
    return "cuda";
  }
  int device() const {
    return device_;
  }
  int sm_count() const {
    return sm_count_;
  }
  cudaStream_t stream() const {
    return stream_.get();
  }
#if !defined(KEPT_CUDA_EMULATION)
  cublasLtHandle_t lt_handle() const {
    return lt_.get();
  }
#endif
  void* workspace() const {
    return workspace_.data();
  }
  std::size_t workspace_bytes() const {
    return workspace_.bytes();
  }

  void synchronize() const {
    KEPT_CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
  }

  // Host -> device copies on a second stream, to overlap with the compute on stream() (the
  // streamed teacher's next layer while the current one runs). upload_behind() queues a copy
  // that starts once the work queued on stream() so far is done (so it may overwrite memory that
  // work reads); await_uploads() makes the work queued on stream() from then on wait for every
  // copy queued before. `host` should be pinned (pinned_host_zeros) for the copy to be
  // asynchronous; from pageable memory the driver stages it and returns late.
  void upload_behind(void* device, const void* host, std::size_t bytes) {
    if (!transfer_) {
      cudaStream_t stream = nullptr;
      // Non-blocking: a synchronous cudaMemcpy elsewhere does not wait for these copies.
      KEPT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      transfer_.reset(stream);
      for (auto* event : {&compute_done_, &transfers_done_}) {
        cudaEvent_t created = nullptr;
        KEPT_CUDA_CHECK(cudaEventCreateWithFlags(&created, cudaEventDisableTiming));
        event->reset(created);
      }
    }
    KEPT_CUDA_CHECK(cudaEventRecord(compute_done_.get(), stream_.get()));
    KEPT_CUDA_CHECK(cudaStreamWaitEvent(transfer_.get(), compute_done_.get(), 0));
    if (bytes)
      KEPT_CUDA_CHECK(
          cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, transfer_.get()));
  }
  void await_uploads() {
    if (!transfer_) return;
    KEPT_CUDA_CHECK(cudaEventRecord(transfers_done_.get(), transfer_.get()));
    KEPT_CUDA_CHECK(cudaStreamWaitEvent(stream_.get(), transfers_done_.get(), 0));
  }

  // Throws if a kernel queued earlier failed asynchronously (a sticky error) or a launch failed.
  void check_last_error() const {
    KEPT_CUDA_CHECK(cudaGetLastError());
  }

  // Hands the attention ops to `engine` (cuDNN SDPA, kept/backend/cuda/cudnn_attention.hpp,
  // built in a g++ translation unit) instead of kept's own kernels; null goes back to them.
  void use_attention_engine(std::shared_ptr<AttentionEngine> engine) {
    attention_engine_ = std::move(engine);
  }
  AttentionEngine* attention_engine() const {
    return attention_engine_.get();
  }

  // Device scratch of at least `bytes`, valid until the next call (stream-ordered reuse).
  void* scratch(std::size_t bytes) {
    if (bytes > scratch_.bytes()) {
      synchronize();  // queued kernels may still read the old block
      scratch_.reserve(bytes);
    }
    return scratch_.data();
  }
  // Device memory for an attention engine's dq, dk and dv before they are accumulated: a second
  // scratch, since the first may hold other ops' partial sums.
  void* attention_scratch(std::size_t bytes) {
    if (bytes > attention_scratch_.bytes()) {
      synchronize();
      attention_scratch_.reserve(bytes);
    }
    return attention_scratch_.data();
  }

  // kept::dynamic_codes() on the device (the signed table, then the unsigned one), uploaded on
  // the first call: the 8-bit optimizer states' code.
  const float* dynamic_codes() {
    if (!codes_.data()) {
      const DynamicCodes& codes = ::kept::dynamic_codes();
      DeviceBuffer buffer(sizeof codes.signed_code + sizeof codes.unsigned_code);
      auto* device = static_cast<float*>(buffer.data());
      KEPT_CUDA_CHECK(cudaMemcpy(device, codes.signed_code.data(), sizeof codes.signed_code,
                                 cudaMemcpyHostToDevice));
      KEPT_CUDA_CHECK(cudaMemcpy(device + codes.signed_code.size(), codes.unsigned_code.data(),
                                 sizeof codes.unsigned_code, cudaMemcpyHostToDevice));
      codes_ = std::move(buffer);
    }
    return static_cast<const float*>(codes_.data());
  }

  // Tensors on this context's device.
  Tensor empty(DType dtype, Shape shape) const {
    return device_empty(dtype, shape);
  }
  Tensor zeros(DType dtype, Shape shape) const {
    return device_zeros(dtype, shape);
  }
  Tensor upload(const Tensor& host) const {
    return to_device(host);
  }
  Tensor download(const Tensor& device_tensor) const {
    return to_host(device_tensor);
  }

  // ---- GEMM (defined in gemm.cuh) -------------------------------------------------------------
  // Row-major C[M,N] = alpha * op(A) op(B) + beta * C, fp32 accumulation (CUBLAS_COMPUTE_32F).
  // A view's rows/cols are the stored matrix; op(X) = X^T when transpose_x. op(A) is [M,K],
  // op(B) is [K,N], C is [M,N]; strides are the leading dimensions (any value >= cols). C must
  // not overlap A or B. With beta == 0, C is not read (it may hold NaNs). Each of A, B, C is
  // bf16 (kept::bf16 or __nv_bfloat16 bits) or float; a mixed A/B pair is widened to fp32 first.
  template <class TA, class TB, class TC>
  void matmul(MatrixView<const TA> a, bool transpose_a, MatrixView<const TB> b, bool transpose_b,
              MatrixView<TC> c, float alpha = 1.0f, float beta = 0.0f);

 private:
#if !defined(KEPT_CUDA_EMULATION)
  detail::GemmPlanCache& gemm_plans();
#endif
  // Runs one GEMM on the backend stream (every matmul overload ends here); defined in gemm.cuh.
  void run_gemm(const GemmProblem& problem);

  int device_ = 0;
  int sm_count_ = 0;
  std::unique_ptr<CUstream_st, detail::StreamDeleter> stream_;
  // upload_behind's stream and events (created on first use).
  std::unique_ptr<CUstream_st, detail::StreamDeleter> transfer_;
  std::unique_ptr<CUevent_st, detail::EventDeleter> compute_done_, transfers_done_;
#if !defined(KEPT_CUDA_EMULATION)
  std::unique_ptr<cublasLtContext, detail::LtHandleDeleter> lt_;
#endif
  DeviceBuffer workspace_;
  DeviceBuffer scratch_;
  DeviceBuffer codes_;
  DeviceBuffer attention_scratch_;
  std::shared_ptr<AttentionEngine> attention_engine_;

#if !defined(KEPT_CUDA_EMULATION)
  // Created on the first matmul; a function-pointer deleter so GemmPlanCache may be incomplete
  // here.
  std::unique_ptr<detail::GemmPlanCache, void (*)(detail::GemmPlanCache*)> gemm_plans_{nullptr,
                                                                                       nullptr};
#endif
};

}  // namespace kept::cuda
