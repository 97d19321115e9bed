// libFuzzer target for the PyTorch .bin reader: the restricted pickle VM (with every tensor it
// accepts materialised against a dummy zero-filled storage), the zip parser (with every entry's
// data read and CRC-checked), and the whole archive path. Any exception other than kept::Error,
// any crash and any sanitizer report is a bug.
//
//   clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -Iinclude \
//       tests/fuzz/fuzz_torch_pickle.cpp -o fuzz_torch_pickle
//   ./fuzz_torch_pickle -max_total_time=30 corpus/ tests/data/torch_bin
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/io/torch_checkpoint.hpp"
#include "kept/io/torch_pickle.hpp"
#include "kept/io/zip.hpp"

namespace {

// Dummy storages stay small so that the fuzzer explores instead of allocating.
constexpr std::uint64_t kMaxDummyStorageBytes = 1u << 20;

void fuzz_pickle(std::span<const std::byte> bytes) {
  try {
    const kept::TorchPickle pickle = kept::parse_torch_pickle(bytes, "fuzz.pkl");
    for (const kept::TorchTensorRef& ref : pickle.tensors) {
      const kept::TorchStorageRef& storage = pickle.storages[ref.storage];
      const std::uint64_t element = kept::dtype_size(storage.dtype);
      if (storage.numel > kMaxDummyStorageBytes / element) continue;
      std::vector<std::byte> dummy(static_cast<std::size_t>(storage.numel * element));
      (void)kept::materialize_torch_tensor(ref, dummy, nullptr, "fuzz.pkl");
    }
  } catch (const kept::Error&) {
  }
}

void fuzz_zip(std::span<const std::byte> bytes) {
  try {
    const kept::ZipReader zip(bytes, "fuzz.zip");
    for (const kept::ZipEntry& entry : zip.entries()) {
      try {
        (void)zip.data(entry, true);
      } catch (const kept::Error&) {
      }
    }
  } catch (const kept::Error&) {
  }
}

void fuzz_archive(std::span<const std::byte> bytes) {
  try {
    (void)kept::read_torch_archive(bytes, nullptr, "fuzz.bin");
  } catch (const kept::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  fuzz_pickle(bytes);
  fuzz_zip(bytes);
  fuzz_archive(bytes);
  return 0;
}
