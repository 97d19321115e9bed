// reference/cuda_unavailable.cpp: `--device cuda` in a kept built without the CUDA backend (no
// nvcc at configure time and KEPT_CUDA_EMULATION off): a clear error naming the way out.
#include <string>

#include "eval_run.hpp"
#include "forward_run.hpp"
#include "teacher_logits_run.hpp"
#include "trainer.hpp"

namespace kept::cli {
namespace {

[[noreturn]] void unavailable(const std::string& what) {
  fail(what,
       ": device \"cuda\": this kept was built without the CUDA backend (no nvcc at "
       "configure time, and KEPT_CUDA_EMULATION off); rebuild with nvcc on the PATH, or "
       "with -DKEPT_CUDA_EMULATION=ON to run the CUDA backend emulated on the CPU");
}

}  // namespace

bool cuda_emulated() {
  return false;
}

std::string cuda_data_parallel_unavailable() {
  return "this kept was built without the CUDA backend";
}

TrainResult run_training_cuda(const TrainJob& job, const TrainOptions&) {
  unavailable(job.file.string());
}
TeacherLogitsSummary run_teacher_logits_cuda(const TrainJob& job, const TeacherLogitsOptions&) {
  unavailable(job.file.string());
}
EvalReport score_on_cuda(const EvalOptions&) {
  unavailable("kept eval");
}
void run_forward_cuda(const std::string&, const std::string&, const std::string&, bool) {
  unavailable("kept forward");
}

}  // namespace kept::cli
