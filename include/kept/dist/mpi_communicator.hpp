// kept/dist/mpi_communicator.hpp: the Communicator between CPU processes, over MPI.
//
// Written against Open MPI (Debian's openmpi-bin, libopenmpi-dev) and only the MPI-3 C API, so
// another MPI should do. Usage: one MpiSession in main, then any number of MpiCommunicators.
// MPI calls come from the main thread only (MPI_THREAD_FUNNELED); kept's OpenMP threads run
// the arithmetic between them.
//
// How the collectives run (the deterministic sums of kept/dist/communicator.hpp): point-to-point
// messages on a private duplicate of the parent communicator, posted all at once and then
// waited for, so no MPI reduction, and so no MPI-chosen summation order, is involved.
//   - reduce_scatter_sum: each rank sends every other rank its contribution to that rank's
//     shard and adds the N contributions to its own shard in rank order;
//   - all_gather: each rank sends its shard to every other rank;
//   - all_reduce_sum: reduce_scatter_sum over a ShardLayout of the buffer with alignment 1,
//     then all_gather of the summed shards;
//   - broadcast: MPI_Bcast (a copy: its tree does not change the bytes).
// Large buffers go in rounds of at most piece_bytes per message (16 MiB by default): MPI counts
// are int, so anything above INT_MAX elements must be split, and the owner's receive buffer for
// a reduce-scatter round is N pieces, not N shards. Messages carry pointers into the buffer,
// never int displacements, so a buffer of any size works.
//
// Errors. The session sets MPI_ERRORS_RETURN on MPI_COMM_WORLD (and the duplicates inherit
// it), so a failing MPI call returns its code and becomes a kept::Error naming the call, the
// operation, the rank and MPI's own text, instead of MPI aborting the job with its own message.
// Bad arguments (a layout for another rank count, a negative count) fail before any message.
//
// A dead rank. When a rank dies without MPI_Finalize (SIGKILL, the OOM killer, a crash, or an
// exception leaving main, see MpiSession), Open MPI's mpirun notices the process exit, prints
// which rank died and how ("mpirun noticed that process rank 1 ... exited on signal 9"), kills
// every other rank of the job and exits non-zero. The surviving ranks are not told: one waiting
// in a collective never returns and never sees an error (MPI_ERRORS_RETURN does not cover a
// dead peer, and plain MPI has no recovery); it is killed. So a job either completes on every
// rank or fails as a whole, and recovery is a restart from the last checkpoint (kept train
// --resume). tests/mpi/dead_rank.sh checks it: rank 1 SIGKILLs itself while rank 0 waits in
// all_reduce_sum; mpirun must exit non-zero within 60 s (it takes under 2 s, start-up included) and
// rank 0's process must be gone.
#pragma once

#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1  // the C API only: MPI-2's C++ bindings are deprecated
#endif
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/dist/communicator.hpp"
#include "kept/dist/shard_layout.hpp"

namespace kept {

namespace detail {

inline std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS)
    return detail::concat("MPI error code ", code);
  return std::string(text, static_cast<std::size_t>(length));
}

// Throws a kept::Error for an MPI return code other than MPI_SUCCESS.
inline void mpi_check(int code, const char* call, const char* operation, int rank, int size) {
  if (code == MPI_SUCCESS) return;
  fail("MPI: ", call, " in ", operation, " failed on rank ", rank, " of ", size, ": ",
       mpi_error_text(code), " (error code ", code, ")");
}

}  // namespace detail

// Owns MPI's lifetime in a process: MPI_Init_thread on construction, MPI_Finalize on
// destruction. Destroyed by an exception (one leaving the scope that holds the session), it
// skips MPI_Finalize: the other ranks may be waiting in a collective this rank will never join,
// and MPI_Finalize could wait for them in turn; a process that exits without it makes mpirun
// end the whole job (the dead-rank case above), while the exception's handler still prints its
// message.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv, int required_thread_level = MPI_THREAD_FUNNELED)
      : exceptions_at_start_(std::uncaught_exceptions()) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    KEPT_CHECK(!initialized, "MpiSession: MPI is already initialised (one session per process)");
    const int code = MPI_Init_thread(argc, argv, required_thread_level, &thread_level_);
    KEPT_CHECK(code == MPI_SUCCESS, "MPI: MPI_Init_thread failed: ", detail::mpi_error_text(code));
    if (thread_level_ < required_thread_level) {
      MPI_Finalize();
      fail("MPI: MPI_Init_thread provides thread level ", thread_level_, ", kept needs ",
           required_thread_level);
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  MpiSession() : MpiSession(nullptr, nullptr) {}
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  ~MpiSession() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    if (std::uncaught_exceptions() > exceptions_at_start_) {
      int rank = -1;
      MPI_Comm_rank(MPI_COMM_WORLD, &rank);
      std::fprintf(stderr, "kept: rank %d leaves MPI on an exception, without MPI_Finalize\n",
                   rank);
      return;
    }
    MPI_Finalize();
  }

  int thread_level() const { return thread_level_; }

  // Ends every rank of the job (MPI_Abort): for an error only this rank has seen, when the
  // others would otherwise wait for it.
  [[noreturn]] static void abort(int exit_code) {
    MPI_Abort(MPI_COMM_WORLD, exit_code);
    std::_Exit(exit_code);  // MPI_Abort does not return; this keeps [[noreturn]] honest
  }

 private:
  int exceptions_at_start_ = 0;
  int thread_level_ = 0;
};

class MpiCommunicator final : public Communicator {
 public:
  static constexpr std::int64_t kDefaultPieceBytes = std::int64_t{1} << 24;

  // Collective over `parent`. piece_bytes bounds every message (and so the rounds of a large
  // collective); tests make it tiny to exercise the splitting.
  explicit MpiCommunicator(MPI_Comm parent = MPI_COMM_WORLD,
                           std::int64_t piece_bytes = kDefaultPieceBytes)
      : piece_bytes_(piece_bytes) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    KEPT_CHECK(initialized, "MpiCommunicator: MPI is not initialised (make an MpiSession first)");
    KEPT_CHECK(piece_bytes >= static_cast<std::int64_t>(sizeof(float)) && piece_bytes <= INT_MAX,
               "MpiCommunicator: piece_bytes ", piece_bytes, " is outside [", sizeof(float), ", ",
               INT_MAX, "]");
    // A private communicator: kept's messages cannot match the application's own.
    check(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup", "MpiCommunicator");
    check(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler",
          "MpiCommunicator");
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank", "MpiCommunicator");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size", "MpiCommunicator");
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  MPI_Comm handle() const { return comm_; }
  std::int64_t piece_bytes() const { return piece_bytes_; }

  void all_reduce_sum(float* data, std::int64_t count) override {
    check_count(count, "all_reduce_sum");
    const ShardLayout layout(count, size_, 1);
    reduce_scatter_sum(data, layout);
    all_gather(data, layout);
  }

  void reduce_scatter_sum(float* data, const ShardLayout& layout) override {
    const char* operation = "reduce_scatter_sum";
    check_layout(layout, operation);
    const std::int64_t piece = piece_bytes_ / static_cast<std::int64_t>(sizeof(float));
    const std::int64_t rounds = (layout.max_count() + piece - 1) / piece;
    const std::int64_t own_offset = layout.offset(rank_);
    const std::int64_t own_count = layout.count(rank_);
    // One row per rank for this round's piece of the own shard, in rank order.
    const std::int64_t row = std::min(piece, own_count);
    std::vector<float> rows(static_cast<std::size_t>(row * size_));
    for (std::int64_t round = 0; round < rounds; ++round) {
      const std::int64_t start = round * piece;
      auto piece_of = [&](int rank) {
        return std::clamp<std::int64_t>(layout.count(rank) - start, 0, piece);
      };
      const std::int64_t mine = piece_of(rank_);
      requests_.clear();
      for (int peer = 0; peer < size_ && mine > 0; ++peer) {
        if (peer == rank_) continue;
        check(MPI_Irecv(rows.data() + peer * row, static_cast<int>(mine), MPI_FLOAT, peer,
                        kReduceScatterTag, comm_, &requests_.emplace_back()),
              "MPI_Irecv", operation);
      }
      for (int peer = 0; peer < size_; ++peer) {
        const std::int64_t count = piece_of(peer);
        if (peer == rank_ || count == 0) continue;
        check(MPI_Isend(data + layout.offset(peer) + start, static_cast<int>(count), MPI_FLOAT,
                        peer, kReduceScatterTag, comm_, &requests_.emplace_back()),
              "MPI_Isend", operation);
      }
      wait_all(operation);
      if (mine == 0) continue;
      float* out = data + own_offset + start;
      std::memcpy(rows.data() + rank_ * row, out, static_cast<std::size_t>(mine) * sizeof(float));
      // Element by element this is ((x_0 + x_1) + x_2) + ...: the rank order of the contract.
      std::memcpy(out, rows.data(), static_cast<std::size_t>(mine) * sizeof(float));
      for (int from = 1; from < size_; ++from) {
        const float* contribution = rows.data() + from * row;
        for (std::int64_t i = 0; i < mine; ++i)
          out[i] += contribution[i];
      }
    }
  }

  void all_gather_bytes(void* data, const ShardLayout& layout, std::size_t element_bytes) override {
    const char* operation = "all_gather";
    check_layout(layout, operation);
    KEPT_CHECK(element_bytes > 0, operation, " on rank ", rank_, ": element size is 0 bytes");
    const auto width = static_cast<std::int64_t>(element_bytes);
    KEPT_CHECK(layout.elements() <= INT64_MAX / width, operation, " on rank ", rank_, ": ",
               layout.elements(), " elements of ", width, " bytes overflow a byte count");
    auto* bytes = static_cast<unsigned char*>(data);
    const std::int64_t rounds = (layout.max_count() * width + piece_bytes_ - 1) / piece_bytes_;
    for (std::int64_t round = 0; round < rounds; ++round) {
      const std::int64_t start = round * piece_bytes_;
      auto piece_of = [&](int rank) {
        return std::clamp<std::int64_t>(layout.count(rank) * width - start, 0, piece_bytes_);
      };
      const std::int64_t mine = piece_of(rank_);
      requests_.clear();
      for (int peer = 0; peer < size_; ++peer) {
        const std::int64_t count = piece_of(peer);
        if (peer == rank_ || count == 0) continue;
        check(MPI_Irecv(bytes + layout.offset(peer) * width + start, static_cast<int>(count),
                        MPI_BYTE, peer, kAllGatherTag, comm_, &requests_.emplace_back()),
              "MPI_Irecv", operation);
      }
      for (int peer = 0; peer < size_ && mine > 0; ++peer) {
        if (peer == rank_) continue;
        check(MPI_Isend(bytes + layout.offset(rank_) * width + start, static_cast<int>(mine),
                        MPI_BYTE, peer, kAllGatherTag, comm_, &requests_.emplace_back()),
              "MPI_Isend", operation);
      }
      wait_all(operation);
    }
  }

  void broadcast_bytes(void* data, std::int64_t bytes, int root) override {
    check_count(bytes, "broadcast");
    check_root(root, "broadcast");
    auto* at = static_cast<unsigned char*>(data);
    for (std::int64_t start = 0; start < bytes; start += piece_bytes_) {
      const auto count = static_cast<int>(std::min(piece_bytes_, bytes - start));
      check(MPI_Bcast(at + start, count, MPI_BYTE, root, comm_), "MPI_Bcast", "broadcast");
    }
  }

  void barrier() override { check(MPI_Barrier(comm_), "MPI_Barrier", "barrier"); }

 private:
  // One tag per collective: MPI keeps the order of messages between two ranks on one tag, and
  // every round completes before the next starts, so a receive always matches its own send.
  static constexpr int kReduceScatterTag = 1;
  static constexpr int kAllGatherTag = 2;

  void check(int code, const char* call, const char* operation) const {
    detail::mpi_check(code, call, operation, rank_, size_);
  }

  void wait_all(const char* operation) {
    statuses_.resize(requests_.size());
    const int code =
        MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), statuses_.data());
    if (code == MPI_ERR_IN_STATUS) {
      for (const MPI_Status& status : statuses_)
        check(status.MPI_ERROR, "MPI_Waitall", operation);
    }
    check(code, "MPI_Waitall", operation);
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  std::int64_t piece_bytes_ = kDefaultPieceBytes;
  std::vector<MPI_Request> requests_;
  std::vector<MPI_Status> statuses_;
};

}  // namespace kept
