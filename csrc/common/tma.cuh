// The bulk copy engine (TMA, sm_90): 1-D copies between global and shared memory that
// one thread issues and an mbarrier (loads) or a bulk group (stores) tracks, so a warp
// keeps whole row pieces in flight instead of 16 bytes per lane. Addresses and sizes
// are multiples of 16 bytes.
//
// Proxies: the copy engine is the "async proxy". Global data written by ordinary
// stores (here: rows a peer wrote over NVLink, acquired with a flag) must be fenced
// with fence_proxy_async_global() by the issuing thread before a bulk load reads it.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"
#include "common/wait.cuh"

namespace hep::tma {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One arrival expected per phase (the issuing thread's arrive.expect_tx).
__device__ __forceinline__ void mbarrier_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(bar)) : "memory");
}
// Makes initialized mbarriers visible to the async proxy.
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// Global -> shared, `bytes` accounted on `bar` (the caller arrives with expect_tx first).
__device__ __forceinline__ void load(void* smem, const void* global, uint32_t bytes, uint64_t* bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(smem_address(smem)), "l"(global), "r"(bytes), "r"(smem_address(bar))
               : "memory");
}

__device__ __forceinline__ bool mbarrier_try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(smem_address(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Bounded (docs/SPEC.md section 6): a load that never completes ends like a peer timeout.
__device__ __forceinline__ bool mbarrier_wait(uint64_t* bar, uint32_t parity, const WaitContext& w, uint32_t phase,
                                              uint32_t peer) {
  if (mbarrier_try_wait(bar, parity)) return true;
  const uint64_t start = ptx::globaltimer_ns();
  while (!mbarrier_try_wait(bar, parity)) {
    if (ptx::globaltimer_ns() - start > w.timeout_ns) {
      record_timeout(w, phase, peer);
      return false;
    }
  }
  return true;
}

// Shared -> global, in the current bulk group.
__device__ __forceinline__ void store(void* global, const void* smem, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(global), "r"(smem_address(smem)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void commit_group() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// At most N groups still reading shared memory (their sources may be overwritten).
template <int N>
__device__ __forceinline__ void wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
// Every group complete (its writes performed).
__device__ __forceinline__ void wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

}  // namespace hep::tma
