// Dispatch with fused permute (docs/SPEC.md sections 2-3): four kernels on one stream.
//
//   1. publish   every rank sanitizes its routing and writes it, with n and the
//                weights, into every peer's routing slot; then bumps that peer's
//                meta counter (release).
//   2. scan      waits for every peer's routing (acquire); per (source, expert):
//                rows per source (hist) and each row's rank among its source's rows
//                of that expert (prefix), every slot in one pass per source.
//   3. place     every rank computes every destination's offsets from hist, so each
//                sender knows the final row of each token on each destination, and
//                each destination its rows, weights, row_expert, padding.
//   4. transfer  sender warps write each token row over NVLink once per destination,
//                straight into its first row there (plus FP8 scales), and release a
//                flag per chunk of tokens there; expander warps on the destination
//                acquire each token's chunk flag and copy it into its other experts'
//                rows (the fused permute), overlapping the transfer (dispatch_copy.cu).
//
// Counters and flags only grow: the meta counter expects call * kPublishBlocks and a
// chunk's flag the call number, with the call count kept on the device, so CUDA-graph
// replays need no resets. Routing slots alternate by call parity, and no rank can be
// two calls ahead of another because each call waits for every peer's routing.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "hybrid_ep_infer/error_block.h"
#include "workspace.h"

namespace hep {

constexpr int kPublishBlocks = 16;  // blocks of the publish kernel (fixed: part of the counter contract)

struct DispatchParams {
  Sizes sizes;
  WorkspaceOffsets off;
  void* local;                 // this rank's workspace
  void* peers[kMaxRanks];      // every rank's workspace as mapped here (peers[rank] == local)
  hep_error_block_t* errors;   // device view of the host-mapped error block
  uint64_t timeout_ns;
  int32_t blocks;              // blocks of the transfer kernel (at most one per SM)
  int32_t send_warps;          // warps per block that send (the rest expand), from the tuning
  int32_t chunk_tokens;        // consecutive tokens per sender flag release, from the tuning
  int32_t expand_tma;          // expand through the copy engine (1) or with warp copies (0), from the tuning
  int32_t send_tma;            // NVLink writes through the copy engine (1) or with warp copies (0), from the tuning

  // Inputs of this call.
  const void* x;
  const float* scales;
  const void* topk_idx;
  bool idx_is_int64;
  const float* topk_weights;
  int32_t num_rows;
  const int32_t* num_tokens_device;
  int32_t num_tokens_host;
};

cudaError_t launch_dispatch(const DispatchParams& params, cudaStream_t stream);
cudaError_t launch_transfer_kernel(const DispatchParams& params, cudaStream_t stream);  // dispatch_copy.cu
// Once per device before the first launch (shared-memory limits: the copy-engine paths,
// place's per-expert tables).
cudaError_t prepare_transfer_kernel();
cudaError_t prepare_plan_kernels();  // dispatch_plan.cu

// Routing slot of (parity, source) inside a workspace.
struct RoutingSlotView {
  int32_t* n;
  int32_t* ids;      // [T, K]
  float* weights;    // [T, K]
};

__host__ __device__ inline RoutingSlotView routing_slot(void* workspace, const Sizes& s, const WorkspaceOffsets& o,
                                                        int parity, int source) {
  char* base = static_cast<char*>(workspace) + o.routing + ((int64_t)parity * s.world + source) * s.routing_slot_bytes();
  RoutingSlotView v;
  v.n = reinterpret_cast<int32_t*>(base);
  v.ids = reinterpret_cast<int32_t*>(base + 16);
  v.weights = reinterpret_cast<float*>(base + 16 + 4 * (int64_t)s.max_tokens * s.top_k);
  return v;
}

}  // namespace hep
