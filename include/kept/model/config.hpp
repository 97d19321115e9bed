// kept/model/config.hpp: the hyper-parameters of a decoder, independent of any file format.
//
// kept runs two computations. The LayerNorm decoder (Orion; HF StableLM with full rotary,
// sequential residual and no q/k bias or q/k norm is the same computation with the same tensor
// names) and the RMSNorm decoder (Llama). `architecture` records which checkpoint family a
// config came from, so a writer can round-trip it; `norm_kind()` is what the model templates need.
// io/hf_config.hpp maps this to and from HF config.json.
#pragma once

#include <cstdint>
#include <string>

#include "kept/core/dtype.hpp"
#include "kept/core/error.hpp"

namespace kept {

enum class Architecture : std::uint8_t { Orion, StableLm, Llama };

constexpr const char* architecture_name(Architecture arch) {
  switch (arch) {
    case Architecture::Orion:
      return "orion";
    case Architecture::StableLm:
      return "stablelm";
    case Architecture::Llama:
      return "llama";
  }
  return "?";
}

enum class NormKind : std::uint8_t { LayerNorm, RmsNorm };

struct ModelConfig {
  Architecture architecture = Architecture::Llama;
  std::int64_t vocab_size = 0;
  std::int64_t hidden_size = 0;
  std::int64_t intermediate_size = 0;
  std::int64_t num_layers = 0;
  std::int64_t num_heads = 0;
  std::int64_t num_kv_heads = 0;  // equal to num_heads: kept implements multi-head attention
  std::int64_t head_dim = 0;      // hidden_size / num_heads
  std::int64_t max_position_embeddings = 4096;
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;       // LayerNorm eps for Orion/StableLM, RMSNorm eps for Llama
  bool attention_bias = false;  // Llama: bias on q, k, v and o
  bool mlp_bias = false;        // Llama: bias on gate, up and down
  DType dtype = DType::BF16;    // storage dtype of the checkpoint (config "torch_dtype")
  std::int64_t bos_token_id = 1;
  std::int64_t eos_token_id = 2;
  std::int64_t pad_token_id = -1;  // -1: none

  // A multi-head decoder of these sizes (num_kv_heads = heads, head_dim = hidden / heads); every
  // other field keeps its default.
  static ModelConfig decoder(Architecture architecture, std::int64_t vocab, std::int64_t hidden,
                             std::int64_t intermediate, std::int64_t layers, std::int64_t heads) {
    ModelConfig config;
    config.architecture = architecture;
    config.vocab_size = vocab;
    config.hidden_size = hidden;
    config.intermediate_size = intermediate;
    config.num_layers = layers;
    config.num_heads = config.num_kv_heads = heads;
    config.head_dim = heads > 0 ? hidden / heads : 0;
    return config;
  }

  NormKind norm_kind() const {
    return architecture == Architecture::Llama ? NormKind::RmsNorm : NormKind::LayerNorm;
  }

  // Checks the invariants the model templates rely on; `where` names the source (a file path).
  void validate(const std::string& where) const {
    auto positive = [&](std::int64_t value, const char* field) {
      KEPT_CHECK(value > 0, where, ": field \"", field, "\" must be positive, got ", value);
    };
    positive(vocab_size, "vocab_size");
    positive(hidden_size, "hidden_size");
    positive(intermediate_size, "intermediate_size");
    positive(num_layers, "num_hidden_layers");
    positive(num_heads, "num_attention_heads");
    positive(head_dim, "head_dim");
    positive(max_position_embeddings, "max_position_embeddings");
    // Upper bounds far above any real model (Orion-14B: 40 layers, hidden 5120, vocab 84608),
    // so a corrupt or hostile config fails here instead of in an allocation of 10^18 bytes.
    auto at_most = [&](std::int64_t value, std::int64_t limit, const char* field) {
      KEPT_CHECK(value <= limit, where, ": field \"", field, "\" is ", value,
                 ", more than kept's limit of ", limit, " (a corrupt config?)");
    };
    at_most(num_layers, 4096, "num_hidden_layers");
    at_most(hidden_size, 1 << 20, "hidden_size");
    at_most(intermediate_size, 1 << 22, "intermediate_size");
    at_most(vocab_size, 1 << 24, "vocab_size");
    at_most(num_heads, 1 << 14, "num_attention_heads");
    at_most(max_position_embeddings, 1 << 26, "max_position_embeddings");
    const double parameters =
        static_cast<double>(num_layers) *
            (4.0 * static_cast<double>(hidden_size) * static_cast<double>(hidden_size) +
             3.0 * static_cast<double>(hidden_size) * static_cast<double>(intermediate_size)) +
        2.0 * static_cast<double>(vocab_size) * static_cast<double>(hidden_size);
    KEPT_CHECK(parameters <= 1e13, where, ": the config describes ", parameters,
               " parameters, more than kept's limit of 1e13 (a corrupt config?)");
    KEPT_CHECK(num_kv_heads == num_heads, where, ": field \"num_key_value_heads\" is ",
               num_kv_heads, " but num_attention_heads is ", num_heads,
               "; kept implements multi-head attention only (no grouped-query attention)");
    KEPT_CHECK(head_dim * num_heads == hidden_size, where, ": head_dim ", head_dim, " x ",
               num_heads, " heads != hidden_size ", hidden_size);
    KEPT_CHECK(head_dim % 2 == 0, where, ": head_dim ", head_dim, " must be even for RoPE");
    KEPT_CHECK(rope_theta > 0, where, ": field \"rope_theta\" must be positive, got ", rope_theta);
    KEPT_CHECK(norm_eps >= 0, where, ": norm eps must be non-negative, got ", norm_eps);
    KEPT_CHECK(architecture == Architecture::Llama || (!attention_bias && !mlp_bias), where,
               ": attention_bias / mlp_bias exist only for llama");
  }
};

}  // namespace kept
