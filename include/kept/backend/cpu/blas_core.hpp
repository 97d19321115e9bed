// kept/backend/cpu/blas_core.hpp: make sure OpenBLAS runs its kernels for this CPU.
//
// Debian's OpenBLAS (0.3.21, DYNAMIC_ARCH) picks its kernels by CPU model when the library
// loads. A model it does not know (measured on 2026-12-03: a recent "Intel Xeon Processor" VM
// with AVX-512) falls back to "Prescott", its SSE3 kernels, and every GEMM runs 5-6x slower
// (sgemm 2048x1024x1024: 110 ms instead of 15-20 ms on 2 threads), which made `kept train` 4x
// slower than PyTorch there. The choice can only be changed before the library initialises,
// through OPENBLAS_CORETYPE, so a program calls use_openblas_kernels_for_this_cpu(argv) first
// thing in main(): when the variable is unset and OpenBLAS fell back to a pre-AVX core on a CPU
// with AVX-512 (or AVX2), it sets SkylakeX (or Haswell) and re-executes itself (same pid,
// arguments and streams). An explicit OPENBLAS_CORETYPE is always respected; KEPT_BLAS_REEXEC=0
// turns this off.
#pragma once

#include <cblas.h>
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <string>

namespace kept::cpu {

inline void use_openblas_kernels_for_this_cpu(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  if (const char* off = std::getenv("KEPT_BLAS_REEXEC"); off && std::string(off) == "0") return;
  std::string core = openblas_get_corename();
  for (char& c : core)
    c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const bool fallback = core == "prescott" || core == "core2" || core == "penryn" ||
                        core == "nehalem" || core == "katmai" || core == "unknown";
  if (!fallback) return;
  __builtin_cpu_init();
  const char* better = __builtin_cpu_supports("avx512f") ? "SkylakeX"
                       : __builtin_cpu_supports("avx2")  ? "Haswell"
                                                         : nullptr;
  if (!better) return;
  if (setenv("OPENBLAS_CORETYPE", better, 1) != 0) return;
  execv("/proc/self/exe", argv);  // returns only on failure: carry on with the slow kernels
  unsetenv("OPENBLAS_CORETYPE");
}

}  // namespace kept::cpu
