// Dispatch, first half: routing exchange and placement (kernels 1-3 of dispatch.cuh).
#include <algorithm>
#include <climits>

#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/placement.cuh"
#include "kernels/routing_rules.cuh"

namespace hep {

__device__ __forceinline__ uint64_t current_epoch(const DispatchParams& p) {
  return *at<const uint64_t>(p.local, p.off.epoch) + 1;  // advanced by the last kernel of the call
}

// ---------------------------------------------------------------------------- 1. publish

constexpr int kPublishThreads = 256;

template <typename IndexT>
__global__ void __launch_bounds__(kPublishThreads) publish_routing_kernel(const __grid_constant__ DispatchParams p) {
  const Sizes& s = p.sizes;
  if (timed_out_before(wait_context(p))) return;  // the buffer is dead; touch no peer
  const uint64_t epoch = current_epoch(p);
  const int parity = static_cast<int>(epoch & 1);
  const int K = s.top_k;

  int32_t n = p.num_tokens_host;
  if (p.num_tokens_device != nullptr) {
    n = *p.num_tokens_device;
    if (n < 0 || n > p.num_rows) {  // this rank sends nothing
      if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd_system(&p.errors->counts[HEP_ERROR_BAD_NUM_TOKENS], 1u);
      n = 0;
    }
  }

  // This rank's routing rows, sanitized once, written to every peer's slot: a tile of
  // blockDim.x tokens is sanitized into shared memory, then copied out with consecutive
  // threads on consecutive words, so each warp store to a peer is one coalesced NVLink
  // write instead of 32 scattered 4-byte ones.
  __shared__ int32_t tile[kPublishThreads * kMaxTopK];
  uint32_t invalid = 0, repeated = 0;
  const IndexT* ids = static_cast<const IndexT*>(p.topk_idx);
  // (t0 depends on the block only: every thread makes the same trips, as the barriers need.)
  for (int t0 = blockIdx.x * blockDim.x; t0 < n; t0 += gridDim.x * blockDim.x) {
    const int t = t0 + threadIdx.x;
    if (t < n) {
      int32_t kept[kMaxTopK];
      sanitize_row(ids + (int64_t)t * K, K, s.num_experts, kept, invalid, repeated);
      for (int k = 0; k < K; ++k) tile[threadIdx.x * K + k] = kept[k];
    }
    __syncthreads();
    const int cells = min(n - t0, static_cast<int>(blockDim.x)) * K;
    const float* weights = p.topk_weights + (int64_t)t0 * K;
    for (int r = 0; r < s.world; ++r) {
      RoutingSlotView slot = routing_slot(p.peers[r], s, p.off, parity, s.rank);
      for (int i = threadIdx.x; i < cells; i += blockDim.x) {
        slot.ids[(int64_t)t0 * K + i] = tile[i];
        slot.weights[(int64_t)t0 * K + i] = weights[i];
      }
    }
    __syncthreads();  // the tile is refilled next trip
  }
  if (blockIdx.x == 0 && threadIdx.x < s.world) {
    *routing_slot(p.peers[threadIdx.x], s, p.off, parity, s.rank).n = n;
  }
  add_block_counts(invalid, repeated, &p.errors->counts[HEP_ERROR_INVALID_EXPERT_ID],
                   &p.errors->counts[HEP_ERROR_REPEATED_EXPERT_ID]);

  // Local reset for this call: row_expert is -1 wherever no row is written.
  int32_t* row_expert = at<int32_t>(p.local, p.off.row_expert);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < s.slots; i += gridDim.x * blockDim.x) row_expert[i] = -1;

  // Publishes this block's routing writes (made visible to the block by the barrier)
  // to each peer; acquired by block_wait_all_peers in scan_kernel on that peer.
  __syncthreads();
  if (threadIdx.x < s.world) {
    ptx::fence_acq_rel_sys();
    ptx::red_add_release_sys(at<uint64_t>(p.peers[threadIdx.x], p.off.meta_arrivals) + s.rank, 1);
  }
}

// ---------------------------------------------------------------------------- 2. scan

constexpr int kScanBatch = 8;  // ids a thread loads before using them

// One block per source ranks every (token, slot) of that source in one pass; its warps
// take consecutive segments of whole 32-token tiles. Shared memory per warp: a count and
// a lane mask per expert ([warps][E] each).
//   1. count: each warp counts its segment's rows per expert;
//   2. every expert's counts are summed across warps in order (exclusive), which gives
//      each warp the rows of that expert before its segment, and the histogram row;
//   3. rank: per tile, each lane ORs its bit into the mask of each of its experts; a
//      slot's rank is then its warp's running count + the lanes below it in the mask,
//      and the lowest lane of each mask adds the tile to the count and clears the mask.
// The rank of a row is its token's order among the source's tokens with that expert
// (docs/SPEC.md section 3). Needed are this rank's tokens x every expert and every source x the
// local experts; the kernel writes every slot's rank (the rest go unread).
__device__ void scan_source(const DispatchParams& p, int parity, int source, int32_t* counts, uint32_t* masks) {
  const Sizes& s = p.sizes;
  const int E = s.num_experts, K = s.top_k;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  RoutingSlotView slot = routing_slot(p.local, s, p.off, parity, source);
  const int n = *slot.n;
  const int tiles = (n + 31) / 32, tiles_per_warp = (tiles + warps - 1) / warps;
  const int first = min(warp * tiles_per_warp * 32, n), last = min(first + tiles_per_warp * 32, n);
  int32_t* my_counts = counts + (int64_t)warp * E;
  uint32_t* my_masks = masks + (int64_t)warp * E;

  for (int i = threadIdx.x; i < warps * E; i += blockDim.x) {
    counts[i] = 0;
    masks[i] = 0;
  }
  __syncthreads();

  // 1. count (the segment's cells are contiguous; ids loaded kScanBatch at a time)
  const int64_t cell_end = (int64_t)last * K;
  for (int64_t c0 = (int64_t)first * K + lane; c0 < cell_end; c0 += 32 * kScanBatch) {
    int32_t ids[kScanBatch];
#pragma unroll
    for (int b = 0; b < kScanBatch; ++b) ids[b] = c0 + 32 * b < cell_end ? slot.ids[c0 + 32 * b] : -1;
#pragma unroll
    for (int b = 0; b < kScanBatch; ++b) {
      if (ids[b] >= 0) atomicAdd(&my_counts[ids[b]], 1);
    }
  }
  __syncthreads();

  // 2. exclusive sums across warps, one thread per expert
  int32_t* hist = at<int32_t>(p.local, p.off.hist) + (int64_t)source * E;
  for (int g = threadIdx.x; g < E; g += blockDim.x) {
    int32_t rows = 0;
    for (int w = 0; w < warps; ++w) {
      const int32_t here = counts[(int64_t)w * E + g];
      counts[(int64_t)w * E + g] = rows;
      rows += here;
    }
    hist[g] = rows;
  }
  __syncthreads();

  // 3. rank, a tile of 32 tokens at a time. Each step re-reads the lane's ids (L1 or L2
  // hits) kScanBatch slots at a time, loaded before use so their latencies overlap.
  int32_t* prefix = at<int32_t>(p.local, p.off.prefix) + (int64_t)source * s.max_tokens * K;
  const uint32_t below = (1u << lane) - 1;
  for (int t0 = first; t0 < last; t0 += 32) {
    const int t = t0 + lane;
    const int32_t* ids = slot.ids + (int64_t)t * K;
    const int slots = t < last ? K : 0;
    int32_t g[kScanBatch];
    auto load = [&](int k0) {
#pragma unroll
      for (int b = 0; b < kScanBatch; ++b) g[b] = k0 + b < slots ? ids[k0 + b] : -1;
    };
    for (int k0 = 0; k0 < slots; k0 += kScanBatch) {
      load(k0);
#pragma unroll
      for (int b = 0; b < kScanBatch; ++b) {
        if (g[b] >= 0) atomicOr(&my_masks[g[b]], 1u << lane);
      }
    }
    __syncwarp();
    for (int k0 = 0; k0 < slots; k0 += kScanBatch) {
      load(k0);
#pragma unroll
      for (int b = 0; b < kScanBatch; ++b) {
        if (g[b] >= 0) prefix[(int64_t)t * K + k0 + b] = my_counts[g[b]] + __popc(my_masks[g[b]] & below);
      }
    }
    __syncwarp();  // every lane has read the counts and masks of this tile
    for (int k0 = 0; k0 < slots; k0 += kScanBatch) {
      load(k0);
#pragma unroll
      for (int b = 0; b < kScanBatch; ++b) {
        if (g[b] < 0) continue;
        const uint32_t mask = my_masks[g[b]];
        if (__ffs(mask) - 1 == lane) {  // one lane per expert of the tile (a token's ids are distinct)
          my_counts[g[b]] += __popc(mask);
          my_masks[g[b]] = 0;
        }
      }
    }
    __syncwarp();
  }
  __syncthreads();  // counts and masks are reused by the block's next source
}

__global__ void __launch_bounds__(1024, 1) scan_kernel(const __grid_constant__ DispatchParams p) {
  const Sizes& s = p.sizes;
  const uint64_t epoch = current_epoch(p);
  const int parity = static_cast<int>(epoch & 1);
  if (!block_wait_all_peers(at<uint64_t>(p.local, p.off.meta_arrivals), s.world, epoch * kPublishBlocks,
                            wait_context(p), kPhaseDispatchRouting)) {
    return;
  }
  extern __shared__ int32_t scan_shared[];  // scan_shared_bytes
  int32_t* counts = scan_shared;
  uint32_t* masks = reinterpret_cast<uint32_t*>(scan_shared + (int64_t)(blockDim.x / 32) * s.num_experts);
  for (int source = blockIdx.x; source < s.world; source += gridDim.x) scan_source(p, parity, source, counts, masks);
}

// Warps of the scan's blocks: 32, or fewer where their counts and masks ([warps][E] each)
// would not fit in kScanSharedBudget (more than 800 experts).
constexpr size_t kScanSharedBudget = 200 * 1024;  // below sm_90's 227 KB less static shared memory
static size_t scan_shared_bytes(int num_experts, int warps) {
  return 2 * sizeof(int32_t) * (size_t)warps * num_experts;
}
static int scan_warps_that_fit(int num_experts) {
  const int fit = static_cast<int>(kScanSharedBudget / scan_shared_bytes(num_experts, 1));
  return max(1, min(32, fit));  // check_desc bounds num_experts (kMaxExperts) so 1 fits
}

// ---------------------------------------------------------------------------- 3. place

constexpr int kPlaceThreads = 256;
constexpr int kPlaceBatch = 8;  // routing slots of a token whose loads are issued together

// Grid-stride over (source, token) pairs: for this rank's own tokens, the row on every
// destination to send to; for every source's tokens, this rank's rows, weights and
// row_expert. Block 0 also writes counts, offsets and zero padding.
__global__ void __launch_bounds__(kPlaceThreads) place_kernel(const __grid_constant__ DispatchParams p) {
  const Sizes& s = p.sizes;
  if (timed_out_before(wait_context(p))) return;
  const uint64_t epoch = current_epoch(p);
  const int parity = static_cast<int>(epoch & 1);
  const int W = s.world, K = s.top_k, L = s.local_experts, T = s.max_tokens;

  extern __shared__ int32_t shared[];  // place_shared_bytes
  int32_t* written = shared;                      // [W * L]
  int32_t* offsets = written + W * L;             // [W * (L + 1)]
  int32_t* before_here = offsets + W * (L + 1);   // [W * L]
  int32_t* before_mine = before_here + W * L;     // [E]
  int32_t* first_sent = before_mine + s.num_experts + threadIdx.x * W;  // [W] per thread
  compute_placement(s, at<const int32_t>(p.local, p.off.hist), written, offsets, before_here, before_mine);

  const int32_t* prefix = at<const int32_t>(p.local, p.off.prefix);
  int32_t* send_row = at<int32_t>(p.local, p.off.send_row);
  int32_t* row_of = at<int32_t>(p.local, p.off.row_of);
  int32_t* first_row = at<int32_t>(p.local, p.off.first_row);
  float* weights_out = at<float>(p.local, p.off.weights);
  int32_t* row_expert = at<int32_t>(p.local, p.off.row_expert);
  const int first_local = s.rank * L;
  uint32_t overflow = 0;

  for (int64_t item = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; item < (int64_t)W * T;
       item += (int64_t)gridDim.x * blockDim.x) {
    const int source = static_cast<int>(item / T), t = static_cast<int>(item % T);
    RoutingSlotView slot = routing_slot(p.local, s, p.off, parity, source);
    const int n = *slot.n;
    const int64_t cell = ((int64_t)source * T + t) * K;
    if (t >= n) {
      first_row[(int64_t)source * T + t] = -1;
      continue;
    }
    // As sender (source == this rank): the first row of my token t on every destination,
    // kept in this thread's shared-memory slots until the token is done (reading back
    // global stores would put an L2 round trip per slot on the thread's path).
    const bool sender = source == s.rank;
    if (sender) {
      for (int r = 0; r < W; ++r) first_sent[r] = INT_MAX;
    }
    // As destination: this rank's rows of (source, t). The slots' ids, ranks and weights
    // are loaded kPlaceBatch at a time before any use, so their latencies overlap (the
    // stores below would otherwise keep the compiler from moving the loads up).
    int32_t first = INT_MAX;
    for (int k0 = 0; k0 < K; k0 += kPlaceBatch) {
      int32_t ids[kPlaceBatch], ranks[kPlaceBatch];
      float weights[kPlaceBatch];
#pragma unroll
      for (int j = 0; j < kPlaceBatch; ++j) {
        const bool in = k0 + j < K;
        ids[j] = in ? slot.ids[(int64_t)t * K + k0 + j] : -1;
        ranks[j] = in ? prefix[cell + k0 + j] : 0;  // meaningful only where read below
        weights[j] = in ? slot.weights[(int64_t)t * K + k0 + j] : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kPlaceBatch; ++j) {
        const int k = k0 + j;
        if (k >= K) break;
        const int32_t g = ids[j];
        int32_t row = -1;
        if (g >= first_local && g < first_local + L) {
          const int e = g - first_local;
          row = row_slot(s, written, offsets, s.rank, e, before_here[source * L + e] + ranks[j]);
          if (row < 0) {
            ++overflow;
          } else {
            weights_out[row] = weights[j];
            row_expert[row] = e;
            first = min(first, row);
          }
        }
        row_of[cell + k] = row;
        if (sender && g >= 0) {
          const int r = g / L;
          const int32_t sent = row_slot(s, written, offsets, r, g % L, before_mine[g] + ranks[j]);
          if (sent >= 0) first_sent[r] = min(first_sent[r], sent);
        }
      }
    }
    first_row[(int64_t)source * T + t] = first == INT_MAX ? -1 : first;
    if (sender) {
      for (int r = 0; r < W; ++r) send_row[(int64_t)t * W + r] = first_sent[r] == INT_MAX ? -1 : first_sent[r];
    }
  }
  add_block_counts(overflow, 0, &p.errors->counts[HEP_ERROR_CAPACITY_OVERFLOW], nullptr);

  if (blockIdx.x == 0) {
    int32_t* tokens_per_expert = at<int32_t>(p.local, p.off.tokens_per_expert);
    int32_t* src_tokens = at<int32_t>(p.local, p.off.src_tokens);
    for (int e = threadIdx.x; e < L; e += blockDim.x) tokens_per_expert[e] = written[s.rank * L + e];
    for (int r = threadIdx.x; r < W; r += blockDim.x) src_tokens[r] = *routing_slot(p.local, s, p.off, parity, r).n;
    if (!s.batched) {
      int32_t* offsets_out = at<int32_t>(p.local, p.off.offsets);
      for (int e = threadIdx.x; e <= L; e += blockDim.x) offsets_out[e] = offsets[s.rank * (L + 1) + e];
    }
  }
  // Padding rows of this rank's experts: zero payload, scales and weight.
  if (!s.batched && blockIdx.x == gridDim.x - 1) {
    char* hidden = at<char>(p.local, p.off.hidden);
    float* scales = at<float>(p.local, p.off.scales);
    for (int e = 0; e < L; ++e) {
      const int32_t lo = offsets[s.rank * (L + 1) + e] + written[s.rank * L + e];
      const int32_t hi = offsets[s.rank * (L + 1) + e + 1];
      const int64_t vectors = (int64_t)(hi - lo) * (s.row_bytes / 16);
      for (int64_t v = threadIdx.x; v < vectors; v += blockDim.x) {
        ptx::st_global_v4(reinterpret_cast<int4*>(hidden + lo * s.row_bytes) + v, make_int4(0, 0, 0, 0));
      }
      for (int64_t i = threadIdx.x; i < (int64_t)(hi - lo) * s.scale_cols; i += blockDim.x) {
        scales[lo * (int64_t)s.scale_cols + i] = 0.f;
      }
      for (int32_t row = lo + threadIdx.x; row < hi; row += blockDim.x) weights_out[row] = 0.f;
    }
  }
}

// ---------------------------------------------------------------------------- launch

// written, offsets, before_here (W*L each, offsets W more), before_mine (E = W*L), and
// W first rows per thread (first_sent).
static size_t place_shared_bytes(const Sizes& s) {
  return sizeof(int32_t) * (4 * (size_t)s.num_experts + s.world + (size_t)kPlaceThreads * s.world);
}

// The dynamic shared memory a kernel may use: the device's opt-in limit less what the
// kernel declares statically (its block reductions).
template <typename Kernel>
static cudaError_t allow_all_shared_memory(Kernel kernel) {
  int device = 0, optin = 0;
  cudaFuncAttributes attributes{};
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              optin - static_cast<int>(attributes.sharedSizeBytes));
}

// Above 48 KB of shared memory for many experts (place's tables, scan's per-warp counts).
cudaError_t prepare_plan_kernels() {
  cudaError_t err = allow_all_shared_memory(place_kernel);
  return err == cudaSuccess ? allow_all_shared_memory(scan_kernel) : err;
}

cudaError_t launch_dispatch(const DispatchParams& p, cudaStream_t stream) {
  const Sizes& s = p.sizes;
  if (p.idx_is_int64) {
    publish_routing_kernel<int64_t><<<kPublishBlocks, kPublishThreads, 0, stream>>>(p);
  } else {
    publish_routing_kernel<int32_t><<<kPublishBlocks, kPublishThreads, 0, stream>>>(p);
  }
  // The planning kernels use at most num_sms blocks, as the copy kernels do.
  const int scan_warps = scan_warps_that_fit(s.num_experts);
  scan_kernel<<<min(s.world, p.blocks), 32 * scan_warps, scan_shared_bytes(s.num_experts, scan_warps), stream>>>(p);
  const int place_blocks =
      static_cast<int>(std::min<int64_t>(((int64_t)s.world * s.max_tokens + kPlaceThreads - 1) / kPlaceThreads, p.blocks));
  place_kernel<<<place_blocks, kPlaceThreads, place_shared_bytes(s), stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_transfer_kernel(p, stream);
}

}  // namespace hep
