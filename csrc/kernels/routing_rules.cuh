// docs/SPEC.md section 6 for one token row, shared by the validation kernel and dispatch:
// ids outside [-1, E) and repeats of an earlier id in the row become -1 and are
// counted; the first occurrence of an id is kept.
#pragma once

#include <cstdint>

namespace hep {

template <typename IndexT>
__device__ __forceinline__ void sanitize_row(const IndexT* ids, int top_k, int num_experts, int32_t* kept,
                                             uint32_t& invalid, uint32_t& repeated) {
  for (int k = 0; k < top_k; ++k) {
    const int64_t id = static_cast<int64_t>(ids[k]);
    int32_t keep = -1;
    if (id < -1 || id >= num_experts) {
      ++invalid;
    } else if (id >= 0) {
      bool seen = false;
      for (int j = 0; j < k; ++j) seen |= (kept[j] == id);
      if (seen) ++repeated; else keep = static_cast<int32_t>(id);
    }
    kept[k] = keep;
  }
}

// Adds block-wide sums of two per-thread counters to host-mapped counters, one
// system-scope atomic per block and counter. Every thread of the block must call it.
__device__ __forceinline__ void add_block_counts(uint32_t a, uint32_t b, uint32_t* counter_a, uint32_t* counter_b) {
  __shared__ uint32_t sums[2];
  if (threadIdx.x == 0) sums[0] = sums[1] = 0;
  __syncthreads();
  a = __reduce_add_sync(0xffffffffu, a);
  b = __reduce_add_sync(0xffffffffu, b);
  if (threadIdx.x % 32 == 0) {
    if (a) atomicAdd(&sums[0], a);
    if (b) atomicAdd(&sums[1], b);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (sums[0] && counter_a) atomicAdd_system(counter_a, sums[0]);
    if (sums[1] && counter_b) atomicAdd_system(counter_b, sums[1]);
  }
}

}  // namespace hep
