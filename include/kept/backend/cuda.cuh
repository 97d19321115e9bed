// kept/backend/cuda.cuh: the CUDA backend, everything (nvcc, or g++ with KEPT_CUDA_EMULATION).
//
//   kept::cuda::Cuda context;                        // device 0: stream, cuBLASLt, workspace
//   kept::cuda::CudaBackend backend(context);        // the kept::Backend contract on it
//   kept::Decoder<kept::RMSNorm, kept::cuda::CudaBackend> model(config, backend);
//
// platform.cuh:  the CUDA runtime or its host emulation, kept::cuda::launch, block reductions
// runtime.cuh:   errors (KEPT_CUDA_CHECK), device discovery, device tensors, the Cuda context
// gemm.cuh:      row-major GEMM on cuBLASLt (emulated on the CPU in the emulation build)
// elementwise.cuh, norm.cuh, rope.cuh, swiglu.cuh, embedding.cuh, attention.cuh,
// optimizer.cuh, softmax_losses.cuh: kept's own kernels, one family per header
// backend.cuh:   CudaBackend and LossKernels<CudaBackend>
#pragma once

#include "kept/backend/cuda/backend.cuh"
