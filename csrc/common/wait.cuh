// Bounded waits on peer counters (docs/SPEC.md section 6). A wait never spins forever: after
// timeout_ns it records the phase and the peer in the error block, once per buffer,
// and returns false so the kernel can exit. Once any wait of the buffer has timed
// out, every later wait returns false at once: the ranks are out of step for good,
// and the host refuses further calls.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"
#include "hybrid_ep_infer/error_block.h"

namespace hep {

// Phase codes written to hep_error_block_t::timeout_phase (Python names them).
enum WaitPhase : uint32_t {
  kPhaseDispatchRouting = 1,  // waiting for a peer's routing (dispatch started on that peer?)
  kPhaseDispatchPayload = 2,  // waiting for a peer's token rows
  kPhaseCombinePartials = 3,  // waiting for a peer's combine partials
};

// Where a kernel's waits report to. `broken` is a device-memory copy of "a wait has
// timed out", so kernels can check it cheaply (the error block is host memory: every
// read of it crosses PCIe).
struct WaitContext {
  hep_error_block_t* errors;  // host-mapped: the host reads phase and peer here
  uint32_t* broken;           // device memory: sticky, never cleared for this buffer
  uint64_t timeout_ns;
};

// A kernel's wait context from its parameter block (errors, local, off, timeout_ns).
template <typename Params>
__device__ __forceinline__ WaitContext wait_context(const Params& p) {
  return {p.errors, reinterpret_cast<uint32_t*>(static_cast<char*>(p.local) + p.off.broken), p.timeout_ns};
}

__device__ __forceinline__ bool timed_out_before(const WaitContext& w) { return ptx::ld_relaxed_sys(w.broken) != 0; }

// Gives up a wait for good: the first waiter of the buffer to give up names the phase
// and peer (reserved is the claim); every later wait of the buffer fails at once.
__device__ __forceinline__ void record_timeout(const WaitContext& w, uint32_t phase, uint32_t peer) {
  if (atomicCAS_system(&w.errors->reserved, 0u, 1u) == 0u) {
    w.errors->timeout_phase = phase;
    w.errors->timeout_peer = peer;
    __threadfence_system();  // phase and peer before the count the host looks at
    atomicAdd_system(&w.errors->counts[HEP_ERROR_TIMEOUT], 1u);
  }
  atomicExch(w.broken, 1u);
}

static __device__ __noinline__ bool spin_until_at_least(const uint64_t* counter, uint64_t expected, const WaitContext& w,
                                                 uint32_t phase, uint32_t peer);

// Acquires `counter` >= `expected`: after true, everything the peer released with
// the counter update is visible to the calling thread (share it with the block by a
// __syncthreads that follows).
__device__ __forceinline__ bool wait_counter_at_least(const uint64_t* counter, uint64_t expected, const WaitContext& w,
                                                      uint32_t phase, uint32_t peer) {
  if (ptx::ld_acquire_sys(counter) >= expected) return true;
  return spin_until_at_least(counter, expected, w, phase, peer);
}

// The slow path, out of line so that waiting code in hot loops keeps its registers.
static __device__ __noinline__ bool spin_until_at_least(const uint64_t* counter, uint64_t expected, const WaitContext& w,
                                                 uint32_t phase, uint32_t peer) {
  const uint64_t start = ptx::globaltimer_ns();
  for (uint32_t spins = 1;; ++spins) {
    // Poll relaxed; acquire once the value is there.
    if (ptx::ld_relaxed_sys(counter) >= expected) return ptx::ld_acquire_sys(counter) >= expected;
    if (spins % 256 == 0) {  // the clock is slower to read than the counter
      if (timed_out_before(w)) return false;
      if (ptx::globaltimer_ns() - start > w.timeout_ns) {
        record_timeout(w, phase, peer);
        return false;
      }
    }
  }
}

// Every thread t < num_peers waits for counters[t]; returns the block-wide verdict.
// Every thread of the block must call it.
__device__ __forceinline__ bool block_wait_all_peers(const uint64_t* counters, int num_peers, uint64_t expected,
                                                     const WaitContext& w, uint32_t phase) {
  bool ok = true;
  for (int peer = threadIdx.x; peer < num_peers; peer += blockDim.x) {
    ok &= wait_counter_at_least(counters + peer, expected, w, phase, peer);
  }
  return __syncthreads_and(ok);
}

// Per-token flags hold the number of the call that last wrote the token (they only grow,
// so replays need no resets). Producer side: after the calling warp's data stores,
// each lane with `signal` publishes them to the reader of `flag` (__syncwarp makes the
// other lanes' stores part of what the release covers). Every lane must call it.
__device__ __forceinline__ void warp_release_flag(bool signal, uint64_t* flag, uint64_t call) {
  __syncwarp();
  if (signal) ptx::st_release_sys(flag, call);
}

// Consumer side: each lane with `want` acquires its `flag` >= call; returns the
// warp-wide verdict. After true, what was released with every waited flag is visible to
// every lane of the warp. Every lane must call it.
__device__ __forceinline__ bool warp_acquire_flags(bool want, const uint64_t* flag, uint64_t call,
                                                   const WaitContext& w, uint32_t phase, uint32_t peer) {
  const bool ok = !want || wait_counter_at_least(flag, call, w, phase, peer);
  const bool all = __all_sync(0xffffffffu, ok);
  __syncwarp();
  return all;
}

}  // namespace hep
