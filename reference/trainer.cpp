#include "trainer.hpp"

#include "trainer_run.hpp"

namespace kept::cli {

TrainResult run_training(const TrainJob& job, const TrainOptions& options) {
  validate_job(job);
  if (!options.synthetic) check_output(job.output, options);
  if (job.device == "cuda") return run_training_cuda(job, options);
  Cpu cpu;
  return training::train_on(cpu, job, options);
}

}  // namespace kept::cli
