// One rank's workspace: every byte a buffer uses on the device, in one allocation that
// is mapped by every peer. The same layout on every rank (it never depends on the
// rank), so a peer's region is "peer base + the same offset". Used by the host to
// size and bind the allocation and by kernels (through DispatchParams) to find things.
#pragma once

#include <cstddef>
#include <cstdint>

#include "hybrid_ep_infer/hybrid_ep_infer.h"

#ifndef HEP_NETWORK_LEG
#define HEP_NETWORK_LEG 0
#endif

namespace hep {

constexpr int kMaxRanks = 64;   // peers a kernel's parameter block can address
constexpr int kMaxTopK = 32;    // slots per token the kernels keep in registers
constexpr int kMaxExperts = 8192;  // place's and scan's per-expert tables live in shared memory
constexpr int kScaleBlock = 128;  // payload elements per FP8 scale
constexpr int kCopyThreads = 512;  // threads per block of the two copy kernels
constexpr int kCopyWarps = kCopyThreads / 32;

// The split measured best at the prefill shape on 4 GPUs with per-token flags and warp
// copies (docs/DESIGN.md, "A construction-time tuner"); the Python package's tuner
// replaces them per shape.
inline hep_tuning_t default_tuning() {
  hep_tuning_t t{};
  t.size = sizeof(hep_tuning_t);
  t.version = HEP_API_VERSION;
  t.dispatch_send_warps = 4;
  t.dispatch_chunk_tokens = 1;
  t.combine_reduce_warps = 13;
  t.combine_chunk_tokens = 1;
  t.dispatch_expand_tma = 0;
  t.dispatch_send_tma = 0;
  t.dispatch_path = HEP_DISPATCH_PLANNED;  // attach picks LOW_LATENCY where the buffer has it
  return t;
}

// The sizes kernels index with, derived once from hep_buffer_desc_t.
struct Sizes {
  int32_t rank, world, hidden, max_tokens, num_experts, top_k, local_experts;
  int32_t payload_bytes, scale_cols;  // scale_cols: H / 128 with FP8 scales, else 0
  int32_t batched, pad_multiple, capacity;
  int32_t slots;  // row slots: capacity (contiguous) or L * capacity (batched)
  int64_t row_bytes;  // H * payload_bytes, a multiple of 16
  int32_t ll_tokens;  // rows per source the low-latency dispatch stages: max_tokens, or 0 (no such path)
  int32_t ranks_per_node;  // G: rank r is on node r / G (world: one node)

  // Several nodes exist only in the multi-node library (HEP_NETWORK_LEG = 1, whose kernels
  // reach other nodes through NVSHMEM: kernels/peer_write.cuh); in this one both are
  // constant false and their branches compile away.
  __host__ __device__ bool spans_nodes() const { return HEP_NETWORK_LEG && ranks_per_node < world; }
  __host__ __device__ bool across_nodes(int r) const {
    return spans_nodes() && r / ranks_per_node != rank / ranks_per_node;
  }

  // A staged row: the payload, then its FP8 scales (16-byte aligned).
  __host__ __device__ int64_t stage_row_bytes() const { return row_bytes + (scale_cols * 4 + 15) / 16 * 16; }

  __host__ __device__ int64_t routing_slot_bytes() const {
    // n (padded to 16 bytes), then ids [T, K] int32, then weights [T, K] fp32.
    return align(16 + 8 * (int64_t)max_tokens * top_k);
  }
  __host__ __device__ static int64_t align(int64_t bytes) { return (bytes + 127) / 128 * 128; }
};

// Byte offsets of every region. "peer" regions are written by other GPUs.
struct WorkspaceOffsets {
  // peer: monotonic arrival counter of each source's routing, [W] uint64.
  int64_t meta_arrivals;
  // peer: per-chunk flags, uint64, each the number of the call that last wrote the chunk
  // (chunk c = tokens [c*C, (c+1)*C), C from the tuning; at most T chunks):
  // data_flags [W (source)][T]: dispatch call that wrote source's chunk c here;
  // combine_flags [W (destination)][T]: combine that wrote destination's partials of chunk c here.
  int64_t data_flags, combine_flags;
  // peer: [W] uint64, the last combine each peer has finished (its reads of its partials done).
  int64_t combine_done;
  // peer: [2 (call parity)][W (source)] routing slots.
  int64_t routing;
  // peer: low-latency dispatch. ll_flags [W (source)][ll_tokens] uint64, the call that
  // last staged source's token t here; ll_stage [2 (call parity)][W (source)][ll_tokens]
  // staged rows (stage_row_bytes each).
  int64_t ll_flags, ll_stage;
  // peer: dispatch payload [slots, H] and FP8 scales [slots, H/128].
  int64_t hidden, scales;
  // peer: combine partials [2 (combine parity)][W (destination)][T, H] bf16.
  int64_t combine_partials;
  // Across nodes only (else empty): the partials this rank sends to sources on other
  // nodes, summed here first (NVSHMEM puts from symmetric memory), [2 (combine
  // parity)][W (source)][T, H] bf16.
  int64_t net_partials;
  // local outputs.
  int64_t weights, row_expert, tokens_per_expert, offsets, combine_out;
  // local plan: where every row goes, recomputed by each dispatch.
  int64_t hist;       // [W, E] int32: rows per (source, global expert)
  int64_t prefix;     // [W, T, K] int32: rank of (s, t, k) among source s's rows of its expert
  int64_t send_row;   // [T, W] int32: row on destination r that token t is written to, or -1
  int64_t row_of;     // [W, T, K] int32: this rank's row of (s, t, k), or -1
  int64_t first_row;  // [W, T] int32: the row source s writes token t to on this rank, or -1
  int64_t src_tokens; // [W] int32: n of every source in the current call
  int64_t reduce_slices_done;  // [W (source), T] uint32: combine's reduce slices done with chunk c (0 between
                               // calls; a buffer whose wait timed out is never run again)
  int64_t epoch;          // uint64: dispatches completed; uint32 "blocks done" right after it
  int64_t combine_epoch;  // uint64: combines completed; uint32 "blocks done" right after it
  int64_t broken;         // uint32: set once any wait of this buffer timed out (sticky)
  int64_t combine_stale;  // uint32: a row of the current combine's routing differed (reset by its last block)
  int64_t total;
};

inline Sizes make_sizes(const hep_buffer_desc_t& d) {
  Sizes s{};
  s.rank = d.rank;
  s.world = d.world_size;
  s.hidden = d.hidden;
  s.max_tokens = d.max_tokens;
  s.num_experts = d.num_experts;
  s.top_k = d.top_k;
  s.local_experts = d.num_experts / d.world_size;
  s.payload_bytes = d.payload_bytes;
  s.scale_cols = d.has_scales ? d.hidden / kScaleBlock : 0;
  s.batched = d.layout == HEP_LAYOUT_BATCHED;
  s.pad_multiple = d.pad_multiple;
  s.capacity = d.capacity;
  s.slots = s.batched ? s.local_experts * d.capacity : d.capacity;
  s.row_bytes = (int64_t)d.hidden * d.payload_bytes;
  s.ll_tokens = d.low_latency ? d.max_tokens : 0;
  s.ranks_per_node = d.ranks_per_node > 0 ? d.ranks_per_node : d.world_size;
  return s;
}

inline WorkspaceOffsets make_offsets(const Sizes& s) {
  WorkspaceOffsets o{};
  int64_t at = 0;
  auto take = [&at](int64_t bytes) {
    int64_t here = at;
    at += Sizes::align(bytes);
    return here;
  };
  const int64_t W = s.world, T = s.max_tokens, K = s.top_k, slots = s.slots;
  o.meta_arrivals = take(8 * W);
  o.data_flags = take(8 * W * T);
  o.combine_flags = take(8 * W * T);
  o.combine_done = take(8 * W);
  o.routing = take(2 * W * s.routing_slot_bytes());
  o.ll_flags = take(8 * W * s.ll_tokens);
  o.ll_stage = take(2 * W * s.ll_tokens * s.stage_row_bytes());
  o.hidden = take(slots * s.row_bytes);
  o.scales = take(slots * s.scale_cols * 4);
  o.combine_partials = take(2 * W * T * s.hidden * 2);
  o.net_partials = take(s.spans_nodes() ? 2 * W * T * s.hidden * 2 : 0);
  o.weights = take(slots * 4);
  o.row_expert = take(slots * 4);
  o.tokens_per_expert = take(4 * (int64_t)s.local_experts);
  o.offsets = take(4 * ((int64_t)s.local_experts + 1));
  o.combine_out = take(T * s.hidden * 2);
  o.hist = take(4 * W * s.num_experts);
  o.prefix = take(4 * W * T * K);
  o.send_row = take(4 * T * W);
  o.row_of = take(4 * W * T * K);
  o.first_row = take(4 * W * T);
  o.src_tokens = take(4 * W);
  o.reduce_slices_done = take(4 * W * T);
  o.epoch = take(16);
  o.combine_epoch = take(16);
  o.broken = take(16);
  o.combine_stale = take(16);
  o.total = at;
  return o;
}

template <typename T>
__host__ __device__ inline T* at(void* base, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

}  // namespace hep
