// kept/backend/cuda/platform.cuh: what every CUDA file of kept includes first: the CUDA runtime
// (nvcc) or its host emulation (g++ with KEPT_CUDA_EMULATION), kept's one kernel launcher, the
// dynamic shared memory accessor, and the warp/block reductions.
//
// The rules that keep a kernel emulatable (kept/backend/cuda/emulation/emulator.hpp runs it):
// launch through kept::cuda::launch (no <<< >>>), reduce through warp_sum/block_sum, reach
// dynamic shared memory through dynamic_shared<T>(), pass memory as raw pointer arguments (the
// emulator checks each against the device allocations), no inline PTX, no floating-point
// atomics (results must not depend on the order threads run, which the emulator checks).
#pragma once

#if defined(KEPT_CUDA_EMULATION)
#include "kept/backend/cuda/emulation/shim.hpp"
#else
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstddef>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// KEPT_CUDA_RETURN_IF_ERROR(call): for launchers, which return cudaError_t instead of throwing.
#define KEPT_CUDA_RETURN_IF_ERROR(call)                             \
  do {                                                              \
    const cudaError_t kept_cuda_status_ = (call);                   \
    if (kept_cuda_status_ != cudaSuccess) return kept_cuda_status_; \
  } while (0)

namespace kept::cuda {

// True in the host-emulation build: kernels run on the CPU.
#if defined(KEPT_CUDA_EMULATION)
inline constexpr bool kEmulated = true;
#else
inline constexpr bool kEmulated = false;
#endif

// What a kernel may take by value: pointers (the emulator sees, checks and restores memory only
// through pointer arguments), arithmetic and enum values, stateless functors, and structs of
// plain values that say so by specialising is_kernel_value (no pointers inside them).
template <class T>
struct is_kernel_value : std::false_type {};
template <class T>
inline constexpr bool kernel_argument_v = std::is_pointer_v<T> || std::is_arithmetic_v<T> ||
                                          std::is_enum_v<T> ||
                                          (std::is_empty_v<T> && std::is_trivially_copyable_v<T>) ||
                                          (is_kernel_value<T>::value &&
                                           std::is_trivially_copyable_v<T>);

// Launches `kernel` on grid x block threads with `shared_bytes` of dynamic shared memory on
// `stream`; returns the launch status (never throws). `name` is for messages: the emulator puts
// it into every fault it reports.
template <class... Params, class... Args>
cudaError_t launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                   std::size_t shared_bytes, cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch: wrong number of kernel arguments");
  static_assert((kernel_argument_v<std::remove_cvref_t<Params>> && ...),
                "launch: a kernel argument is neither a pointer, an arithmetic value, a stateless "
                "functor nor a struct declared with is_kernel_value (pass memory as raw pointers)");
#if defined(KEPT_CUDA_EMULATION)
  (void)stream;
  std::tuple<std::decay_t<Params>...> params(static_cast<Params>(std::forward<Args>(args))...);
  std::vector<const void*> written, read;
  std::apply(
      [&](const auto&... value) {
        const auto classify = [&](const auto& p) {
          using P = std::remove_cvref_t<decltype(p)>;
          if constexpr (std::is_pointer_v<P>) {
            if constexpr (std::is_const_v<std::remove_pointer_t<P>>)
              read.push_back(p);
            else
              written.push_back(p);
          }
        };
        (classify(value), ...);
      },
      params);
  const std::function<void()> body = [&] { std::apply(kernel, params); };
  std::string fault =
      emulation::emulator().run(name, grid, block, shared_bytes, body, written, read);
  if (fault.empty()) return cudaSuccess;
  const bool configuration = fault.find(": invalid launch: ") != std::string::npos;
  return emulation::record(configuration ? cudaErrorInvalidConfiguration : cudaErrorLaunchFailure,
                           std::move(fault));
#else
  (void)name;
  kernel<<<grid, block, shared_bytes, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
#endif
}

// The block's dynamic shared memory (the launch's shared_bytes), 16-byte aligned.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
#if defined(KEPT_CUDA_EMULATION)
  return static_cast<T*>(emulation::emulator().dynamic_shared());
#else
  extern __shared__ __align__(16) unsigned char kept_dynamic_shared_bytes[];
  return reinterpret_cast<T*>(kept_dynamic_shared_bytes);
#endif
}

// ---- reductions: a fixed butterfly, so a sum is the same bits on a GPU and in the emulator ----

inline constexpr unsigned kFullWarp = 0xffffffffu;

// T is float or double (double: the gradient norm's sums).
template <class T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_xor_sync(kFullWarp, value, offset);
  return value;
}
template <class T>
__device__ __forceinline__ T warp_max(T value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T other = __shfl_xor_sync(kFullWarp, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// Sum (or max) over a 1-D block of kBlock threads (a multiple of 32), returned to every thread.
// Every thread of the block must call it (it has barriers).
template <int kBlock, bool kMax = false, class T>
__device__ __forceinline__ T block_reduce(T value) {
  static_assert(kBlock % 32 == 0 && kBlock >= 32 && kBlock <= 1024);
  constexpr int kWarps = kBlock / 32;
  __shared__ T partial[kWarps];
  __shared__ T total;
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  value = kMax ? warp_max(value) : warp_sum(value);
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  if (warp == 0) {
    T combined = lane < kWarps ? partial[lane] : (kMax ? static_cast<T>(-INFINITY) : T(0));
    combined = kMax ? warp_max(combined) : warp_sum(combined);
    if (lane == 0) total = combined;
  }
  __syncthreads();
  const T result = total;
  __syncthreads();  // the next call may overwrite partial and total
  return result;
}
template <int kBlock, class T>
__device__ __forceinline__ T block_sum(T value) {
  return block_reduce<kBlock, false>(value);
}
template <int kBlock, class T>
__device__ __forceinline__ T block_max(T value) {
  return block_reduce<kBlock, true>(value);
}

}  // namespace kept::cuda
