// kept/backend/cuda.cuh: the CUDA backend, everything (compile with nvcc, link kept::cuda).
//
//   kept::cuda::Cuda backend;                       // device 0: stream, cuBLASLt, workspace
//   kept::Tensor x = backend.upload(host_x);        // MemorySpace::Cuda tensors
//   backend.matmul(as_matrix<bf16>(x), false, as_matrix<bf16>(w), true, as_matrix<bf16>(y));
//   backend.layernorm_forward(x.data<bf16>(), weight, bias, y.data<bf16>(), mean, rstd, rows,
//                             cols, eps);
//
// runtime.cuh: errors (KEPT_CUDA_CHECK), cuda_device_count(), device tensors, the Cuda context.
// gemm.cuh:    row-major GEMM on cuBLASLt (bf16/fp32 inputs, fp32 accumulation).
// layernorm.cuh, rmsnorm.cuh: norm forward/backward kernels (fp32 math, bf16 or fp32 storage).
#pragma once

#include "kept/backend/cuda/gemm.cuh"
#include "kept/backend/cuda/layernorm.cuh"
#include "kept/backend/cuda/rmsnorm.cuh"
#include "kept/backend/cuda/runtime.cuh"
