#include "trainer.hpp"

#include "trainer_run.hpp"

namespace kept::cli {

#if !defined(KEPT_REFERENCE_CUDA)
TrainResult run_training_cuda(const TrainJob& job, const TrainOptions&) {
  fail(job.file.string(), ": device \"cuda\": this kept was built without the CUDA backend (no nvcc "
       "at configure time, and KEPT_CUDA_EMULATION off); rebuild with nvcc on the PATH, or with "
       "-DKEPT_CUDA_EMULATION=ON to run the CUDA backend emulated on the CPU");
}
#endif

TrainResult run_training(const TrainJob& job, const TrainOptions& options) {
  validate_job(job);
  check_output(job.output, options);
  if (job.device == "cuda") return run_training_cuda(job, options);
  Cpu cpu;
  return training::train_on(cpu, job, options);
}

}  // namespace kept::cli
