// How a kernel writes into a peer's workspace. A peer on this rank's node (NVLink
// domain) is written with stores through its mapped workspace, p.peers[r]. A peer on
// another node exists only in the multi-node library (built with HEP_NETWORK_LEG = 1,
// docs/MULTINODE.md): there p.peers[r] is this rank's own symmetric workspace, the
// address the engine translates for PE r, and every write goes through net.cuh as a put
// with the waiter's flag as its signal (data before flag, as a release orders them).
// In the single-domain library Sizes::across_nodes() is constant false, so those
// branches compile away.
#pragma once

#include <cstdint>

#include "workspace.h"

#if HEP_NETWORK_LEG
#include "multinode/net.cuh"
#endif

namespace hep {

// The calling warp puts `bytes` from `src` (this rank's symmetric workspace) to `dst` on
// rank r, then sets `flag` on r to `value`. Every lane calls it.
__device__ __forceinline__ void put_then_set_flag(void* dst, const void* src, size_t bytes, uint64_t* flag,
                                                  uint64_t value, int r) {
#if HEP_NETWORK_LEG
  net::put_signal_set_warp(dst, src, bytes, flag, value, r);
#else
  __trap();  // unreachable: Sizes::across_nodes() is false
#endif
}

// As put_then_set_flag, adding `add` to the flag (a counter) instead.
__device__ __forceinline__ void put_then_add_flag(void* dst, const void* src, size_t bytes, uint64_t* flag,
                                                  uint64_t add, int r) {
#if HEP_NETWORK_LEG
  net::put_signal_add_warp(dst, src, bytes, flag, add, r);
#else
  __trap();
#endif
}

// One thread: `flag` on rank r (another node) becomes `value` (the caller fences first,
// as before a release store).
__device__ __forceinline__ void set_remote_flag(uint64_t* flag, uint64_t value, int r) {
#if HEP_NETWORK_LEG
  net::signal_set(flag, value, r);
#else
  __trap();
#endif
}

}  // namespace hep
