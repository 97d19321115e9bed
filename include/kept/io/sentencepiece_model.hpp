// kept/io/sentencepiece_model.hpp: reads a SentencePiece `tokenizer.model` (a serialized
// `sentencepiece.ModelProto`) without protobuf or the SentencePiece library.
//
// kept needs the pieces and the settings that decide how text becomes ids, to write a
// `tokenizer.json` that gives the same ids (kept/io/hf_tokenizer.hpp). SentencePiece's C++ API
// exposes the pieces but not the normaliser settings, and Debian ships no header for the model
// proto, so the few fields used are read here from the protobuf wire format:
//
//   ModelProto       1 pieces (repeated message), 2 trainer_spec, 3 normalizer_spec
//   SentencePiece    1 piece (string), 2 score (float), 3 type (enum Type below)
//   TrainerSpec      3 model_type (1 unigram, 2 bpe, 3 word, 4 char), 24
//                    treat_whitespace_as_suffix, 35 byte_fallback, 40-43 unk/bos/eos/pad id
//   NormalizerSpec   1 name, 2 precompiled_charsmap (bytes), 3 add_dummy_prefix,
//                    4 remove_extra_whitespaces, 5 escape_whitespaces
//
// Field numbers and defaults are those of SentencePiece's sentencepiece_model.proto; absent
// fields take the proto defaults (add_dummy_prefix, remove_extra_whitespaces and
// escape_whitespaces true, unk 0, bos 1, eos 2, pad -1). Every other field is skipped by wire
// type. A truncated or malformed file is an error naming the file and the byte offset.
#pragma once

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/io/json.hpp"

namespace kept {

inline constexpr std::uint64_t kMaxTokenizerModelBytes = 256ull << 20;

struct SentencePiece {
  // SentencePiece's ModelProto.SentencePiece.Type.
  enum class Type : int {
    Normal = 1,
    Unknown = 2,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
    Byte = 6
  };
  std::string piece;
  float score = 0;
  Type type = Type::Normal;
};

struct SentencePieceModel {
  enum class Kind : int { Unigram = 1, Bpe = 2, Word = 3, Char = 4 };
  std::vector<SentencePiece> pieces;
  Kind kind = Kind::Unigram;
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  std::int64_t unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;
  // Normaliser: the rule's name ("identity", "nmt_nfkc", ...; empty when the trainer stored
  // none) and its compiled character map (empty for identity).
  std::string normalizer_name;
  std::string precompiled_charsmap;
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;

  std::int64_t size() const { return static_cast<std::int64_t>(pieces.size()); }
  // The piece with this id, or "" when the id is out of range (pad -1, say).
  std::string piece_or_empty(std::int64_t id) const {
    return id >= 0 && id < size() ? pieces[static_cast<std::size_t>(id)].piece : std::string();
  }
  // Whether the normaliser changes text at all beyond whitespace escaping.
  bool normalizes_characters() const { return !precompiled_charsmap.empty(); }
};

inline const char* sentencepiece_kind_name(SentencePieceModel::Kind kind) {
  switch (kind) {
    case SentencePieceModel::Kind::Unigram:
      return "unigram";
    case SentencePieceModel::Kind::Bpe:
      return "bpe";
    case SentencePieceModel::Kind::Word:
      return "word";
    case SentencePieceModel::Kind::Char:
      return "char";
  }
  return "unknown";
}

namespace detail {

// A protobuf wire-format cursor over one message's bytes.
class ProtoReader {
 public:
  ProtoReader(std::string_view bytes, const std::string& where, std::size_t base_offset)
      : bytes_(bytes), where_(where), base_(base_offset) {}

  bool done() const { return position_ >= bytes_.size(); }
  std::size_t offset() const { return base_ + position_; }

  std::uint64_t varint() {
    std::uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      KEPT_CHECK(position_ < bytes_.size(), where_, ": truncated varint at byte ", offset());
      const auto byte = static_cast<std::uint8_t>(bytes_[position_++]);
      value |= static_cast<std::uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return value;
    }
    fail(where_, ": malformed varint (more than 10 bytes) at byte ", offset());
  }
  // A length-delimited field's bytes; the returned offset is where they start in the file.
  std::string_view bytes(std::size_t* start) {
    const std::uint64_t length = varint();
    KEPT_CHECK(length <= bytes_.size() - position_, where_, ": field of ", length,
               " bytes at byte ", offset(), " runs past the end of its message (",
               bytes_.size() - position_, " bytes left)");
    *start = offset();
    const std::string_view view = bytes_.substr(position_, static_cast<std::size_t>(length));
    position_ += static_cast<std::size_t>(length);
    return view;
  }
  float fixed32_float() {
    KEPT_CHECK(bytes_.size() - position_ >= 4, where_, ": truncated fixed32 at byte ", offset());
    std::uint32_t bits = 0;
    for (int i = 0; i < 4; ++i)
      bits |= static_cast<std::uint32_t>(static_cast<std::uint8_t>(bytes_[position_ + i]))
              << (8 * i);
    position_ += 4;
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
  }
  void skip(int wire_type) {
    std::size_t ignored = 0;
    switch (wire_type) {
      case 0:
        varint();
        return;
      case 1:
        KEPT_CHECK(bytes_.size() - position_ >= 8, where_, ": truncated fixed64 at byte ",
                   offset());
        position_ += 8;
        return;
      case 2:
        bytes(&ignored);
        return;
      case 5:
        fixed32_float();
        return;
      default:
        fail(where_, ": unsupported protobuf wire type ", wire_type, " at byte ", offset(),
             " (not a SentencePiece model?)");
    }
  }
  // Reads a field key; returns false at the end of the message.
  bool next(int* field, int* wire_type) {
    if (done()) return false;
    const std::uint64_t key = varint();
    *field = static_cast<int>(key >> 3);
    *wire_type = static_cast<int>(key & 7);
    KEPT_CHECK(*field > 0, where_, ": field number 0 at byte ", offset(),
               " (not a SentencePiece model?)");
    return true;
  }
  void expect(int wire_type, int expected, const char* field_name) const {
    KEPT_CHECK(wire_type == expected, where_, ": field ", field_name, " has wire type ", wire_type,
               ", expected ", expected, " (byte ", offset(), ")");
  }

 private:
  std::string_view bytes_;
  const std::string& where_;
  std::size_t base_;
  std::size_t position_ = 0;
};

inline std::int64_t proto_int32(std::uint64_t raw) {
  return static_cast<std::int64_t>(static_cast<std::int32_t>(static_cast<std::uint32_t>(raw)));
}

}  // namespace detail

// Parses the bytes of a tokenizer.model; `where` names it in errors.
inline SentencePieceModel parse_sentencepiece_model(std::string_view file,
                                                    const std::string& where) {
  SentencePieceModel model;
  detail::ProtoReader top(file, where, 0);
  int field = 0, wire = 0;
  bool saw_trainer = false;
  while (top.next(&field, &wire)) {
    std::size_t start = 0;
    if (field == 1) {
      top.expect(wire, 2, "ModelProto.pieces");
      detail::ProtoReader message(top.bytes(&start), where, start);
      SentencePiece piece;
      bool has_piece = false;
      while (message.next(&field, &wire)) {
        if (field == 1 && wire == 2) {
          std::size_t ignored = 0;
          piece.piece = std::string(message.bytes(&ignored));
          has_piece = true;
        } else if (field == 2 && wire == 5) {
          piece.score = message.fixed32_float();
        } else if (field == 3 && wire == 0) {
          const std::uint64_t type = message.varint();
          KEPT_CHECK(type >= 1 && type <= 6, where, ": piece ", model.pieces.size(),
                     " has an unknown type ", type);
          piece.type = static_cast<SentencePiece::Type>(type);
        } else {
          message.skip(wire);
        }
      }
      KEPT_CHECK(has_piece && !piece.piece.empty(), where, ": piece ", model.pieces.size(),
                 " has no text");
      model.pieces.push_back(std::move(piece));
    } else if (field == 2) {
      top.expect(wire, 2, "ModelProto.trainer_spec");
      saw_trainer = true;
      detail::ProtoReader message(top.bytes(&start), where, start);
      while (message.next(&field, &wire)) {
        if (wire != 0) {
          message.skip(wire);
          continue;
        }
        const std::uint64_t value = message.varint();
        switch (field) {
          case 3:
            KEPT_CHECK(value >= 1 && value <= 4, where, ": trainer_spec.model_type ", value,
                       " is unknown");
            model.kind = static_cast<SentencePieceModel::Kind>(value);
            break;
          case 24:
            model.treat_whitespace_as_suffix = value != 0;
            break;
          case 35:
            model.byte_fallback = value != 0;
            break;
          case 40:
            model.unk_id = detail::proto_int32(value);
            break;
          case 41:
            model.bos_id = detail::proto_int32(value);
            break;
          case 42:
            model.eos_id = detail::proto_int32(value);
            break;
          case 43:
            model.pad_id = detail::proto_int32(value);
            break;
          default:
            break;
        }
      }
    } else if (field == 3) {
      top.expect(wire, 2, "ModelProto.normalizer_spec");
      detail::ProtoReader message(top.bytes(&start), where, start);
      while (message.next(&field, &wire)) {
        std::size_t ignored = 0;
        if (field == 1 && wire == 2) {
          model.normalizer_name = std::string(message.bytes(&ignored));
        } else if (field == 2 && wire == 2) {
          model.precompiled_charsmap = std::string(message.bytes(&ignored));
        } else if (field >= 3 && field <= 5 && wire == 0) {
          const bool value = message.varint() != 0;
          (field == 3   ? model.add_dummy_prefix
           : field == 4 ? model.remove_extra_whitespaces
                        : model.escape_whitespaces) = value;
        } else {
          message.skip(wire);
        }
      }
    } else {
      top.skip(wire);
    }
  }
  KEPT_CHECK(!model.pieces.empty(), where, ": no pieces (not a SentencePiece model)");
  KEPT_CHECK(saw_trainer, where, ": no trainer_spec (not a SentencePiece model)");
  for (const std::int64_t id : {model.unk_id, model.bos_id, model.eos_id, model.pad_id})
    KEPT_CHECK(id >= -1 && id < model.size(), where, ": special id ", id, " is outside the ",
               model.size(), " pieces");
  KEPT_CHECK(model.unk_id >= 0, where, ": the model has no unk piece (trainer_spec.unk_id -1)");
  return model;
}

inline SentencePieceModel read_sentencepiece_model(const std::filesystem::path& path) {
  const std::string bytes = detail::read_text_file(path, kMaxTokenizerModelBytes);
  return parse_sentencepiece_model(bytes, path.string());
}

}  // namespace kept
