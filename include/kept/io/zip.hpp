// kept/io/zip.hpp: a read-only reader for the zip archives torch.save writes.
//
// What it reads. torch.save (PyTorchStreamWriter, built on miniz) writes a zip whose entries are
// all *stored* (method 0, never compressed), with the local headers padded by an "FB" extra
// field so each record's data starts 64-byte aligned, general-purpose flag bit 3 set (sizes and
// CRC in a data descriptor after the data, zeros in the local header), and ZIP64 structures
// (end-of-central-directory locator and record, zip64 extra fields) once the archive passes
// 4 GiB or 65535 entries, which every multi-GB shard of a 14B model does. The reader takes
// sizes, CRCs and offsets from the central directory (authoritative, and the only place that
// holds them with bit 3 set), reads each local header only for the lengths of its name and
// extra field to find where the data starts, and hands out zero-copy spans into the mapping.
// Compressed (deflate, ...) and encrypted entries are refused by name when their data is asked
// for; multi-disk archives are refused outright.
//
// Untrusted input. Every offset and size is checked against the file before it is used, with
// overflow-safe arithmetic: the end-of-central-directory record must end exactly at the end of
// the file (comment included), the central directory must lie inside the file and before the
// record, each entry's local header and data must lie before the central directory, and the
// local header must repeat the central directory's name. The entry count is bounded by what the
// central directory's size can hold before anything is allocated. Errors start with the file
// name and name the entry. The parser works on an in-memory span (ZipReader) so that a fuzzer
// can drive it; ZipFile adds the mmap.
//
// CRC32. data(entry, verify_crc) checks the entry's CRC-32 when asked. The torch loader asks for
// the pickle (data.pkl, kilobytes: a flipped bit there changes the structure of the whole
// checkpoint, and checking costs nothing) but not for the tensor records: those are gigabytes
// each, and checking them would read every page of a multi-GB shard up front, defeating the lazy
// mmap (a model is converted tensor by tensor) and costing seconds per shard. A recorded CRC of 0
// is not checked: torch.serialization.set_crc32_options(False) makes torch write 0 for "not
// computed" (a real CRC of 0 is a 1 in 2^32 event, and a CRC is no defence against a crafted
// file anyway).
//
// Why hand-written and not libzip-dev or libminizip-dev (both in Debian). We prefer well-kept
// libraries, but neither serves here: (1) kept needs zero-copy access to stored entries of
// multi-GB shards, i.e. the byte offset of each entry's data inside an mmapped file, and
// libzip 1.7 has no public API for it (zip_fopen/zip_fread copy through its own buffers, and
// zip_stat carries no data offset); minizip only exposes it after opening the entry through its
// FILE*-style I/O callbacks (unzGetCurrentFileZStreamPos64), one entry at a time and with the
// library's own global state; (2) kept is header-only, and either library would add a
// link-time dependency (plus zlib) for every consumer of kept::kept, for a format subset of a
// few hundred lines; (3) this subset (stored entries, ZIP64, central directory + local header)
// is small enough to bounds-check exhaustively and to fuzz in isolation. The CRC-32 is the
// standard reflected polynomial 0xEDB88320 with a 256-entry table, written here for the same
// reason (zlib's crc32 would be the only zlib symbol kept uses).
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/mapped_file.hpp"

namespace kept {

// One entry of the central directory, validated.
struct ZipEntry {
  std::string name;
  std::uint16_t method = 0;  // 0 = stored; anything else is refused when the data is read
  std::uint16_t flags = 0;   // general-purpose bit flags (bit 0: encrypted)
  std::uint32_t crc32 = 0;
  std::uint64_t compressed_size = 0;
  std::uint64_t size = 0;                 // uncompressed size
  std::uint64_t local_header_offset = 0;  // where its local file header starts
  std::uint64_t data_offset = 0;          // where its (stored) data starts in the file
};

namespace detail {

inline std::uint16_t zip_u16(const std::byte* p) {
  return static_cast<std::uint16_t>(static_cast<unsigned>(p[0]) |
                                    (static_cast<unsigned>(p[1]) << 8));
}
inline std::uint32_t zip_u32(const std::byte* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
inline std::uint64_t zip_u64(const std::byte* p) {
  return static_cast<std::uint64_t>(zip_u32(p)) |
         (static_cast<std::uint64_t>(zip_u32(p + 4)) << 32);
}

// An entry name from an untrusted file, printable in a message: quoted, control and non-ASCII
// bytes as \xNN, cut after 120 bytes.
inline std::string quote_bytes(std::string_view text) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out = "'";
  std::size_t shown = 0;
  for (char c : text) {
    if (shown++ == 120) {
      out += "...";
      break;
    }
    auto byte = static_cast<unsigned char>(c);
    if (byte >= 0x20 && byte < 0x7f && byte != '\'' && byte != '\\') {
      out += c;
    } else {
      out += "\\x";
      out += kHex[byte >> 4];
      out += kHex[byte & 15];
    }
  }
  return out + "'";
}

inline const std::array<std::uint32_t, 256>& crc32_table() {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> result{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t value = i;
      for (int bit = 0; bit < 8; ++bit)
        value = (value & 1u) ? (value >> 1) ^ 0xEDB88320u : value >> 1;
      result[i] = value;
    }
    return result;
  }();
  return table;
}

}  // namespace detail

// CRC-32 as zip (and zlib's crc32) computes it.
inline std::uint32_t crc32(std::span<const std::byte> bytes, std::uint32_t crc = 0) {
  const auto& table = detail::crc32_table();
  crc = ~crc;
  for (std::byte b : bytes)
    crc = table[(crc ^ static_cast<std::uint32_t>(b)) & 0xffu] ^ (crc >> 8);
  return ~crc;
}

// Limits, far above anything torch writes (a 14B model's shard has ~300 entries).
inline constexpr std::uint64_t kMaxZipEntries = 1u << 20;

// The central directory of a zip held in memory, validated; zero-copy access to stored entries.
class ZipReader {
 public:
  ZipReader() = default;

  // `where` (a path) starts every message.
  ZipReader(std::span<const std::byte> file, std::string where)
      : file_(file), where_(std::move(where)) {
    parse();
  }

  const std::string& where() const { return where_; }
  std::span<const std::byte> file() const { return file_; }
  // Entries in central-directory order.
  const std::vector<ZipEntry>& entries() const { return entries_; }
  const ZipEntry* find(std::string_view name) const {
    auto found = index_.find(name);
    return found == index_.end() ? nullptr : &entries_[found->second];
  }
  bool contains(std::string_view name) const { return find(name) != nullptr; }

  // The stored bytes of `entry` (which must come from entries()/find()), as a span into the
  // file. Refuses compressed and encrypted entries; checks the CRC-32 when `verify_crc` is set
  // (see the top comment for when to ask for it).
  std::span<const std::byte> data(const ZipEntry& entry, bool verify_crc) const {
    const std::string what = where_ + ": zip entry " + detail::quote_bytes(entry.name);
    if (entry.flags & 1u)
      fail(what, " is encrypted; torch.save never encrypts, kept cannot read it");
    if (entry.method != 0)
      fail(what, " is compressed (method ", entry.method, entry.method == 8 ? ", deflate" : "",
           "); torch.save stores every entry uncompressed, kept reads only stored (method 0) "
           "entries");
    auto bytes = file_.subspan(static_cast<std::size_t>(entry.data_offset),
                               static_cast<std::size_t>(entry.size));
    if (verify_crc && entry.crc32 != 0) {
      const std::uint32_t actual = crc32(bytes);
      if (actual != entry.crc32)
        fail(what, ": CRC-32 mismatch (the central directory records ", hex32(entry.crc32),
             ", the data has ", hex32(actual), "): the file is corrupt");
    }
    return bytes;
  }
  // data() of the entry named `name`; throws if there is none.
  std::span<const std::byte> data(std::string_view name, bool verify_crc) const {
    const ZipEntry* entry = find(name);
    if (!entry) fail(where_, ": zip entry ", detail::quote_bytes(name), " not found");
    return data(*entry, verify_crc);
  }

 private:
  static std::string hex32(std::uint32_t value) {
    static constexpr char kHex[] = "0123456789abcdef";
    std::string text = "0x";
    for (int shift = 28; shift >= 0; shift -= 4)
      text += kHex[(value >> shift) & 15u];
    return text;
  }

  // [offset, offset + length) lies inside [0, limit).
  static bool fits(std::uint64_t offset, std::uint64_t length, std::uint64_t limit) {
    return offset <= limit && length <= limit - offset;
  }
  const std::byte* at(std::uint64_t offset) const {
    return file_.data() + static_cast<std::size_t>(offset);
  }

  void parse() {
    const std::uint64_t size = file_.size();
    constexpr std::uint64_t kEocdBytes = 22;
    if (size < kEocdBytes)
      fail(where_, ": not a zip archive: ", size,
           " bytes is shorter than an end-of-central-directory record (truncated?)");

    // The end-of-central-directory record: the last signature whose comment ends the file.
    std::uint64_t eocd = 0;
    bool found = false;
    const std::uint64_t lowest = size - kEocdBytes > 0xffff ? size - kEocdBytes - 0xffff : 0;
    for (std::uint64_t pos = size - kEocdBytes + 1; pos-- > lowest;) {
      if (detail::zip_u32(at(pos)) == 0x06054b50u &&
          pos + kEocdBytes + detail::zip_u16(at(pos + 20)) == size) {
        eocd = pos;
        found = true;
        break;
      }
    }
    if (!found)
      fail(where_,
           ": not a zip archive: no end-of-central-directory record at the end of the file "
           "(truncated, or not written by torch.save)");
    const std::byte* record = at(eocd);
    std::uint64_t disk = detail::zip_u16(record + 4);
    std::uint64_t cd_disk = detail::zip_u16(record + 6);
    std::uint64_t disk_entries = detail::zip_u16(record + 8);
    std::uint64_t total_entries = detail::zip_u16(record + 10);
    std::uint64_t cd_size = detail::zip_u32(record + 12);
    std::uint64_t cd_offset = detail::zip_u32(record + 16);
    std::uint64_t cd_limit = eocd;  // the central directory ends before this

    // ZIP64: a locator right before the record points at the zip64 end-of-central-directory
    // record, whose 64-bit fields replace the saturated 16/32-bit ones.
    constexpr std::uint64_t kLocatorBytes = 20, kZip64EocdBytes = 56;
    if (eocd >= kLocatorBytes && detail::zip_u32(at(eocd - kLocatorBytes)) == 0x07064b50u) {
      const std::byte* locator = at(eocd - kLocatorBytes);
      const std::uint32_t zip64_disk = detail::zip_u32(locator + 4);
      const std::uint64_t zip64_offset = detail::zip_u64(locator + 8);
      const std::uint32_t disks = detail::zip_u32(locator + 16);
      if (zip64_disk != 0 || disks > 1)
        fail(where_, ": multi-disk (split) zip archives are not supported");
      if (!fits(zip64_offset, kZip64EocdBytes, eocd - kLocatorBytes))
        fail(where_, ": zip64 end-of-central-directory locator points at offset ", zip64_offset,
             ", outside the file (truncated or corrupt)");
      const std::byte* zip64 = at(zip64_offset);
      if (detail::zip_u32(zip64) != 0x06064b50u)
        fail(where_, ": no zip64 end-of-central-directory record at offset ", zip64_offset,
             " where the locator points (corrupt)");
      disk = detail::zip_u32(zip64 + 16);
      cd_disk = detail::zip_u32(zip64 + 20);
      disk_entries = detail::zip_u64(zip64 + 24);
      total_entries = detail::zip_u64(zip64 + 32);
      cd_size = detail::zip_u64(zip64 + 40);
      cd_offset = detail::zip_u64(zip64 + 48);
      cd_limit = zip64_offset;
    } else if (total_entries == 0xffff || cd_size == 0xffffffffu || cd_offset == 0xffffffffu) {
      fail(where_,
           ": the end-of-central-directory record has saturated (ZIP64) fields but no zip64 "
           "locator precedes it (truncated or corrupt)");
    }
    if (disk != 0 || cd_disk != 0 || disk_entries != total_entries)
      fail(where_, ": multi-disk (split) zip archives are not supported");
    if (!fits(cd_offset, cd_size, cd_limit))
      fail(where_, ": central directory [", cd_offset, ", +", cd_size,
           ") runs outside the file before the end record at ", cd_limit,
           " (truncated or corrupt)");
    constexpr std::uint64_t kCentralBytes = 46, kLocalBytes = 30;
    if (total_entries > cd_size / kCentralBytes)
      fail(where_, ": the end record claims ", total_entries,
           " entries, more than a central directory of ", cd_size, " bytes can hold");
    if (total_entries > kMaxZipEntries)
      fail(where_, ": ", total_entries, " zip entries, more than the limit of ", kMaxZipEntries);

    entries_.reserve(static_cast<std::size_t>(total_entries));
    std::uint64_t pos = cd_offset;
    const std::uint64_t cd_end = cd_offset + cd_size;
    for (std::uint64_t i = 0; i < total_entries; ++i) {
      if (!fits(pos, kCentralBytes, cd_end) || detail::zip_u32(at(pos)) != 0x02014b50u)
        fail(where_, ": central directory entry ", i, " at offset ", pos,
             " is missing or has a bad signature (corrupt)");
      const std::byte* h = at(pos);
      ZipEntry entry;
      entry.flags = detail::zip_u16(h + 8);
      entry.method = detail::zip_u16(h + 10);
      entry.crc32 = detail::zip_u32(h + 16);
      entry.compressed_size = detail::zip_u32(h + 20);
      entry.size = detail::zip_u32(h + 24);
      const std::uint64_t name_length = detail::zip_u16(h + 28);
      const std::uint64_t extra_length = detail::zip_u16(h + 30);
      const std::uint64_t comment_length = detail::zip_u16(h + 32);
      std::uint32_t start_disk = detail::zip_u16(h + 34);
      entry.local_header_offset = detail::zip_u32(h + 42);
      if (!fits(pos + kCentralBytes, name_length + extra_length + comment_length, cd_end))
        fail(where_, ": central directory entry ", i, " runs past the central directory");
      entry.name.assign(reinterpret_cast<const char*>(h + kCentralBytes),
                        static_cast<std::size_t>(name_length));
      const std::string what = where_ + ": zip entry " + detail::quote_bytes(entry.name);
      parse_zip64_extra(what, h + kCentralBytes + name_length, extra_length, entry, start_disk);
      if (start_disk != 0) fail(what, ": lies on another disk (multi-disk archive)");
      if (entry.method == 0 && entry.compressed_size != entry.size)
        fail(what, ": stored entry has compressed size ", entry.compressed_size, " but size ",
             entry.size, " (corrupt)");

      // The local header: only its name and extra lengths matter (sizes come from above).
      const std::uint64_t lho = entry.local_header_offset;
      if (!fits(lho, kLocalBytes, cd_offset) || detail::zip_u32(at(lho)) != 0x04034b50u)
        fail(what, ": no local file header at offset ", lho, " (truncated or corrupt)");
      const std::uint64_t local_name = detail::zip_u16(at(lho) + 26);
      const std::uint64_t local_extra = detail::zip_u16(at(lho) + 28);
      if (!fits(lho + kLocalBytes, local_name + local_extra, cd_offset))
        fail(what, ": local file header at offset ", lho, " runs into the central directory");
      if (std::string_view(reinterpret_cast<const char*>(at(lho + kLocalBytes)),
                           static_cast<std::size_t>(local_name)) != entry.name)
        fail(what, ": the local file header at offset ", lho, " names a different entry (corrupt)");
      entry.data_offset = lho + kLocalBytes + local_name + local_extra;
      if (!fits(entry.data_offset, entry.compressed_size, cd_offset))
        fail(what, ": data [", entry.data_offset, ", +", entry.compressed_size,
             ") runs past the start of the central directory at ", cd_offset,
             " (truncated or corrupt)");

      if (!index_.emplace(entry.name, entries_.size()).second)
        fail(what, ": appears twice in the central directory");
      entries_.push_back(std::move(entry));
      pos += kCentralBytes + name_length + extra_length + comment_length;
    }
  }

  // The zip64 extended-information extra field (id 0x0001) holds, in this order, the 64-bit
  // size, compressed size and local header offset, and the 32-bit start disk, each present only
  // when the central directory's field is saturated.
  void parse_zip64_extra(const std::string& what, const std::byte* extra, std::uint64_t length,
                         ZipEntry& entry, std::uint32_t& start_disk) const {
    const bool need_size = entry.size == 0xffffffffu;
    const bool need_compressed = entry.compressed_size == 0xffffffffu;
    const bool need_offset = entry.local_header_offset == 0xffffffffu;
    const bool need_disk = start_disk == 0xffffu;
    bool seen = false;
    std::uint64_t pos = 0;
    while (pos + 4 <= length) {
      const std::uint16_t id = detail::zip_u16(extra + pos);
      const std::uint64_t field_length = detail::zip_u16(extra + pos + 2);
      if (field_length > length - pos - 4)
        fail(what, ": extra field runs past the central directory entry (corrupt)");
      if (id == 0x0001 && !seen) {
        seen = true;
        const std::byte* field = extra + pos + 4;
        std::uint64_t used = 0;
        auto take64 = [&](std::uint64_t& target, const char* name) {
          if (used + 8 > field_length)
            fail(what, ": zip64 extra field is too short for the ", name);
          target = detail::zip_u64(field + used);
          used += 8;
        };
        if (need_size) take64(entry.size, "size");
        if (need_compressed) take64(entry.compressed_size, "compressed size");
        if (need_offset) take64(entry.local_header_offset, "local header offset");
        if (need_disk) {
          if (used + 4 > field_length) fail(what, ": zip64 extra field is too short for the disk");
          start_disk = detail::zip_u32(field + used);
        }
      }
      pos += 4 + field_length;
    }
    if ((need_size || need_compressed || need_offset || need_disk) && !seen)
      fail(what, ": has saturated (ZIP64) sizes or offset but no zip64 extra field (corrupt)");
  }

  std::span<const std::byte> file_;
  std::string where_;
  std::vector<ZipEntry> entries_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

// A zip file on disk, mmapped (see map_file_private in mapped_file.hpp), with its directory parsed.
class ZipFile {
 public:
  ZipFile() = default;

  explicit ZipFile(const std::filesystem::path& path)
      : path_(path), mapping_(map_file_private(path)) {
    reader_ = ZipReader(bytes(), path.string());
  }

  const std::filesystem::path& path() const { return path_; }
  const ZipReader& reader() const { return reader_; }
  // The whole file; tensors viewing it hold this Storage. Null for an empty file.
  const std::shared_ptr<Storage>& mapping() const { return mapping_; }
  std::span<const std::byte> bytes() const { return mapped_bytes(mapping_); }

 private:
  std::filesystem::path path_;
  std::shared_ptr<Storage> mapping_;
  ZipReader reader_;
};

}  // namespace kept
