// reference/trainer_cuda.cpp: `kept train` on the CUDA backend. Compiled by nvcc for a GPU
// (trainer_cuda.cu includes this file), or by g++ against the host emulation in a
// KEPT_CUDA_EMULATION build, where the kernels run on the CPU under the emulator's checks.
#include <cstdio>

#include "kept/backend/cuda/backend.cuh"
#include "trainer.hpp"
#include "trainer_run.hpp"

namespace kept::cli {

TrainResult run_training_cuda(const TrainJob& job, const TrainOptions& options) {
  const cuda::DeviceProbe probe = cuda::probe_devices();
  KEPT_CHECK(probe.count > 0, job.file.string(),
             ": device \"cuda\": no usable CUDA device (", probe.describe(), ")");
  if (cuda::kEmulated)
    std::fprintf(stderr,
                 "device cuda: emulated on the CPU (a KEPT_CUDA_EMULATION build: kept's kernels "
                 "run under the emulator's checks, far slower than a GPU)\n");
  cuda::Cuda context;
  if (!cuda::kEmulated)
    std::fprintf(stderr, "device cuda: GPU %d (%d SMs)\n", context.device(), context.sm_count());
  cuda::CudaBackend backend(context);
  return training::train_on(backend, job, options);
}

}  // namespace kept::cli
