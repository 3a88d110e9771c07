// The send half of the low-latency dispatch (see ll_dispatch.cuh). Device code only;
// the kernels are in ll_dispatch.cu.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "common/warp_copy.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/peer_write.cuh"
#include "kernels/routing_rules.cuh"

namespace hep::ll {

constexpr int kSendUnroll = 4;  // as the planned transfer's NVLink writes

// This rank's staging slot for token t on the workspace `base` (a peer's, to write it;
// the local one, to read what `source` staged).
__device__ __forceinline__ char* staged_row(void* base, const Sizes& s, const WorkspaceOffsets& o, int parity,
                                            int source, int t) {
  const int64_t slot = ((int64_t)parity * s.world + source) * s.ll_tokens + t;
  return at<char>(base, o.ll_stage) + slot * s.stage_row_bytes();
}

__device__ __forceinline__ uint64_t* staged_flag(void* base, const Sizes& s, const WorkspaceOffsets& o, int source,
                                                 int t) {
  return at<uint64_t>(base, o.ll_flags) + (int64_t)source * s.ll_tokens + t;
}

// n of this call: the host's, or the device's (outside [0, m]: this rank sends nothing;
// counted once, by `count_bad`).
__device__ __forceinline__ int32_t tokens_to_send(const DispatchParams& p, bool count_bad) {
  if (p.num_tokens_device == nullptr) return p.num_tokens_host;
  const int32_t n = *p.num_tokens_device;
  if (n >= 0 && n <= p.num_rows) return n;
  if (count_bad) atomicAdd_system(&p.errors->counts[HEP_ERROR_BAD_NUM_TOKENS], 1u);
  return 0;
}

// Block 0: this rank's routing, sanitized (routing_rules.cuh), into every peer's slot,
// then one release of kPublishBlocks on each peer's meta counter for this rank (the
// planned dispatch's contract: its publish kernel's blocks add one each). Cells go out
// in order, consecutive threads on consecutive words, so the peer writes coalesce.
// A slot is a repeat when an earlier slot of its row holds the same valid id: the same
// verdict as sanitize_row. Peers on other nodes get the whole slot, as written into this
// rank's own, in one put that adds to their counter.
template <typename IndexT>
__device__ void publish_routing(const DispatchParams& p, int parity, int n) {
  const Sizes& s = p.sizes;
  const int K = s.top_k;
  const IndexT* ids = static_cast<const IndexT*>(p.topk_idx);
  uint32_t invalid = 0, repeated = 0;
  for (int64_t cell = threadIdx.x; cell < (int64_t)n * K; cell += blockDim.x) {
    const int64_t id = static_cast<int64_t>(ids[cell]);
    int32_t kept = -1;
    if (id < -1 || id >= s.num_experts) {
      ++invalid;
    } else if (id >= 0) {
      const int64_t row = cell - cell % K;
      bool seen = false;
      for (int64_t j = row; j < cell; ++j) seen |= static_cast<int64_t>(ids[j]) == id;
      if (seen) ++repeated; else kept = static_cast<int32_t>(id);
    }
    const float weight = p.topk_weights[cell];
    for (int r = 0; r < s.world; ++r) {
      if (s.across_nodes(r)) continue;
      RoutingSlotView slot = routing_slot(p.peers[r], s, p.off, parity, s.rank);
      slot.ids[cell] = kept;
      slot.weights[cell] = weight;
    }
  }
  if (threadIdx.x < s.world && !s.across_nodes(threadIdx.x)) {
    *routing_slot(p.peers[threadIdx.x], s, p.off, parity, s.rank).n = n;
  }
  add_block_counts(invalid, repeated, &p.errors->counts[HEP_ERROR_INVALID_EXPERT_ID],
                   &p.errors->counts[HEP_ERROR_REPEATED_EXPERT_ID]);
  __syncthreads();  // the block's routing writes, before the release that covers them
  if (threadIdx.x < s.world && !s.across_nodes(threadIdx.x)) {
    ptx::fence_acq_rel_sys();
    ptx::red_add_release_sys(at<uint64_t>(p.peers[threadIdx.x], p.off.meta_arrivals) + s.rank, kPublishBlocks);
  }
  if (s.spans_nodes()) {  // one warp per peer on another node
    const int warp = threadIdx.x / 32;
    int32_t* own = routing_slot(p.local, s, p.off, parity, s.rank).n;
    for (int r = warp; r < s.world; r += blockDim.x / 32) {
      if (!s.across_nodes(r)) continue;
      put_then_add_flag(routing_slot(p.peers[r], s, p.off, parity, s.rank).n, own, s.routing_slot_bytes(),
                        at<uint64_t>(p.peers[r], p.off.meta_arrivals) + s.rank, kPublishBlocks, r);
    }
  }
}

// The calling warp: token t's row (and scales) into this rank's staging slot on the
// workspace `base` (a node peer's, or this rank's own).
__device__ __forceinline__ void copy_row_to_slot(const DispatchParams& p, void* base, int parity, int t, int lane) {
  const Sizes& s = p.sizes;
  char* dst = staged_row(base, s, p.off, parity, s.rank, t);
  warp_copy<true, kSendUnroll>(dst, static_cast<const char*>(p.x) + t * s.row_bytes, s.row_bytes, lane);
  if (s.scale_cols) {
    warp_copy_words(reinterpret_cast<float*>(dst + s.row_bytes), p.scales + (int64_t)t * s.scale_cols, s.scale_cols,
                    lane);
  }
}

// Items (token t, destination r), token-major, destinations rotated from rank + 1 so the
// ranks' warps start on different links: if t has an expert on r, its row (and scales)
// into this rank's staging slot on r, then a release of the slot's flag there. The
// destination test reads the raw ids: a valid id's rank is the same whether or not the
// slot is a repeat.
template <typename IndexT>
__device__ void stage_rows(const DispatchParams& p, uint64_t call, int parity, int n, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  const int W = s.world, K = s.top_k, L = s.local_experts;
  const IndexT* ids = static_cast<const IndexT*>(p.topk_idx);
  for (int64_t item = warp; item < (int64_t)n * W; item += warps) {
    const int t = static_cast<int>(item / W), r = (s.rank + 1 + static_cast<int>(item % W)) % W;
    bool here = false;
    if (lane < K) {
      const int64_t id = static_cast<int64_t>(ids[(int64_t)t * K + lane]);
      here = id >= 0 && id < s.num_experts && id / L == r;
    }
    if (!__any_sync(0xffffffffu, here)) continue;
    copy_row_to_slot(p, p.peers[r], parity, t, lane);
    warp_release_flag(lane == 0, staged_flag(p.peers[r], s, p.off, s.rank, t), call);
  }
}

// Across nodes, items are tokens: a token with a destination on another node is copied
// once into this rank's own staging slot (the engine puts from symmetric memory), then
// put from there to each such destination with its flag as the signal; node peers get
// stores and a release as in stage_rows. One warp per token, so the own slot is written
// once, before any put reads it.
template <typename IndexT>
__device__ void stage_rows_across_nodes(const DispatchParams& p, uint64_t call, int parity, int n, int warp, int warps,
                                        int lane) {
  const Sizes& s = p.sizes;
  const int W = s.world, K = s.top_k, L = s.local_experts, G = s.ranks_per_node;
  const IndexT* ids = static_cast<const IndexT*>(p.topk_idx);
  const uint64_t own_node = (G >= 64 ? ~0ull : (1ull << G) - 1) << (s.rank / G * G);
  const int64_t staged_bytes = s.row_bytes + 4 * (int64_t)s.scale_cols;
  for (int t = warp; t < n; t += warps) {
    uint64_t bit = 0;  // lane k: the rank of slot k's expert
    if (lane < K) {
      const int64_t id = static_cast<int64_t>(ids[(int64_t)t * K + lane]);
      if (id >= 0 && id < s.num_experts) bit = 1ull << (id / L);
    }
    const uint64_t dests = (uint64_t)__reduce_or_sync(0xffffffffu, static_cast<uint32_t>(bit >> 32)) << 32 |
                           __reduce_or_sync(0xffffffffu, static_cast<uint32_t>(bit));
    const char* own = staged_row(p.local, s, p.off, parity, s.rank, t);
    if (dests & ~own_node) {
      copy_row_to_slot(p, p.local, parity, t, lane);
      __syncwarp();
    }
    for (int i = 1; i <= W; ++i) {
      const int r = (s.rank + i) % W;
      if (!(dests >> r & 1)) continue;
      if (s.across_nodes(r)) {
        put_then_set_flag(staged_row(p.peers[r], s, p.off, parity, s.rank, t), own, staged_bytes,
                          staged_flag(p.peers[r], s, p.off, s.rank, t), call, r);
      } else {
        copy_row_to_slot(p, p.peers[r], parity, t, lane);
        warp_release_flag(lane == 0, staged_flag(p.peers[r], s, p.off, s.rank, t), call);
      }
    }
  }
}

}  // namespace hep::ll
