// Where rows land (docs/SPEC.md section 3), from the rows per (source, expert):
// capacity applied in expert order, offsets, and each source's first rank. Shared by
// the planned dispatch (place_kernel) and the low-latency receive.
#pragma once

#include <cstdint>

#include "workspace.h"

namespace hep {

// What a block needs from the histogram, in shared memory:
//   written [W*L]      rows written per (destination, local expert) (capacity applied in
//                      expert order, docs/SPEC.md section 3)
//   offsets [W*(L+1)]  first row of each of them (contiguous layout)
//   before_here [W*L]  rows of this rank's local expert e from sources before src
//   before_mine [E]    rows of expert g from sources before this rank
// hist is [W (source)][E] rows per (source, global expert), in global or shared memory.
// One thread per expert sums its column of hist (the sums are independent, so the
// loads overlap), then one thread per destination lays its experts out from those
// totals in shared memory.
__device__ inline void compute_placement(const Sizes& s, const int32_t* hist, int32_t* written, int32_t* offsets,
                                         int32_t* before_here, int32_t* before_mine) {
  const int L = s.local_experts;
  for (int g = threadIdx.x; g < s.num_experts; g += blockDim.x) {
    const bool local = g / L == s.rank;
    int32_t rows = 0;
    for (int src = 0; src < s.world; ++src) {
      if (src == s.rank) before_mine[g] = rows;
      if (local) before_here[src * L + g % L] = rows;
      rows += hist[(int64_t)src * s.num_experts + g];
    }
    written[g] = rows;  // all rows of expert g = (g / L, g % L); capacity applied below
  }
  __syncthreads();
  for (int r = threadIdx.x; r < s.world; r += blockDim.x) {
    int32_t offset = 0;
    for (int e = 0; e < L; ++e) {
      const int32_t rows = written[r * L + e];
      int32_t fit;
      if (s.batched) {
        fit = min(rows, s.capacity);
      } else {
        fit = min(rows, max(s.capacity - offset, 0));
        offsets[r * (L + 1) + e] = offset;
        offset += (fit + s.pad_multiple - 1) / s.pad_multiple * s.pad_multiple;
      }
      written[r * L + e] = fit;
    }
    if (!s.batched) offsets[r * (L + 1) + L] = offset;
  }
  __syncthreads();
}

// Row slot of rank-in-expert j of local expert e on destination r, or -1 if dropped.
__device__ __forceinline__ int32_t row_slot(const Sizes& s, const int32_t* written, const int32_t* offsets, int r,
                                            int e, int32_t j) {
  const int L = s.local_experts;
  if (j >= written[r * L + e]) return -1;
  return s.batched ? e * s.capacity + j : offsets[r * (L + 1) + e] + j;
}

}  // namespace hep
