// kept/io/atomic_file.hpp: all-or-nothing output files and directories.
//
// A conversion runs for minutes to hours and writes tens of gigabytes; a crash, a full disk or
// a Ctrl-C must never leave a file (or a checkpoint directory) that looks complete but is not.
// The POSIX recipe used here:
//   - AtomicFile writes to a temporary file in the destination's own directory (rename() is
//     only atomic within one filesystem), fsyncs it, renames it over the destination and fsyncs
//     the directory so the rename itself survives a power loss. Any failure, or destruction
//     before commit(), removes the temporary file; the previous destination stays untouched.
//   - AtomicDirectory builds a whole output directory under a temporary name beside the
//     destination and renames it into place at commit(). An existing destination is refused
//     unless `force`; with `force` the old directory is swapped out (renameat2 RENAME_EXCHANGE,
//     a single atomic step, or on filesystems without it: move aside, rename, restore on
//     failure) and then deleted. Without `force` the final rename uses RENAME_NOREPLACE, so a
//     directory created by someone else between the check and the commit is not replaced.
// Temporary names start with '.' and contain ".tmp-", so a crashed run leaves only hidden,
// recognisable debris, never something at the destination path.
// Errors are kept::Error naming the destination and the errno text ("No space left on device").
#pragma once

#include <fcntl.h>
#include <stdio.h>  // renameat2, RENAME_NOREPLACE, RENAME_EXCHANGE (glibc >= 2.28)
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "kept/core/error.hpp"
#include "kept/io/json.hpp"

namespace kept {

namespace detail {

// A fresh hidden name beside `destination`: ".<name>.tmp-<pid>-<counter>-<random>". The name is
// cut to keep the result under NAME_MAX (255) for long destination names.
inline std::filesystem::path temporary_sibling(const std::filesystem::path& destination,
                                               std::string_view kind) {
  static std::atomic<std::uint64_t> counter{0};
  static thread_local std::mt19937_64 random{std::random_device{}()};
  std::string name = destination.filename().string().substr(0, 160);
  std::string suffix = std::to_string(::getpid()) + "-" + std::to_string(counter++) + "-" +
                       std::to_string(random() % 1000000007ull);
  return destination.parent_path() / ("." + name + "." + std::string(kind) + "-" + suffix);
}

inline std::filesystem::path parent_or_dot(const std::filesystem::path& path) {
  return path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
}

// Makes a directory entry (a rename, a new file) durable. Filesystems that cannot fsync a
// directory answer EINVAL; there is nothing more to do on those.
inline void fsync_directory(const std::filesystem::path& directory, const std::string& context) {
  int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    fail(context, ": cannot open directory ", directory.string(),
         " to sync it: ", errno_text(errno));
  int result = ::fsync(fd);
  int error_number = errno;
  ::close(fd);
  if (result != 0 && error_number != EINVAL)
    fail(context, ": cannot sync directory ", directory.string(), ": ", errno_text(error_number));
}

inline void fsync_file(const std::filesystem::path& file, const std::string& context) {
  int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(context, ": cannot open ", file.string(), " to sync it: ", errno_text(errno));
  int result = ::fsync(fd);
  int error_number = errno;
  ::close(fd);
  if (result != 0 && error_number != EINVAL)
    fail(context, ": cannot sync ", file.string(), ": ", errno_text(error_number));
}

// A destination path with any trailing separator removed ("out/" names the directory "out").
inline std::filesystem::path normalized_destination(const std::filesystem::path& destination) {
  std::filesystem::path path = destination.lexically_normal();
  if (!path.has_filename() && path.has_parent_path()) path = path.parent_path();
  std::string name = path.filename().string();
  if (name.empty() || name == "." || name == "..")
    fail(destination.string(), ": an output path must end in a file or directory name");
  return path;
}

}  // namespace detail

// Writes one file atomically: construct, write() any number of times, commit().
class AtomicFile {
 public:
  explicit AtomicFile(const std::filesystem::path& destination)
      : destination_(detail::normalized_destination(destination)) {
    for (int attempt = 0;; ++attempt) {
      temp_path_ = detail::temporary_sibling(destination_, "tmp");
      // 0666 filtered by the umask: the final file gets ordinary permissions (mkstemp's 0600
      // would make checkpoints unreadable to other users).
      fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ >= 0) break;
      if (errno != EEXIST || attempt >= 16)
        fail(destination_.string(), ": cannot create temporary file ", temp_path_.string(), ": ",
             detail::errno_text(errno));
    }
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() { abandon(); }

  const std::filesystem::path& destination() const { return destination_; }
  const std::filesystem::path& temp_path() const { return temp_path_; }
  std::uint64_t bytes_written() const { return bytes_written_; }

  // Appends bytes. On failure the temporary file is removed and kept::Error is thrown.
  void write(std::span<const std::byte> bytes) {
    KEPT_CHECK(fd_ >= 0, destination_.string(), ": write after commit or failure");
    const std::byte* next = bytes.data();
    std::size_t left = bytes.size();
    while (left > 0) {
      // Linux writes at most ~2 GiB per call; ask for 1 GiB at a time.
      std::size_t chunk = left < (std::size_t{1} << 30) ? left : (std::size_t{1} << 30);
      ssize_t written = ::write(fd_, next, chunk);
      if (written < 0 && errno == EINTR) continue;
      if (written < 0) fail_and_abandon("cannot write", errno);
      if (written == 0) fail_and_abandon("cannot write", ENOSPC);  // no progress: a full disk
      next += written;
      left -= static_cast<std::size_t>(written);
      bytes_written_ += static_cast<std::uint64_t>(written);
    }
  }
  void write(std::string_view text) { write(std::as_bytes(std::span(text.data(), text.size()))); }

  // Makes the file durable and moves it to the destination, replacing any previous file.
  void commit() {
    KEPT_CHECK(fd_ >= 0, destination_.string(), ": commit after commit or failure");
    if (::fsync(fd_) != 0) fail_and_abandon("cannot sync", errno);
    int fd = fd_;
    fd_ = -1;
    // close() can report a deferred write error (NFS); the data is not safe if it does.
    if (::close(fd) != 0) fail_and_abandon("cannot close", errno);
    if (::rename(temp_path_.c_str(), destination_.c_str()) != 0)
      fail_and_abandon("cannot rename temporary file into place", errno);
    committed_ = true;
    detail::fsync_directory(detail::parent_or_dot(destination_), destination_.string());
  }

 private:
  [[noreturn]] void fail_and_abandon(const char* what, int error_number) {
    const std::string temporary = temp_path_.string();  // abandon() forgets it
    abandon();
    fail(destination_.string(), ": ", what, " (temporary file ", temporary,
         "): ", detail::errno_text(error_number));
  }
  void abandon() noexcept {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!committed_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
    temp_path_.clear();
  }

  std::filesystem::path destination_;
  std::filesystem::path temp_path_;
  int fd_ = -1;
  bool committed_ = false;
  std::uint64_t bytes_written_ = 0;
};

inline void write_file_atomically(const std::filesystem::path& path,
                                  std::span<const std::byte> contents) {
  AtomicFile file(path);
  file.write(contents);
  file.commit();
}

inline void write_file_atomically(const std::filesystem::path& path, std::string_view contents) {
  write_file_atomically(path, std::as_bytes(std::span(contents.data(), contents.size())));
}

// Builds an output directory under a temporary name and moves it into place at commit().
// Write everything into path(); the destination does not change until commit() succeeds.
class AtomicDirectory {
 public:
  explicit AtomicDirectory(const std::filesystem::path& destination, bool force = false)
      : destination_(detail::normalized_destination(destination)), force_(force) {
    // Refuse early, before hours of work, as well as at commit().
    check_destination();
    for (int attempt = 0;; ++attempt) {
      temp_path_ = detail::temporary_sibling(destination_, "tmp");
      if (::mkdir(temp_path_.c_str(), 0777) == 0) break;
      if (errno != EEXIST || attempt >= 16)
        fail(destination_.string(), ": cannot create temporary directory ", temp_path_.string(),
             ": ", detail::errno_text(errno));
    }
  }
  AtomicDirectory(const AtomicDirectory&) = delete;
  AtomicDirectory& operator=(const AtomicDirectory&) = delete;
  ~AtomicDirectory() {
    if (!committed_ && !temp_path_.empty()) {
      std::error_code ignored;
      std::filesystem::remove_all(temp_path_, ignored);
    }
  }

  // Where to write the contents.
  const std::filesystem::path& path() const { return temp_path_; }
  const std::filesystem::path& destination() const { return destination_; }
  bool committed() const { return committed_; }

  void commit() {
    KEPT_CHECK(!committed_, destination_.string(), ": directory committed twice");
    const std::string context = destination_.string();
    // Files written with AtomicFile are already durable; anything else written into the
    // directory is synced here so the renamed directory never holds half-flushed files.
    for (const auto& entry : std::filesystem::recursive_directory_iterator(temp_path_)) {
      if (entry.is_regular_file()) detail::fsync_file(entry.path(), context);
    }
    detail::fsync_directory(temp_path_, context);
    bool exists = check_destination();
    if (!exists) {
      install_new();
    } else {
      replace_existing();
    }
    committed_ = true;
    detail::fsync_directory(detail::parent_or_dot(destination_), context);
  }

 private:
  // Returns whether the destination exists; throws if it may not be replaced.
  bool check_destination() const {
    std::error_code error;
    auto status = std::filesystem::symlink_status(destination_, error);
    if (error && error != std::errc::no_such_file_or_directory)
      fail(destination_.string(), ": cannot inspect the output path: ", error.message());
    if (!std::filesystem::exists(status)) return false;
    if (!force_)
      fail(destination_.string(),
           ": output directory already exists (--force replaces it; in the API, force = true)");
    if (!std::filesystem::is_directory(status))
      fail(destination_.string(), ": exists and is not a directory; refusing to replace it");
    return true;
  }

  void install_new() {
    if (::renameat2(AT_FDCWD, temp_path_.c_str(), AT_FDCWD, destination_.c_str(),
                    RENAME_NOREPLACE) == 0)
      return;
    int error_number = errno;
    if (error_number == EEXIST)
      fail(destination_.string(),
           ": output directory appeared while it was being built; "
           "refusing to replace it");
    if (error_number != EINVAL && error_number != ENOSYS)
      fail(destination_.string(), ": cannot rename ", temp_path_.string(),
           " into place: ", detail::errno_text(error_number));
    // This filesystem has no RENAME_NOREPLACE: a plain rename (it still refuses a non-empty
    // destination).
    if (::rename(temp_path_.c_str(), destination_.c_str()) != 0)
      fail(destination_.string(), ": cannot rename ", temp_path_.string(),
           " into place: ", detail::errno_text(errno));
  }

  void replace_existing() {
    const std::string context = destination_.string();
    if (::renameat2(AT_FDCWD, temp_path_.c_str(), AT_FDCWD, destination_.c_str(),
                    RENAME_EXCHANGE) == 0) {
      // The old directory now lives at the temporary name.
      remove_old(temp_path_);
      return;
    }
    int error_number = errno;
    if (error_number != EINVAL && error_number != ENOSYS)
      fail(context,
           ": cannot swap the new directory into place: ", detail::errno_text(error_number));
    // No atomic exchange on this filesystem: move the old one aside, rename, then delete it.
    std::filesystem::path aside = detail::temporary_sibling(destination_, "old");
    if (::rename(destination_.c_str(), aside.c_str()) != 0)
      fail(context, ": cannot move the existing directory aside: ", detail::errno_text(errno));
    if (::rename(temp_path_.c_str(), destination_.c_str()) != 0) {
      error_number = errno;
      ::rename(aside.c_str(), destination_.c_str());  // put the old output back
      fail(context,
           ": cannot rename the new directory into place: ", detail::errno_text(error_number));
    }
    remove_old(aside);
  }

  // The new output is already in place; failing to delete the old copy does not make the
  // result wrong, so it leaves hidden debris instead of an error.
  static void remove_old(const std::filesystem::path& old) {
    std::error_code ignored;
    std::filesystem::remove_all(old, ignored);
  }

  std::filesystem::path destination_;
  std::filesystem::path temp_path_;
  bool force_ = false;
  bool committed_ = false;
};

}  // namespace kept
