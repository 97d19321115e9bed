#include "trainer.hpp"

#include "kept/core/hash.hpp"
#include "trainer_run.hpp"

namespace kept::cli {

TrainResult run_training(const TrainJob& job, const TrainOptions& options) {
  validate_job(job);
  Communicator* comm = options.communicator;
  const int ranks = comm ? comm->size() : 1;
  if (ranks > 1) {
    // Every rank must run the same job: the job as parsed (flags and --set applied), hashed.
    comm->agree_on("the job (" + job.file.string() + " with its flags)",
                   fnv1a(job.to_json().dump()));
    // On GPUs the ranks would talk through NCCL; the emulated CUDA backend keeps its "device"
    // memory on the host, so MPI stands in for NCCL there and the GPU path's host logic (bf16
    // weights, fp32 gradients, ZeRO over the device arena) runs in CI.
    if (job.device == "cuda")
      if (const std::string why = cuda_data_parallel_unavailable(); !why.empty())
        fail(job.file.string(), ": ", ranks, " ranks on device \"cuda\": data parallel on GPUs ",
             "needs the NCCL communicator (include/kept/dist/nccl_communicator.cuh), and ", why,
             "; run the ranks on the CPU (device \"cpu\")");
    KEPT_CHECK(job.grad_accum >= ranks, job.file.string(), ": grad_accum ", job.grad_accum,
               " is less than the ", ranks,
               " ranks; each rank runs whole micro-batches of a step (micro-batch m on rank m "
               "mod ",
               ranks, "), so set grad_accum >= ", ranks,
               " (the global batch is batch_size x "
               "grad_accum sequences whatever the rank count)");
    KEPT_CHECK(job.zero_stage != 3 || job.grad_accum % ranks == 0, job.file.string(),
               ": zero_stage 3 gathers each layer's weights from every rank whenever it runs, so "
               "every rank must run as many micro-batches as the others, but grad_accum ",
               job.grad_accum, " is not a multiple of the ", ranks, " ranks; set grad_accum to ",
               (job.grad_accum + ranks - 1) / ranks * ranks, " or use zero_stage 2");
  }
  // Every rank checks the output directory before rank 0 creates or clears it.
  if (!options.synthetic) check_output(job.output, options);
  if (comm) comm->barrier();
  if (job.device == "cuda") return run_training_cuda(job, options);
  Cpu cpu;
  return training::train_on(cpu, job, options);
}

}  // namespace kept::cli
