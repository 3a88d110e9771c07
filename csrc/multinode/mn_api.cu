// The multi-node engine's C interface (hybrid_ep_infer_mn.h): NVSHMEM's runtime, and the
// exchange step's buffers and launches. Validates and forwards; the kernel is in exchange.cu.
#include <cstring>
#include <new>

#include <cuda_runtime.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include "common/device_guard.h"
#include "common/status.h"
#include "hybrid_ep_infer/hybrid_ep_infer_mn.h"
#include "multinode/exchange.cuh"

static_assert(sizeof(nvshmemx_uniqueid_t) == HEP_MN_UNIQUE_ID_BYTES, "the header's id size is NVSHMEM's");

namespace {

struct Runtime {
  bool initialized = false;
  int rank = -1, world = 0, device = -1;
  int allocations = 0;  // exchanges and workspaces alive; finalize refuses while any is
  bool broken = false;  // a wait timed out: no NVSHMEM collective may run again (a peer is gone)
};
Runtime runtime;

}  // namespace

struct hep_mn_exchange {
  hep_mn_exchange_desc_t desc{};
  void* symmetric = nullptr;       // send, then recv, then signals
  uint64_t* state = nullptr;       // device: call counter, then the done counter
  hep_error_block_t* errors_host = nullptr;
  hep_error_block_t* errors_device = nullptr;
  uint32_t* broken = nullptr;      // device
};

namespace {

// Symmetric layout of one exchange: send [bytes], recv [world][bytes], signals [world].
size_t recv_offset(const hep_mn_exchange_desc_t& d) { return (size_t)d.bytes; }
size_t signals_offset(const hep_mn_exchange_desc_t& d) { return (size_t)d.bytes * (1 + runtime.world); }
size_t symmetric_bytes(const hep_mn_exchange_desc_t& d) { return signals_offset(d) + 8 * (size_t)runtime.world; }

hep_status_t check_exchange_desc(const hep_mn_exchange_desc_t* d) {
  HEP_REQUIRE(d != nullptr, "hep_mn_exchange_create: NULL desc");
  HEP_REQUIRE(d->bytes > 0 && d->bytes % 16 == 0, "bytes must be a positive multiple of 16, got %lld",
              (long long)d->bytes);
  HEP_REQUIRE(d->num_peers >= 1 && d->num_peers <= HEP_MN_MAX_PEERS, "num_peers must be in [1, %d], got %d",
              HEP_MN_MAX_PEERS, d->num_peers);
  HEP_REQUIRE(d->blocks_per_peer >= 1, "blocks_per_peer must be >= 1, got %d", d->blocks_per_peer);
  HEP_REQUIRE(d->timeout_ns > 0, "timeout_ns must be positive");
  for (int i = 0; i < d->num_peers; ++i) {
    const int pe = d->peers[i];
    HEP_REQUIRE(pe >= 0 && pe < runtime.world && pe != runtime.rank,
                "peers[%d] = %d: a peer is another rank in [0, %d)", i, pe, runtime.world);
    for (int j = 0; j < i; ++j) HEP_REQUIRE(d->peers[j] != pe, "peer %d is named twice", pe);
  }
  return HEP_SUCCESS;
}

// (nvshmem_free is a collective: after a timeout the symmetric region is left to the
// process's end.)
void free_exchange(hep_mn_exchange* x, bool free_symmetric) {
  if (x->symmetric && free_symmetric) nvshmem_free(x->symmetric);
  if (x->state) cudaFree(x->state);
  if (x->broken) cudaFree(x->broken);
  if (x->errors_host) cudaFreeHost(x->errors_host);
  delete x;
}

}  // namespace

extern "C" {

int hep_mn_api_version(void) { return HEP_MN_API_VERSION; }

const char* hep_mn_last_error(void) { return hep::last_error(); }

hep_status_t hep_mn_unique_id(uint8_t out[HEP_MN_UNIQUE_ID_BYTES]) {
  hep::clear_last_error();
  HEP_REQUIRE(out != nullptr, "hep_mn_unique_id: NULL argument");
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  if (nvshmemx_get_uniqueid(&id) != 0) {
    hep::set_last_error("nvshmemx_get_uniqueid failed (NVSHMEM's log: set NVSHMEM_DEBUG=WARN)");
    return HEP_INTERNAL_ERROR;
  }
  std::memcpy(out, &id, sizeof(id));
  return HEP_SUCCESS;
}

hep_status_t hep_mn_init(const uint8_t id_bytes[HEP_MN_UNIQUE_ID_BYTES], int rank, int world, int device) {
  hep::clear_last_error();
  HEP_REQUIRE(id_bytes != nullptr, "hep_mn_init: NULL id");
  HEP_REQUIRE(!runtime.initialized, "hep_mn_init: the runtime is already started in this process (one per process)");
  HEP_REQUIRE(world >= 1 && rank >= 0 && rank < world, "hep_mn_init: rank %d of world %d", rank, world);
  HEP_CUDA_CALL(cudaSetDevice(device));  // NVSHMEM binds the PE to the current device
  nvshmemx_uniqueid_t id;
  std::memcpy(&id, id_bytes, sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  if (nvshmemx_set_attr_uniqueid_args(rank, world, &id, &attr) != 0) {
    hep::set_last_error("nvshmemx_set_attr_uniqueid_args failed");
    return HEP_INTERNAL_ERROR;
  }
  nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);  // ends the process on failure
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != world) {
    hep::set_last_error("NVSHMEM started as PE %d of %d, asked for %d of %d", nvshmem_my_pe(), nvshmem_n_pes(), rank,
                        world);
    nvshmem_finalize();
    return HEP_INTERNAL_ERROR;
  }
  runtime = Runtime{true, rank, world, device, 0};
  return HEP_SUCCESS;
}

int hep_mn_initialized(void) { return runtime.initialized ? 1 : 0; }

hep_status_t hep_mn_finalize(void) {
  hep::clear_last_error();
  HEP_REQUIRE(runtime.initialized, "hep_mn_finalize: the runtime is not started");
  HEP_REQUIRE(runtime.allocations == 0, "hep_mn_finalize: %d exchange(s) or workspace(s) not freed",
              runtime.allocations);
  HEP_REQUIRE(!runtime.broken, "hep_mn_finalize: a wait timed out, so a peer may be gone and NVSHMEM's collective "
              "finalize could hang; the runtime ends with the process");
  hep::DeviceGuard guard(runtime.device);
  HEP_CUDA_CALL(guard.status());
  nvshmem_finalize();
  runtime = Runtime{};
  return HEP_SUCCESS;
}

hep_status_t hep_mn_workspace_alloc(size_t bytes, void** out) {
  hep::clear_last_error();
  HEP_REQUIRE(out != nullptr, "hep_mn_workspace_alloc: NULL out");
  *out = nullptr;
  HEP_REQUIRE(runtime.initialized, "hep_mn_workspace_alloc: call hep_mn_init first");
  HEP_REQUIRE(!runtime.broken, "hep_mn_workspace_alloc: a wait of this process timed out; restart the process");
  HEP_REQUIRE(bytes > 0, "hep_mn_workspace_alloc: 0 bytes");
  hep::DeviceGuard guard(runtime.device);
  HEP_CUDA_CALL(guard.status());
  // Collective: every rank, the same size, the same order. (Attach needs 128-byte alignment.)
  void* workspace = nvshmem_align(256, bytes);
  if (workspace == nullptr) {
    hep::set_last_error("hep_mn_workspace_alloc: nvshmem_align of %zu bytes failed (NVSHMEM_SYMMETRIC_SIZE sets "
                        "the heap)", bytes);
    return HEP_CUDA_ERROR;
  }
  cudaError_t err = cudaMemset(workspace, 0, bytes);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    hep::set_last_error("hep_mn_workspace_alloc: zeroing: %s", cudaGetErrorString(err));
    nvshmem_free(workspace);
    return HEP_CUDA_ERROR;
  }
  nvshmem_barrier_all();  // zero on every rank before anyone writes into it
  ++runtime.allocations;
  *out = workspace;
  return HEP_SUCCESS;
}

hep_status_t hep_mn_workspace_peer(void* workspace, int pe, void** out) {
  hep::clear_last_error();
  HEP_REQUIRE(workspace != nullptr && out != nullptr, "hep_mn_workspace_peer: NULL argument");
  HEP_REQUIRE(runtime.initialized, "hep_mn_workspace_peer: call hep_mn_init first");
  HEP_REQUIRE(pe >= 0 && pe < runtime.world, "hep_mn_workspace_peer: pe %d outside [0, %d)", pe, runtime.world);
  *out = nvshmem_ptr(workspace, pe);
  return HEP_SUCCESS;
}

hep_status_t hep_mn_workspace_free(void* workspace, int peer_timed_out) {
  hep::clear_last_error();
  if (workspace == nullptr) return HEP_SUCCESS;
  HEP_REQUIRE(runtime.initialized, "hep_mn_workspace_free: the runtime is not started");
  hep::DeviceGuard guard(runtime.device);
  HEP_CUDA_CALL(guard.status());
  HEP_CUDA_CALL(cudaDeviceSynchronize());
  if (peer_timed_out) runtime.broken = true;
  if (!runtime.broken) {
    nvshmem_barrier_all();  // no peer still writes into it
    nvshmem_free(workspace);
  }
  --runtime.allocations;
  return HEP_SUCCESS;
}

hep_status_t hep_mn_exchange_create(const hep_mn_exchange_desc_t* desc, hep_mn_exchange_t** out) {
  hep::clear_last_error();
  HEP_REQUIRE(out != nullptr, "hep_mn_exchange_create: NULL out");
  *out = nullptr;
  HEP_REQUIRE(runtime.initialized, "hep_mn_exchange_create: call hep_mn_init first");
  HEP_REQUIRE(!runtime.broken, "hep_mn_exchange_create: a wait of this process timed out; restart the process");
  hep_status_t status = check_exchange_desc(desc);
  if (status != HEP_SUCCESS) return status;
  hep::DeviceGuard guard(runtime.device);
  HEP_CUDA_CALL(guard.status());

  hep_mn_exchange* x = new (std::nothrow) hep_mn_exchange;
  HEP_REQUIRE(x != nullptr, "hep_mn_exchange_create: out of host memory");
  x->desc = *desc;
  // Collective: every rank allocates the same size in the same order.
  x->symmetric = nvshmem_malloc(symmetric_bytes(*desc));
  cudaError_t err = x->symmetric ? cudaSuccess : cudaErrorMemoryAllocation;
  if (err == cudaSuccess) err = cudaMemset(x->symmetric, 0, symmetric_bytes(*desc));
  if (err == cudaSuccess) err = cudaMalloc(&x->state, 16);
  if (err == cudaSuccess) err = cudaMemset(x->state, 0, 16);
  if (err == cudaSuccess) err = cudaMalloc(&x->broken, 4);
  if (err == cudaSuccess) err = cudaMemset(x->broken, 0, 4);
  if (err == cudaSuccess) err = cudaHostAlloc(&x->errors_host, sizeof(hep_error_block_t), cudaHostAllocMapped);
  if (err == cudaSuccess) {
    std::memset(x->errors_host, 0, sizeof(hep_error_block_t));
    err = cudaHostGetDevicePointer(reinterpret_cast<void**>(&x->errors_device), x->errors_host, 0);
  }
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    hep::set_last_error("hep_mn_exchange_create: %s (symmetric heap %zu bytes; NVSHMEM_SYMMETRIC_SIZE sets the "
                        "heap)", x->symmetric ? cudaGetErrorString(err) : "nvshmem_malloc failed",
                        symmetric_bytes(*desc));
    free_exchange(x, true);
    return HEP_CUDA_ERROR;
  }
  nvshmem_barrier_all();  // every rank's signals are zero before anyone puts
  ++runtime.allocations;
  *out = x;
  return HEP_SUCCESS;
}

hep_status_t hep_mn_exchange_buffers(hep_mn_exchange_t* x, void** send, void** recv) {
  hep::clear_last_error();
  HEP_REQUIRE(x != nullptr && send != nullptr && recv != nullptr, "hep_mn_exchange_buffers: NULL argument");
  *send = x->symmetric;
  *recv = static_cast<char*>(x->symmetric) + recv_offset(x->desc);
  return HEP_SUCCESS;
}

hep_status_t hep_mn_exchange_run(hep_mn_exchange_t* x, uint64_t stream) {
  hep::clear_last_error();
  HEP_REQUIRE(x != nullptr, "hep_mn_exchange_run: NULL argument");
  hep::mn::ExchangeParams p{};
  char* base = static_cast<char*>(x->symmetric);
  p.send = base;
  p.recv = base + recv_offset(x->desc);
  p.signals = reinterpret_cast<uint64_t*>(base + signals_offset(x->desc));
  p.call = x->state;
  p.done = reinterpret_cast<uint32_t*>(x->state + 1);
  p.bytes = x->desc.bytes;
  p.rank = runtime.rank;
  p.num_peers = x->desc.num_peers;
  p.blocks_per_peer = x->desc.blocks_per_peer;
  std::memcpy(p.peers, x->desc.peers, sizeof(p.peers));
  p.wait = {x->errors_device, x->broken, x->desc.timeout_ns};
  hep::DeviceGuard guard(runtime.device);
  HEP_CUDA_CALL(guard.status());
  HEP_CUDA_CALL(hep::mn::launch_exchange(p, reinterpret_cast<cudaStream_t>(stream)));
  return HEP_SUCCESS;
}

hep_status_t hep_mn_exchange_error_block(hep_mn_exchange_t* x, const hep_error_block_t** out) {
  hep::clear_last_error();
  HEP_REQUIRE(x != nullptr && out != nullptr, "hep_mn_exchange_error_block: NULL argument");
  *out = x->errors_host;
  return HEP_SUCCESS;
}

hep_status_t hep_mn_exchange_destroy(hep_mn_exchange_t* x) {
  hep::clear_last_error();
  if (x == nullptr) return HEP_SUCCESS;
  hep::DeviceGuard guard(runtime.device);
  HEP_CUDA_CALL(guard.status());
  HEP_CUDA_CALL(cudaDeviceSynchronize());
  if (x->errors_host->counts[HEP_ERROR_TIMEOUT] != 0) runtime.broken = true;
  if (!runtime.broken) nvshmem_barrier_all();  // no peer still puts into this exchange
  free_exchange(x, !runtime.broken);
  --runtime.allocations;
  return HEP_SUCCESS;
}

}  // extern "C"
