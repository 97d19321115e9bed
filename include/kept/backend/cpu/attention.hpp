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
// materialised. Work is split into blocks of kRowBlock query rows: a block only needs keys
// [0, end of block), which skips most of the masked upper triangle, and its score tile
// (kRowBlock x seq floats) stays in cache. Forward parallelises over (sequence, head, row
// block); backward over (sequence, head), because dK and dV of one head collect
// contributions from all its row blocks. GEMMs inside run on the calling thread (OpenMP
// OpenBLAS inside a parallel region).
// dq, dk, dv accumulate (+=).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kept/backend/cpu/gemm.hpp"

namespace kept::cpu {

struct AttentionShape {
  std::int64_t batch = 0, seq = 0, heads = 0, head_dim = 0;
  std::int64_t row_stride() const { return heads * head_dim; }
  template <class T>
  T scale() const {
    return T(1) / std::sqrt(static_cast<T>(head_dim));
  }
};

inline constexpr std::int64_t kAttentionRowBlock = 64;

namespace detail {
// Softmax over the causal prefix of each row of `scores` (rows [row0, row0 + rows) of the
// sequence, keys [0, row0 + rows)), in place; writes log-sum-exp per row.
template <class T>
inline void causal_softmax_rows(T* scores, std::int64_t rows, std::int64_t keys, std::int64_t row0,
                                T* lse) {
  for (std::int64_t r = 0; r < rows; ++r) {
    T* row = scores + r * keys;
    const std::int64_t visible = row0 + r + 1;
    T max_score = -std::numeric_limits<T>::infinity();
    for (std::int64_t j = 0; j < visible; ++j)
      max_score = std::max(max_score, row[j]);
    T sum = T(0);
    for (std::int64_t j = 0; j < visible; ++j) {
      row[j] = std::exp(row[j] - max_score);
      sum += row[j];
    }
    const T inverse = T(1) / sum;
    for (std::int64_t j = 0; j < visible; ++j)
      row[j] *= inverse;
    for (std::int64_t j = visible; j < keys; ++j)
      row[j] = T(0);
    lse[r] = max_score + std::log(sum);
  }
}
}  // namespace detail

// o = attention(q, k, v); lse is [batch, heads, seq].
template <class T>
inline void attention_forward(const T* q, const T* k, const T* v, T* o, T* lse,
                              const AttentionShape& shape) {
  const std::int64_t stride = shape.row_stride(), seq = shape.seq;
  const std::int64_t blocks = (seq + kAttentionRowBlock - 1) / kAttentionRowBlock;
  const std::int64_t items = shape.batch * shape.heads * blocks;
  const T scale = shape.scale<T>();
#pragma omp parallel
  {
    std::vector<T> scores(static_cast<std::size_t>(kAttentionRowBlock * seq));
#pragma omp for schedule(dynamic)
    for (std::int64_t item = 0; item < items; ++item) {
      // Largest blocks first (the last row block of a sequence has the most keys), so the
      // dynamic schedule ends on small items and the threads finish together.
      const std::int64_t pairs = shape.batch * shape.heads;
      const std::int64_t block = blocks - 1 - item / pairs;
      const std::int64_t head = (item % pairs) % shape.heads, b = (item % pairs) / shape.heads;
      const std::int64_t row0 = block * kAttentionRowBlock;
      const std::int64_t rows = std::min(kAttentionRowBlock, seq - row0), keys = row0 + rows;
      const std::int64_t offset = b * seq * stride + head * shape.head_dim;
      MatrixView<const T> q_block(q + offset + row0 * stride, rows, shape.head_dim, stride);
      MatrixView<const T> k_prefix(k + offset, keys, shape.head_dim, stride);
      MatrixView<const T> v_prefix(v + offset, keys, shape.head_dim, stride);
      MatrixView<T> s(scores.data(), rows, keys);
      gemm(q_block, Transpose::No, k_prefix, Transpose::Yes, s, scale);
      T* lse_rows = lse + (b * shape.heads + head) * seq + row0;
      detail::causal_softmax_rows(scores.data(), rows, keys, row0, lse_rows);
      MatrixView<T> o_block(o + offset + row0 * stride, rows, shape.head_dim, stride);
      gemm(MatrixView<const T>(s), Transpose::No, v_prefix, Transpose::No, o_block);
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
#pragma omp parallel
  {
    std::vector<T> probs(static_cast<std::size_t>(kAttentionRowBlock * seq));
    std::vector<T> d_scores(probs.size());
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
        const T* lse_rows = lse + pair * seq + row0;
        for (std::int64_t r = 0; r < rows; ++r) {
          const std::int64_t visible = row0 + r + 1;
          for (std::int64_t j = 0; j < visible; ++j)
            p(r, j) = std::exp(p(r, j) - lse_rows[r]);
          for (std::int64_t j = visible; j < keys; ++j)
            p(r, j) = T(0);
        }
        // dV[0:keys] += P^T dO
        gemm(MatrixView<const T>(p), Transpose::Yes, do_block, Transpose::No,
             MatrixView<T>(dv + offset, keys, head_dim, stride), T(1), T(1));
        // dP = dO V^T, then dS = P o (dP - delta)
        gemm(do_block, Transpose::No, v_prefix, Transpose::Yes, ds);
        for (std::int64_t r = 0; r < rows; ++r) {
          const T* do_row = do_block.row(r);
          const T* o_row = o + offset + (row0 + r) * stride;
          T delta = T(0);
          for (std::int64_t d = 0; d < head_dim; ++d)
            delta += do_row[d] * o_row[d];
          for (std::int64_t j = 0; j < keys; ++j)
            ds(r, j) = p(r, j) * (ds(r, j) - delta);
        }
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
