// kept/io/torch_pickle.hpp: a restricted pickle VM for the data.pkl inside torch.save archives.
//
// torch.save writes a state dict as a pickle (protocol 2 by default) in which each tensor is a
// call `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
// backward_hooks[, metadata])`, each storage is a persistent id ('storage', torch.FloatStorage,
// key, location, numel) whose bytes are the archive record data/<key>, and the dict itself is
// `collections.OrderedDict()` filled by SETITEMS (plus a BUILD that restores the `_metadata`
// attribute of a module's state_dict()). Python's pickle can call any importable function, so
// loading an untrusted pickle runs arbitrary code. This VM never calls anything: it interprets a
// whitelist of opcodes into plain values and recognises a whitelist of globals as *tags*, which
// only ever turn into a tensor description or an empty dict.
//
// Opcodes accepted: PROTO (<= 5), FRAME (ignored, bounds-checked), STOP; MARK; EMPTY_DICT,
// EMPTY_LIST, EMPTY_TUPLE, TUPLE, TUPLE1/2/3, SETITEM(S), APPEND(S); BININT, BININT1, BININT2,
// LONG1 (up to 64 bits), BINFLOAT, NONE, NEWTRUE, NEWFALSE; UNICODE, BINUNICODE,
// SHORT_BINUNICODE, BINUNICODE8; BINPUT, LONG_BINPUT, MEMOIZE, BINGET, LONG_BINGET; GLOBAL and
// STACK_GLOBAL (whitelisted names only); REDUCE (whitelisted callables only); BUILD (on an
// OrderedDict only, state ignored); BINPERSID (storages only). Anything else is refused with the
// opcode and its offset.
// Globals accepted: collections.OrderedDict; torch._utils._rebuild_tensor_v2, _rebuild_tensor
// and _rebuild_parameter; torch.{Float,BFloat16,Half,Double,Long,Int,Short,Char,Byte,Bool}Storage.
// Any other global is refused when the GLOBAL opcode is read, before anything could use it:
// "<file>: pickle asks for 'os system', which is not a tensor-rebuilding function; refusing to
// load (kept never executes code from a checkpoint)".
//
// Untrusted input: every read is bounds-checked; the VM is a loop (no recursion); values live in
// an arena indexed by 32-bit ids (so self-referencing containers cannot leak or recurse); the
// stack, the mark depth, the memo and the arena are bounded. Python 3 semantics for MARK are kept:
// an opcode cannot pop below the innermost mark.
//
// Output: the pickle must produce a dict (OrderedDict or dict) mapping string names to tensors;
// each tensor becomes a TorchTensorRef (storage, offset, shape, strides), validated against its
// storage's element count with the tensor's name in every message. materialize_torch_tensor
// turns one into a kept::Tensor given the storage's bytes: a zero-copy view when the strides are
// the contiguous row-major ones (kept's tensors are always contiguous), else a contiguous copy.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kept/core/dtype.hpp"
#include "kept/core/error.hpp"
#include "kept/core/shape.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/json.hpp"
#include "kept/io/zip.hpp"

namespace kept {

// A storage the pickle refers to: the archive record data/<key>.
struct TorchStorageRef {
  std::string key;
  DType dtype = DType::F32;
  std::uint64_t numel = 0;  // elements, as the persistent id says
  std::string location;     // "cpu", "cuda:0", ... (informational: kept loads to the host)
};

// A tensor of the state dict: a strided view of a storage.
struct TorchTensorRef {
  std::string name;
  std::size_t storage = 0;  // index into TorchPickle::storages
  DType dtype = DType::F32;
  std::uint64_t storage_offset = 0;  // in elements
  Shape shape;
  std::vector<std::int64_t> strides;  // in elements, one per dimension, all >= 0

  // Whether the strides are the row-major contiguous ones (dimensions of size 1 match any).
  bool contiguous() const {
    const auto expected = shape.strides();
    for (int axis = 0; axis < shape.rank(); ++axis)
      if (shape[axis] != 1 && strides[static_cast<std::size_t>(axis)] != expected[axis])
        return false;
    return true;
  }
};

struct TorchPickle {
  std::vector<TorchStorageRef> storages;  // distinct keys, in order of first use
  std::vector<TorchTensorRef> tensors;    // in the dict's order
};

// Bounds on what one pickle may build; a 14B model's data.pkl needs ~10^4 values.
inline constexpr std::size_t kMaxPickleValues = 1u << 24;
inline constexpr std::size_t kMaxPickleStack = 1u << 22;
inline constexpr std::size_t kMaxPickleMarks = 1u << 12;
inline constexpr std::size_t kMaxPickleMemo = 1u << 22;

namespace detail {

class TorchPickleVm {
 public:
  TorchPickleVm(std::span<const std::byte> data, std::string_view where)
      : data_(data), where_(where) {}

  TorchPickle run() {
    for (;;) {
      op_offset_ = pos_;
      const auto op = static_cast<unsigned char>(read_byte("an opcode"));
      switch (op) {
        case 0x80: {  // PROTO
          const auto version = static_cast<unsigned char>(read_byte("PROTO"));
          if (version > 5) error("pickle protocol ", int(version), " is newer than 5");
          break;
        }
        case 0x95: {  // FRAME: a length prefix for buffering; nothing to do but check it
          const std::uint64_t length = read_uint(8, "FRAME");
          if (length > data_.size() - pos_) error("FRAME of ", length, " bytes runs past the end");
          break;
        }
        case '.':  // STOP
          return finish();
        case '(':  // MARK
          if (marks_.size() >= kMaxPickleMarks) error("MARKs nest deeper than ", kMaxPickleMarks);
          marks_.push_back(stack_.size());
          break;
        case '}':  // EMPTY_DICT
          push(new_container(Kind::Dict));
          break;
        case ']':  // EMPTY_LIST
          push(new_container(Kind::List));
          break;
        case ')':  // EMPTY_TUPLE
          push(new_container(Kind::Tuple));
          break;
        case 't': {  // TUPLE
          const std::size_t base = pop_mark();
          push(make_tuple(base));
          break;
        }
        case 0x85:    // TUPLE1
        case 0x86:    // TUPLE2
        case 0x87: {  // TUPLE3
          const std::size_t count = op - 0x84u;
          need(count);
          push(make_tuple(stack_.size() - count));
          break;
        }
        case 's': {  // SETITEM
          need(3);
          const std::uint32_t value = pop(), key = pop();
          auto& dict = container_of(top(), Kind::Dict, "SETITEM");
          dict.push_back(key);
          dict.push_back(value);
          break;
        }
        case 'u': {  // SETITEMS
          const std::size_t base = pop_mark();
          if ((stack_.size() - base) % 2 != 0) error("SETITEMS with an odd number of items");
          auto& items = container_of(below(base), Kind::Dict, "SETITEMS");
          items.insert(items.end(), stack_.begin() + static_cast<std::ptrdiff_t>(base),
                       stack_.end());
          stack_.resize(base);
          break;
        }
        case 'a': {  // APPEND
          need(2);
          const std::uint32_t value = pop();
          container_of(top(), Kind::List, "APPEND").push_back(value);
          break;
        }
        case 'e': {  // APPENDS
          const std::size_t base = pop_mark();
          auto& items = container_of(below(base), Kind::List, "APPENDS");
          items.insert(items.end(), stack_.begin() + static_cast<std::ptrdiff_t>(base),
                       stack_.end());
          stack_.resize(base);
          break;
        }
        case 'J':  // BININT
          push(new_int(static_cast<std::int32_t>(read_uint(4, "BININT"))));
          break;
        case 'K':  // BININT1
          push(new_int(static_cast<std::int64_t>(read_uint(1, "BININT1"))));
          break;
        case 'M':  // BININT2
          push(new_int(static_cast<std::int64_t>(read_uint(2, "BININT2"))));
          break;
        case 0x8a: {  // LONG1
          const auto length = static_cast<unsigned char>(read_byte("LONG1"));
          push(new_int(read_long(length)));
          break;
        }
        case 'G': {  // BINFLOAT (big-endian)
          auto bytes = read_bytes(8, "BINFLOAT");
          std::uint64_t bits = 0;
          for (std::byte b : bytes)
            bits = (bits << 8) | static_cast<std::uint64_t>(b);
          push(new_node(Kind::Float, 0, 0, std::bit_cast<double>(bits)));
          break;
        }
        case 'N':  // NONE
          push(new_node(Kind::None));
          break;
        case 0x88:  // NEWTRUE
        case 0x89:  // NEWFALSE
          push(new_node(Kind::Bool, 0, op == 0x88 ? 1 : 0));
          break;
        case 'V':  // UNICODE (raw-unicode-escape, newline-terminated)
          push(new_string(decode_raw_unicode_escape(read_line("UNICODE"))));
          break;
        case 'X':  // BINUNICODE
          push(new_string(as_text(read_bytes(read_uint(4, "BINUNICODE"), "BINUNICODE"))));
          break;
        case 0x8c:  // SHORT_BINUNICODE
          push(new_string(
              as_text(read_bytes(read_uint(1, "SHORT_BINUNICODE"), "SHORT_BINUNICODE"))));
          break;
        case 0x8d:  // BINUNICODE8
          push(new_string(as_text(read_bytes(read_uint(8, "BINUNICODE8"), "BINUNICODE8"))));
          break;
        case 'q':  // BINPUT
          memo_put(read_uint(1, "BINPUT"));
          break;
        case 'r':  // LONG_BINPUT
          memo_put(read_uint(4, "LONG_BINPUT"));
          break;
        case 0x94:  // MEMOIZE
          memo_put(memo_.size());
          break;
        case 'h':  // BINGET
          memo_get(read_uint(1, "BINGET"));
          break;
        case 'j':  // LONG_BINGET
          memo_get(read_uint(4, "LONG_BINGET"));
          break;
        case 'c': {  // GLOBAL "module\nname\n"
          std::string module = as_text(read_line("GLOBAL"));
          std::string name = as_text(read_line("GLOBAL"));
          push(new_global(module, name));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          need(2);
          const std::uint32_t name = pop(), module = pop();
          if (nodes_[name].kind != Kind::String || nodes_[module].kind != Kind::String)
            error("STACK_GLOBAL needs two strings (module, name), found ", kind_name(module),
                  " and ", kind_name(name));
          push(new_global(strings_[nodes_[module].ref], strings_[nodes_[name].ref]));
          break;
        }
        case 'R': {  // REDUCE
          need(2);
          const std::uint32_t args = pop(), callable = pop();
          push(reduce(callable, args));
          break;
        }
        case 'b': {  // BUILD
          need(2);
          const std::uint32_t state = pop();
          const Node& target = nodes_[top()];
          // A module's state_dict() is an OrderedDict with a `_metadata` attribute, which
          // pickle restores with BUILD. kept needs none of it.
          if (target.kind != Kind::Dict || target.integer != 1)
            error("BUILD (setting an object's state) on ", kind_name(top()),
                  "; kept allows it only on an OrderedDict");
          (void)state;
          break;
        }
        case 'Q': {  // BINPERSID
          need(1);
          push(persistent_load(pop()));
          break;
        }
        default:
          error("opcode ", describe_opcode(op), " is not one kept accepts (kept reads only the ",
                "opcodes torch.save uses to write tensors; it never executes code from a ",
                "checkpoint)");
      }
    }
  }

 private:
  enum class Kind : std::uint8_t {
    None,
    Bool,
    Int,
    Float,
    String,
    Tuple,
    List,
    Dict,  // integer = 1 for an OrderedDict
    Global,
    Storage,
    Tensor
  };
  enum class GlobalId : std::uint8_t {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    StorageType
  };
  struct Node {
    Kind kind = Kind::None;
    std::uint32_t ref = 0;  // strings_/containers_/storages/tensors_/globals_ index
    std::int64_t integer = 0;
    double real = 0;
  };
  struct GlobalTag {
    GlobalId id;
    DType dtype;       // for StorageType
    std::string text;  // "module name", for messages
  };
  struct PendingTensor {
    std::uint32_t storage = 0;
    std::uint64_t offset = 0;
    std::vector<std::int64_t> sizes;
    std::vector<std::int64_t> strides;
  };

  template <class... Parts>
  [[noreturn]] void error(Parts&&... parts) const {
    fail(where_, ": pickle: at offset ", op_offset_, ": ", std::forward<Parts>(parts)...);
  }

  static std::string describe_opcode(unsigned char op) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string text = "0x";
    text += kHex[op >> 4];
    text += kHex[op & 15];
    if (op >= 0x20 && op < 0x7f) text += std::string(" ('") + static_cast<char>(op) + "')";
    return text;
  }

  // ---- reading -------------------------------------------------------------------------------
  std::byte read_byte(const char* what) {
    if (pos_ >= data_.size())
      error("the pickle ends in the middle of ", what, " (truncated: no STOP)");
    return data_[pos_++];
  }
  std::span<const std::byte> read_bytes(std::uint64_t count, const char* what) {
    if (count > data_.size() - pos_)
      error(what, " of ", count, " bytes runs past the end of the pickle (", data_.size() - pos_,
            " bytes left; truncated?)");
    auto bytes = data_.subspan(pos_, static_cast<std::size_t>(count));
    pos_ += static_cast<std::size_t>(count);
    return bytes;
  }
  std::uint64_t read_uint(int bytes, const char* what) {
    auto raw = read_bytes(static_cast<std::uint64_t>(bytes), what);
    std::uint64_t value = 0;
    for (int i = bytes - 1; i >= 0; --i)
      value = (value << 8) | static_cast<std::uint64_t>(raw[static_cast<std::size_t>(i)]);
    return value;
  }
  std::int64_t read_long(unsigned length) {
    if (length > 8) error("LONG1 integer of ", length, " bytes does not fit in 64 bits");
    auto raw = read_bytes(length, "LONG1");
    if (length == 0) return 0;
    std::uint64_t value = 0;
    for (int i = static_cast<int>(length) - 1; i >= 0; --i)
      value = (value << 8) | static_cast<std::uint64_t>(raw[static_cast<std::size_t>(i)]);
    if (length < 8 && (static_cast<unsigned>(raw[length - 1]) & 0x80u))
      value |= ~std::uint64_t{0} << (8 * length);  // sign-extend
    return static_cast<std::int64_t>(value);
  }
  std::span<const std::byte> read_line(const char* what) {
    const std::size_t start = pos_;
    while (pos_ < data_.size() && data_[pos_] != std::byte{'\n'})
      ++pos_;
    if (pos_ >= data_.size()) error(what, " argument has no terminating newline (truncated)");
    auto line = data_.subspan(start, pos_ - start);
    ++pos_;
    return line;
  }
  static std::string as_text(std::span<const std::byte> bytes) {
    return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  }
  static void append_utf8(std::string& out, std::uint32_t code) {
    if (code < 0x80) {
      out += static_cast<char>(code);
    } else if (code < 0x800) {
      out += static_cast<char>(0xc0 | (code >> 6));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else if (code < 0x10000) {
      out += static_cast<char>(0xe0 | (code >> 12));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (code >> 18));
      out += static_cast<char>(0x80 | ((code >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((code >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (code & 0x3f));
    }
  }
  // Python's raw-unicode-escape: bytes are Latin-1, except \uXXXX and \UXXXXXXXX.
  std::string decode_raw_unicode_escape(std::span<const std::byte> bytes) const {
    std::string out;
    for (std::size_t i = 0; i < bytes.size();) {
      const auto c = static_cast<unsigned char>(bytes[i]);
      if (c == '\\' && i + 1 < bytes.size() &&
          (bytes[i + 1] == std::byte{'u'} || bytes[i + 1] == std::byte{'U'})) {
        const std::size_t digits = bytes[i + 1] == std::byte{'u'} ? 4 : 8;
        if (i + 2 + digits > bytes.size()) error("UNICODE string has a truncated \\u escape");
        std::uint32_t code = 0;
        for (std::size_t k = 0; k < digits; ++k) {
          const auto d = static_cast<unsigned char>(bytes[i + 2 + k]);
          std::uint32_t nibble;
          if (d >= '0' && d <= '9') {
            nibble = d - '0';
          } else if (d >= 'a' && d <= 'f') {
            nibble = d - 'a' + 10;
          } else if (d >= 'A' && d <= 'F') {
            nibble = d - 'A' + 10;
          } else {
            error("UNICODE string has a bad \\u escape");
          }
          code = (code << 4) | nibble;
        }
        if (code > 0x10ffff) error("UNICODE string escapes a code point past U+10FFFF");
        append_utf8(out, code);
        i += 2 + digits;
      } else {
        append_utf8(out, c);
        ++i;
      }
    }
    return out;
  }

  // ---- values --------------------------------------------------------------------------------
  std::uint32_t new_node(Kind kind, std::uint32_t ref = 0, std::int64_t integer = 0,
                         double real = 0) {
    if (nodes_.size() >= kMaxPickleValues)
      error("the pickle builds more than ", kMaxPickleValues, " values");
    nodes_.push_back(Node{kind, ref, integer, real});
    return static_cast<std::uint32_t>(nodes_.size() - 1);
  }
  std::uint32_t new_int(std::int64_t value) { return new_node(Kind::Int, 0, value); }
  std::uint32_t new_string(std::string text) {
    strings_.push_back(std::move(text));
    return new_node(Kind::String, static_cast<std::uint32_t>(strings_.size() - 1));
  }
  std::uint32_t new_container(Kind kind, std::int64_t ordered = 0) {
    containers_.emplace_back();
    return new_node(kind, static_cast<std::uint32_t>(containers_.size() - 1), ordered);
  }
  std::uint32_t make_tuple(std::size_t base) {
    std::uint32_t tuple = new_container(Kind::Tuple);
    containers_.back().assign(stack_.begin() + static_cast<std::ptrdiff_t>(base), stack_.end());
    stack_.resize(base);
    return tuple;
  }
  std::vector<std::uint32_t>& container_of(std::uint32_t node, Kind kind, const char* op) {
    if (nodes_[node].kind != kind)
      error(op, " needs a ", kind == Kind::Dict ? "dict" : "list", " below its items, found ",
            kind_name(node));
    return containers_[nodes_[node].ref];
  }
  const std::vector<std::uint32_t>& items(std::uint32_t node) const {
    return containers_[nodes_[node].ref];
  }

  std::string kind_name(std::uint32_t node) const {
    switch (nodes_[node].kind) {
      case Kind::None:
        return "None";
      case Kind::Bool:
        return "a bool";
      case Kind::Int:
        return "an int";
      case Kind::Float:
        return "a float";
      case Kind::String:
        return "a string";
      case Kind::Tuple:
        return "a tuple";
      case Kind::List:
        return "a list";
      case Kind::Dict:
        return nodes_[node].integer ? "an OrderedDict" : "a dict";
      case Kind::Global:
        return "the global " + quote_bytes(globals_[nodes_[node].ref].text);
      case Kind::Storage:
        return "a storage";
      case Kind::Tensor:
        return "a tensor";
    }
    return "?";
  }

  // ---- the stack -----------------------------------------------------------------------------
  std::size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void need(std::size_t count) const {
    if (stack_.size() - floor() < count)
      error("stack underflow (the opcode needs ", count, " value(s) above the last MARK, ",
            "there are ", stack_.size() - floor(), ")");
  }
  void push(std::uint32_t node) {
    if (stack_.size() >= kMaxPickleStack)
      error("the pickle stack grows past ", kMaxPickleStack, " values");
    stack_.push_back(node);
  }
  std::uint32_t pop() {
    need(1);
    const std::uint32_t node = stack_.back();
    stack_.pop_back();
    return node;
  }
  std::uint32_t top() const {
    need(1);
    return stack_.back();
  }
  // The value just below the items of a popped mark that starts at `base`.
  std::uint32_t below(std::size_t base) const {
    if (base <= floor()) error("stack underflow (no container below the MARK)");
    return stack_[base - 1];
  }
  std::size_t pop_mark() {
    if (marks_.empty()) error("no MARK to pop");
    const std::size_t base = marks_.back();
    marks_.pop_back();
    return base;
  }
  void memo_put(std::uint64_t index) {
    if (memo_.size() >= kMaxPickleMemo && !memo_.count(index))
      error("the pickle memoizes more than ", kMaxPickleMemo, " values");
    memo_[index] = top();
  }
  void memo_get(std::uint64_t index) {
    auto found = memo_.find(index);
    if (found == memo_.end()) error("memo entry ", index, " was never stored");
    push(found->second);
  }

  // ---- globals, calls, storages --------------------------------------------------------------
  std::uint32_t new_global(const std::string& module, const std::string& name) {
    GlobalTag tag{GlobalId::OrderedDict, DType::F32, module + " " + name};
    if (module == "collections" && name == "OrderedDict") {
      tag.id = GlobalId::OrderedDict;
    } else if (module == "torch._utils" && name == "_rebuild_tensor_v2") {
      tag.id = GlobalId::RebuildTensorV2;
    } else if (module == "torch._utils" && name == "_rebuild_tensor") {
      tag.id = GlobalId::RebuildTensor;
    } else if (module == "torch._utils" && name == "_rebuild_parameter") {
      tag.id = GlobalId::RebuildParameter;
    } else if (module == "torch" && storage_dtype(name, tag.dtype)) {
      tag.id = GlobalId::StorageType;
    } else if (module == "torch" && name.size() > 7 && name.ends_with("Storage")) {
      fail(where_, ": pickle asks for storage type ", quote_bytes(tag.text),
           ", which kept does not read (it reads torch.{Float,BFloat16,Half,Double,Long,Int,"
           "Short,Char,Byte,Bool}Storage); refusing to load");
    } else {
      fail(where_, ": pickle asks for ", quote_bytes(tag.text),
           ", which is not a tensor-rebuilding function; refusing to load (kept never executes "
           "code from a checkpoint)");
    }
    globals_.push_back(std::move(tag));
    return new_node(Kind::Global, static_cast<std::uint32_t>(globals_.size() - 1));
  }

  static bool storage_dtype(std::string_view name, DType& dtype) {
    static constexpr std::pair<std::string_view, DType> kTypes[] = {
        {"FloatStorage", DType::F32}, {"BFloat16Storage", DType::BF16},
        {"HalfStorage", DType::F16},  {"DoubleStorage", DType::F64},
        {"LongStorage", DType::I64},  {"IntStorage", DType::I32},
        {"ShortStorage", DType::I16}, {"CharStorage", DType::I8},
        {"ByteStorage", DType::U8},   {"BoolStorage", DType::Bool}};
    for (const auto& [type_name, type_dtype] : kTypes) {
      if (name == type_name) {
        dtype = type_dtype;
        return true;
      }
    }
    return false;
  }

  std::uint32_t persistent_load(std::uint32_t pid) {
    const Node& node = nodes_[pid];
    if (node.kind != Kind::Tuple || items(pid).size() != 5)
      error("BINPERSID expects a tuple ('storage', storage type, key, location, numel), found ",
            kind_name(pid), node.kind == Kind::Tuple ? " of " : "",
            node.kind == Kind::Tuple ? std::to_string(items(pid).size()) + " items" : "");
    const auto& parts = items(pid);
    if (!is_string(parts[0], "storage"))
      error("BINPERSID: only 'storage' persistent ids exist in torch.save archives, found ",
            nodes_[parts[0]].kind == Kind::String ? quote_bytes(strings_[nodes_[parts[0]].ref])
                                                  : kind_name(parts[0]));
    const Node& type = nodes_[parts[1]];
    if (type.kind != Kind::Global || globals_[type.ref].id != GlobalId::StorageType)
      error("BINPERSID: the storage type must be a torch.*Storage global, found ",
            kind_name(parts[1]));
    if (nodes_[parts[2]].kind != Kind::String || nodes_[parts[3]].kind != Kind::String)
      error("BINPERSID: the storage key and location must be strings, found ", kind_name(parts[2]),
            " and ", kind_name(parts[3]));
    const Node& numel = nodes_[parts[4]];
    if (numel.kind != Kind::Int || numel.integer < 0)
      error("BINPERSID: the storage size must be a non-negative int, found ",
            numel.kind == Kind::Int ? std::to_string(numel.integer) : kind_name(parts[4]));
    const std::string& key = strings_[nodes_[parts[2]].ref];
    const DType dtype = globals_[type.ref].dtype;
    auto found = storage_index_.find(key);
    std::uint32_t index;
    if (found == storage_index_.end()) {
      index = static_cast<std::uint32_t>(result_.storages.size());
      result_.storages.push_back(TorchStorageRef{
          key, dtype, static_cast<std::uint64_t>(numel.integer), strings_[nodes_[parts[3]].ref]});
      storage_index_.emplace(key, index);
    } else {
      index = found->second;
      const TorchStorageRef& seen = result_.storages[index];
      if (seen.dtype != dtype || seen.numel != static_cast<std::uint64_t>(numel.integer))
        error("storage ", quote_bytes(key), " is described twice differently (",
              dtype_name(seen.dtype), " x ", seen.numel, ", then ", dtype_name(dtype), " x ",
              numel.integer, ")");
    }
    return new_node(Kind::Storage, index);
  }

  bool is_string(std::uint32_t node, std::string_view text) const {
    return nodes_[node].kind == Kind::String && strings_[nodes_[node].ref] == text;
  }

  // A tuple of non-negative ints, or an error naming `what`.
  std::vector<std::int64_t> int_tuple(std::uint32_t node, const char* what) const {
    if (nodes_[node].kind != Kind::Tuple)
      error("tensor ", what, " must be a tuple of ints, found ", kind_name(node));
    std::vector<std::int64_t> values;
    for (std::uint32_t item : items(node)) {
      if (nodes_[item].kind != Kind::Int || nodes_[item].integer < 0)
        error("tensor ", what, " must hold non-negative ints, found ",
              nodes_[item].kind == Kind::Int ? std::to_string(nodes_[item].integer)
                                             : kind_name(item));
      values.push_back(nodes_[item].integer);
    }
    return values;
  }

  std::uint32_t reduce(std::uint32_t callable, std::uint32_t args) {
    if (nodes_[callable].kind != Kind::Global)
      error("REDUCE calls ", kind_name(callable),
            "; kept calls only tensor-rebuilding functions and OrderedDict");
    const GlobalTag& tag = globals_[nodes_[callable].ref];
    if (nodes_[args].kind != Kind::Tuple)
      error("REDUCE of ", quote_bytes(tag.text), " with ", kind_name(args),
            " as arguments (expected a tuple)");
    const std::vector<std::uint32_t> arguments = items(args);  // copy: new nodes may be added
    switch (tag.id) {
      case GlobalId::OrderedDict:
        if (!arguments.empty())
          error("OrderedDict is called with ", arguments.size(),
                " argument(s); torch.save calls it with none");
        return new_container(Kind::Dict, 1);
      case GlobalId::RebuildTensorV2:
      case GlobalId::RebuildTensor: {
        const bool v2 = tag.id == GlobalId::RebuildTensorV2;
        if (v2 ? (arguments.size() != 6 && arguments.size() != 7) : arguments.size() != 4)
          error(quote_bytes(tag.text), " is called with ", arguments.size(),
                " arguments, expected ", v2 ? "6 or 7" : "4");
        return rebuild_tensor(arguments, v2);
      }
      case GlobalId::RebuildParameter: {
        if (arguments.size() != 3 || nodes_[arguments[0]].kind != Kind::Tensor)
          error("'torch._utils _rebuild_parameter' expects (tensor, requires_grad, hooks), found ",
                arguments.size(), " argument(s)",
                arguments.empty() ? "" : " starting with " + kind_name(arguments[0]));
        check_hooks(arguments[2]);
        return arguments[0];  // a Parameter is its tensor for kept
      }
      case GlobalId::StorageType:
        break;
    }
    error(quote_bytes(tag.text), " cannot be called (REDUCE); it may only appear in a storage's ",
          "persistent id");
  }

  void check_hooks(std::uint32_t hooks) const {
    const Node& node = nodes_[hooks];
    if (node.kind == Kind::None) return;
    if (node.kind != Kind::Dict || !items(hooks).empty())
      error("a tensor's backward_hooks must be an empty OrderedDict, found ", kind_name(hooks),
            node.kind == Kind::Dict ? " with entries" : "");
  }

  std::uint32_t rebuild_tensor(const std::vector<std::uint32_t>& args, bool v2) {
    if (nodes_[args[0]].kind != Kind::Storage)
      error("a tensor's first argument must be a storage (a persistent id), found ",
            kind_name(args[0]));
    const Node& offset = nodes_[args[1]];
    if (offset.kind != Kind::Int || offset.integer < 0)
      error("a tensor's storage_offset must be a non-negative int, found ",
            offset.kind == Kind::Int ? std::to_string(offset.integer) : kind_name(args[1]));
    PendingTensor tensor;
    tensor.storage = nodes_[args[0]].ref;
    tensor.offset = static_cast<std::uint64_t>(offset.integer);
    tensor.sizes = int_tuple(args[2], "size");
    tensor.strides = int_tuple(args[3], "stride");
    if (tensor.sizes.size() != tensor.strides.size())
      error("a tensor has ", tensor.sizes.size(), " sizes but ", tensor.strides.size(), " strides");
    if (tensor.sizes.size() > static_cast<std::size_t>(Shape::kMaxRank))
      error("a tensor has ", tensor.sizes.size(), " dimensions, kept supports at most ",
            Shape::kMaxRank);
    if (v2) {
      if (nodes_[args[4]].kind != Kind::Bool)
        error("a tensor's requires_grad must be a bool, found ", kind_name(args[4]));
      check_hooks(args[5]);
      if (args.size() == 7) {
        // Metadata: {'conj': True} / {'neg': True} for lazily conjugated or negated views.
        const std::uint32_t metadata = args[6];
        if (nodes_[metadata].kind != Kind::Dict && nodes_[metadata].kind != Kind::None)
          error("a tensor's metadata must be a dict, found ", kind_name(metadata));
        if (nodes_[metadata].kind == Kind::Dict) {
          const auto& entries = items(metadata);
          for (std::size_t i = 0; i + 1 < entries.size(); i += 2) {
            const Node& value = nodes_[entries[i + 1]];
            if (value.kind == Kind::Bool && value.integer == 0) continue;
            error("a tensor carries metadata ",
                  nodes_[entries[i]].kind == Kind::String
                      ? quote_bytes(strings_[nodes_[entries[i]].ref])
                      : kind_name(entries[i]),
                  " (a lazy conj/neg bit), which kept does not apply; save t.resolve_conj()"
                  ".resolve_neg() instead");
          }
        }
      }
    }
    tensors_.push_back(std::move(tensor));
    return new_node(Kind::Tensor, static_cast<std::uint32_t>(tensors_.size() - 1));
  }

  // ---- the result ----------------------------------------------------------------------------
  TorchPickle finish() {
    if (!marks_.empty()) error("STOP with ", marks_.size(), " MARK(s) still open");
    need(1);
    const std::uint32_t root = stack_.back();
    if (nodes_[root].kind != Kind::Dict)
      fail(where_, ": pickle holds ", kind_name(root),
           ", not a state dict (a dict of tensor names to tensors)");
    const auto& entries = items(root);
    std::set<std::string_view> seen;
    for (std::size_t i = 0; i < entries.size(); i += 2) {
      const std::uint32_t key = entries[i], value = entries[i + 1];
      if (nodes_[key].kind != Kind::String)
        fail(where_, ": state dict has a key that is ", kind_name(key),
             ", not a string tensor name");
      const std::string& name = strings_[nodes_[key].ref];
      const std::string tensor_where = where_ + ": tensor " + quote_json(name);
      if (nodes_[value].kind != Kind::Tensor)
        fail(tensor_where, ": is ", kind_name(value),
             ", not a tensor (kept reads flat state dicts of tensor name to tensor)");
      if (!seen.insert(name).second) fail(tensor_where, ": appears twice in the state dict");
      result_.tensors.push_back(make_ref(tensor_where, name, tensors_[nodes_[value].ref]));
    }
    return std::move(result_);
  }

  TorchTensorRef make_ref(const std::string& where, const std::string& name,
                          const PendingTensor& pending) const {
    const TorchStorageRef& storage = result_.storages[pending.storage];
    TorchTensorRef ref;
    ref.name = name;
    ref.storage = pending.storage;
    ref.dtype = storage.dtype;
    ref.storage_offset = pending.offset;
    ref.strides = pending.strides;
    std::uint64_t numel = 1;
    bool empty = false;
    for (std::int64_t size : pending.sizes)
      empty = empty || size == 0;
    for (std::int64_t size : pending.sizes) {
      if (!empty && __builtin_mul_overflow(numel, static_cast<std::uint64_t>(size), &numel))
        fail(where, ": shape overflows 64 bits");
    }
    const std::uint64_t element = dtype_size(storage.dtype);
    if (!empty &&
        numel > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / element)
      fail(where, ": shape overflows 64-bit byte sizes");
    ref.shape = Shape(pending.sizes);
    if (empty) return ref;
    // The last element the view reaches must lie inside the storage.
    std::uint64_t last = pending.offset;
    for (std::size_t axis = 0; axis < pending.sizes.size(); ++axis) {
      std::uint64_t step = 0;
      if (__builtin_mul_overflow(static_cast<std::uint64_t>(pending.sizes[axis] - 1),
                                 static_cast<std::uint64_t>(pending.strides[axis]), &step) ||
          __builtin_add_overflow(last, step, &last))
        fail(where, ": its view (offset ", pending.offset, ", shape ", ref.shape,
             ") overflows 64-bit element indices");
    }
    if (last >= storage.numel)
      fail(where, ": its view (offset ", pending.offset, ", shape ", ref.shape, ", strides ",
           strides_text(pending.strides), ") reaches element ", last, " of storage ",
           quote_bytes(storage.key), ", which holds ", storage.numel, " elements");
    if (numel > storage.numel)
      fail(where, ": has ", numel, " elements but its storage ", quote_bytes(storage.key),
           " holds only ", storage.numel,
           ": an expanded (stride-0) view, which kept does not materialise; save "
           "t.contiguous() instead");
    return ref;
  }

  static std::string strides_text(const std::vector<std::int64_t>& strides) {
    std::string text = "[";
    for (std::size_t i = 0; i < strides.size(); ++i)
      text += (i ? ", " : "") + std::to_string(strides[i]);
    return text + "]";
  }

  std::span<const std::byte> data_;
  std::string where_;
  std::size_t pos_ = 0;
  std::size_t op_offset_ = 0;
  std::vector<Node> nodes_;
  std::vector<std::string> strings_;
  std::vector<std::vector<std::uint32_t>> containers_;
  std::vector<GlobalTag> globals_;
  std::vector<PendingTensor> tensors_;
  std::vector<std::uint32_t> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, std::uint32_t> memo_;
  std::map<std::string, std::uint32_t, std::less<>> storage_index_;
  TorchPickle result_;
};

}  // namespace detail

// Interprets a torch.save data.pkl (see the top comment). `where` (the file) starts every
// message. Never executes anything; throws kept::Error on anything it does not accept.
inline TorchPickle parse_torch_pickle(std::span<const std::byte> pickle, std::string_view where) {
  return detail::TorchPickleVm(pickle, where).run();
}

// The tensor `ref` describes, from the bytes of its storage (`storage`: exactly
// storages[ref.storage].numel elements). Contiguous views are zero-copy when `owner` is given
// and holds `storage` and the data is aligned for its dtype; everything else is copied into a
// fresh contiguous tensor. `where` (the file) starts messages.
inline Tensor materialize_torch_tensor(const TorchTensorRef& ref,
                                       std::span<const std::byte> storage,
                                       const std::shared_ptr<Storage>& owner,
                                       std::string_view where) {
  const std::size_t element = dtype_size(ref.dtype);
  const std::int64_t numel = ref.shape.numel();
  if (numel == 0) return Tensor::empty(ref.dtype, ref.shape);
  // make_ref validated the view against the storage's element count; check the bytes too.
  const int rank = ref.shape.rank();
  std::uint64_t last = ref.storage_offset;
  for (int axis = 0; axis < rank; ++axis)
    last += static_cast<std::uint64_t>(ref.shape[axis] - 1) *
            static_cast<std::uint64_t>(ref.strides[static_cast<std::size_t>(axis)]);
  if (last >= storage.size() / element)
    fail(where, ": tensor ", detail::quote_json(ref.name), ": its view reaches element ", last,
         " of a storage of ", storage.size(), " bytes");

  if (ref.contiguous()) {
    const std::byte* first = storage.data() + ref.storage_offset * element;
    if (owner) {
      const auto* base = static_cast<const std::byte*>(owner->data());
      const bool inside =
          first >= base && first - base <= static_cast<std::ptrdiff_t>(owner->bytes());
      if (inside && reinterpret_cast<std::uintptr_t>(first) % element == 0)
        return Tensor::from_storage(ref.dtype, ref.shape, owner,
                                    static_cast<std::size_t>(first - base));
    }
    Tensor copy = Tensor::empty(ref.dtype, ref.shape);
    std::memcpy(copy.raw(), first, copy.nbytes());
    return copy;
  }

  // Strided: walk the indices in row-major order; the innermost axis is one memcpy when its
  // stride is 1.
  Tensor copy = Tensor::empty(ref.dtype, ref.shape);
  auto* out = static_cast<std::byte*>(copy.raw());
  const std::int64_t inner = rank ? ref.shape[rank - 1] : 1;
  const std::int64_t inner_stride = rank ? ref.strides[static_cast<std::size_t>(rank - 1)] : 1;
  std::int64_t index[Shape::kMaxRank] = {};
  for (std::int64_t done = 0; done < numel; done += inner) {
    std::uint64_t source = ref.storage_offset;
    for (int axis = 0; axis + 1 < rank; ++axis)
      source += static_cast<std::uint64_t>(index[axis]) *
                static_cast<std::uint64_t>(ref.strides[static_cast<std::size_t>(axis)]);
    if (inner_stride == 1) {
      std::memcpy(out, storage.data() + source * element,
                  static_cast<std::size_t>(inner) * element);
      out += static_cast<std::size_t>(inner) * element;
    } else {
      for (std::int64_t i = 0; i < inner; ++i) {
        std::memcpy(
            out, storage.data() + (source + static_cast<std::uint64_t>(i * inner_stride)) * element,
            element);
        out += element;
      }
    }
    for (int axis = rank - 2; axis >= 0; --axis) {
      if (++index[axis] < ref.shape[axis]) break;
      index[axis] = 0;
    }
  }
  return copy;
}

}  // namespace kept
