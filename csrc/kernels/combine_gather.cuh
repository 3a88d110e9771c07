// Combine's gather role, the receive half, with the stale-combine check (see
// combine.cuh). Device code only; the kernel is in combine.cu.
#pragma once

#include <cstdint>

#include "common/column_slices.cuh"
#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "kernels/combine_sum.cuh"

namespace hep::combining {

// The stale-combine check for token t of this rank (every lane calls it): its row of
// p.topk_idx, sanitized by the rule of routing_rules.cuh (lane k holds slot k: ids
// outside [0, E) and repeats of a lower slot's id become -1), against `published`, the
// ids the latest dispatch published for this rank. True if any slot differs.
__device__ __forceinline__ bool routing_differs(const CombineParams& p, const int32_t* published, int t, int lane) {
  const int K = p.sizes.top_k;
  int64_t id = -1;
  if (lane < K) {
    const int64_t at_k = (int64_t)t * K + lane;
    id = p.idx_is_int64 ? static_cast<const int64_t*>(p.topk_idx)[at_k]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.topk_idx)[at_k]);
  }
  const bool valid = lane < K && id >= 0 && id < p.sizes.num_experts;
  // Lanes without a valid id get keys no other lane has; a valid id is kept in the
  // lowest lane holding it.
  const unsigned long long key = valid ? static_cast<unsigned long long>(id) : (1ull << 63) | lane;
  const uint32_t same = __match_any_sync(0xffffffffu, key);
  const int32_t kept = valid && (same & ((1u << lane) - 1)) == 0 ? static_cast<int32_t>(id) : -1;
  return __any_sync(0xffffffffu, lane < K && kept != published[(int64_t)t * K + lane]);
}

// The stale-combine check over the gather warp's tokens t < n (t = warp, warp + warps, ...),
// before its sums; out of line, so that the sums keep their registers. Sets combine_stale
// on the first difference.
__device__ __noinline__ void check_routing(const CombineParams& p, int n, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  // This rank's routing as the latest dispatch (the epoch it ended with) published it.
  const int dispatch_parity = static_cast<int>(*at<const uint64_t>(p.local, p.off.epoch) & 1);
  const int32_t* published = routing_slot(p.local, s, p.off, dispatch_parity, s.rank).ids;
  for (int t = warp; t < min(n, p.num_rows); t += warps) {
    if (routing_differs(p, published, t, lane)) {
      if (lane == 0) atomicExch(at<uint32_t>(p.local, p.off.combine_stale), 1u);  // read by the last block
      return;
    }
  }
}

// Gather role. Items (token t of this rank, column slice), t-major: once the chunk of t
// from every destination with rows of t is here, the slice's columns of their sum in
// ascending destination rank (ranks without rows of t wrote none: skipping them equals
// adding +0.0). A token is split into up to kMaxColumnSlices slices, one warp each, where
// the tokens are fewer than the warps (small n: one warp per token was most of the
// gather's time). Returns false if a wait timed out.
__device__ bool gather_tokens(const CombineParams& p, uint64_t combine, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  const int W = s.world, T = s.max_tokens;
  const int parity = static_cast<int>(combine & 1);
  const int n = at<const int32_t>(p.local, p.off.src_tokens)[s.rank];
  const int32_t* send_row = at<const int32_t>(p.local, p.off.send_row);
  const uint64_t* flags = at<const uint64_t>(p.local, p.off.combine_flags);
  const int vectors = s.hidden / 8;
  __shared__ const int4* warp_terms[kWarps][kMaxRanks];
  const int4** terms = warp_terms[threadIdx.x / 32];
  if (p.topk_idx != nullptr) check_routing(p, n, warp, warps, lane);
  const ColumnSlices<int> slices = column_slices(p.num_rows, warps, vectors);

  for (int64_t item = warp; item < (int64_t)p.num_rows * slices.count; item += warps) {
    const int t = static_cast<int>(item / slices.count);
    const auto [begin, end] = slices[static_cast<int>(item % slices.count)];
    int count = 0;
    __syncwarp();
    for (int base = 0; base < W; base += 32) {
      const int r = base + lane;
      const bool has_rows = t < n && r < W && send_row[(int64_t)t * W + r] >= 0;
      const uint64_t* flag = flags + (int64_t)r * T + t / p.chunk_tokens;
      if (!warp_acquire_flags(has_rows, flag, combine, wait_context(p), kPhaseCombinePartials, r)) {
        return false;
      }
      const uint32_t holders = __ballot_sync(0xffffffffu, has_rows);
      if (has_rows) terms[count + __popc(holders & ((1u << lane) - 1))] =
          reinterpret_cast<const int4*>(partials(p.local, s, p.off, parity, r, t)) + begin;
      count += __popc(holders);
    }
    __syncwarp();
    int4* dst = reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(p.out) + (int64_t)t * s.hidden) + begin;
    sum_rows<false>(dst, terms, nullptr, count, false, end - begin, lane);
  }
  return true;
}

}  // namespace hep::combining
