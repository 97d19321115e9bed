// The CUDA contract TU (tests/cuda/cuda_contract.cu) compiled by g++ against the host emulation:
// the whole model, every objective and the training surface instantiate for the emulated
// CudaBackend too.
#include "cuda/cuda_contract.cu"
