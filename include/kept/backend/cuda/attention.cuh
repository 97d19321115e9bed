// kept/backend/cuda/attention.cuh: causal softmax attention, forward and backward, kept's own
// kernels (the reference path; cuDNN SDPA replaces them where it is available and faster).
//
// Math (as kept/backend/cpu/attention.hpp), per sequence b and head h, scale = 1/sqrt(D):
//   S_ij = scale q_i . k_j (j <= i),  P = softmax_rows(S),  o_i = sum_j P_ij v_j,
//   lse_i = log sum_j exp(S_ij)  (saved [batch, heads, seq], fp32)
//   backward: delta_i = dO_i . o_i,  dP_ij = dO_i . v_j,  dS_ij = P_ij (dP_ij - delta_i)
//             dq_i += scale sum_j dS_ij k_j,  dk_j += scale sum_i dS_ij q_i,  dv_j += sum_i P_ij
//             dO_i
// Layout: q, k, v, o [batch * seq, heads * D] row-major (head h of token t at t * heads * D +
// h * D), bf16 (or fp32) storage, fp32 math; dq/dk/dv accumulate (read, add in fp32, round once).
//
// Design: one block per (row, head, sequence). The forward keeps a row's scores in dynamic
// shared memory (seq floats), each thread computing whole dot products for its keys, then one
// thread per output column sums over the keys in order. The backward is two kernels so that
// every output has one writer (no atomics, the same bits every run): per query row (delta_i,
// then dq_i), and per key row (dk_j and dv_j over the queries i >= j, recomputing P and dS from
// lse and delta). O(seq^2 D) work per head, with no tiling: correct and deterministic, not fast.
#pragma once

#include <cmath>
#include <cstdint>

#include "kept/backend/cuda/kernel_common.cuh"

namespace kept::cuda::detail {

inline constexpr int kAttentionThreads = 128;

struct AttentionDims {
  std::int64_t seq, heads, head_dim;
  float scale;
  __device__ __forceinline__ std::int64_t stride() const { return heads * head_dim; }
  // Offset of token `t` of sequence b, head h.
  __device__ __forceinline__ std::int64_t at(std::int64_t b, std::int64_t h, std::int64_t t) const {
    return (b * seq + t) * heads * head_dim + h * head_dim;
  }
};

}  // namespace kept::cuda::detail

namespace kept::cuda {
template <>
struct is_kernel_value<detail::AttentionDims> : std::true_type {};  // sizes and the scale
}  // namespace kept::cuda

namespace kept::cuda::detail {

template <class T>
__device__ __forceinline__ float dot(const T* a, const T* b, std::int64_t n) {
  float sum = 0.0f;
  for (std::int64_t d = 0; d < n; ++d)
    sum += to_f32(a[d]) * to_f32(b[d]);
  return sum;
}

template <class T>
__global__ void attention_forward_kernel(const T* q, const T* k, const T* v, T* o, float* lse,
                                         AttentionDims dims) {
  const std::int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  float* scores = dynamic_shared<float>();
  const T* qi = q + dims.at(b, h, i);
  float local_max = -INFINITY;
  for (std::int64_t j = threadIdx.x; j <= i; j += kAttentionThreads) {
    const float s = dims.scale * dot(qi, k + dims.at(b, h, j), dims.head_dim);
    scores[j] = s;
    local_max = fmaxf(local_max, s);
  }
  const float max = block_max<kAttentionThreads>(local_max);
  float local_sum = 0.0f;
  for (std::int64_t j = threadIdx.x; j <= i; j += kAttentionThreads) {
    const float e = expf(scores[j] - max);
    scores[j] = e;
    local_sum += e;
  }
  const float sum = block_sum<kAttentionThreads>(local_sum);  // its barrier publishes scores
  for (std::int64_t d = threadIdx.x; d < dims.head_dim; d += kAttentionThreads) {
    float acc = 0.0f;
    for (std::int64_t j = 0; j <= i; ++j)
      acc += scores[j] * to_f32(v[dims.at(b, h, j) + d]);
    o[dims.at(b, h, i) + d] = from_f32<T>(acc / sum);
  }
  if (threadIdx.x == 0) lse[(b * dims.heads + h) * dims.seq + i] = max + logf(sum);
}

// Per query row i: delta_i (saved for the key kernel) and dq_i.
template <class T>
__global__ void attention_backward_query_kernel(const T* d_o, const T* q, const T* k, const T* v,
                                                const T* o, const float* lse, T* dq, float* delta,
                                                AttentionDims dims) {
  const std::int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const std::int64_t row = (b * dims.heads + h) * dims.seq + i;
  float* d_scores = dynamic_shared<float>();
  const T* qi = q + dims.at(b, h, i);
  const T* doi = d_o + dims.at(b, h, i);
  float local = 0.0f;
  for (std::int64_t d = threadIdx.x; d < dims.head_dim; d += kAttentionThreads)
    local += to_f32(doi[d]) * to_f32(o[dims.at(b, h, i) + d]);
  const float delta_i = block_sum<kAttentionThreads>(local);
  for (std::int64_t j = threadIdx.x; j <= i; j += kAttentionThreads) {
    const float p = expf(dims.scale * dot(qi, k + dims.at(b, h, j), dims.head_dim) - lse[row]);
    d_scores[j] = p * (dot(doi, v + dims.at(b, h, j), dims.head_dim) - delta_i);
  }
  __syncthreads();
  for (std::int64_t d = threadIdx.x; d < dims.head_dim; d += kAttentionThreads) {
    float acc = 0.0f;
    for (std::int64_t j = 0; j <= i; ++j)
      acc += d_scores[j] * to_f32(k[dims.at(b, h, j) + d]);
    T& out = dq[dims.at(b, h, i) + d];
    out = from_f32<T>(to_f32(out) + dims.scale * acc);
  }
  if (threadIdx.x == 0) delta[row] = delta_i;
}

// Per key row j: dk_j and dv_j over the queries i >= j.
template <class T>
__global__ void attention_backward_key_kernel(const T* d_o, const T* q, const T* k, const T* v,
                                              const float* lse, const float* delta, T* dk, T* dv,
                                              AttentionDims dims) {
  const std::int64_t j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const std::int64_t rows = (b * dims.heads + h) * dims.seq;
  float* probs = dynamic_shared<float>();
  float* d_scores = probs + dims.seq;
  const T* kj = k + dims.at(b, h, j);
  const T* vj = v + dims.at(b, h, j);
  for (std::int64_t i = j + threadIdx.x; i < dims.seq; i += kAttentionThreads) {
    const float p = expf(dims.scale * dot(q + dims.at(b, h, i), kj, dims.head_dim) - lse[rows + i]);
    probs[i] = p;
    d_scores[i] = p * (dot(d_o + dims.at(b, h, i), vj, dims.head_dim) - delta[rows + i]);
  }
  __syncthreads();
  for (std::int64_t d = threadIdx.x; d < dims.head_dim; d += kAttentionThreads) {
    float acc_k = 0.0f, acc_v = 0.0f;
    for (std::int64_t i = j; i < dims.seq; ++i) {
      acc_k += d_scores[i] * to_f32(q[dims.at(b, h, i) + d]);
      acc_v += probs[i] * to_f32(d_o[dims.at(b, h, i) + d]);
    }
    T& out_k = dk[dims.at(b, h, j) + d];
    out_k = from_f32<T>(to_f32(out_k) + dims.scale * acc_k);
    T& out_v = dv[dims.at(b, h, j) + d];
    out_v = from_f32<T>(to_f32(out_v) + acc_v);
  }
}

inline dim3 attention_grid(std::int64_t batch, std::int64_t seq, std::int64_t heads) {
  return dim3(static_cast<unsigned>(seq), static_cast<unsigned>(heads),
              static_cast<unsigned>(batch));
}

}  // namespace kept::cuda::detail

namespace kept::cuda {

// Shapes the kernels take: grid (seq, heads, batch) within CUDA's limits, scores in shared memory.
inline bool attention_shape_supported(std::int64_t batch, std::int64_t seq, std::int64_t heads) {
  return seq > 0 && seq <= 16384 && heads <= 65535 && batch <= 65535;
}

template <class T>
cudaError_t launch_attention_forward(const T* q, const T* k, const T* v, T* o, float* lse,
                                     std::int64_t batch, std::int64_t seq, std::int64_t heads,
                                     std::int64_t head_dim, float scale, cudaStream_t stream) {
  if (batch * seq * heads == 0) return cudaSuccess;
  using namespace detail;
  return launch("attention_forward", attention_forward_kernel<T>, attention_grid(batch, seq, heads),
                dim3(kAttentionThreads), sizeof(float) * static_cast<std::size_t>(seq), stream, q,
                k, v, o, lse, AttentionDims{seq, heads, head_dim, scale});
}

// `delta` is device scratch of batch * heads * seq floats.
template <class T>
cudaError_t launch_attention_backward(const T* d_o, const T* q, const T* k, const T* v, const T* o,
                                      const float* lse, T* dq, T* dk, T* dv, float* delta,
                                      std::int64_t batch, std::int64_t seq, std::int64_t heads,
                                      std::int64_t head_dim, float scale, cudaStream_t stream) {
  if (batch * seq * heads == 0) return cudaSuccess;
  using namespace detail;
  const AttentionDims dims{seq, heads, head_dim, scale};
  KEPT_CUDA_RETURN_IF_ERROR(launch("attention_backward_query", attention_backward_query_kernel<T>,
                                   attention_grid(batch, seq, heads), dim3(kAttentionThreads),
                                   sizeof(float) * static_cast<std::size_t>(seq), stream, d_o, q, k,
                                   v, o, lse, dq, delta, dims));
  return launch("attention_backward_key", attention_backward_key_kernel<T>,
                attention_grid(batch, seq, heads), dim3(kAttentionThreads),
                2 * sizeof(float) * static_cast<std::size_t>(seq), stream, d_o, q, k, v, lse,
                static_cast<const float*>(delta), dk, dv, dims);
}

}  // namespace kept::cuda
