// One exchange step of the network leg (hep_mn_exchange_run, docs/MULTINODE.md): every
// rank puts its send bytes into its slot of each peer's receive region, with a signal
// per (peer, source), then waits for every peer's bytes of this call.
//
//   blocks    peer i gets blocks [i * blocks_per_peer, (i + 1) * blocks_per_peer); each
//             block's warp 0 puts one 16-byte-aligned share and adds 1 to the signal of
//             this rank on that peer. A source's signal on a receiver therefore reaches
//             call * blocks_per_peer when all its shares of call `call` have landed
//             (cumulative, never reset: replays need no host work).
//   receive   the first block of peer i waits for that peer's signal here, bounded.
//   end       the last block to finish advances the call counter; every block read it
//             at its start.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/wait.cuh"
#include "hybrid_ep_infer/hybrid_ep_infer_mn.h"

namespace hep::mn {

struct ExchangeParams {
  char* send;            // symmetric [bytes]
  char* recv;            // symmetric [world][bytes]
  uint64_t* signals;     // symmetric [world]: shares of each source landed here, cumulative
  uint64_t* call;        // device: the last completed call
  uint32_t* done;        // device: blocks finished with this call (reset by the last)
  int64_t bytes;
  int32_t rank;
  int32_t num_peers;
  int32_t blocks_per_peer;
  int32_t peers[HEP_MN_MAX_PEERS];
  WaitContext wait;
};

cudaError_t launch_exchange(const ExchangeParams& params, cudaStream_t stream);

}  // namespace hep::mn
