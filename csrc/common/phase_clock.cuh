// GPU-clock marks at a kernel's phase boundaries, for performance work (profiling builds
// only: cmake -DHEP_PHASE_CLOCK=ON; benchmarks/phase_clock.py reads them). In other
// builds a mark compiles to nothing.
//
// Each kernel file that includes this header gets its own marks (internal linkage): for
// mark m, the earliest and the latest %globaltimer at which any caller passed it since
// the last read. %globaltimer is common to every SM of a GPU, so the marks of ranks that
// share one GPU lie on one clock.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"

namespace hep::phase_clock {

constexpr int kMarks = 8;

#ifdef HEP_PHASE_CLOCK
namespace {

__device__ unsigned long long g_first[kMarks] = {~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull, ~0ull};
__device__ unsigned long long g_last[kMarks];
static_assert(kMarks == 8, "g_first's initializer names every mark");

// The calling thread passed mark m (callers pick one thread per block or per warp).
__device__ __forceinline__ void mark(int m) {
  const unsigned long long now = ptx::globaltimer_ns();
  atomicMin(&g_first[m], now);
  atomicMax(&g_last[m], now);
}

// host[0 .. kMarks): earliest, host[kMarks .. 2 kMarks): latest (0 where no caller
// passed a mark); then every mark cleared. Synchronous; the device must be idle.
inline cudaError_t read_and_clear(unsigned long long* host) {
  unsigned long long first[kMarks], last[kMarks];
  cudaError_t err = cudaMemcpyFromSymbol(first, g_first, sizeof(first));
  if (err == cudaSuccess) err = cudaMemcpyFromSymbol(last, g_last, sizeof(last));
  for (int m = 0; m < kMarks && err == cudaSuccess; ++m) {
    host[m] = last[m] == 0 ? 0 : first[m];
    host[kMarks + m] = last[m];
    first[m] = ~0ull;
    last[m] = 0;
  }
  if (err == cudaSuccess) err = cudaMemcpyToSymbol(g_first, first, sizeof(first));
  if (err == cudaSuccess) err = cudaMemcpyToSymbol(g_last, last, sizeof(last));
  return err;
}

}  // namespace
#else
__device__ __forceinline__ void mark(int) {}
#endif

}  // namespace hep::phase_clock
