// Combine with fused unpermute (SPEC section 4): two kernels on one stream.
//
//   1. reduce   on each destination, per received token: the fp32 sum over ascending k
//               of fp32(w * y) (or fp32(y)), separate multiply and add, rounded once
//               to bf16, written over NVLink into the source's partials; then the
//               source's combine counter is bumped (release).
//   2. gather   on each source, once every destination's partials are in (acquire):
//               per token, the fp32 sum of its bf16 partials in ascending destination
//               rank, rounded once; +0.0 for rows >= n and tokens with no rows.
//
// Rows come from the plan of the matching dispatch (row_of, first_row, send_row). A
// rank with no rows of a token writes no partial for it; the source skips it, which
// equals adding +0.0 (a sum started at +0.0 is never -0.0). Partials alternate
// between two halves by combine parity: a destination can be at most one combine
// ahead of a source, since finishing a combine needs that source's partials.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "hybrid_ep_infer/error_block.h"
#include "workspace.h"

namespace hep {

struct CombineParams {
  Sizes sizes;
  WorkspaceOffsets off;
  void* local;
  void* peers[kMaxRanks];
  hep_error_block_t* errors;
  uint64_t timeout_ns;
  int32_t send_blocks;  // blocks of the reduce kernel (fixed: part of the counter contract)

  const void* y;        // expert outputs in the dispatch layout, bf16 [slots, H]
  void* out;            // [num_rows, H] bf16
  int32_t num_rows;     // m of the matching dispatch
  bool weighted;
};

cudaError_t launch_combine(const CombineParams& params, cudaStream_t stream);

}  // namespace hep
