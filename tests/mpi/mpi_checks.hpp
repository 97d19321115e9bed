// tests/mpi/mpi_checks.hpp: what the MPI test programs share (test_communicator.cpp,
// test_zero.cpp).
//
// A plain main rather than Catch2: every rank must make the same collective calls in the same
// order, and a Catch2 REQUIRE that ends a test case on one rank would leave the others waiting in
// its next collective. So a failed check is printed and counted and the run goes on; at the end
// the ranks add their failure counts with MPI_Allreduce itself (not the code under test) and
// every rank exits non-zero if any check failed anywhere.
#pragma once

#include <mpi.h>

#include <cstdio>
#include <exception>
#include <string>

#include "kept/dist/mpi_communicator.hpp"

namespace kept::test {

struct MpiChecks {
  int rank = 0;
  int checks = 0;
  int failures = 0;
  std::string context;  // what is under test, for messages

  void expect(bool ok, const std::string& what) {
    ++checks;
    if (ok) return;
    ++failures;
    std::fprintf(stderr, "rank %d: FAILED [%s]: %s\n", rank, context.c_str(), what.c_str());
  }

  // Collective: the failures over every rank, reported once by rank 0; the exit status.
  int finish(const char* program) const {
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) {
      int ranks = 0;
      MPI_Comm_size(MPI_COMM_WORLD, &ranks);
      std::printf("%s: %d ranks, %d checks on rank 0, %d failures on all ranks\n", program, ranks,
                  checks, total);
    }
    return total == 0 ? 0 : 1;
  }
};

// main's body: MPI around `run`; a rank-local surprise ends the job rather than leave the other
// ranks waiting.
template <class Run>
int run_under_mpi(int* argc, char*** argv, const char* program, Run run) {
  kept::MpiSession session(argc, argv);
  try {
    return run();
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s: unexpected error: %s\n", program, error.what());
    kept::MpiSession::abort(1);
  }
  return 1;
}

}  // namespace kept::test
