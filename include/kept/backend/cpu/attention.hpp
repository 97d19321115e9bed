// kept/backend/cpu/attention.hpp: causal softmax attention, forward and backward, per head.
//
// For one sequence and one head, with Q, K, V in R^{T x D} (rows are positions) and
// scale = 1/sqrt(D):
//   S = scale * Q K^T,  S_ij = -inf for j > i (causal),  P = softmax_rows(S),  O = P V
//   lse_i = log sum_j exp(S_ij)  (saved, so backward rebuilds P = exp(S - lse) exactly)
// Backward, given dO:
//   dV = P^T dO,  dP = dO V^T,  delta_i = sum_d dO_id O_id,  dS = P o (dP - delta)
//   dQ = scale * dS K,  dK = scale * dS^T Q
//
// Layout: q, k, v, o are [batch * seq, heads * head_dim] (the output of the projections), so
// head h of sequence b is a strided matrix (row stride heads * head_dim) and no transposes are
// materialised. Work is split into blocks of kAttentionRowBlock query rows: a block only needs
// keys [0, end of block), which skips most of the masked upper triangle, and its score tile
// (kAttentionRowBlock x seq floats) stays in L2 for seq up to ~2k. Forward parallelises over
// (sequence, head, row block); backward over (sequence, head), because dK and dV of one head
// collect contributions from all its row blocks. GEMMs inside run on the calling thread
// (OpenMP OpenBLAS inside a parallel region).
// dq, dk, dv accumulate (+=).
//
// Speed: the exponentials (T^2/2 per head and direction) use vexp (vector_math.hpp: within
// 1 ulp, vectorised) and the AVX2 or AVX-512 instantiation the CPU supports; the forward keeps the
// exponentials unnormalised (P V is scaled by 1/sum afterwards, 128 values a row instead of
// `keys`), so a score row is touched twice (max; exp and sum). Row sums are blocked as in the
// norms (vector_math.hpp). float64 (the reference) uses
// std::exp and the same structure.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "kept/backend/cpu/gemm.hpp"
#include "kept/backend/cpu/vector_math.hpp"
#include "kept/core/attention_shape.hpp"

namespace kept::cpu {

using kept::AttentionShape;

#ifndef KEPT_ATTENTION_ROW_BLOCK
#define KEPT_ATTENTION_ROW_BLOCK 128
#endif
inline constexpr std::int64_t kAttentionRowBlock = KEPT_ATTENTION_ROW_BLOCK;

namespace detail {

// Forward softmax of a block of score rows (rows [row0, row0 + rows) of the sequence, keys
// [0, keys), row stride `keys`), in place: row r gets e_j = exp(s_j - max) on its causal prefix
// j <= row0 + r and 0 after it; lse[r] = max + log(sum e), inverse_sum[r] = 1 / sum e.
template <class T>
KEPT_ALWAYS_INLINE void causal_softmax_block(T* scores, std::int64_t rows, std::int64_t keys,
                                             std::int64_t row0, T* lse, T* inverse_sum) {
  for (std::int64_t r = 0; r < rows; ++r) {
    T* __restrict row = scores + r * keys;
    const std::int64_t visible = row0 + r + 1;
    const T max_score = row_max(row, visible);
    double sum = 0;
    for (std::int64_t block = 0; block < visible; block += kReductionBlock) {
      const std::int64_t block_end = std::min(visible, block + kReductionBlock);
      T block_sum = T(0);
#pragma omp simd reduction(+ : block_sum)
      for (std::int64_t j = block; j < block_end; ++j) {
        const T e = vexp(row[j] - max_score);
        row[j] = e;
        block_sum += e;
      }
      sum += static_cast<double>(block_sum);
    }
    for (std::int64_t j = visible; j < keys; ++j)
      row[j] = T(0);
    lse[r] = max_score + static_cast<T>(std::log(sum));
    inverse_sum[r] = static_cast<T>(1.0 / sum);
  }
}

// Backward: p = exp(s - lse) on the causal prefix, 0 after it (in place, as above).
template <class T>
KEPT_ALWAYS_INLINE void causal_probabilities_block(T* scores, std::int64_t rows, std::int64_t keys,
                                                   std::int64_t row0, const T* lse) {
  for (std::int64_t r = 0; r < rows; ++r) {
    T* __restrict row = scores + r * keys;
    const std::int64_t visible = row0 + r + 1;
    const T row_lse = lse[r];
    KEPT_PRAGMA_SIMD
    for (std::int64_t j = 0; j < visible; ++j)
      row[j] = vexp(row[j] - row_lse);
    for (std::int64_t j = visible; j < keys; ++j)
      row[j] = T(0);
  }
}

// Backward: ds = p o (dp - delta), row by row (ds holds dp on entry).
template <class T>
KEPT_ALWAYS_INLINE void softmax_backward_block(const T* probs, T* d_scores, std::int64_t rows,
                                               std::int64_t keys, const T* delta) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const T* __restrict p = probs + r * keys;
    T* __restrict ds = d_scores + r * keys;
    const T row_delta = delta[r];
    KEPT_PRAGMA_SIMD
    for (std::int64_t j = 0; j < keys; ++j)
      ds[j] = p[j] * (ds[j] - row_delta);
  }
}

KEPT_CPU_ENTRY_POINTS(causal_softmax_block, causal_softmax_block<float>,
                      (float* scores, std::int64_t rows, std::int64_t keys, std::int64_t row0,
                       float* lse, float* inverse_sum),
                      (scores, rows, keys, row0, lse, inverse_sum))
KEPT_CPU_ENTRY_POINTS(causal_probabilities_block, causal_probabilities_block<float>,
                      (float* scores, std::int64_t rows, std::int64_t keys, std::int64_t row0,
                       const float* lse),
                      (scores, rows, keys, row0, lse))
KEPT_CPU_ENTRY_POINTS(softmax_backward_block, softmax_backward_block<float>,
                      (const float* probs, float* d_scores, std::int64_t rows, std::int64_t keys,
                       const float* delta),
                      (probs, d_scores, rows, keys, delta))

template <class T>
inline void causal_softmax(CpuIsa isa, T* scores, std::int64_t rows, std::int64_t keys,
                           std::int64_t row0, T* lse, T* inverse_sum) {
  bool dispatched = false;
  KEPT_CPU_DISPATCH_TO(T, isa, causal_softmax_block, (scores, rows, keys, row0, lse, inverse_sum))
  if (!dispatched) causal_softmax_block<T>(scores, rows, keys, row0, lse, inverse_sum);
}
template <class T>
inline void causal_probabilities(CpuIsa isa, T* scores, std::int64_t rows, std::int64_t keys,
                                 std::int64_t row0, const T* lse) {
  bool dispatched = false;
  KEPT_CPU_DISPATCH_TO(T, isa, causal_probabilities_block, (scores, rows, keys, row0, lse))
  if (!dispatched) causal_probabilities_block<T>(scores, rows, keys, row0, lse);
}
template <class T>
inline void softmax_backward(CpuIsa isa, const T* probs, T* d_scores, std::int64_t rows,
                             std::int64_t keys, const T* delta) {
  bool dispatched = false;
  KEPT_CPU_DISPATCH_TO(T, isa, softmax_backward_block, (probs, d_scores, rows, keys, delta))
  if (!dispatched) softmax_backward_block<T>(probs, d_scores, rows, keys, delta);
}
}  // namespace detail

// o = attention(q, k, v); lse is [batch, heads, seq].
template <class T>
inline void attention_forward(const T* q, const T* k, const T* v, T* o, T* lse,
                              const AttentionShape& shape) {
  const std::int64_t stride = shape.row_stride(), seq = shape.seq, head_dim = shape.head_dim;
  const std::int64_t blocks = (seq + kAttentionRowBlock - 1) / kAttentionRowBlock;
  const std::int64_t pairs = shape.batch * shape.heads;
  const std::int64_t items = pairs * blocks;
  const T scale = shape.scale<T>();
  const CpuIsa isa = cpu_isa();
#pragma omp parallel
  {
    std::vector<T> scores(static_cast<std::size_t>(kAttentionRowBlock * seq));
    std::vector<T> inverse_sum(static_cast<std::size_t>(kAttentionRowBlock));
#pragma omp for schedule(dynamic)
    for (std::int64_t item = 0; item < items; ++item) {
      // Largest blocks first (the last row block of a sequence has the most keys), so the
      // dynamic schedule ends on small items and the threads finish together.
      const std::int64_t block = blocks - 1 - item / pairs;
      const std::int64_t head = (item % pairs) % shape.heads, b = (item % pairs) / shape.heads;
      const std::int64_t row0 = block * kAttentionRowBlock;
      const std::int64_t rows = std::min(kAttentionRowBlock, seq - row0), keys = row0 + rows;
      const std::int64_t offset = b * seq * stride + head * head_dim;
      MatrixView<const T> q_block(q + offset + row0 * stride, rows, head_dim, stride);
      MatrixView<const T> k_prefix(k + offset, keys, head_dim, stride);
      MatrixView<const T> v_prefix(v + offset, keys, head_dim, stride);
      MatrixView<T> s(scores.data(), rows, keys);
      gemm(q_block, Transpose::No, k_prefix, Transpose::Yes, s, scale);
      T* lse_rows = lse + (b * shape.heads + head) * seq + row0;
      detail::causal_softmax(isa, scores.data(), rows, keys, row0, lse_rows, inverse_sum.data());
      MatrixView<T> o_block(o + offset + row0 * stride, rows, head_dim, stride);
      gemm(MatrixView<const T>(s), Transpose::No, v_prefix, Transpose::No, o_block);
      for (std::int64_t r = 0; r < rows; ++r) {
        T* __restrict o_row = o_block.row(r);
        const T inverse = inverse_sum[static_cast<std::size_t>(r)];
        KEPT_PRAGMA_SIMD
        for (std::int64_t d = 0; d < head_dim; ++d)
          o_row[d] *= inverse;
      }
    }
  }
}

// dq += dL/dq, dk += dL/dk, dv += dL/dv given d_o, the forward's inputs, output and lse.
template <class T>
inline void attention_backward(const T* d_o, const T* q, const T* k, const T* v, const T* o,
                               const T* lse, T* dq, T* dk, T* dv, const AttentionShape& shape) {
  const std::int64_t stride = shape.row_stride(), seq = shape.seq, head_dim = shape.head_dim;
  const std::int64_t blocks = (seq + kAttentionRowBlock - 1) / kAttentionRowBlock;
  const T scale = shape.scale<T>();
  const CpuIsa isa = cpu_isa();
#pragma omp parallel
  {
    std::vector<T> probs(static_cast<std::size_t>(kAttentionRowBlock * seq));
    std::vector<T> d_scores(probs.size());
    std::vector<T> delta(static_cast<std::size_t>(kAttentionRowBlock));
#pragma omp for schedule(dynamic)
    for (std::int64_t pair = 0; pair < shape.batch * shape.heads; ++pair) {
      const std::int64_t b = pair / shape.heads, head = pair % shape.heads;
      const std::int64_t offset = b * seq * stride + head * head_dim;
      for (std::int64_t block = 0; block < blocks; ++block) {
        const std::int64_t row0 = block * kAttentionRowBlock;
        const std::int64_t rows = std::min(kAttentionRowBlock, seq - row0), keys = row0 + rows;
        MatrixView<const T> q_block(q + offset + row0 * stride, rows, head_dim, stride);
        MatrixView<const T> do_block(d_o + offset + row0 * stride, rows, head_dim, stride);
        MatrixView<const T> k_prefix(k + offset, keys, head_dim, stride);
        MatrixView<const T> v_prefix(v + offset, keys, head_dim, stride);
        MatrixView<T> p(probs.data(), rows, keys);
        MatrixView<T> ds(d_scores.data(), rows, keys);
        // Rebuild P from the saved log-sum-exp.
        gemm(q_block, Transpose::No, k_prefix, Transpose::Yes, p, scale);
        detail::causal_probabilities(isa, probs.data(), rows, keys, row0, lse + pair * seq + row0);
        // dV[0:keys] += P^T dO
        gemm(MatrixView<const T>(p), Transpose::Yes, do_block, Transpose::No,
             MatrixView<T>(dv + offset, keys, head_dim, stride), T(1), T(1));
        // dP = dO V^T, then dS = P o (dP - delta), delta_r = dO_r . O_r
        gemm(do_block, Transpose::No, v_prefix, Transpose::Yes, ds);
        for (std::int64_t r = 0; r < rows; ++r) {
          const T* __restrict do_row = do_block.row(r);
          const T* __restrict o_row = o + offset + (row0 + r) * stride;
          T sum = T(0);
#pragma omp simd reduction(+ : sum)
          for (std::int64_t d = 0; d < head_dim; ++d)
            sum += do_row[d] * o_row[d];
          delta[static_cast<std::size_t>(r)] = sum;
        }
        detail::softmax_backward(isa, probs.data(), d_scores.data(), rows, keys, delta.data());
        // dQ[block] += scale * dS K,  dK[0:keys] += scale * dS^T Q[block]
        gemm(MatrixView<const T>(ds), Transpose::No, k_prefix, Transpose::No,
             MatrixView<T>(dq + offset + row0 * stride, rows, head_dim, stride), scale, T(1));
        gemm(MatrixView<const T>(ds), Transpose::Yes, q_block, Transpose::No,
             MatrixView<T>(dk + offset, keys, head_dim, stride), scale, T(1));
      }
    }
  }
}

}  // namespace kept::cpu
