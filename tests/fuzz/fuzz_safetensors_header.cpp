// libFuzzer target for the safetensors header parser (kept/io/safetensors.hpp).
//
// The input is a whole file image. The parser must either accept it and return a header whose
// entries really tile the data region, or reject it with kept::Error. Any other exception
// (a leaked nlohmann exception, std::length_error...), a crash, a sanitizer report or a
// violated invariant is a bug.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "kept/core/error.hpp"
#include "kept/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> file(reinterpret_cast<const std::byte*>(data), size);
  kept::SafetensorsHeader header;
  try {
    header = kept::parse_safetensors_header(file, "fuzz-input");
  } catch (const kept::Error&) {
    return 0;  // rejected cleanly
  }
  // Accepted: check what the reader will rely on when it builds tensor views.
  if (header.data_start() + header.data_bytes != size) std::abort();
  std::uint64_t covered = 0;
  for (const kept::SafetensorsEntry& entry : header.tensors) {
    if (entry.begin != covered || entry.end < entry.begin || entry.end > header.data_bytes)
      std::abort();
    const auto expected =
        static_cast<std::uint64_t>(entry.shape.numel()) * kept::dtype_size(entry.dtype);
    if (entry.end - entry.begin != expected) std::abort();
    covered = entry.end;
  }
  if (covered != header.data_bytes) std::abort();
  return 0;
}
