// The exchange step's kernel (see exchange.cuh).
#include "multinode/exchange.cuh"
#include "multinode/net.cuh"

namespace hep::mn {
namespace {

constexpr int kThreads = 32;  // one warp: the put is a warp call, the wait one thread's

__global__ void __launch_bounds__(kThreads) exchange_kernel(const __grid_constant__ ExchangeParams p) {
  const uint64_t call = *p.call + 1;
  const int peer_index = blockIdx.x / p.blocks_per_peer, share = blockIdx.x % p.blocks_per_peer;
  const int pe = p.peers[peer_index];
  // A dead exchange touches no peer; one read per block, so every lane takes the warp-wide put.
  if (!__syncthreads_or(threadIdx.x == 0 && timed_out_before(p.wait))) {
    const int64_t vectors = p.bytes / 16, per_share = (vectors + p.blocks_per_peer - 1) / p.blocks_per_peer;
    const int64_t lo = min(vectors, share * per_share) * 16, hi = min(vectors, (share + 1) * per_share) * 16;
    // (an empty share still signals: the receiver counts shares, not bytes)
    net::put_signal_add_warp(p.recv + (int64_t)p.rank * p.bytes + lo, p.send + lo, hi - lo, p.signals + p.rank, 1,
                             pe);
    if (threadIdx.x == 0) net::release_sources();  // the next call may rewrite send
    if (share == 0 && threadIdx.x == 0) {  // (a timeout is recorded in the error block)
      net::wait_signal(p.signals + pe, call * p.blocks_per_peer, p.wait, HEP_MN_PHASE_EXCHANGE, pe);
    }
  }
  __syncwarp();
  if (threadIdx.x == 0) {
    __threadfence();
    if (atomicAdd(p.done, 1u) == gridDim.x - 1) {
      *p.done = 0;
      *p.call = call;
    }
  }
}

}  // namespace

cudaError_t launch_exchange(const ExchangeParams& p, cudaStream_t stream) {
  exchange_kernel<<<p.num_peers * p.blocks_per_peer, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hep::mn
