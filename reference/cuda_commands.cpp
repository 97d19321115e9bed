// reference/cuda_commands.cpp: the commands' runs on the CUDA backend (`--device cuda`: train,
// eval, forward). Compiled by nvcc for a GPU (cuda_commands.cu includes this file), or by g++
// against the host emulation in a KEPT_CUDA_EMULATION build, where kept's kernels run on the CPU
// under the emulator's checks. Without either, cuda_unavailable.cpp gives a clear error instead.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

#include "attention_engine.hpp"
#include "eval_run.hpp"
#include "forward_run.hpp"
#include "kept/backend/cuda/backend.cuh"
#include "kept/dist/local_communicator.hpp"
#if defined(KEPT_WITH_NCCL) && !defined(KEPT_CUDA_EMULATION)
#include "kept/dist/nccl_communicator.cuh"
#endif
#include "teacher_logits_run.hpp"
#include "trainer.hpp"
#include "trainer_run.hpp"

namespace kept::cli {
namespace {

// Checks for a device and says which one this is (the first line of a run's output).
void announce_device(const std::string& what) {
  const cuda::DeviceProbe probe = cuda::probe_devices();
  KEPT_CHECK(probe.count > 0, what, ": device \"cuda\": no usable CUDA device (", probe.describe(),
             ")");
  if (cuda::kEmulated)
    std::fprintf(stderr,
                 "device cuda: emulated on the CPU (a KEPT_CUDA_EMULATION build: kept's kernels "
                 "run under the emulator's checks, far slower than a GPU)\n");
  else
    std::fprintf(stderr, "device cuda: GPU 0 of %d\n", probe.count);
}

// Hands the attention ops to cuDNN where it is chosen (reference/attention_engine.hpp) and
// says which attention runs.
void choose_attention(cuda::Cuda& context) {
  std::string said;
  context.use_attention_engine(make_attention_engine(said));
  std::fprintf(stderr, "%s\n", said.c_str());
}

}  // namespace

bool cuda_emulated() {
  return cuda::kEmulated;
}

std::string cuda_data_parallel_unavailable() {
#if defined(KEPT_WITH_NCCL) || defined(KEPT_CUDA_EMULATION)
  return "";
#else
  return "this kept was built without NCCL (none was found at configure time: install it with "
         "the CUDA toolkit or point NCCL_ROOT at one, and build again)";
#endif
}

namespace {

// This process's rank on its node, from the launcher (Open MPI, MPICH and Intel MPI, Slurm):
// which GPU it takes. 0 when none says.
[[maybe_unused]] int local_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* value = std::getenv(name)) return std::atoi(value);
  return 0;
}

}  // namespace

TrainResult run_training_cuda(const TrainJob& job, const TrainOptions& options) {
  announce_device(job.file.string());
  cuda::Cuda context;
  choose_attention(context);
  cuda::CudaBackend backend(context);
  TrainOptions with_memory = options;
  std::size_t free = 0, total = 0;
  KEPT_CUDA_CHECK(cudaMemGetInfo(&free, &total));
  with_memory.device_memory_bytes = static_cast<double>(total);
  // On GPUs the gradients and weights travel through NCCL, bootstrapped over MPI (or, for
  // --nccl as one process, over a local communicator); the emulator's "device" memory is host
  // memory, so there MPI carries them itself.
  const bool distributed = options.communicator && options.communicator->size() > 1;
  LocalCommunicator one_process;
#if defined(KEPT_WITH_NCCL) && !defined(KEPT_CUDA_EMULATION)
  std::unique_ptr<NcclCommunicator> nccl;
  if (distributed || options.nccl) {
    Communicator& host = options.communicator ? *options.communicator : one_process;
    nccl = std::make_unique<NcclCommunicator>(host, local_rank(), context.stream());
    with_memory.buffer_communicator = nccl.get();
    if (host.rank() == 0)
      std::fprintf(stderr, "collectives: NCCL over %d GPU%s\n", host.size(),
                   host.size() > 1 ? "s" : "");
  }
#else
  KEPT_CHECK(!options.nccl || cuda::kEmulated, job.file.string(),
             ": --nccl: ", cuda_data_parallel_unavailable());
  // The emulator: --nccl runs the collectives through the local communicator instead.
  if (options.nccl && !distributed) with_memory.buffer_communicator = &one_process;
#endif
  return training::train_on(backend, job, with_memory);
}

TeacherLogitsSummary run_teacher_logits_cuda(const TrainJob& job,
                                             const TeacherLogitsOptions& options) {
  announce_device(job.file.string());
  cuda::Cuda context;
  choose_attention(context);
  cuda::CudaBackend backend(context);
  return precompute_teacher_logits(backend, job, options);
}

EvalReport score_on_cuda(const EvalOptions& options) {
  announce_device("kept eval");
  cuda::Cuda context;
  choose_attention(context);
  cuda::CudaBackend backend(context);
  return score(backend, options);
}

void run_forward_cuda(const std::string& model_dir, const std::string& input,
                      const std::string& output, bool hidden_states) {
  announce_device("kept forward");
  cuda::Cuda context;
  choose_attention(context);
  cuda::CudaBackend backend(context);
  run_forward(backend, model_dir, input, output, hidden_states);
}

}  // namespace kept::cli
