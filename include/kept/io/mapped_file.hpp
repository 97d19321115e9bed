// kept/io/mapped_file.hpp: a checkpoint file mapped into memory, the basis of zero-copy reads.
//
// Files are mapped private and copy-on-write: a tensor viewing the mapping can be written to
// without touching the file and without faulting (a read-only mapping would turn an innocent
// in-place update into a SIGSEGV). The Storage munmaps when the last view goes away, so
// tensors outlive the reader that produced them. MAP_NORESERVE: a multi-GB shard must not
// count against the commit limit, since pages are only copied when written.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>

#include "kept/core/error.hpp"
#include "kept/core/tensor.hpp"
#include "kept/io/json.hpp"

namespace kept {

// Maps `path`; null for an empty file (mmap cannot map zero bytes). Errors name the path.
inline std::shared_ptr<Storage> map_file_private(const std::filesystem::path& path) {
  const std::string where = path.string();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(where, ": cannot open: ", detail::errno_text(errno));
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat info {};
  if (::fstat(fd, &info) != 0) fail(where, ": cannot stat: ", detail::errno_text(errno));
  if (!S_ISREG(info.st_mode)) fail(where, ": not a regular file");
  const auto size = static_cast<std::size_t>(info.st_size);
  if (size == 0) return nullptr;
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
  if (base == MAP_FAILED) fail(where, ": cannot mmap: ", detail::errno_text(errno));
  std::shared_ptr<Storage> mapping;
  try {
    mapping = std::make_shared<Storage>(base, size, MemorySpace::Host,
                                        [size](void* data) { ::munmap(data, size); });
  } catch (...) {
    ::munmap(base, size);
    throw;
  }
  mapping->mark_file_mapping();
  return mapping;
}

inline std::span<const std::byte> mapped_bytes(const std::shared_ptr<Storage>& mapping) {
  if (!mapping) return {};
  return {static_cast<const std::byte*>(mapping->data()), mapping->bytes()};
}

// Gives the pages under `tensor` back to the kernel if it is a view of a file mapping (no-op
// otherwise): clean file-backed pages are dropped and re-read on the next access. Pages only
// partly covered by the tensor are kept, since a neighbour may still be in use. A streaming
// converter calls this after each tensor, so its resident memory stays at a few tensors.
inline void release_file_pages(const Tensor& tensor) {
  const auto& storage = tensor.storage();
  if (!storage || !storage->file_mapping() || tensor.nbytes() == 0) return;
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto begin = reinterpret_cast<std::uintptr_t>(tensor.raw());
  const std::uintptr_t end = begin + tensor.nbytes();
  const std::uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;
  if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

}  // namespace kept
