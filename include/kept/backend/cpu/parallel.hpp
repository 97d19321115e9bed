// kept/backend/cpu/parallel.hpp: how the CPU kernels split work between OpenMP threads.
//
// Inside a parallel region each thread takes one contiguous share (the static schedule, done
// by hand so that a kernel can pick its ISA entry point once per thread, not per element).
// Shares are whole granules: rows for the row kernels, 16 elements (64 bytes of fp32, one
// cache line) for the elementwise ones, so that no two threads write the same line.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace kept::cpu::detail {

// The calling thread's [begin, end) of `count` items, in shares of whole `granule`s.
inline void thread_share(std::int64_t count, std::int64_t granule, std::int64_t& begin,
                         std::int64_t& end) {
  const std::int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
  const std::int64_t granules = (count + granule - 1) / granule;
  const std::int64_t per = granules / threads, extra = granules % threads;
  const std::int64_t first = thread * per + std::min(thread, extra);
  begin = std::min(count, first * granule);
  end = std::min(count, (first + per + (thread < extra ? 1 : 0)) * granule);
}

}  // namespace kept::cpu::detail
