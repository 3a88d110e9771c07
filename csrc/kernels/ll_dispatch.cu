// The low-latency dispatch's kernels (see ll_dispatch.cuh): the send half, the receive
// half, and both in one launch.
#include "common/phase_clock.cuh"
#include "common/ptx.cuh"
#include "common/spread_warps.cuh"
#include "common/wait.cuh"
#include "kernels/ll_dispatch.cuh"
#include "kernels/ll_dispatch_recv.cuh"
#include "kernels/ll_dispatch_send.cuh"

namespace hep {
namespace {

constexpr int kThreads = kCopyThreads;
constexpr int kWarps = kCopyWarps;
static_assert(kMaxRanks <= kThreads, "a block's threads publish to and wait for one peer each");
static_assert(kMaxTopK <= 32, "a warp holds a token's slots one per lane");
static_assert(kMaxRanks <= 64, "a token's destinations are tested one rank per item, send_row per rank");
static_assert(kMarkDispatchExited < phase_clock::kMarks, "every phase mark has a slot");

// Block 0 publishes the routing; the other blocks' warps stage rows (block 0 too when it
// is the only one).
template <typename IndexT>
__device__ void send_half(const DispatchParams& p, uint64_t call, int parity) {
  const int n = ll::tokens_to_send(p, blockIdx.x == 0 && threadIdx.x == 0);
  if (blockIdx.x == 0) {
    ll::publish_routing<IndexT>(p, parity, n);
    if (threadIdx.x == 0) phase_clock::mark(kMarkDispatchRoutingPublished);
  }
  const int lane = threadIdx.x % 32;
  int warp = threadIdx.x / 32, warps = kWarps;
  if (gridDim.x > 1) {
    if (blockIdx.x == 0) return;
    warp = spread_warp(warp, 1);
    warps = (gridDim.x - 1) * kWarps;
  }
  if (p.sizes.spans_nodes()) {
    ll::stage_rows_across_nodes<IndexT>(p, call, parity, n, warp, warps, lane);
  } else {
    ll::stage_rows<IndexT>(p, call, parity, n, warp, warps, lane);
  }
  if (lane == 0) phase_clock::mark(kMarkDispatchRowsStaged);
}

// Waits for every source's routing, builds the plan tables, places and copies the rows.
// Returns false if a wait timed out.
__device__ bool receive_half(const DispatchParams& p, uint64_t call, int parity) {
  const Sizes& s = p.sizes;
  if (!block_wait_all_peers(at<uint64_t>(p.local, p.off.meta_arrivals), s.world, call * kPublishBlocks,
                            wait_context(p), kPhaseDispatchRouting)) {
    return false;
  }
  if (threadIdx.x == 0) phase_clock::mark(kMarkDispatchRoutingArrived);
  extern __shared__ int32_t plan_shared[];  // ll_receive_shared_bytes
  const ll::PlanTables tb = ll::carve_plan_tables(s, plan_shared);
  ll::build_plan_tables(p, parity, tb);
  if (threadIdx.x == 0) phase_clock::mark(kMarkDispatchPlanBuilt);
  if (blockIdx.x == 0) ll::write_counts(p, tb);
  const int warp = spread_warp(threadIdx.x / 32), warps = gridDim.x * kWarps, lane = threadIdx.x % 32;
  ll::clear_unfilled_rows(p, tb, warp, warps, lane);
  if (lane == 0) phase_clock::mark(kMarkDispatchRowsCleared);
  uint32_t overflow = 0;
  const bool ok = ll::place_staged_rows(p, call, parity, tb, warp, warps, lane, overflow);
  if (lane == 0) phase_clock::mark(kMarkDispatchRowsPlaced);
  add_block_counts(overflow, 0, &p.errors->counts[HEP_ERROR_CAPACITY_OVERFLOW], nullptr);
  return __syncthreads_and(ok);
}

// End of the call: the last block advances the call counter (every block has read it).
__device__ void finish_call(const DispatchParams& p, uint64_t call) {
  __syncthreads();
  if (threadIdx.x == 0) {
    phase_clock::mark(kMarkDispatchExited);
    uint32_t* done = at<uint32_t>(p.local, p.off.epoch + 8);
    __threadfence();
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
      *done = 0;
      *at<uint64_t>(p.local, p.off.epoch) = call;
    }
  }
}

template <typename IndexT, int kPhases>
__global__ void __launch_bounds__(kThreads, 1) ll_dispatch_kernel(const __grid_constant__ DispatchParams p) {
  const uint64_t call = *at<const uint64_t>(p.local, p.off.epoch) + 1;
  const int parity = static_cast<int>(call & 1);
  if (threadIdx.x == 0) phase_clock::mark(kMarkDispatchEntered);
  // A dead buffer touches no peer; one read per block, so its threads take the same barriers.
  if (!__syncthreads_or(threadIdx.x == 0 && timed_out_before(wait_context(p)))) {
    if (kPhases & kLowLatencySend) send_half<IndexT>(p, call, parity);
    if (kPhases & kLowLatencyReceive) receive_half(p, call, parity);
  }
  if (kPhases & kLowLatencyReceive) finish_call(p, call);
}

template <int kPhases>
cudaError_t launch(const DispatchParams& p, cudaStream_t stream) {
  const size_t shared = kPhases & kLowLatencyReceive ? ll_receive_shared_bytes(p.sizes) : 0;
  if (p.idx_is_int64) {
    ll_dispatch_kernel<int64_t, kPhases><<<p.blocks, kThreads, shared, stream>>>(p);
  } else {
    ll_dispatch_kernel<int32_t, kPhases><<<p.blocks, kThreads, shared, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace

size_t ll_receive_shared_bytes(const Sizes& s) { return sizeof(int32_t) * ll::plan_table_words(s); }

cudaError_t prepare_ll_dispatch() {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  // The kernels' static shared memory is a few hundred bytes (block counts, add_block_counts).
  const int bytes = optin - 1024;
  if (err == cudaSuccess) err = allow_shared_memory(ll_dispatch_kernel<int32_t, kLowLatencyReceive>, bytes);
  if (err == cudaSuccess) err = allow_shared_memory(ll_dispatch_kernel<int64_t, kLowLatencyReceive>, bytes);
  if (err == cudaSuccess) err = allow_shared_memory(ll_dispatch_kernel<int32_t, kLowLatencyBoth>, bytes);
  if (err == cudaSuccess) err = allow_shared_memory(ll_dispatch_kernel<int64_t, kLowLatencyBoth>, bytes);
  return err;
}

#ifdef HEP_PHASE_CLOCK
cudaError_t read_ll_dispatch_phase_clock(unsigned long long* host) { return phase_clock::read_and_clear(host); }
#endif

cudaError_t launch_ll_dispatch(const DispatchParams& p, int phases, cudaStream_t stream) {
  switch (phases) {
    case kLowLatencySend: return launch<kLowLatencySend>(p, stream);
    case kLowLatencyReceive: return launch<kLowLatencyReceive>(p, stream);
    case kLowLatencyBoth: return launch<kLowLatencyBoth>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hep
