// Dispatch, first half: routing exchange and placement (kernels 1-3 of dispatch.cuh).
#include <climits>

#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "kernels/dispatch.cuh"
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

  // This rank's routing rows, sanitized once, written to every peer's slot.
  uint32_t invalid = 0, repeated = 0;
  const IndexT* ids = static_cast<const IndexT*>(p.topk_idx);
  for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < n; t += gridDim.x * blockDim.x) {
    int32_t kept[kMaxTopK];
    sanitize_row(ids + (int64_t)t * K, K, s.num_experts, kept, invalid, repeated);
    for (int r = 0; r < s.world; ++r) {
      RoutingSlotView slot = routing_slot(p.peers[r], s, p.off, parity, s.rank);
      for (int k = 0; k < K; ++k) {
        slot.ids[(int64_t)t * K + k] = kept[k];
        slot.weights[(int64_t)t * K + k] = p.topk_weights[(int64_t)t * K + k];
      }
    }
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

constexpr int kScanThreads = 256;
constexpr int kScanWarps = kScanThreads / 32;

// Columns a rank needs: (this rank, every expert) for its own tokens, and
// (every other source, each local expert) for the rows it receives.
__host__ __device__ inline int scan_columns(const Sizes& s) {
  return s.num_experts + (s.world - 1) * s.local_experts;
}

__device__ __forceinline__ void scan_column(int c, const Sizes& s, int& source, int& expert) {
  if (c < s.num_experts) {
    source = s.rank;
    expert = c;
  } else {
    const int i = c - s.num_experts;
    const int other = i / s.local_experts;  // index among the W - 1 other sources
    source = other < s.rank ? other : other + 1;
    expert = s.rank * s.local_experts + i % s.local_experts;
  }
}

// Blocks [0, W): histogram of source `blockIdx.x`'s rows per expert.
// Blocks [W, ...): one warp per needed column, ranking rows in token order.
__global__ void __launch_bounds__(kScanThreads) scan_kernel(const __grid_constant__ DispatchParams p) {
  const Sizes& s = p.sizes;
  const uint64_t epoch = current_epoch(p);
  const int parity = static_cast<int>(epoch & 1);
  const int K = s.top_k;
  if (!block_wait_all_peers(at<uint64_t>(p.local, p.off.meta_arrivals), s.world, epoch * kPublishBlocks,
                            wait_context(p), kPhaseDispatchRouting)) {
    return;
  }

  if (blockIdx.x < s.world) {
    extern __shared__ int32_t counts[];  // [E]
    const int source = blockIdx.x;
    for (int g = threadIdx.x; g < s.num_experts; g += blockDim.x) counts[g] = 0;
    __syncthreads();
    RoutingSlotView slot = routing_slot(p.local, s, p.off, parity, source);
    const int64_t cells = (int64_t)*slot.n * K;
    for (int64_t i = threadIdx.x; i < cells; i += blockDim.x) {
      const int32_t g = slot.ids[i];
      if (g >= 0) atomicAdd(&counts[g], 1);
    }
    __syncthreads();
    int32_t* hist = at<int32_t>(p.local, p.off.hist) + (int64_t)source * s.num_experts;
    for (int g = threadIdx.x; g < s.num_experts; g += blockDim.x) hist[g] = counts[g];
    return;
  }

  const int lane = threadIdx.x % 32;
  const int column = (blockIdx.x - s.world) * kScanWarps + threadIdx.x / 32;
  if (column >= scan_columns(s)) return;
  int source, expert;
  scan_column(column, s, source, expert);
  RoutingSlotView slot = routing_slot(p.local, s, p.off, parity, source);
  const int n = *slot.n;
  int32_t* prefix = at<int32_t>(p.local, p.off.prefix) + (int64_t)source * s.max_tokens * K;
  int32_t running = 0;
  for (int t0 = 0; t0 < n; t0 += 32) {
    const int t = t0 + lane;
    int found = -1;
    if (t < n) {
      for (int k = 0; k < K; ++k) found = slot.ids[(int64_t)t * K + k] == expert ? k : found;
    }
    const uint32_t mask = __ballot_sync(0xffffffffu, found >= 0);
    if (found >= 0) prefix[(int64_t)t * K + found] = running + __popc(mask & ((1u << lane) - 1));
    running += __popc(mask);
  }
}

// ---------------------------------------------------------------------------- 3. place

constexpr int kPlaceThreads = 256;

// Rows written per expert and row offsets, for every destination (capacity applied
// in expert order, SPEC section 3). Shared memory: written [W*L], offsets [W*(L+1)].
__device__ void compute_placement(const DispatchParams& p, int32_t* written, int32_t* offsets) {
  const Sizes& s = p.sizes;
  const int L = s.local_experts;
  const int32_t* hist = at<const int32_t>(p.local, p.off.hist);
  for (int r = threadIdx.x; r < s.world; r += blockDim.x) {
    int32_t offset = 0;
    for (int e = 0; e < L; ++e) {
      int32_t rows = 0;
      for (int src = 0; src < s.world; ++src) rows += hist[(int64_t)src * s.num_experts + r * L + e];
      int32_t fit;
      if (s.batched) {
        fit = min(rows, s.capacity);
      } else {
        fit = min(rows, max(s.capacity - offset, 0));
        offsets[r * (L + 1) + e] = offset;
        offset += (fit + s.pad_multiple - 1) / s.pad_multiple * s.pad_multiple;
      }
      written[r * L + e] = fit;
    }
    if (!s.batched) offsets[r * (L + 1) + L] = offset;
  }
  __syncthreads();
}

// Rows of `expert` from sources before `source`.
__device__ __forceinline__ int32_t rows_before(const Sizes& s, const int32_t* hist, int source, int expert) {
  int32_t rows = 0;
  for (int src = 0; src < source; ++src) rows += hist[(int64_t)src * s.num_experts + expert];
  return rows;
}

// Row slot of rank-in-expert j of local expert e on destination r, or -1 if dropped.
__device__ __forceinline__ int32_t row_slot(const Sizes& s, const int32_t* written, const int32_t* offsets, int r,
                                            int e, int32_t j) {
  const int L = s.local_experts;
  if (j >= written[r * L + e]) return -1;
  return s.batched ? e * s.capacity + j : offsets[r * (L + 1) + e] + j;
}

// Grid-stride over (source, token) pairs: for this rank's own tokens, the row on every
// destination to send to; for every source's tokens, this rank's rows, weights and
// row_expert. Block 0 also writes counts, offsets and zero padding.
__global__ void __launch_bounds__(kPlaceThreads) place_kernel(const __grid_constant__ DispatchParams p) {
  const Sizes& s = p.sizes;
  if (timed_out_before(wait_context(p))) return;
  const uint64_t epoch = current_epoch(p);
  const int parity = static_cast<int>(epoch & 1);
  const int W = s.world, K = s.top_k, L = s.local_experts, T = s.max_tokens;

  extern __shared__ int32_t shared[];
  int32_t* written = shared;             // [W * L]
  int32_t* offsets = shared + W * L;     // [W * (L + 1)]
  compute_placement(p, written, offsets);

  const int32_t* hist = at<const int32_t>(p.local, p.off.hist);
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
    // As destination: this rank's rows of (source, t).
    int32_t first = INT_MAX;
    for (int k = 0; k < K; ++k) {
      const int32_t g = slot.ids[(int64_t)t * K + k];
      int32_t row = -1;
      if (g >= first_local && g < first_local + L) {
        const int e = g - first_local;
        row = row_slot(s, written, offsets, s.rank, e, rows_before(s, hist, source, g) + prefix[cell + k]);
        if (row < 0) {
          ++overflow;
        } else {
          weights_out[row] = slot.weights[(int64_t)t * K + k];
          row_expert[row] = e;
          first = min(first, row);
        }
      }
      row_of[cell + k] = row;
    }
    first_row[(int64_t)source * T + t] = first == INT_MAX ? -1 : first;

    // As sender: the first row of my token t on every destination.
    if (source == s.rank) {
      int32_t* send = send_row + (int64_t)t * W;
      for (int r = 0; r < W; ++r) send[r] = -1;
      for (int k = 0; k < K; ++k) {
        const int32_t g = slot.ids[(int64_t)t * K + k];
        if (g < 0) continue;
        const int r = g / L;
        const int32_t row = row_slot(s, written, offsets, r, g % L, rows_before(s, hist, source, g) + prefix[cell + k]);
        if (row >= 0 && (send[r] < 0 || row < send[r])) send[r] = row;
      }
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

cudaError_t launch_dispatch(const DispatchParams& p, cudaStream_t stream) {
  const Sizes& s = p.sizes;
  if (p.idx_is_int64) {
    publish_routing_kernel<int64_t><<<kPublishBlocks, kPublishThreads, 0, stream>>>(p);
  } else {
    publish_routing_kernel<int32_t><<<kPublishBlocks, kPublishThreads, 0, stream>>>(p);
  }
  const int scan_blocks = s.world + (scan_columns(s) + kScanWarps - 1) / kScanWarps;
  scan_kernel<<<scan_blocks, kScanThreads, s.num_experts * sizeof(int32_t), stream>>>(p);
  const int place_blocks = static_cast<int>(((int64_t)s.world * s.max_tokens + kPlaceThreads - 1) / kPlaceThreads);
  const size_t place_shared = sizeof(int32_t) * (2 * s.world * s.local_experts + s.world);
  place_kernel<<<place_blocks, kPlaceThreads, place_shared, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_transfer_kernel(p, stream);
}

}  // namespace hep
