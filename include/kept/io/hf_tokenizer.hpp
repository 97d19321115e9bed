// kept/io/hf_tokenizer.hpp: the tokenizer files of a Hugging Face Llama checkpoint, written from a
// SentencePiece model so that transformers 4.x and 5.x, slow and fast, give the ids SentencePiece
// gives, with trust_remote_code=False.
//
// Files written:
//   tokenizer.model          the source's, byte for byte (the slow tokenizer reads it);
//   tokenizer.json           the fast tokenizer (below);
//   tokenizer_config.json    class, special tokens, add_bos/add_eos, legacy, no auto_map;
//   special_tokens_map.json  bos, eos, unk (and pad when the source has one);
//   generation_config.json   the source's, else bos/eos/pad from the model's config;
//   chat_template.jinja      when there is a chat template (also inline in tokenizer_config).
//
// tokenizer.json reproduces SentencePiece BPE (the model Orion, Llama and `kept tokenizer` use):
//   normalizer  Precompiled(charsmap) when the rule is not identity (tokenizers implements
//               SentencePiece's compiled map exactly); then, for remove_extra_whitespaces,
//               regex replaces that drop leading and trailing ' ' and fold runs of ' ' (only
//               U+0020, as SentencePiece: a tab or newline is kept); then Prepend("▁") for
//               add_dummy_prefix and Replace(' ', '▁') for escape_whitespaces;
//   model       BPE over every piece with byte_fallback as the model says, unk fused. Merges:
//               SentencePiece BPE merges the adjacent pair whose concatenation is the
//               highest-scoring piece, leftmost first; HF BPE merges the lowest-ranked pair. So
//               every split (l, r) of every normal piece p with l and r in the vocabulary is a
//               merge, ranked by p's score (descending), then p's id, then l's id;
//   decoder     Replace('▁', ' '), ByteFallback, Fuse, and Strip one leading space when a dummy
//               prefix was added;
//   added tokens  the control and unknown pieces (special), user-defined pieces (not special);
//               each is matched in text before normalisation, as the source's tokenizer does.
//
// Which class. transformers 5's LlamaTokenizer does not load tokenizer.json as written: it keeps
// the vocabulary and merges and rebuilds the rest itself (no normalizer; Metaspace, which adds
// the "▁" prefix only to text that does not already start with a space). That equals
// SentencePiece exactly when the model has the identity rule, keeps extra whitespace and adds no
// dummy prefix (Orion's and `kept tokenizer`'s settings); then tokenizer_class is LlamaTokenizer
// with add_prefix_space false (LlamaTokenizerFast on 4.x). Any other SentencePiece model gets
// tokenizer_class PreTrainedTokenizerFast, which both lines load from tokenizer.json as written,
// so the ids stay exact; LlamaTokenizer (slow, 4.x) still reads tokenizer.model directly.
// `legacy` is true: the source (SentencePiece, and Orion's remote-code tokenizer) encodes the
// text between two special tokens on its own, dummy prefix included.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

#include "kept/core/error.hpp"
#include "kept/io/atomic_file.hpp"
#include "kept/io/json.hpp"
#include "kept/io/sentencepiece_model.hpp"
#include "kept/model/config.hpp"

namespace kept {

inline constexpr std::uint64_t kMaxTokenizerConfigBytes = 16ull << 20;

// Orion's chat format, `<s>Human: {q}\n\nAssistant: </s>{a}</s>` turn after turn, as a
// transformers chat template (`kept convert --chat-template orion`).
inline constexpr std::string_view kOrionChatTemplate =
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n\\nAssistant: ' + "
    "eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Orion chat format has only user and assistant turns, got ' + "
    "message['role']) }}{% endif %}{% endfor %}";

// What a source directory says about its tokenizer, beyond tokenizer.model.
struct TokenizerSource {
  std::filesystem::path model_file;  // tokenizer.model
  SentencePieceModel model;
  nlohmann::json tokenizer_config;    // tokenizer_config.json, or null
  nlohmann::json special_tokens_map;  // special_tokens_map.json, or null
  nlohmann::json generation_config;   // generation_config.json, or null
  std::string chat_template;          // chat_template.jinja or tokenizer_config's, or ""
  bool had_auto_map = false;          // the source's tokenizer needed remote code
};

// Reads `path`: a directory holding tokenizer.model (and any of the JSON files above), or a
// tokenizer.model file whose directory is read the same way.
inline TokenizerSource read_tokenizer_source(const std::filesystem::path& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  const bool is_directory = fs::is_directory(path, error);
  TokenizerSource source;
  source.model_file = is_directory ? path / "tokenizer.model" : path;
  const fs::path directory = is_directory ? path : path.parent_path();
  KEPT_CHECK(fs::is_regular_file(source.model_file, error), source.model_file.string(),
             ": tokenizer model not found (a SentencePiece tokenizer.model is needed)");
  source.model = read_sentencepiece_model(source.model_file);
  auto read_object = [&](const char* name) -> nlohmann::json {
    const fs::path file = directory / name;
    if (!fs::is_regular_file(file, error)) return nullptr;
    nlohmann::json value = detail::parse_json_strict(
        detail::read_text_file(file, kMaxTokenizerConfigBytes), file.string(), 64);
    KEPT_CHECK(value.is_object(), file.string(), ": must hold a JSON object, found ",
               detail::describe_json(value));
    return value;
  };
  source.tokenizer_config = read_object("tokenizer_config.json");
  source.special_tokens_map = read_object("special_tokens_map.json");
  source.generation_config = read_object("generation_config.json");
  const fs::path config_file = directory / "tokenizer_config.json";
  if (source.tokenizer_config.is_object()) {
    source.had_auto_map = source.tokenizer_config.contains("auto_map");
    if (auto found = source.tokenizer_config.find("chat_template");
        found != source.tokenizer_config.end() && !found->is_null()) {
      if (found->is_string()) {
        source.chat_template = found->get<std::string>();
      } else if (found->is_array()) {  // [{"name": ..., "template": ...}]: the default one
        for (const auto& entry : *found)
          if (entry.is_object() && entry.value("name", "") == "default" &&
              entry.contains("template") && entry["template"].is_string())
            source.chat_template = entry["template"].get<std::string>();
        KEPT_CHECK(!source.chat_template.empty(), config_file.string(),
                   ": field \"chat_template\" is a list without a \"default\" template");
      } else {
        fail(config_file.string(), ": field \"chat_template\" must be a string or a list, found ",
             detail::describe_json(*found));
      }
    }
  }
  const fs::path jinja = directory / "chat_template.jinja";
  if (fs::is_regular_file(jinja, error))
    source.chat_template = detail::read_text_file(jinja, kMaxTokenizerConfigBytes);
  return source;
}

struct HfTokenizerOptions {
  // From the model's config.json, when there is one: ids the generation config must carry and
  // the context length (tokenizer_config's model_max_length).
  std::optional<std::int64_t> bos_token_id, eos_token_id, pad_token_id, max_position_embeddings;
  // Replaces the source's chat template when non-empty ("" keeps the source's, if any).
  std::string chat_template;
  bool drop_chat_template = false;
};

// The options a model's config implies: its token ids and context length.
inline HfTokenizerOptions tokenizer_options_for(const ModelConfig& config) {
  HfTokenizerOptions options;
  options.bos_token_id = config.bos_token_id;
  options.eos_token_id = config.eos_token_id;
  if (config.pad_token_id >= 0) options.pad_token_id = config.pad_token_id;
  options.max_position_embeddings = config.max_position_embeddings;
  return options;
}

// Applies a `--chat-template` choice: "" or "auto" keeps the source's, "none" drops it, "orion"
// is kOrionChatTemplate, anything else names a Jinja file (which must not be empty).
inline void choose_chat_template(HfTokenizerOptions& options, const std::string& choice) {
  if (choice.empty() || choice == "auto") return;
  if (choice == "none") {
    options.drop_chat_template = true;
  } else if (choice == "orion") {
    options.chat_template = std::string(kOrionChatTemplate);
  } else {
    options.chat_template = detail::read_text_file(choice, kMaxTokenizerConfigBytes);
    KEPT_CHECK(!options.chat_template.empty(), choice, ": the chat template file is empty");
  }
}

struct HfTokenizerReport {
  std::string tokenizer_class;
  std::string class_reason;  // why not LlamaTokenizer, when it is not
  std::vector<std::string> files;
  bool dropped_auto_map = false;
  bool chat_template = false;
  std::int64_t vocab_size = 0;
};

namespace detail {

// A special-token field of tokenizer_config.json / special_tokens_map.json: a string or an
// AddedToken object {"content": ...}.
inline std::optional<std::string> special_token_text(const nlohmann::json& object,
                                                     const char* key) {
  if (!object.is_object()) return std::nullopt;
  auto found = object.find(key);
  if (found == object.end() || found->is_null()) return std::nullopt;
  if (found->is_string()) return found->get<std::string>();
  if (found->is_object() && found->contains("content") && (*found)["content"].is_string())
    return (*found)["content"].get<std::string>();
  return std::nullopt;
}

inline std::string base64(std::string_view bytes) {
  static constexpr char kTable[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  std::size_t i = 0;
  for (; i + 2 < bytes.size(); i += 3) {
    const std::uint32_t v = static_cast<std::uint8_t>(bytes[i]) << 16 |
                            static_cast<std::uint8_t>(bytes[i + 1]) << 8 |
                            static_cast<std::uint8_t>(bytes[i + 2]);
    for (int shift = 18; shift >= 0; shift -= 6)
      out += kTable[(v >> shift) & 63];
  }
  if (i < bytes.size()) {
    std::uint32_t v = static_cast<std::uint8_t>(bytes[i]) << 16;
    if (i + 1 < bytes.size()) v |= static_cast<std::uint8_t>(bytes[i + 1]) << 8;
    out += kTable[(v >> 18) & 63];
    out += kTable[(v >> 12) & 63];
    out += i + 1 < bytes.size() ? kTable[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

inline nlohmann::json replace_string(std::string_view from, std::string_view to) {
  return {{"type", "Replace"}, {"pattern", {{"String", from}}}, {"content", to}};
}
inline nlohmann::json replace_regex(std::string_view from, std::string_view to) {
  return {{"type", "Replace"}, {"pattern", {{"Regex", from}}}, {"content", to}};
}

inline std::string dump_json(const nlohmann::json& value, const std::string& where) {
  try {
    return value.dump(2, ' ', false, nlohmann::json::error_handler_t::strict) + "\n";
  } catch (const nlohmann::json::exception& error) {
    fail(where, ": cannot write JSON: ", error.what());
  }
}

}  // namespace detail

// Why transformers 5's LlamaTokenizer would not reproduce `model`, or "" when it would.
inline std::string llama_tokenizer_mismatch(const SentencePieceModel& model) {
  if (model.normalizes_characters())
    return "its normaliser rule '" + model.normalizer_name +
           "' rewrites characters (LlamaTokenizer has no normaliser)";
  if (model.remove_extra_whitespaces)
    return "it removes extra whitespace (LlamaTokenizer keeps it)";
  if (model.add_dummy_prefix)
    return "it adds a dummy prefix (transformers 5's LlamaTokenizer adds none to text that starts "
           "with a space)";
  if (!model.escape_whitespaces) return "it does not escape whitespace";
  return "";
}

// The tokenizer.json of `model` (see the top of this file). `add_bos` / `add_eos` go into the
// post-processor.
// Checks, without building anything, that kept can write a tokenizer.json for `model`; commands
// call it before any long work, build_tokenizer_json calls it again.
inline void check_tokenizer_supported(const SentencePieceModel& model, const std::string& where) {
  KEPT_CHECK(model.kind == SentencePieceModel::Kind::Bpe, where, ": a ",
             sentencepiece_kind_name(model.kind),
             " SentencePiece model; kept writes HF tokenizers for BPE models (Orion's, Llama's "
             "and `kept tokenizer`'s)");
  KEPT_CHECK(!model.treat_whitespace_as_suffix, where,
             ": trainer_spec.treat_whitespace_as_suffix is set; kept's tokenizer.json supports "
             "only the prefix form Llama uses");
}

// Checks that every id the tokenizer can produce is a row of the model's embedding;
// `config_where` names the model's config.json.
inline void check_tokenizer_fits(const TokenizerSource& source, std::int64_t model_vocab_size,
                                 const std::string& config_where) {
  KEPT_CHECK(source.model.size() <= model_vocab_size, source.model_file.string(),
             ": the tokenizer has ", source.model.size(), " pieces but ", config_where,
             " has a vocabulary of ", model_vocab_size, "; they do not belong together");
}

inline nlohmann::json build_tokenizer_json(const SentencePieceModel& model,
                                           const std::string& where, bool add_bos, bool add_eos) {
  using nlohmann::json;
  check_tokenizer_supported(model, where);
  using Type = SentencePiece::Type;
  json vocab = json::object();
  std::unordered_map<std::string, std::int64_t> ids;
  ids.reserve(model.pieces.size());
  for (std::int64_t id = 0; id < model.size(); ++id) {
    const SentencePiece& piece = model.pieces[static_cast<std::size_t>(id)];
    KEPT_CHECK(ids.emplace(piece.piece, id).second, where, ": piece ", id, " repeats \"",
               piece.piece, "\"");
    vocab[piece.piece] = id;
  }
  struct Merge {
    float score;
    std::int64_t merged, left;
    std::string_view l, r;
  };
  std::vector<Merge> merges;
  for (std::int64_t id = 0; id < model.size(); ++id) {
    const SentencePiece& piece = model.pieces[static_cast<std::size_t>(id)];
    if (piece.type != Type::Normal && piece.type != Type::UserDefined) continue;
    const std::string_view text = piece.piece;
    for (std::size_t cut = 1; cut < text.size(); ++cut) {
      if ((static_cast<unsigned char>(text[cut]) & 0xc0) == 0x80) continue;  // inside a char
      auto left = ids.find(std::string(text.substr(0, cut)));
      auto right = ids.find(std::string(text.substr(cut)));
      if (left == ids.end() || right == ids.end()) continue;
      merges.push_back({piece.score, id, left->second, text.substr(0, cut), text.substr(cut)});
    }
  }
  std::sort(merges.begin(), merges.end(), [](const Merge& a, const Merge& b) {
    if (a.score != b.score) return a.score > b.score;
    return std::tie(a.merged, a.left) < std::tie(b.merged, b.left);
  });
  json merge_list = json::array();
  for (const Merge& merge : merges)
    merge_list.push_back(json::array({merge.l, merge.r}));

  json added = json::array();
  for (std::int64_t id = 0; id < model.size(); ++id) {
    const SentencePiece& piece = model.pieces[static_cast<std::size_t>(id)];
    const bool special = piece.type == Type::Control || piece.type == Type::Unknown;
    if (!special && piece.type != Type::UserDefined) continue;
    added.push_back({{"id", id},
                     {"content", piece.piece},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", special}});
  }

  json normalizers = json::array();
  if (model.normalizes_characters())
    normalizers.push_back({{"type", "Precompiled"},
                           {"precompiled_charsmap", detail::base64(model.precompiled_charsmap)}});
  if (model.remove_extra_whitespaces) {
    // \A and \z: tokenizers' regex engine (Oniguruma) reads ^ and $ as line anchors.
    normalizers.push_back(detail::replace_regex("\\A +", ""));
    normalizers.push_back(detail::replace_regex(" +\\z", ""));
    normalizers.push_back(detail::replace_regex(" {2,}", " "));
  }
  if (model.add_dummy_prefix) normalizers.push_back({{"type", "Prepend"}, {"prepend", "▁"}});
  if (model.escape_whitespaces) normalizers.push_back(detail::replace_string(" ", "▁"));

  json decoders = json::array();
  if (model.escape_whitespaces) decoders.push_back(detail::replace_string("▁", " "));
  decoders.push_back({{"type", "ByteFallback"}});
  decoders.push_back({{"type", "Fuse"}});
  if (model.add_dummy_prefix)
    decoders.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});

  // Post-processor: "$A" with bos/eos around it as the config says.
  json single = json::array(), pair = json::array(), special_tokens = json::object();
  auto add_special = [&](std::int64_t id, json& sequence, int type_id) {
    const std::string& text = model.pieces[static_cast<std::size_t>(id)].piece;
    sequence.push_back({{"SpecialToken", {{"id", text}, {"type_id", type_id}}}});
    special_tokens[text] = {
        {"id", text}, {"ids", json::array({id})}, {"tokens", json::array({text})}};
  };
  for (int side = 0; side < 2; ++side) {
    json& sequence = side == 0 ? single : pair;
    for (int segment = 0; segment <= side; ++segment) {
      if (add_bos && model.bos_id >= 0) add_special(model.bos_id, sequence, segment);
      sequence.push_back({{"Sequence", {{"id", segment == 0 ? "A" : "B"}, {"type_id", segment}}}});
      if (add_eos && model.eos_id >= 0) add_special(model.eos_id, sequence, segment);
    }
  }

  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", normalizers.empty()
                             ? json(nullptr)
                             : json{{"type", "Sequence"}, {"normalizers", normalizers}}},
          {"pre_tokenizer", nullptr},
          {"post_processor",
           {{"type", "TemplateProcessing"},
            {"single", single},
            {"pair", pair},
            {"special_tokens", special_tokens}}},
          {"decoder", {{"type", "Sequence"}, {"decoders", decoders}}},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", model.piece_or_empty(model.unk_id)},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", true},
            {"byte_fallback", model.byte_fallback},
            {"ignore_merges", false},
            {"vocab", vocab},
            {"merges", merge_list}}}};
}

// Writes the HF tokenizer files of `source` into `directory` (which must exist). Each file is
// written atomically; an existing file of the same name is replaced.
inline HfTokenizerReport write_hf_tokenizer(const TokenizerSource& source,
                                            const std::filesystem::path& directory,
                                            const HfTokenizerOptions& options = {}) {
  namespace fs = std::filesystem;
  using nlohmann::json;
  const SentencePieceModel& model = source.model;
  const std::string where = source.model_file.string();
  const json& config = source.tokenizer_config;
  HfTokenizerReport report;
  report.vocab_size = model.size();
  report.dropped_auto_map = source.had_auto_map;

  // Special tokens: the source's configuration first, then the SentencePiece pieces.
  auto token = [&](const char* key, std::int64_t id) -> std::optional<std::string> {
    if (auto text = detail::special_token_text(config, key)) return text;
    if (auto text = detail::special_token_text(source.special_tokens_map, key)) return text;
    if (id >= 0) return model.piece_or_empty(id);
    return std::nullopt;
  };
  const std::optional<std::string> bos = token("bos_token", model.bos_id),
                                   eos = token("eos_token", model.eos_id),
                                   unk = token("unk_token", model.unk_id),
                                   pad = token("pad_token", model.pad_id);
  // add_bos_token / add_eos_token: the source's, else false (Orion's values; kept's own
  // training packs documents with eos only).
  auto flag = [&](const char* key) {
    if (config.is_object() && config.contains(key)) {
      KEPT_CHECK(config[key].is_boolean(),
                 (source.model_file.parent_path() / "tokenizer_config.json").string(), ": field \"",
                 key, "\" must be true or false, found ", detail::describe_json(config[key]));
      return config[key].get<bool>();
    }
    return false;
  };
  const bool add_bos = flag("add_bos_token"), add_eos = flag("add_eos_token");

  const json tokenizer_json = build_tokenizer_json(model, where, add_bos, add_eos);
  report.class_reason = llama_tokenizer_mismatch(model);
  report.tokenizer_class =
      report.class_reason.empty() ? "LlamaTokenizer" : "PreTrainedTokenizerFast";

  std::string chat_template = source.chat_template;
  if (!options.chat_template.empty()) chat_template = options.chat_template;
  if (options.drop_chat_template) chat_template.clear();
  report.chat_template = !chat_template.empty();

  json added_decoder = json::object();
  for (const json& entry : tokenizer_json["added_tokens"]) {
    json described = entry;
    described.erase("id");
    added_decoder[std::to_string(entry["id"].get<std::int64_t>())] = described;
  }
  json tokenizer_config = {{"tokenizer_class", report.tokenizer_class},
                           {"add_bos_token", add_bos},
                           {"add_eos_token", add_eos},
                           {"added_tokens_decoder", added_decoder},
                           {"clean_up_tokenization_spaces", false},
                           {"legacy", true},
                           {"sp_model_kwargs", json::object()},
                           {"spaces_between_special_tokens", false}};
  if (report.tokenizer_class == "LlamaTokenizer") tokenizer_config["add_prefix_space"] = false;
  json special_map = json::object();
  for (auto [key, value] : {std::pair{"bos_token", &bos},
                            {"eos_token", &eos},
                            {"unk_token", &unk},
                            {"pad_token", &pad}}) {
    tokenizer_config[key] = *value ? json(**value) : json(nullptr);
    if (*value) special_map[key] = **value;
  }
  std::optional<std::int64_t> max_length = options.max_position_embeddings;
  if (config.is_object() && config.contains("model_max_length") &&
      config["model_max_length"].is_number_integer())
    max_length = config["model_max_length"].get<std::int64_t>();
  if (max_length) tokenizer_config["model_max_length"] = *max_length;
  if (report.chat_template) tokenizer_config["chat_template"] = chat_template;

  // Generation config: the source's (it holds no code), with the model's ids where known.
  json generation =
      source.generation_config.is_object() ? source.generation_config : json::object();
  generation.erase("transformers_version");
  if (options.bos_token_id) generation["bos_token_id"] = *options.bos_token_id;
  if (options.eos_token_id) generation["eos_token_id"] = *options.eos_token_id;
  if (options.pad_token_id && *options.pad_token_id >= 0)
    generation["pad_token_id"] = *options.pad_token_id;
  if (!generation.contains("bos_token_id") && model.bos_id >= 0)
    generation["bos_token_id"] = model.bos_id;
  if (!generation.contains("eos_token_id") && model.eos_id >= 0)
    generation["eos_token_id"] = model.eos_id;

  auto write = [&](const char* name, const std::string& contents) {
    write_file_atomically(directory / name, contents);
    report.files.emplace_back(name);
  };
  {
    std::error_code error;
    const fs::path target = directory / "tokenizer.model";
    if (!fs::exists(target, error) || !fs::equivalent(source.model_file, target, error))
      write("tokenizer.model", detail::read_text_file(source.model_file, kMaxTokenizerModelBytes));
    else
      report.files.emplace_back("tokenizer.model");
  }
  write("tokenizer.json",
        detail::dump_json(tokenizer_json, (directory / "tokenizer.json").string()));
  write("tokenizer_config.json",
        detail::dump_json(tokenizer_config, (directory / "tokenizer_config.json").string()));
  write("special_tokens_map.json",
        detail::dump_json(special_map, (directory / "special_tokens_map.json").string()));
  write("generation_config.json",
        detail::dump_json(generation, (directory / "generation_config.json").string()));
  if (report.chat_template) {
    write("chat_template.jinja", chat_template);
  } else {
    std::error_code error;
    fs::remove(directory / "chat_template.jinja", error);
  }
  return report;
}

}  // namespace kept
