// The network leg's device seam (docs/MULTINODE.md section 5): the only place kernels
// touch the engine. NVSHMEM implements it; NCCL GIN can implement the same calls.
//
//   put_signal_add_warp  the bytes, then the peer's signal updated (data before signal:
//   put_signal_set_warp  the engine's put-with-signal orders them, on every transport)
//   signal_set           a peer's signal set, no data
//   wait_signal          acquires a local signal >= expected, bounded (NVSHMEM's own wait
//                        is unbounded: it runs only after our poll saw the value, for the
//                        transport's consistency step)
//   release_sources      the puts this thread issued have completed: their sources may be
//                        rewritten
#pragma once

#include <cstdint>

#include <nvshmem.h>
#include <nvshmemx.h>

#include "common/wait.cuh"

namespace hep::net {

// The calling warp puts `bytes` from `src` (symmetric, this PE) to `dst` (symmetric, the
// same region on `pe`), then adds `add` to `signal` on `pe`. Every lane calls it.
__device__ __forceinline__ void put_signal_add_warp(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                                   uint64_t add, int pe) {
  nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, signal, add, NVSHMEM_SIGNAL_ADD, pe);
}

// As put_signal_add_warp, but `signal` on `pe` becomes `value`.
__device__ __forceinline__ void put_signal_set_warp(void* dst, const void* src, size_t bytes, uint64_t* signal,
                                                   uint64_t value, int pe) {
  nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, signal, value, NVSHMEM_SIGNAL_SET, pe);
}

// One thread: `signal` (symmetric) on `pe` becomes `value`.
__device__ __forceinline__ void signal_set(uint64_t* signal, uint64_t value, int pe) {
  nvshmemx_signal_op(signal, value, NVSHMEM_SIGNAL_SET, pe);
}

// One thread: waits until the local `signal` (written by peers' puts) is >= expected.
__device__ __forceinline__ bool wait_signal(uint64_t* signal, uint64_t expected, const WaitContext& w, uint32_t phase,
                                           uint32_t peer) {
  if (!wait_counter_at_least(signal, expected, w, phase, peer)) return false;
  nvshmem_signal_wait_until(signal, NVSHMEM_CMP_GE, expected);  // returns at once: the value is there
  return true;
}

__device__ __forceinline__ void release_sources() { nvshmem_quiet(); }

}  // namespace hep::net
