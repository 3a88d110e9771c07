// The receive half of the low-latency dispatch (see ll_dispatch.cuh). Device code
// only; the kernels are in ll_dispatch.cu.
#pragma once

#include <climits>
#include <cstdint>

#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "common/column_slices.cuh"
#include "common/warp_copy.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/ll_dispatch_send.cuh"
#include "kernels/placement.cuh"

namespace hep::ll {

constexpr int kExpandUnroll = 8;  // as the planned dispatch's local copies
static_assert(kMaxRanks <= 64, "the plan build's scan gives each lane of one warp two sources");

// The plan tables each receiving block builds in shared memory, from every source's
// routing (n <= max_tokens = ll_tokens rows each):
//   hist        [W][E]        rows per (source, global expert)
//   written, offsets, before_here, before_mine: compute_placement's (placement.cuh)
//   tokens      [W]           every source's n this call (its routing slot's, read once)
//   masks_here  [W][L][words] bit t: source's token t has local expert e
//   masks_own   [E][words]    bit t: this rank's token t has expert g
// A slot's rank among its source's rows of an expert (docs/SPEC.md section 3: token
// order) is the number of mask bits below its token.
struct PlanTables {
  int32_t* hist;
  int32_t* written;
  int32_t* offsets;
  int32_t* before_here;
  int32_t* before_mine;
  int32_t* tokens;
  uint32_t* masks_here;
  uint32_t* masks_own;
  int words;
};

__host__ __device__ inline int mask_words(const Sizes& s) { return (s.ll_tokens + 31) / 32; }

__host__ __device__ inline int64_t plan_table_words(const Sizes& s) {
  const int64_t W = s.world, E = s.num_experts, L = s.local_experts;
  return W * E + W * L + W * (L + 1) + W * L + E + W + (W * L + E) * mask_words(s);
}

__device__ inline PlanTables carve_plan_tables(const Sizes& s, int32_t* shared) {
  const int W = s.world, E = s.num_experts, L = s.local_experts;
  PlanTables tb;
  tb.words = mask_words(s);
  tb.hist = shared;
  tb.written = tb.hist + W * E;
  tb.offsets = tb.written + W * L;
  tb.before_here = tb.offsets + W * (L + 1);
  tb.before_mine = tb.before_here + W * L;
  tb.tokens = tb.before_mine + E;
  tb.masks_here = reinterpret_cast<uint32_t*>(tb.tokens + W);
  tb.masks_own = tb.masks_here + (int64_t)W * L * tb.words;
  return tb;
}

// Counts and masks from every source's routing (its slot here, published before the
// meta counter the caller acquired), then the placement. Every thread of the block calls it.
// Every source's n is loaded at once, then one loop runs over the cells of all sources, so
// the sources' loads overlap instead of following one another (a cost that grew with W).
__device__ void build_plan_tables(const DispatchParams& p, int parity, const PlanTables& tb) {
  const Sizes& s = p.sizes;
  const int W = s.world, E = s.num_experts, L = s.local_experts, K = s.top_k;
  __shared__ int32_t cells_before[kMaxRanks + 1];  // [r]: cells of the sources before r
  for (int64_t i = threadIdx.x; i < (int64_t)W * E; i += blockDim.x) tb.hist[i] = 0;
  for (int64_t i = threadIdx.x; i < ((int64_t)W * L + E) * tb.words; i += blockDim.x) tb.masks_here[i] = 0;
  if (threadIdx.x < 32) {  // an inclusive warp scan of n * K, two sources per lane (W <= 64)
    const int lane = threadIdx.x, a = 2 * lane, b = 2 * lane + 1;
    const int32_t na = a < W ? *routing_slot(p.local, s, p.off, parity, a).n : 0;
    const int32_t nb = b < W ? *routing_slot(p.local, s, p.off, parity, b).n : 0;
    if (a < W) tb.tokens[a] = na;
    if (b < W) tb.tokens[b] = nb;
    const int32_t cb = nb * K;
    int32_t sum = na * K + cb;
    for (int d = 1; d < 32; d *= 2) {
      const int32_t below = __shfl_up_sync(0xffffffffu, sum, d);
      if (lane >= d) sum += below;
    }
    if (lane == 0) cells_before[0] = 0;
    if (a < W) cells_before[a + 1] = sum - cb;
    if (b < W) cells_before[b + 1] = sum;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < cells_before[W]; i += blockDim.x) {
    int lo = 0, hi = W - 1;  // the source of cell i: the last r with cells_before[r] <= i
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (cells_before[mid] <= i) lo = mid; else hi = mid - 1;
    }
    const int source = lo;
    const int64_t cell = i - cells_before[source];
    const int32_t g = routing_slot(p.local, s, p.off, parity, source).ids[cell];
    if (g < 0) continue;
    const int t = static_cast<int>(cell / K);
    const uint32_t bit = 1u << (t % 32);
    atomicAdd(&tb.hist[source * E + g], 1);
    if (g / L == s.rank) atomicOr(&tb.masks_here[(int64_t)(source * L + g % L) * tb.words + t / 32], bit);
    if (source == s.rank) atomicOr(&tb.masks_own[(int64_t)g * tb.words + t / 32], bit);
  }
  __syncthreads();
  compute_placement(s, tb.hist, tb.written, tb.offsets, tb.before_here, tb.before_mine);
}

__device__ __forceinline__ int32_t rank_in_mask(const uint32_t* mask, int t) {
  int32_t below = __popc(mask[t / 32] & ((1u << (t % 32)) - 1));
  for (int w = 0; w < t / 32; ++w) below += __popc(mask[w]);
  return below;
}

// Items (token t, source, slice), token-major (the order the senders go in): this rank's
// rows of the token (lane k holds slot k); slice 0 writes their weights and row_expert, the
// plan entries combine reads, and, for this rank's own tokens, the first row on every
// destination; every slice then copies its columns of the staged row into each of the
// token's rows here (slice 0 also the scales). Returns false if a wait timed out.
__device__ bool place_staged_rows(const DispatchParams& p, uint64_t call, int parity, const PlanTables& tb, int warp,
                                  int warps, int lane, uint32_t& overflow) {
  const Sizes& s = p.sizes;
  const int W = s.world, K = s.top_k, L = s.local_experts, T = s.max_tokens;
  const int first_local = s.rank * L;
  int32_t* send_row = at<int32_t>(p.local, p.off.send_row);
  int32_t* row_of = at<int32_t>(p.local, p.off.row_of);
  int32_t* first_row = at<int32_t>(p.local, p.off.first_row);
  float* weights_out = at<float>(p.local, p.off.weights);
  int32_t* row_expert = at<int32_t>(p.local, p.off.row_expert);
  char* hidden = at<char>(p.local, p.off.hidden);
  float* scales = at<float>(p.local, p.off.scales);
  int max_n = 0;
  for (int r = 0; r < W; ++r) max_n = max(max_n, tb.tokens[r]);
  const int64_t pairs = (int64_t)max_n * W;
  const ColumnSlices<int64_t> slices = column_slices<int64_t>(pairs, warps, s.row_bytes / 16);

  for (int64_t item = warp; item < pairs * slices.count; item += warps) {
    const int64_t pair = item / slices.count;
    const int slice = static_cast<int>(item % slices.count);
    const bool first_slice = slice == 0;
    const int t = static_cast<int>(pair / W), source = static_cast<int>(pair % W);
    if (t >= tb.tokens[source]) continue;
    const RoutingSlotView slot = routing_slot(p.local, s, p.off, parity, source);
    const int64_t cell = ((int64_t)source * T + t) * K;
    const int32_t g = lane < K ? slot.ids[(int64_t)t * K + lane] : -1;
    int32_t row = -1;
    if (g >= first_local && g < first_local + L) {
      const int e = g - first_local;
      const int32_t j = tb.before_here[source * L + e] +
                        rank_in_mask(tb.masks_here + (int64_t)(source * L + e) * tb.words, t);
      row = row_slot(s, tb.written, tb.offsets, s.rank, e, j);
      if (first_slice && row < 0) ++overflow;
      if (first_slice && row >= 0) {
        weights_out[row] = slot.weights[(int64_t)t * K + lane];
        row_expert[row] = e;
      }
    }
    if (first_slice) {
      if (lane < K) row_of[cell + lane] = row;
      const int32_t first = __reduce_min_sync(0xffffffffu, row >= 0 ? row : INT_MAX);
      if (lane == 0) first_row[(int64_t)source * T + t] = first == INT_MAX ? -1 : first;
    }

    if (first_slice && source == s.rank) {  // as sender: the first row of token t on every destination
      int dest = -1;
      int32_t sent = -1;
      if (g >= 0) {
        dest = g / L;
        const int32_t j = tb.before_mine[g] + rank_in_mask(tb.masks_own + (int64_t)g * tb.words, t);
        sent = row_slot(s, tb.written, tb.offsets, dest, g % L, j);
      }
      for (int r = 0; r < W; ++r) {
        const int32_t lowest = __reduce_min_sync(0xffffffffu, dest == r && sent >= 0 ? sent : INT_MAX);
        if (lane == 0) send_row[(int64_t)t * W + r] = lowest == INT_MAX ? -1 : lowest;
      }
    }

    uint32_t filled = __ballot_sync(0xffffffffu, row >= 0);
    if (filled == 0) continue;
    if (!warp_acquire_flags(lane == 0, staged_flag(p.local, s, p.off, source, t), call, wait_context(p),
                            kPhaseDispatchPayload, source)) {
      return false;
    }
    // The slice's columns of the staged row are loaded once per round of kExpandUnroll
    // vectors a lane, then stored into every row of the token here.
    const auto [begin, end] = slices[slice];
    const char* staged = staged_row(p.local, s, p.off, parity, source, t);
    const int4* src = reinterpret_cast<const int4*>(staged);
    for (int64_t base = begin; base < end; base += 32 * kExpandUnroll) {  // warp-uniform
      int4 buf[kExpandUnroll];
#pragma unroll
      for (int u = 0; u < kExpandUnroll; ++u) {
        const int64_t v = base + 32 * u + lane;
        if (v < end) buf[u] = ptx::ld_global_v4(src + v);
      }
      for (uint32_t rows = filled; rows; rows &= rows - 1) {
        const int32_t to = __shfl_sync(0xffffffffu, row, __ffs(rows) - 1);
        int4* dst = reinterpret_cast<int4*>(hidden + (int64_t)to * s.row_bytes);
#pragma unroll
        for (int u = 0; u < kExpandUnroll; ++u) {
          const int64_t v = base + 32 * u + lane;
          if (v < end) ptx::st_global_v4(dst + v, buf[u]);
        }
      }
    }
    for (; first_slice && s.scale_cols && filled; filled &= filled - 1) {
      const int32_t to = __shfl_sync(0xffffffffu, row, __ffs(filled) - 1);
      warp_copy_words(scales + (int64_t)to * s.scale_cols, reinterpret_cast<const float*>(staged + s.row_bytes),
                      s.scale_cols, lane);
    }
  }
  return true;
}

// Rows no token fills this call: row_expert -1 (what the planned dispatch's publish
// resets every row to); contiguous padding rows (an expert's rows past its written ones,
// up to the next expert's offset) also get zero payload, scales and weight. Disjoint from
// the rows place_staged_rows writes, so the two need no ordering. `warp`/`warps`: global.
__device__ void clear_unfilled_rows(const DispatchParams& p, const PlanTables& tb, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  const int L = s.local_experts;
  const int32_t* written = tb.written + s.rank * L;
  const int32_t* offsets = tb.offsets + s.rank * (L + 1);
  int32_t* row_expert = at<int32_t>(p.local, p.off.row_expert);
  for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < s.slots; j += (int64_t)gridDim.x * blockDim.x) {
    bool filled = false;
    if (s.batched) {
      filled = j % s.capacity < written[j / s.capacity];
    } else {
      for (int e = 0; e < L; ++e) filled |= j >= offsets[e] && j < offsets[e] + written[e];
    }
    if (!filled) row_expert[j] = -1;
  }
  if (s.batched) return;
  char* hidden = at<char>(p.local, p.off.hidden);
  float* scales = at<float>(p.local, p.off.scales);
  float* weights_out = at<float>(p.local, p.off.weights);
  int64_t item = warp, base = 0;  // padding rows of all experts, numbered in expert order
  for (int e = 0; e < L; ++e) {
    const int32_t lo = offsets[e] + written[e], hi = offsets[e + 1];
    for (; item < base + (hi - lo); item += warps) {
      const int64_t row = lo + (item - base);
      int4* payload = reinterpret_cast<int4*>(hidden + row * s.row_bytes);
      for (int64_t v = lane; v < s.row_bytes / 16; v += 32) ptx::st_global_v4(payload + v, make_int4(0, 0, 0, 0));
      for (int i = lane; i < s.scale_cols; i += 32) scales[row * s.scale_cols + i] = 0.f;
      if (lane == 0) weights_out[row] = 0.f;
    }
    base += hi - lo;
  }
}

// Block 0: the counts and offsets outputs, and every source's n (combine reads it).
__device__ void write_counts(const DispatchParams& p, const PlanTables& tb) {
  const Sizes& s = p.sizes;
  const int L = s.local_experts;
  int32_t* tokens_per_expert = at<int32_t>(p.local, p.off.tokens_per_expert);
  int32_t* src_tokens = at<int32_t>(p.local, p.off.src_tokens);
  for (int e = threadIdx.x; e < L; e += blockDim.x) tokens_per_expert[e] = tb.written[s.rank * L + e];
  for (int r = threadIdx.x; r < s.world; r += blockDim.x) src_tokens[r] = tb.tokens[r];
  if (!s.batched) {
    int32_t* offsets_out = at<int32_t>(p.local, p.off.offsets);
    for (int e = threadIdx.x; e <= L; e += blockDim.x) offsets_out[e] = tb.offsets[s.rank * (L + 1) + e];
  }
}

}  // namespace hep::ll
