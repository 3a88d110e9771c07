/*
 * hybrid_ep_infer's multi-node engine (docs/MULTINODE.md): NVSHMEM's runtime under this
 * library, and the network leg's exchange step on it. A separate library,
 * libhybrid_ep_infer_mn.so, built only where NVSHMEM is found (CMake HEP_MULTINODE);
 * the single-domain library does not depend on it.
 *
 * One NVSHMEM runtime per process (NVSHMEM's rule), over one group of ranks: PE = rank.
 * hep_mn_init, hep_mn_finalize and every create/destroy below are collectives of that
 * group; hep_mn_exchange_run is a collective of the ranks it names as peers.
 *
 * This library also carries the whole C interface of hybrid_ep_infer.h, built so that
 * a buffer with ranks_per_node below its world size writes ranks on other nodes through
 * NVSHMEM (hep_buffer_desc_t::ranks_per_node); its workspaces come from
 * hep_mn_workspace_alloc.
 */
#ifndef HYBRID_EP_INFER_MN_H_
#define HYBRID_EP_INFER_MN_H_

#include <stddef.h>
#include <stdint.h>

#include "hybrid_ep_infer/error_block.h"
#include "hybrid_ep_infer/hybrid_ep_infer.h" /* hep_status_t, HEP_API */

#ifdef __cplusplus
extern "C" {
#endif

#define HEP_MN_API_VERSION 2
#define HEP_MN_UNIQUE_ID_BYTES 128 /* sizeof(nvshmemx_uniqueid_t) */
#define HEP_MN_MAX_PEERS 64

/* Phase codes of the network leg's waits (hep_error_block_t::timeout_phase). */
enum hep_mn_phase {
  HEP_MN_PHASE_EXCHANGE = 8, /* waiting for a peer's bytes of an exchange step */
};

HEP_API int hep_mn_api_version(void);
/* Description of the last failure in this thread ("" if none). */
HEP_API const char* hep_mn_last_error(void);

/* On one rank (the group's first): the id every rank passes to hep_mn_init. */
HEP_API hep_status_t hep_mn_unique_id(uint8_t out[HEP_MN_UNIQUE_ID_BYTES]);
/* Starts the runtime on CUDA device `device` as PE `rank` of `world`. NVSHMEM ends the
 * process on a failed init (it cannot return one), so the caller checks what it can first. */
HEP_API hep_status_t hep_mn_init(const uint8_t id[HEP_MN_UNIQUE_ID_BYTES], int rank, int world, int device);
HEP_API int hep_mn_initialized(void);
/* Ends the runtime; every exchange and workspace must have been freed. */
HEP_API hep_status_t hep_mn_finalize(void);

/* A buffer's workspace in NVSHMEM's symmetric heap: `bytes` (the same on every rank),
 * zeroed on every rank before this returns. Collective over the group. */
HEP_API hep_status_t hep_mn_workspace_alloc(size_t bytes, void** out);
/* Rank `pe`'s copy of the symmetric `workspace`, mapped for loads and stores here, or
 * NULL where the engine reaches it only by puts. */
HEP_API hep_status_t hep_mn_workspace_peer(void* workspace, int pe, void** out);
/* Collective over the group, unless `peer_timed_out` (a wait of the buffer timed out, so a
 * peer may be gone): then the memory stays until the process ends and the runtime can
 * no longer be finalized. */
HEP_API hep_status_t hep_mn_workspace_free(void* workspace, int peer_timed_out);

/* One exchange step of the network leg, as docs/MULTINODE.md uses it: every rank puts
 * `bytes` from its send region into slot `rank` of each peer's receive region, with a
 * signal per (peer, source) set to the call number in the same put (data before signal),
 * then waits, bounded, for every peer's bytes of this call. Static symmetric buffers,
 * a call counter in device memory: capturable in a CUDA graph and replayable. */
typedef struct hep_mn_exchange hep_mn_exchange_t;

typedef struct hep_mn_exchange_desc {
  int64_t bytes;                     /* per step and peer, a multiple of 16, > 0 */
  int32_t num_peers;                 /* 1..HEP_MN_MAX_PEERS */
  int32_t peers[HEP_MN_MAX_PEERS];   /* PEs to exchange with (not this rank, no repeats); every
                                        peer must name this rank among its own peers */
  int32_t blocks_per_peer;           /* thread blocks that put to one peer, >= 1 */
  uint64_t timeout_ns;               /* bound of every wait, > 0 */
} hep_mn_exchange_desc_t;

/* Collective over the group: allocates the symmetric regions (send [bytes], receive
 * [world][bytes], signals [world]). */
HEP_API hep_status_t hep_mn_exchange_create(const hep_mn_exchange_desc_t* desc, hep_mn_exchange_t** out);
/* Device pointers: this rank's send region, and its receive region (slot r = rank r's bytes). */
HEP_API hep_status_t hep_mn_exchange_buffers(hep_mn_exchange_t* exchange, void** send, void** recv);
/* One step on `stream` (a cudaStream_t). */
HEP_API hep_status_t hep_mn_exchange_run(hep_mn_exchange_t* exchange, uint64_t stream);
/* The exchange's sticky error block (host-mapped; timeouts name phase and peer). */
HEP_API hep_status_t hep_mn_exchange_error_block(hep_mn_exchange_t* exchange, const hep_error_block_t** out);
/* Collective over the group. */
HEP_API hep_status_t hep_mn_exchange_destroy(hep_mn_exchange_t* exchange);

#ifdef __cplusplus
}
#endif

#endif /* HYBRID_EP_INFER_MN_H_ */
