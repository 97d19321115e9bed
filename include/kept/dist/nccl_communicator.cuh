// kept/dist/nccl_communicator.cuh: the Communicator between GPUs, over NCCL (nvcc only).
//
// One process per GPU; every pointer handed to a collective is device memory of this rank's GPU
// (cudaMalloc'd or managed), checked with cudaPointerGetAttributes before anything is queued.
//
// Bootstrap. The constructor takes a host Communicator (MpiCommunicator across processes,
// LocalCommunicator for a one-process job) and this process's local rank on its node:
//   1. device = local_rank % cudaGetDeviceCount(), cudaSetDevice(device); the ranks agree over
//      the host communicator that every one of them got a device (one rank without a GPU makes
//      every rank throw, instead of leaving the others waiting in ncclCommInitRank);
//   2. rank 0 calls ncclGetUniqueId and broadcasts the id (and its status) over the host
//      communicator;
//   3. ncclCommInitRank(size, id, rank) with the host communicator's rank and size.
// The host communicator must outlive this one: agree_on goes through it.
//
// Streams and ordering. Collectives run on the communicator's own stream (non-blocking, highest
// priority, stream()), never on the caller's. The caller names its compute stream (constructor,
// set_compute_stream; the legacy default stream 0 is allowed) and each collective is ordered
// after it and before it with two events:
//   - on entry, an event is recorded on the compute stream and the collective stream waits on it:
//     the collective sees everything queued on the compute stream before the call (the gradients
//     a backward pass wrote);
//   - on exit, an event is recorded on the collective stream and the compute stream waits on it:
//     whatever is queued on the compute stream after the call sees the results.
// So, seen from the compute stream, a collective behaves as if it had been queued on it, and the
// calls return to the host without waiting for the device (except barrier, which synchronises,
// and agree_on, which is host-only). The host must not read the results before synchronising the
// compute stream (or the collective stream: synchronize()), and the buffers must stay allocated
// until then (cudaFree waits for the device, so freeing is safe). Work queued on other streams
// is not ordered: order it against the compute stream yourself. The separate stream lets NCCL's
// kernels run beside compute kernels queued on other streams, and is what a later overlapping
// API (ZeRO-3 prefetch: join the compute stream later) needs.
//
// Deterministic sums (the contract of kept/dist/communicator.hpp): NCCL's own reductions add in
// the order of their ring or tree, chosen by message size, rank count, topology and version, so
// ncclAllReduce and ncclReduceScatter do not give rank-order bits. Here, as in the MPI
// communicator:
//   - reduce_scatter_sum: in rounds of at most `piece` floats per shard, one NCCL group of
//     ncclSend (this rank's contribution to each peer's shard) and ncclRecv (each peer's
//     contribution to this rank's shard, into N - 1 staging rows), then one small kernel
//     (rank_ordered_sum_kernel) that adds, per element, x_0 + x_1 + ... + x_{N-1} in rank order
//     with __fadd_rn (this rank's own contribution read in place) and writes the shard;
//   - all_reduce_sum: reduce_scatter_sum over ShardLayout(count, N, 64) followed by all_gather of
//     the summed shards (the layout's boundaries are 256-byte multiples, so on a 16-byte-aligned
//     buffer the kernel moves 16-byte packs);
//   - with one rank there is nothing to add: the sums only order the streams.
// Cost, per rank and call: 2 (N - 1) / N of the buffer sent and as much received (the volume of a
// ring all-reduce), one extra read of N pieces and one write of the own shard by the kernel, a
// staging buffer of (N - 1) rows (about staging_bytes, 64 MiB by default, allocated on first use
// and kept; growing it calls cudaFree, which waits for the device), and all-to-all traffic in
// rounds: every rank talks to every other (a ring only to its neighbours), which costs latency
// with many ranks across nodes, and a round's kernel runs between its communication and the next
// round's (no overlap inside one call). Expect it
// to be slower than ncclAllReduce, most on many nodes; on one NVLink node the volume dominates.
// NcclSums::NcclAllReduce (NcclOptions) is the fast path: ncclAllReduce for all_reduce_sum and
// grouped in-place ncclReduce to each shard's owner for reduce_scatter_sum. Its bits depend on
// NCCL's choice of algorithm: NOT deterministic across rank counts, message sizes, machines or
// NCCL versions (replicas still agree within one all-reduce, a reduce-scatter has one owner per
// shard), so a run resumed elsewhere may not continue the same bits.
//
// Uneven all-gather. ncclAllGather needs the same count on every rank. When the layout's shards
// are all the same size (the common ZeRO case: the arena a multiple of N x alignment) it is one
// in-place ncclAllGather (send buffer = this rank's shard, receive buffer = the whole buffer).
// Otherwise (uneven last shard, empty trailing shards) it is one NCCL group of ncclSend of the
// own shard to every peer and ncclRecv of each peer's shard straight into its place: exact
// counts, no staging buffer, no padding, no extra copy, the same volume as a ring all-gather,
// and all-to-all traffic as above. (Padding to the largest shard would need a staging buffer of
// N x the largest shard and two extra copies of the whole buffer.) broadcast is ncclBroadcast in
// place; barrier an ncclAllReduce of one float followed by a synchronisation of the collective
// stream (so it also waits for the compute stream's queued work); agree_on hashes through the
// host communicator.
//
// Sizes. NCCL counts are size_t, so a message above INT_MAX elements or bytes needs no
// splitting; byte counts are checked against int64 overflow (elements x element size), and the
// staging bounds only the reduce-scatter's rows.
//
// Errors. Every failing NCCL or CUDA call throws a kept::Error naming the call, the operation
// (all_reduce_sum, all_gather, ...), the rank and size, and ncclGetErrorString / cudaGetErrorString
// (plus ncclGetLastError's detail). Bad arguments (a layout for another rank count, a negative
// count, a root outside the ranks, a host pointer) fail before anything is queued and leave the
// communicator usable. A failure once NCCL calls were queued leaves it unusable: later calls throw,
// and the destructor calls ncclCommAbort instead of ncclCommDestroy (a peer may never answer).
// NCCL reports a failure on another rank asynchronously: barrier and synchronize() check
// ncclCommGetAsyncError.
#pragma once

#include <nccl.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "kept/backend/cuda/kernel_common.cuh"
#include "kept/backend/cuda/platform.cuh"
#include "kept/core/error.hpp"
#include "kept/dist/communicator.hpp"
#include "kept/dist/rank_ordered_sum.cuh"
#include "kept/dist/shard_layout.hpp"

namespace kept {

static_assert(sizeof(std::size_t) >= sizeof(std::int64_t),
              "NCCL counts are size_t: a non-negative int64 count must fit");

// How NcclCommunicator adds: in rank order (the Communicator contract) or NCCL's way (fast, not
// deterministic: see the top comment).
enum class NcclSums { RankOrdered, NcclAllReduce };

struct NcclOptions {
  NcclSums sums = NcclSums::RankOrdered;
  // Bound of the reduce-scatter's staging buffer (N - 1 rows of received pieces); smaller makes
  // more rounds. Tests make it tiny.
  std::int64_t staging_bytes = std::int64_t{64} << 20;
};

namespace detail {

// Throws a kept::Error for an NCCL result other than ncclSuccess.
inline void nccl_check(ncclResult_t result, const char* call, const char* operation, int rank,
                       int size) {
  if (result == ncclSuccess) return;
  const char* last = ncclGetLastError(nullptr);  // the comm argument is unused by NCCL
  const bool detail = last != nullptr && last[0] != '\0';
  fail("NCCL: ", call, " in ", operation, " failed on rank ", rank, " of ", size, ": ",
       ncclGetErrorString(result), " (ncclResult_t ", static_cast<int>(result), ")",
       detail ? "; NCCL's last error: " : "", detail ? last : "");
}

// Throws a kept::Error for a CUDA status other than cudaSuccess.
inline void nccl_cuda_check(cudaError_t status, const char* call, const char* operation, int rank,
                            int size) {
  if (status == cudaSuccess) return;
  (void)cudaGetLastError();  // a sticky launch error is reported here, not by the next call
  fail("CUDA: ", call, " in ", operation, " failed on rank ", rank, " of ", size, ": ",
       cudaGetErrorName(status), " (", static_cast<int>(status), "): ", cudaGetErrorString(status));
}

// ---- the all-gather's pieces -----------------------------------------------------------------

// Byte offset and byte count of every rank's shard, and whether one in-place ncclAllGather does
// (every shard the same size).
struct GatherPlan {
  bool even = false;
  std::int64_t total_bytes = 0;
  std::vector<std::int64_t> offset_bytes;  // per rank
  std::vector<std::int64_t> count_bytes;   // per rank
};

inline GatherPlan gather_plan(const ShardLayout& layout, std::size_t element_bytes,
                              const char* operation, int rank) {
  KEPT_CHECK(element_bytes > 0, operation, " on rank ", rank, ": element size is 0 bytes");
  KEPT_CHECK(element_bytes <= static_cast<std::size_t>(INT64_MAX), operation, " on rank ", rank,
             ": element size ", element_bytes, " bytes overflows a byte count");
  const auto width = static_cast<std::int64_t>(element_bytes);
  KEPT_CHECK(layout.elements() <= INT64_MAX / width, operation, " on rank ", rank, ": ",
             layout.elements(), " elements of ", width, " bytes overflow a byte count");
  GatherPlan plan;
  plan.total_bytes = layout.elements() * width;
  plan.even = true;
  for (int k = 0; k < layout.ranks(); ++k) {
    plan.offset_bytes.push_back(layout.offset(k) * width);
    plan.count_bytes.push_back(layout.count(k) * width);
    if (plan.count_bytes.back() != plan.count_bytes.front()) plan.even = false;
  }
  return plan;
}

}  // namespace detail

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `host`: every rank of it constructs one, with its local rank (the rank among
  // the processes on its node: detect_local_rank()) and its compute stream.
  NcclCommunicator(Communicator& host, int local_rank, cudaStream_t compute_stream,
                   NcclOptions options = {})
      : host_(host),
        rank_(host.rank()),
        size_(host.size()),
        compute_(compute_stream),
        options_(options) {
    const char* operation = "NcclCommunicator";
    piece_ = detail::sum_piece_elements(options.staging_bytes, size_);
    try {
      // 1. the device, agreed on by every rank before anyone waits in NCCL.
      std::string local_failure;
      try {
        select_device(local_rank);
      } catch (const Error& error) {
        local_failure = error.what();
      }
      std::string agreement_failure;
      try {
        host_.agree_on("NcclCommunicator device setup (0 = ok, 1 = failed)",
                       local_failure.empty() ? 0 : 1);
      } catch (const Error& error) {
        agreement_failure = error.what();
      }
      if (!local_failure.empty()) fail(local_failure);
      if (!agreement_failure.empty()) fail(agreement_failure);
      // 2. the unique id from rank 0, with its status so that a failure there ends every rank.
      Bootstrap bootstrap{};
      if (rank_ == 0) bootstrap.status = static_cast<int>(ncclGetUniqueId(&bootstrap.id));
      host_.broadcast(&bootstrap, 1, 0);
      check_nccl(static_cast<ncclResult_t>(bootstrap.status), "ncclGetUniqueId (on rank 0)",
                 operation);
      // 3. the communicator, its stream, events and scratch.
      int least = 0, greatest = 0;
      check_cuda(cudaDeviceGetStreamPriorityRange(&least, &greatest),
                 "cudaDeviceGetStreamPriorityRange", operation);
      check_cuda(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest),
                 "cudaStreamCreateWithPriority", operation);
      check_cuda(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming),
                 "cudaEventCreateWithFlags", operation);
      check_cuda(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming),
                 "cudaEventCreateWithFlags", operation);
      check_cuda(cudaMalloc(&scratch_, sizeof(float)), "cudaMalloc", operation);
      check_cuda(cudaMemset(scratch_, 0, sizeof(float)), "cudaMemset", operation);
      check_nccl(ncclCommInitRank(&comm_, size_, bootstrap.id, rank_), "ncclCommInitRank",
                 operation);
      int nccl_rank = -1, nccl_size = -1;
      check_nccl(ncclCommUserRank(comm_, &nccl_rank), "ncclCommUserRank", operation);
      check_nccl(ncclCommCount(comm_, &nccl_size), "ncclCommCount", operation);
      KEPT_CHECK(nccl_rank == rank_ && nccl_size == size_, operation, ": NCCL says rank ",
                 nccl_rank, " of ", nccl_size, ", the host communicator rank ", rank_, " of ",
                 size_);
    } catch (...) {
      broken_ = true;
      release();
      throw;
    }
  }
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;
  ~NcclCommunicator() override { release(); }

  // This process's rank among those on its node, from the launcher's environment (Open MPI,
  // MPICH/Intel MPI, Slurm, torchrun's LOCAL_RANK), or `fallback` when none is set.
  static int detect_local_rank(int fallback = 0) {
    for (const char* name :
         {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"}) {
      const char* value = std::getenv(name);
      if (value == nullptr || value[0] == '\0') continue;
      char* end = nullptr;
      const long parsed = std::strtol(value, &end, 10);
      KEPT_CHECK(*end == '\0' && parsed >= 0 && parsed <= INT_MAX, "NcclCommunicator: $", name,
                 " = '", value, "' is not a local rank");
      return static_cast<int>(parsed);
    }
    return fallback;
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const { return device_; }
  ncclComm_t handle() const { return comm_; }
  // The collectives' own stream (see the top comment).
  cudaStream_t stream() const { return stream_; }
  cudaStream_t compute_stream() const { return compute_; }
  // Later collectives order themselves against `compute_stream` instead.
  void set_compute_stream(cudaStream_t compute_stream) { compute_ = compute_stream; }
  const NcclOptions& options() const { return options_; }
  // Floats per reduce-scatter round and shard (from options().staging_bytes).
  std::int64_t piece_elements() const { return piece_; }

  void all_reduce_sum(float* data, std::int64_t count) override {
    const char* operation = "all_reduce_sum";
    check_count(count, operation);
    check_usable(operation);
    check_device_memory(data, float_bytes(count, operation), operation);
    if (options_.sums == NcclSums::NcclAllReduce) {
      run(operation, [&] {
        if (count == 0) return;
        check_nccl(ncclAllReduce(data, data, static_cast<std::size_t>(count), ncclFloat, ncclSum,
                                 comm_, stream_),
                   "ncclAllReduce", operation);
      });
      return;
    }
    const ShardLayout layout(count, size_, detail::kAllReduceAlignment);
    const detail::GatherPlan plan = detail::gather_plan(layout, sizeof(float), operation, rank_);
    prepare_staging(layout, operation);
    run(operation, [&] {
      if (size_ == 1) return;  // a sum of one rank's values is those values
      reduce_scatter_queue(data, layout, operation);
      all_gather_queue(data, plan, operation);
    });
  }

  void reduce_scatter_sum(float* data, const ShardLayout& layout) override {
    const char* operation = "reduce_scatter_sum";
    check_layout(layout, operation);
    check_usable(operation);
    check_device_memory(data, float_bytes(layout.elements(), operation), operation);
    if (options_.sums == NcclSums::RankOrdered) prepare_staging(layout, operation);
    run(operation, [&] {
      if (size_ == 1) return;
      if (options_.sums == NcclSums::NcclAllReduce) {
        check_nccl(ncclGroupStart(), "ncclGroupStart", operation);
        for (int owner = 0; owner < size_; ++owner) {
          const std::int64_t count = layout.count(owner);
          if (count == 0) continue;
          float* shard = data + layout.offset(owner);
          check_nccl(ncclReduce(shard, shard, static_cast<std::size_t>(count), ncclFloat, ncclSum,
                                owner, comm_, stream_),
                     "ncclReduce", operation);
        }
        check_nccl(ncclGroupEnd(), "ncclGroupEnd", operation);
        return;
      }
      reduce_scatter_queue(data, layout, operation);
    });
  }

  void all_gather_bytes(void* data, const ShardLayout& layout, std::size_t element_bytes) override {
    const char* operation = "all_gather";
    check_layout(layout, operation);
    check_usable(operation);
    const detail::GatherPlan plan = detail::gather_plan(layout, element_bytes, operation, rank_);
    check_device_memory(data, plan.total_bytes, operation);
    run(operation, [&] { all_gather_queue(data, plan, operation); });
  }

  void broadcast_bytes(void* data, std::int64_t bytes, int root) override {
    const char* operation = "broadcast";
    check_count(bytes, operation);
    check_root(root, operation);
    check_usable(operation);
    check_device_memory(data, bytes, operation);
    run(operation, [&] {
      if (bytes == 0) return;
      check_nccl(ncclBroadcast(data, data, static_cast<std::size_t>(bytes), ncclUint8, root, comm_,
                               stream_),
                 "ncclBroadcast", operation);
    });
  }

  void barrier() override {
    const char* operation = "barrier";
    check_usable(operation);
    run(operation, [&] {
      check_nccl(ncclAllReduce(scratch_, scratch_, 1, ncclFloat, ncclSum, comm_, stream_),
                 "ncclAllReduce", operation);
    });
    synchronize_as(operation);
  }

  // Through the host communicator (the hashes are host values).
  void agree_on(const std::string& what, std::uint64_t hash) override {
    host_.agree_on(what, hash);
  }

  // Waits until every collective queued so far has finished on this GPU; then checks NCCL's
  // asynchronous error state (a failure seen by another rank).
  void synchronize() {
    check_usable("synchronize");
    synchronize_as("synchronize");
  }

 private:
  struct Bootstrap {
    ncclUniqueId id;
    int status = static_cast<int>(ncclSuccess);
  };

  void check_nccl(ncclResult_t result, const char* call, const char* operation) const {
    detail::nccl_check(result, call, operation, rank_, size_);
  }
  void check_cuda(cudaError_t status, const char* call, const char* operation) const {
    detail::nccl_cuda_check(status, call, operation, rank_, size_);
  }

  void select_device(int local_rank) {
    const char* operation = "NcclCommunicator";
    KEPT_CHECK(local_rank >= 0, operation, " on rank ", rank_, ": local rank ", local_rank,
               " is negative");
    int count = 0;
    const cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) (void)cudaGetLastError();
    KEPT_CHECK(status == cudaSuccess && count > 0, operation, " on rank ", rank_,
               ": no CUDA device (cudaGetDeviceCount: ", cudaGetErrorString(status), " (",
               static_cast<int>(status), "), ", count, " device(s))");
    device_ = local_rank % count;
    check_cuda(cudaSetDevice(device_), "cudaSetDevice", operation);
  }

  // The bytes of `count` floats, checked against int64 overflow.
  std::int64_t float_bytes(std::int64_t count, const char* operation) const {
    constexpr auto kWidth = static_cast<std::int64_t>(sizeof(float));
    KEPT_CHECK(count <= INT64_MAX / kWidth, operation, " on rank ", rank_, ": ", count,
               " floats overflow a byte count");
    return count * kWidth;
  }

  void check_usable(const char* operation) const {
    KEPT_CHECK(!broken_, operation, " on rank ", rank_, " of ", size_,
               ": the NCCL communicator failed earlier and cannot be used any more");
  }

  // `bytes` bytes at `pointer` must be device memory of this rank's GPU.
  void check_device_memory(const void* pointer, std::int64_t bytes, const char* operation) const {
    if (bytes == 0) return;
    KEPT_CHECK(pointer != nullptr, operation, " on rank ", rank_, ": the buffer of ", bytes,
               " bytes is a null pointer");
    cudaPointerAttributes attributes{};
    const cudaError_t status = cudaPointerGetAttributes(&attributes, pointer);
    if (status != cudaSuccess) (void)cudaGetLastError();
    KEPT_CHECK(status == cudaSuccess, operation, " on rank ", rank_,
               ": cudaPointerGetAttributes failed on the buffer: ", cudaGetErrorString(status));
    const bool device = attributes.type == cudaMemoryTypeDevice;
    KEPT_CHECK(device || attributes.type == cudaMemoryTypeManaged, operation, " on rank ", rank_,
               ": the buffer is not device memory (cudaMemoryType ",
               static_cast<int>(attributes.type),
               "); NcclCommunicator takes pointers to GPU memory");
    KEPT_CHECK(!device || attributes.device == device_, operation, " on rank ", rank_,
               ": the buffer is on device ", attributes.device,
               ", this rank communicates from device ", device_);
  }

  // Orders `queue` (the NCCL calls and kernels of one collective) after the compute stream and
  // the compute stream after it; a failure once anything was queued breaks the communicator.
  template <class Queue>
  void run(const char* operation, Queue&& queue) {
    try {
      check_cuda(cudaSetDevice(device_), "cudaSetDevice", operation);
      check_cuda(cudaEventRecord(ready_, compute_), "cudaEventRecord (compute stream)", operation);
      check_cuda(cudaStreamWaitEvent(stream_, ready_, 0), "cudaStreamWaitEvent (collective stream)",
                 operation);
      queue();
      check_cuda(cudaEventRecord(done_, stream_), "cudaEventRecord (collective stream)", operation);
      check_cuda(cudaStreamWaitEvent(compute_, done_, 0), "cudaStreamWaitEvent (compute stream)",
                 operation);
    } catch (...) {
      broken_ = true;
      throw;
    }
  }

  void synchronize_as(const char* operation) {
    try {
      check_cuda(cudaSetDevice(device_), "cudaSetDevice", operation);
      check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize", operation);
      ncclResult_t state = ncclSuccess;
      check_nccl(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError", operation);
      check_nccl(state, "a queued NCCL operation (ncclCommGetAsyncError)", operation);
    } catch (...) {
      broken_ = true;
      throw;
    }
  }

  // Grows the staging rows to what a deterministic reduce-scatter over `layout` needs, before
  // anything is queued (a failed cudaMalloc leaves the communicator usable; cudaFree of the old
  // rows waits for the device, so collectives still queued finish with them first).
  void prepare_staging(const ShardLayout& layout, const char* operation) {
    if (size_ == 1) return;
    const std::int64_t floats = detail::SumRounds(layout, piece_).row_stride(rank_) * (size_ - 1);
    check_cuda(cudaSetDevice(device_), "cudaSetDevice", operation);
    if (floats > staging_floats_) {
      if (staging_ != nullptr) check_cuda(cudaFree(staging_), "cudaFree (staging)", operation);
      staging_ = nullptr;
      staging_floats_ = 0;
      check_cuda(cudaMalloc(&staging_, static_cast<std::size_t>(floats) * sizeof(float)),
                 "cudaMalloc (staging)", operation);
      staging_floats_ = floats;
    }
  }

  // The deterministic reduce-scatter (top comment), queued on stream_; size_ > 1.
  void reduce_scatter_queue(float* data, const ShardLayout& layout, const char* operation) {
    const detail::SumRounds rounds(layout, piece_);
    const std::int64_t stride = rounds.row_stride(rank_);
    float* rows = staging_;  // prepare_staging made it large enough
    float* own = data + layout.offset(rank_);
    for (std::int64_t round = 0; round < rounds.rounds(); ++round) {
      const std::int64_t start = rounds.start(round);
      const std::int64_t mine = rounds.piece(rank_, round);
      check_nccl(ncclGroupStart(), "ncclGroupStart", operation);
      for (int peer = 0; peer < size_; ++peer) {
        if (peer == rank_) continue;
        if (mine > 0)
          check_nccl(ncclRecv(rows + detail::staging_slot(peer, rank_) * stride,
                              static_cast<std::size_t>(mine), ncclFloat, peer, comm_, stream_),
                     "ncclRecv", operation);
        const std::int64_t theirs = rounds.piece(peer, round);
        if (theirs > 0)
          check_nccl(ncclSend(data + layout.offset(peer) + start, static_cast<std::size_t>(theirs),
                              ncclFloat, peer, comm_, stream_),
                     "ncclSend", operation);
      }
      check_nccl(ncclGroupEnd(), "ncclGroupEnd", operation);
      check_cuda(
          detail::launch_rank_ordered_sum(own + start, rows, stride, mine, size_, rank_, stream_),
          "launch_rank_ordered_sum", operation);
    }
  }

  // The all-gather (top comment), queued on stream_.
  void all_gather_queue(void* data, const detail::GatherPlan& plan, const char* operation) {
    if (plan.total_bytes == 0) return;
    auto* bytes = static_cast<unsigned char*>(data);
    const auto own = static_cast<std::size_t>(rank_);
    if (plan.even) {
      check_nccl(
          ncclAllGather(bytes + plan.offset_bytes[own], bytes,
                        static_cast<std::size_t>(plan.count_bytes[own]), ncclUint8, comm_, stream_),
          "ncclAllGather", operation);
      return;
    }
    check_nccl(ncclGroupStart(), "ncclGroupStart", operation);
    for (int peer = 0; peer < size_; ++peer) {
      if (peer == rank_) continue;
      const auto k = static_cast<std::size_t>(peer);
      if (plan.count_bytes[k] > 0)
        check_nccl(
            ncclRecv(bytes + plan.offset_bytes[k], static_cast<std::size_t>(plan.count_bytes[k]),
                     ncclUint8, peer, comm_, stream_),
            "ncclRecv", operation);
      if (plan.count_bytes[own] > 0)
        check_nccl(ncclSend(bytes + plan.offset_bytes[own],
                            static_cast<std::size_t>(plan.count_bytes[own]), ncclUint8, peer, comm_,
                            stream_),
                   "ncclSend", operation);
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd", operation);
  }

  // Frees everything; never throws. A broken communicator is aborted (a peer may never answer).
  void release() noexcept {
    if (device_ >= 0) (void)cudaSetDevice(device_);
    if (comm_ != nullptr) {
      if (broken_) {
        (void)ncclCommAbort(comm_);
      } else {
        if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
        (void)ncclCommDestroy(comm_);
      }
      comm_ = nullptr;
    }
    if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
    if (staging_ != nullptr) (void)cudaFree(staging_);
    if (scratch_ != nullptr) (void)cudaFree(scratch_);
    if (ready_ != nullptr) (void)cudaEventDestroy(ready_);
    if (done_ != nullptr) (void)cudaEventDestroy(done_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    staging_ = nullptr;
    scratch_ = nullptr;
    ready_ = done_ = nullptr;
    stream_ = nullptr;
    staging_floats_ = 0;
  }

  Communicator& host_;
  int rank_ = 0;
  int size_ = 1;
  int device_ = -1;
  cudaStream_t compute_ = nullptr;
  NcclOptions options_;
  std::int64_t piece_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  cudaEvent_t done_ = nullptr;
  float* scratch_ = nullptr;
  float* staging_ = nullptr;
  std::int64_t staging_floats_ = 0;
  bool broken_ = false;
};

}  // namespace kept
