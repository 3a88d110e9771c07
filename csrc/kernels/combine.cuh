// Combine with fused unpermute (docs/SPEC.md section 4): one kernel, two warp roles (or,
// split into a send and a receive half, one launch per role).
//
//   reduce   (combine_reduce.cuh) on each destination, per received token: the fp32 sum
//            over ascending k of fp32(w * y) (or fp32(y)), separate multiply and add,
//            rounded once to bf16, written over NVLink into the source's partials; then,
//            per chunk of tokens, the release of that chunk's flag on the source.
//   gather   (combine_gather.cuh) on each source, per token: once the chunk flag of every
//            destination with rows of it is acquired, the fp32 sum of its bf16 partials in
//            ascending destination rank, rounded once; +0.0 for rows >= n and tokens with
//            no rows.
//
// Both sum with combine_sum.cuh. Where a role's items are fewer than its warps, an item's
// columns are split across up to 8 warps (column slices); each column still gets the same
// terms in the same order.
//
// Rows come from the plan of the matching dispatch (row_of, first_row, send_row). A
// rank with no rows of a token writes no partial for it; the source skips it, which
// equals adding +0.0 (a sum started at +0.0 is never -0.0). Partials alternate
// between two halves by combine parity, and a destination writes a half only after
// the source said it finished the combine that last read it (combine_done), so any
// number of combines may follow one dispatch.
//
// Stale-combine check (topk_idx given): each gather warp also compares its token's
// routing, sanitized, with what the latest dispatch published for it; a difference
// sets combine_stale, and the last block then overwrites the whole output with +0.0
// and counts HEP_ERROR_STALE_COMBINE once. Partials are sent as usual. Split into
// halves, the send half's warps compare (its inputs may be overwritten once it is
// enqueued) and the receive half's last block takes the verdict.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "hybrid_ep_infer/error_block.h"
#include "workspace.h"

namespace hep {

// Which roles a launch runs: both (hep_combine), or one per half (hep_combine_send runs
// the reducers, hep_combine_recv the gatherers and the end of the call).
enum CombineRoles : int32_t {
  kCombineReduce = 1,
  kCombineGather = 2,
  kCombineBoth = kCombineReduce | kCombineGather,
};

struct CombineParams {
  Sizes sizes;
  WorkspaceOffsets off;
  void* local;
  void* peers[kMaxRanks];
  hep_error_block_t* errors;
  uint64_t timeout_ns;
  int32_t blocks;       // blocks of the combine kernel (at most one per SM)
  int32_t reduce_warps; // warps per block that reduce (the rest gather), from the tuning
  int32_t chunk_tokens; // consecutive tokens per reducer flag release, from the tuning
  int32_t roles;        // CombineRoles

  const void* y;        // expert outputs in the dispatch layout, bf16 [slots, H]
  void* out;            // [num_rows, H] bf16
  int32_t num_rows;     // m of the matching dispatch
  bool weighted;
  const void* topk_idx;  // [num_rows, K] routing to check against the latest dispatch's, or nullptr
  bool idx_is_int64;
  bool stale_verdict;    // the receive half of a split combine whose send checked topk_idx
};

cudaError_t launch_combine(const CombineParams& params, cudaStream_t stream);

// Profiling builds (HEP_PHASE_CLOCK, common/phase_clock.cuh): the marks of the combine
// kernel since the last read, indexed by CombineMark; then cleared.
enum CombineMark : int {
  kMarkCombineEntered,       // a block started
  kMarkCombinePartialsFree,  // a block may write every source's partials half
  kMarkCombineReduced,       // a reduce warp wrote its last partial
  kMarkCombineGathered,      // a gather warp stored its last output row
  kMarkCombineExited,        // a block ended the call
};
cudaError_t read_combine_phase_clock(unsigned long long* host);

}  // namespace hep
