// The combine kernel (see combine.cuh): the reduce role (combine_reduce.cuh) and the
// gather role (combine_gather.cuh) in one launch, or one role per launch (the split halves).
#include "common/phase_clock.cuh"
#include "common/ptx.cuh"
#include "common/spread_warps.cuh"
#include "common/wait.cuh"
#include "kernels/combine.cuh"
#include "kernels/combine_gather.cuh"
#include "kernels/combine_reduce.cuh"
#include "kernels/combine_sum.cuh"
#include "kernels/peer_write.cuh"

namespace hep {
namespace {

using combining::kThreads;
using combining::kWarps;
static_assert(kMarkCombineExited < phase_clock::kMarks, "every phase mark has a slot");

// Both roles in one kernel, so the sums on the source overlap the transfer of partials;
// or one role per launch (the split halves).
__global__ void __launch_bounds__(kThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  const Sizes& s = p.sizes;
  const int W = s.world;
  const uint64_t combine = combining::current_combine(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) phase_clock::mark(kMarkCombineEntered);
  // A timed-out buffer writes no peer (a graph may replay after the host saw the timeout);
  // one read per block, so its threads take the same barriers.
  bool ok = !__syncthreads_or(threadIdx.x == 0 && timed_out_before(wait_context(p)));
  if (ok && p.roles == kCombineReduce && p.topk_idx != nullptr) {  // the send half checks the routing
    const int n = at<const int32_t>(p.local, p.off.src_tokens)[s.rank];
    combining::check_routing(p, n, spread_warp(warp), gridDim.x * kWarps, lane);
  }
  if (ok && (p.roles & kCombineReduce)) {
    // Partials alternate between two halves by combine parity: before writing this half
    // on a source, that source must have finished reading it (its combine - 2). Nearly
    // always true on arrival; it matters when a rank has nothing to wait for (n = 0).
    ok = block_wait_all_peers(at<uint64_t>(p.local, p.off.combine_done), W, combine >= 2 ? combine - 2 : 0,
                              wait_context(p), kPhaseCombinePartials);
    if (threadIdx.x == 0) phase_clock::mark(kMarkCombinePartialsFree);
  }
  if (ok) {
    const int reduce_warps = p.roles == kCombineBoth ? p.reduce_warps : p.roles == kCombineReduce ? kWarps : 0;
    const int gather_warps = kWarps - reduce_warps;
    if (warp < reduce_warps) {
      combining::reduce_tokens(p, combine, spread_warp(warp), gridDim.x * reduce_warps, lane);
      if (lane == 0) phase_clock::mark(kMarkCombineReduced);
    } else {
      ok = combining::gather_tokens(p, combine, spread_warp(warp - reduce_warps), gridDim.x * gather_warps, lane);
      if (lane == 0) phase_clock::mark(kMarkCombineGathered);
    }
  }
  if (!(p.roles & kCombineGather)) return;  // the send half: the receive half ends the call

  // End of the call: the last block advances the combine count and tells every peer
  // that this rank is done with this half of its partials.
  __shared__ bool last_block;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* done = at<uint32_t>(p.local, p.off.combine_epoch + 8);
    __threadfence();
    last_block = atomicAdd(done, 1u) == gridDim.x - 1;
    if (last_block) {
      *done = 0;
      *at<uint64_t>(p.local, p.off.combine_epoch) = combine;
    }
  }
  __syncthreads();
  if (last_block && (p.topk_idx != nullptr || p.stale_verdict)) {  // the stale-combine check's verdict (combine.cuh)
    __shared__ bool stale;
    if (threadIdx.x == 0) {
      __threadfence();  // every block's combine_stale store came before its count above
      stale = atomicExch(at<uint32_t>(p.local, p.off.combine_stale), 0u) != 0;
      if (stale) atomicAdd_system(&p.errors->counts[HEP_ERROR_STALE_COMBINE], 1u);
    }
    __syncthreads();
    if (stale) {  // after every block's writes of the output (they came before their counts)
      int4* out = static_cast<int4*>(p.out);
      for (int64_t i = threadIdx.x; i < (int64_t)p.num_rows * s.hidden / 8; i += blockDim.x) out[i] = make_int4(0, 0, 0, 0);
    }
  }
  if (last_block && threadIdx.x < W && !timed_out_before(wait_context(p))) {
    ptx::fence_acq_rel_sys();
    uint64_t* done = at<uint64_t>(p.peers[threadIdx.x], p.off.combine_done) + s.rank;
    if (s.across_nodes(threadIdx.x)) {
      set_remote_flag(done, combine, threadIdx.x);
    } else {
      ptx::st_release_sys(done, combine);
    }
  }
  if (threadIdx.x == 0) phase_clock::mark(kMarkCombineExited);
}

}  // namespace

#ifdef HEP_PHASE_CLOCK
cudaError_t read_combine_phase_clock(unsigned long long* host) { return phase_clock::read_and_clear(host); }
#endif

cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream) {
  combine_kernel<<<p.blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hep
