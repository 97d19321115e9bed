// kept/convert/resize.hpp: a Llama decoder's weights mapped to another size, and two mapped
// models interpolated (Chain-based Distillation: anchors of several sizes, and a model of any
// size between two of them initialised as w = (1 - a) w_A + a w_B).
//
// The target may be narrower or wider (hidden size, heads, intermediate size) and shallower or
// deeper than the source, axis by axis; the vocabulary and the head size stay. Each axis is
// mapped on its own:
//
//   equal    the identity (a model mapped to its own shape comes back bit for bit).
//   shrink   consistent selection by importance: the source's coordinates are ranked by the sum
//            of squares of every weight that reads or writes them, and the target keeps the
//            first ones of that ranking, in ranking order, the same hidden coordinates in every
//            layer so that the residual stream lines up (Xu et al. 2023's consistent weight
//            selection, with the ranking deciding which). Ranked:
//              hidden coordinate c  embedding and LM-head column c, the input column c of
//                                   q/k/v/gate/up and the output row c of o/down, all layers;
//              head h of a layer    its rows of q, k, v and its columns of o (head_dim each);
//              FFN unit u           row u of gate and up, column u of down.
//            Norm weights and biases follow their coordinate but do not vote. Reordering a
//            Llama's coordinates consistently (hidden, a layer's heads, a layer's units) is an
//            exact symmetry of the network (RMSNorm's weight is elementwise, RoPE acts inside a
//            head), so the ranking itself changes nothing; dropping the tail is the
//            approximation. Ranking order (not the original order) is what lets two anchors
//            meet: a smaller anchor made by this rule holds the larger one's top coordinates
//            first, so the larger one shrunk to a middle size and the smaller one grown to it
//            put the same coordinates in the same places.
//   grow     zero-padding, which preserves the function exactly: a new hidden coordinate is
//            written by nothing (zero embedding column, zero o/down output rows and biases), so
//            it stays 0 along the residual stream, and what reads it reads 0; a new head has
//            zero q/k/v rows and zero o columns (its uniform attention over zero values adds 0);
//            a new FFN unit has zero gate/up rows and a zero down column (silu(0) * 0 = 0). The
//            one correction: an RMSNorm over h_t coordinates of which h_s carry the signal sees
//            a mean square h_s / h_t times the source's, so every norm weight is multiplied by
//            sqrt(h_s / h_t) (exact when eps = 0; with eps > 0 the source's eps acts as
//            eps h_t / h_s: a relative change of order eps / mean square). New coordinates'
//            norm weights (which multiply 0) get the mean of the source's final-norm weight
//            (scaled likewise), so that interpolating them with a real anchor stays in range.
//            Shrinking the hidden size changes the norms' mean square too, by the share of the
//            stream's energy the kept coordinates carry, which the weights alone cannot know:
//            the kept share of the hidden ranking's score stands in for it, and the norm weights
//            are multiplied by sqrt(share h_s / h_t) (1 when the energy is spread evenly, and
//            exact when the dropped coordinates carry nothing, e.g. a grown model shrunk back).
//
// Depth. Shrinking keeps L_t layers evenly spaced over the source's L_s: target layer j is
// source layer round(j (L_s - 1) / (L_t - 1)) (the first and the last always kept). Growing
// places source layer i at target position round(i (L_t - 1) / (L_s - 1)) and fills every other
// position with an identity layer: its input side (the two norms, q, k, v, gate, up and their
// biases) copied from the source layer placed just before it, its output side (o, down and
// their biases) zero, so it adds nothing to the residual stream (exact). Both rules map layers
// by relative depth, so a shrunk larger anchor and a grown smaller one pair layers of about the
// same depth.
//
// Interpolation: w = w_A + a (w_B - w_A) element by element in double (a = 0 gives A and a = 1
// gives B exactly; two copies of one model give it back for any a). default_alpha puts the
// target by parameter count between the anchors: a = (N_A - N_T) / (N_A - N_B), so a target
// the size of A takes A and one the size of B takes B.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/model/config.hpp"

namespace kept {

// A model's weights by HF name, host tensors of any floating dtype.
using NamedWeights = std::map<std::string, Tensor, std::less<>>;

// Along one axis, each target index's source index, or -1 for a new (zero) entry.
using IndexMap = std::vector<std::int64_t>;

struct ResizeMaps {
  IndexMap hidden;                       // target hidden coordinate -> source coordinate
  std::vector<std::int64_t> layer;       // target layer -> source layer, -1: identity layer
  std::vector<std::int64_t> input_side;  // target layer -> source layer of its input side
  std::vector<IndexMap> heads;           // per target layer: head -> head of input_side[l]
  std::vector<IndexMap> units;           // per target layer: FFN unit -> unit of input_side[l]
  double norm_scale = 1.0;               // sqrt(h_s / h_t) when the hidden size grows
  double new_norm_weight = 0.0;          // a new hidden coordinate's norm weight (unscaled)
};

// Parameters of a Llama config (embedding and LM head included): what default_alpha compares.
inline double parameter_count(const ModelConfig& c) {
  const auto h = static_cast<double>(c.hidden_size), i = static_cast<double>(c.intermediate_size);
  const auto attention = static_cast<double>(c.num_heads * c.head_dim);
  double layer = 3 * h * attention + attention * h + 3 * h * i + 2 * h;
  if (c.attention_bias) layer += 3 * attention + h;
  if (c.mlp_bias) layer += 2 * i + h;
  return static_cast<double>(c.num_layers) * layer + 2 * static_cast<double>(c.vocab_size) * h + h;
}

// a = (N_A - N_T) / (N_A - N_B), clamped to [0, 1]; 0 when the anchors are the same size.
inline double default_alpha(const ModelConfig& a, const ModelConfig& b, const ModelConfig& target) {
  const double na = parameter_count(a), nb = parameter_count(b), nt = parameter_count(target);
  if (na == nb) return 0.0;
  return std::clamp((na - nt) / (na - nb), 0.0, 1.0);
}

// The shape checks every mapping needs; `from` and `to` name the two sides in errors.
inline void check_resizable(const ModelConfig& source, const std::string& from,
                            const ModelConfig& target, const std::string& to) {
  KEPT_CHECK(
      source.architecture == Architecture::Llama, from, ": is ",
      architecture_name(source.architecture),
      "; only Llama checkpoints are resized (convert a LayerNorm model first: kept convert)");
  KEPT_CHECK(target.architecture == Architecture::Llama, to, ": is ",
             architecture_name(target.architecture), ", not llama");
  KEPT_CHECK(source.vocab_size == target.vocab_size, to, ": vocab_size ", target.vocab_size,
             " differs from ", from, "'s ", source.vocab_size,
             "; resizing keeps the vocabulary (and the tokenizer)");
  KEPT_CHECK(
      source.head_dim == target.head_dim, to, ": head_dim ", target.head_dim, " differs from ",
      from, "'s ", source.head_dim,
      "; resizing adds or drops whole heads, so hidden_size / num_attention_heads must stay");
  KEPT_CHECK(source.attention_bias == target.attention_bias && source.mlp_bias == target.mlp_bias,
             to, ": attention_bias / mlp_bias differ from ", from, "'s");
}

namespace detail {

inline std::vector<double> as_doubles(const Tensor& tensor) {
  const Tensor wide = tensor.dtype() == DType::F64 ? tensor : tensor.to(DType::F64);
  const auto values = wide.span<const double>();
  return std::vector<double>(values.begin(), values.end());
}

inline const Tensor& weight(const NamedWeights& weights, const std::string& name,
                            const Shape& shape, std::string_view where) {
  auto found = weights.find(name);
  KEPT_CHECK(found != weights.end(), where, ": has no tensor ", name);
  KEPT_CHECK(found->second.shape() == shape, where, ": ", name, " has shape ",
             found->second.shape(), ", its config says ", shape);
  return found->second;
}

inline std::string layer_name(std::int64_t l, std::string_view rest) {
  return "model.layers." + std::to_string(l) + "." + std::string(rest);
}

// The first `count` indices of 0..n-1 ranked by `score` (descending, ties by index); or the
// identity when count == n, or zero-padding (-1) past n when count > n.
inline IndexMap choose(const std::vector<double>& score, std::int64_t count) {
  const auto n = static_cast<std::int64_t>(score.size());
  IndexMap map(static_cast<std::size_t>(count), -1);
  if (count >= n) {
    std::iota(map.begin(), map.begin() + n, 0);
    return map;
  }
  std::vector<std::int64_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) {
    return score[static_cast<std::size_t>(x)] > score[static_cast<std::size_t>(y)];
  });
  std::copy(order.begin(), order.begin() + count, map.begin());
  return map;
}

enum class Along { Rows, Columns };

// Adds the squares of a [rows, cols] matrix into score[row / group] (Along::Rows) or
// score[column / group] (Along::Columns).
inline void add_squares(Along along, const std::vector<double>& m, std::int64_t rows,
                        std::int64_t cols, std::vector<double>& score, std::int64_t group = 1) {
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) {
      const double x = m[static_cast<std::size_t>(r * cols + c)];
      score[static_cast<std::size_t>((along == Along::Rows ? r : c) / group)] += x * x;
    }
}

}  // namespace detail

// The maps from `source` (weights of config `from`) to config `to` (see the top comment).
inline ResizeMaps plan_resize(const NamedWeights& source, const ModelConfig& from,
                              const ModelConfig& to, std::string_view where = "source") {
  using detail::layer_name;
  check_resizable(from, std::string(where), to, "target config");
  const std::int64_t h = from.hidden_size, i = from.intermediate_size, v = from.vocab_size;
  const std::int64_t heads = from.num_heads, d = from.head_dim, a = heads * d;
  auto read = [&](const std::string& name, const Shape& shape) {
    return detail::as_doubles(detail::weight(source, name, shape, where));
  };
  ResizeMaps maps;
  // Depth.
  const std::int64_t ls = from.num_layers, lt = to.num_layers;
  maps.layer.assign(static_cast<std::size_t>(lt), -1);
  if (lt <= ls) {
    for (std::int64_t j = 0; j < lt; ++j)
      maps.layer[static_cast<std::size_t>(j)] =
          lt == 1 ? 0
                  : std::llround(static_cast<double>(j * (ls - 1)) / static_cast<double>(lt - 1));
  } else {
    for (std::int64_t s = 0; s < ls; ++s)
      maps.layer[static_cast<std::size_t>(ls == 1 ? 0
                                                  : std::llround(static_cast<double>(s * (lt - 1)) /
                                                                 static_cast<double>(ls - 1)))] = s;
  }
  maps.input_side = maps.layer;
  for (std::size_t j = 1; j < maps.input_side.size(); ++j)
    if (maps.input_side[j] < 0) maps.input_side[j] = maps.input_side[j - 1];
  // Hidden: ranked over every weight that touches the residual stream (only when shrinking).
  std::vector<double> hidden_score(static_cast<std::size_t>(h), 0.0);
  if (to.hidden_size < h) {
    for (const char* name : {"model.embed_tokens.weight", "lm_head.weight"})
      detail::add_squares(detail::Along::Columns, read(name, {v, h}), v, h, hidden_score);
    for (std::int64_t l = 0; l < ls; ++l) {
      for (const char* in :
           {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"})
        detail::add_squares(detail::Along::Columns, read(layer_name(l, in), {a, h}), a, h,
                            hidden_score);
      for (const char* in : {"mlp.gate_proj.weight", "mlp.up_proj.weight"})
        detail::add_squares(detail::Along::Columns, read(layer_name(l, in), {i, h}), i, h,
                            hidden_score);
      detail::add_squares(detail::Along::Rows,
                          read(layer_name(l, "self_attn.o_proj.weight"), {h, a}), h, a,
                          hidden_score);
      detail::add_squares(detail::Along::Rows, read(layer_name(l, "mlp.down_proj.weight"), {h, i}),
                          h, i, hidden_score);
    }
  }
  maps.hidden = detail::choose(hidden_score, to.hidden_size);
  if (to.hidden_size != h) {
    // The norms' weights: sqrt(share x h_s / h_t) (the top comment), share 1 when growing.
    double share = 1.0;
    if (to.hidden_size < h) {
      const double total = std::accumulate(hidden_score.begin(), hidden_score.end(), 0.0);
      double kept = 0;
      for (std::int64_t c : maps.hidden)
        kept += hidden_score[static_cast<std::size_t>(c)];
      share =
          total > 0 ? kept / total : static_cast<double>(to.hidden_size) / static_cast<double>(h);
    }
    maps.norm_scale =
        std::sqrt(share * static_cast<double>(h) / static_cast<double>(to.hidden_size));
    const std::vector<double> final_norm = read("model.norm.weight", {h});
    maps.new_norm_weight =
        std::accumulate(final_norm.begin(), final_norm.end(), 0.0) / static_cast<double>(h);
  }
  // Heads and FFN units, per target layer from the layer its input side comes from.
  for (std::int64_t j = 0; j < lt; ++j) {
    const std::int64_t l = maps.input_side[static_cast<std::size_t>(j)];
    std::vector<double> head_score(static_cast<std::size_t>(heads), 0.0);
    if (to.num_heads < heads) {
      for (const char* in :
           {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"})
        detail::add_squares(detail::Along::Rows, read(layer_name(l, in), {a, h}), a, h, head_score,
                            d);
      detail::add_squares(detail::Along::Columns,
                          read(layer_name(l, "self_attn.o_proj.weight"), {h, a}), h, a, head_score,
                          d);
    }
    maps.heads.push_back(detail::choose(head_score, to.num_heads));
    std::vector<double> unit_score(static_cast<std::size_t>(i), 0.0);
    if (to.intermediate_size < i) {
      for (const char* in : {"mlp.gate_proj.weight", "mlp.up_proj.weight"})
        detail::add_squares(detail::Along::Rows, read(layer_name(l, in), {i, h}), i, h, unit_score);
      detail::add_squares(detail::Along::Columns,
                          read(layer_name(l, "mlp.down_proj.weight"), {h, i}), h, i, unit_score);
    }
    maps.units.push_back(detail::choose(unit_score, to.intermediate_size));
  }
  return maps;
}

// `source` (config `from`) mapped to config `to` by `maps`, as F64 host tensors (every tensor of
// a Llama checkpoint of config `to`).
inline NamedWeights apply_resize(const NamedWeights& source, const ModelConfig& from,
                                 const ModelConfig& to, const ResizeMaps& maps,
                                 std::string_view where = "source") {
  using detail::layer_name;
  const std::int64_t hs = from.hidden_size, is = from.intermediate_size, v = from.vocab_size;
  const std::int64_t d = from.head_dim, as = from.num_heads * d;
  const std::int64_t ht = to.hidden_size;
  const IndexMap vocab = [&] {
    IndexMap identity(static_cast<std::size_t>(v));
    std::iota(identity.begin(), identity.end(), 0);
    return identity;
  }();
  // A head map widened to rows of head_dim.
  auto head_rows = [&](const IndexMap& heads) {
    IndexMap rows;
    for (std::int64_t head : heads)
      for (std::int64_t k = 0; k < d; ++k)
        rows.push_back(head < 0 ? -1 : head * d + k);
    return rows;
  };
  NamedWeights out;
  // out[r, c] = in[rows[r], cols[c]] (0 where either is -1) for a [src_rows, src_cols] matrix;
  // zero: the whole tensor 0 (an identity layer's output side).
  auto matrix = [&](const std::string& out_name, const std::string& in_name, const Shape& in_shape,
                    const IndexMap& rows, const IndexMap& cols, bool zero = false) {
    const std::vector<double> in =
        detail::as_doubles(detail::weight(source, in_name, in_shape, where));
    const std::int64_t in_cols = in_shape.rank() == 2 ? in_shape[1] : 1;
    const auto out_rows = static_cast<std::int64_t>(rows.size());
    const auto out_cols = static_cast<std::int64_t>(cols.size());
    Tensor t = Tensor::zeros(DType::F64,
                             in_shape.rank() == 2 ? Shape{out_rows, out_cols} : Shape{out_rows});
    auto values = t.span<double>();
    if (!zero)
      for (std::int64_t r = 0; r < out_rows; ++r) {
        const std::int64_t sr = rows[static_cast<std::size_t>(r)];
        if (sr < 0) continue;
        for (std::int64_t c = 0; c < out_cols; ++c) {
          const std::int64_t sc = cols[static_cast<std::size_t>(c)];
          if (sc >= 0)
            values[static_cast<std::size_t>(r * out_cols + c)] =
                in[static_cast<std::size_t>(sr * in_cols + sc)];
        }
      }
    out.emplace(out_name, std::move(t));
  };
  const IndexMap one{0};
  auto norm = [&](const std::string& out_name, const std::string& in_name) {
    const std::vector<double> in = detail::as_doubles(detail::weight(source, in_name, {hs}, where));
    Tensor t = Tensor::empty(DType::F64, {ht});
    auto values = t.span<double>();
    for (std::int64_t c = 0; c < ht; ++c) {
      const std::int64_t sc = maps.hidden[static_cast<std::size_t>(c)];
      values[static_cast<std::size_t>(c)] =
          maps.norm_scale * (sc < 0 ? maps.new_norm_weight : in[static_cast<std::size_t>(sc)]);
    }
    out.emplace(out_name, std::move(t));
  };
  matrix("model.embed_tokens.weight", "model.embed_tokens.weight", {v, hs}, vocab, maps.hidden);
  matrix("lm_head.weight", "lm_head.weight", {v, hs}, vocab, maps.hidden);
  norm("model.norm.weight", "model.norm.weight");
  for (std::int64_t j = 0; j < to.num_layers; ++j) {
    const std::int64_t placed = maps.layer[static_cast<std::size_t>(j)];
    const std::int64_t l = maps.input_side[static_cast<std::size_t>(j)];
    const bool identity = placed < 0;
    const IndexMap rows = head_rows(maps.heads[static_cast<std::size_t>(j)]);
    const IndexMap& units = maps.units[static_cast<std::size_t>(j)];
    auto name = [](std::int64_t layer, std::string_view rest) { return layer_name(layer, rest); };
    norm(name(j, "input_layernorm.weight"), name(l, "input_layernorm.weight"));
    norm(name(j, "post_attention_layernorm.weight"), name(l, "post_attention_layernorm.weight"));
    // Each projection maps its inner axis (heads widened to rows, or FFN units) and the hidden
    // one. The input side reads the stream, [inner, hidden]; the output side writes it,
    // [hidden, inner], and is zero in an identity layer.
    struct Projection {
      const char* name;
      const IndexMap& inner;
      std::int64_t inner_size;  // in the source
      bool output_side, bias;
    };
    const Projection projections[] = {
        {"self_attn.q_proj", rows, as, false, from.attention_bias},
        {"self_attn.k_proj", rows, as, false, from.attention_bias},
        {"self_attn.v_proj", rows, as, false, from.attention_bias},
        {"self_attn.o_proj", rows, as, true, from.attention_bias},
        {"mlp.gate_proj", units, is, false, from.mlp_bias},
        {"mlp.up_proj", units, is, false, from.mlp_bias},
        {"mlp.down_proj", units, is, true, from.mlp_bias},
    };
    for (const Projection& p : projections) {
      const std::string weight = std::string(p.name) + ".weight";
      const std::string bias = std::string(p.name) + ".bias";
      if (p.output_side) {
        matrix(name(j, weight), name(l, weight), {hs, p.inner_size}, maps.hidden, p.inner,
               identity);
        if (p.bias) matrix(name(j, bias), name(l, bias), {hs}, maps.hidden, one, identity);
      } else {
        matrix(name(j, weight), name(l, weight), {p.inner_size, hs}, p.inner, maps.hidden);
        if (p.bias) matrix(name(j, bias), name(l, bias), {p.inner_size}, p.inner, one);
      }
    }
  }
  return out;
}

// `source` mapped to config `to` (plan_resize, then apply_resize).
inline NamedWeights resize_weights(const NamedWeights& source, const ModelConfig& from,
                                   const ModelConfig& to, std::string_view where = "source") {
  return apply_resize(source, from, to, plan_resize(source, from, to, where), where);
}

// w = a_w + alpha (b_w - a_w) for every tensor (the same names and shapes on both sides), F64.
inline NamedWeights interpolate_weights(const NamedWeights& a, const NamedWeights& b,
                                        double alpha) {
  KEPT_CHECK(alpha >= 0.0 && alpha <= 1.0, "interpolate: alpha ", alpha, " is outside [0, 1]");
  KEPT_CHECK(a.size() == b.size(), "interpolate: ", a.size(), " tensors against ", b.size());
  NamedWeights out;
  for (const auto& [name, tensor_a] : a) {
    auto found = b.find(name);
    KEPT_CHECK(found != b.end(), "interpolate: the second model has no ", name);
    KEPT_CHECK(found->second.shape() == tensor_a.shape(), "interpolate: ", name, " has shape ",
               tensor_a.shape(), " and ", found->second.shape());
    const std::vector<double> x = detail::as_doubles(tensor_a),
                              y = detail::as_doubles(found->second);
    Tensor t = Tensor::empty(DType::F64, tensor_a.shape());
    auto values = t.span<double>();
    for (std::size_t e = 0; e < x.size(); ++e)
      values[e] = alpha == 0.0 ? x[e] : alpha == 1.0 ? y[e] : x[e] + alpha * (y[e] - x[e]);
    out.emplace(name, std::move(t));
  }
  return out;
}

}  // namespace kept
