// The dead-rank case of kept/dist/mpi_communicator.hpp, run by tests/mpi/dead_rank.sh under
// mpirun -np 2: rank 1 dies while rank 0 waits for it in all_reduce_sum.
//   dead_rank sigkill DIR: rank 1 raises SIGKILL on itself (no handler, no cleanup, no output);
//   dead_rank throw DIR:   rank 1 throws a kept::Error out of its MpiSession's scope, which
//                          then skips MPI_Finalize (MpiSession's comment).
// Rank 0 writes its pid to DIR/rank0.pid before it enters the collective, so that the script
// can check it reached the collective and is gone afterwards. The collective cannot complete;
// the job must end because mpirun ends it.
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <exception>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "kept/core/error.hpp"
#include "kept/dist/mpi_communicator.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: dead_rank sigkill|throw DIR\n");
    return 2;
  }
  const std::string mode = argv[1];
  const std::string dir = argv[2];
  int rank = -1;
  try {
    kept::MpiSession session(&argc, &argv);
    kept::MpiCommunicator comm;
    rank = comm.rank();
    comm.barrier();  // every rank is up
    if (rank == 1) {
      // Let rank 0 get into the collective first, so it is waiting when this rank dies.
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      if (mode == "sigkill") std::raise(SIGKILL);
      throw kept::Error("rank 1 fails on its own");
    }
    std::ofstream(dir + "/rank" + std::to_string(rank) + ".pid") << getpid() << "\n";
    std::fprintf(stderr, "dead_rank: rank %d waiting in all_reduce_sum\n", rank);
    std::vector<float> values(1000, 1.0f);
    comm.all_reduce_sum(values.data(), static_cast<std::int64_t>(values.size()));
    std::printf("dead_rank: rank %d: all_reduce_sum returned\n", rank);  // must not happen
    return 0;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "dead_rank: rank %d: %s\n", rank, error.what());
    return 1;
  }
}
