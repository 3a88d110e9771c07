// Low-latency dispatch (docs/SPEC.md sections 2-3, docs/DESIGN.md "Low-latency dispatch"):
// rows move before any plan exists, and one kernel does the whole call.
//
//   send      (ll_dispatch_send.cuh) block 0 sanitizes this rank's routing and writes
//             it, with n and the weights, into every peer's routing slot, then bumps
//             that peer's meta counter (release), as the planned dispatch's publish does.
//             The other blocks' warps write each token row (and FP8 scales) once per
//             destination that has an expert of it, into this rank's staging slot
//             there, then release that token's staging flag there. Waits for nobody.
//   receive   (ll_dispatch_recv.cuh) every block waits for every source's routing, then
//             builds this rank's part of the plan in shared memory from it (rows per
//             source and expert, capacity, offsets, each slot's rank in token order),
//             and its warps, one (token, source) at a time in token order, write the
//             plan entries combine reads (row_of, first_row, send_row), the weights
//             and row_expert, acquire the token's staging flag and copy the staged
//             row into each of its rows here. Rows no token fills are cleared.
//
// The one-call op runs both halves in one kernel (every block sends, then receives:
// all blocks are resident, so waiting blocks never starve senders); the split halves
// (hep_dispatch_send / hep_dispatch_recv) run them as two kernels. The outputs and the
// plan are exactly the planned dispatch's, so combine and the next dispatch (of either
// path) do not care which path ran.
//
// Staging slots alternate by call parity. A source stages call c + 2 only after its own
// receive of c + 1 saw every peer's routing of c + 1, which each peer publishes after
// its receive of c ended: so nobody still reads the slot being overwritten.
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "kernels/dispatch.cuh"

namespace hep {

enum LowLatencyPhases : int {
  kLowLatencySend = 1,
  kLowLatencyReceive = 2,
  kLowLatencyBoth = kLowLatencySend | kLowLatencyReceive,
};

// Shared memory of the receive half (its per-block plan tables); the buffer must fit it
// (hep_context_attach checks).
size_t ll_receive_shared_bytes(const Sizes& s);
cudaError_t prepare_ll_dispatch();  // once per device: the receive's shared-memory limit
cudaError_t launch_ll_dispatch(const DispatchParams& params, int phases, cudaStream_t stream);

// Profiling builds (HEP_PHASE_CLOCK, common/phase_clock.cuh): the marks of these kernels
// since the last read, indexed by LowLatencyDispatchMark; then cleared.
enum LowLatencyDispatchMark : int {
  kMarkDispatchEntered,          // a block started
  kMarkDispatchRoutingPublished, // block 0 released its routing to every peer
  kMarkDispatchRowsStaged,       // a staging warp wrote its last row
  kMarkDispatchRoutingArrived,   // a block saw every source's routing
  kMarkDispatchPlanBuilt,        // a block built its plan tables
  kMarkDispatchRowsCleared,      // a warp cleared its last unfilled row
  kMarkDispatchRowsPlaced,       // a warp copied its last staged row
  kMarkDispatchExited,           // a block ended the call
};
cudaError_t read_ll_dispatch_phase_clock(unsigned long long* host);

}  // namespace hep
