// The combine kernel (see combine.cuh). One warp per token; each lane owns 8 columns
// (one 16-byte vector of bf16) at a time.
#include <cuda_bf16.h>

#include "common/phase_clock.cuh"
#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "kernels/combine.cuh"
#include "kernels/dispatch.cuh"
#include "kernels/peer_write.cuh"

namespace hep {
namespace {

constexpr int kThreads = kCopyThreads;
constexpr int kWarps = kCopyWarps;
// A lane sums kVectors 16-byte columns at once (v, v+32, ...), loading kTermsInFlight
// terms (rows or partials) of each before the first add: 16 loads in flight per lane.
// At 24 SMs the kernel is bound by memory latency, not bandwidth: more loads in flight per
// lane is what shortens it (docs/DESIGN.md, "Loads in flight").
constexpr int kVectors = 4;
constexpr int kTermsInFlight = 4;
constexpr int kMaxGatherSlices = 8;  // gather_tokens: column slices per token at small n
constexpr int kMaxReduceSlices = 8;  // reduce_tokens: column slices per chunk at small n
static_assert(kMarkCombineExited < phase_clock::kMarks, "every phase mark has a slot");

struct Float8 {
  float v[8];
};

__device__ __forceinline__ Float8 unpack_bf16x8(int4 packed) {
  Float8 f;
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __bfloat1622float2(h[i]);
    f.v[2 * i] = pair.x;
    f.v[2 * i + 1] = pair.y;
  }
  return f;
}

__device__ __forceinline__ int4 pack_bf16x8_rn(const Float8& f) {
  int4 packed;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f.v[2 * i], f.v[2 * i + 1]);
  return packed;
}

// acc[c] += (weighted ? term * w : term) over the 8 floats of each column, in order.
__device__ __forceinline__ void accumulate(Float8 (&acc)[kVectors], const int4 (&raw)[kVectors], float w,
                                           bool weighted) {
#pragma unroll
  for (int c = 0; c < kVectors; ++c) {
    const Float8 term = unpack_bf16x8(raw[c]);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[c].v[i] = __fadd_rn(acc[c].v[i], weighted ? __fmul_rn(term.v[i], w) : term.v[i]);
  }
}

// Sums `count` bf16 rows (row j at terms[j], ascending j, weight w[j] if weighted) into
// 16-byte columns v, v+32, ... of the calling lane and stores each column, rounded once,
// to dst. The SPEC's order holds per column: +0.0, then the terms in ascending j.
// kReadOnly: the rows were written before this kernel (y), so the non-coherent path is safe.
template <bool kReadOnly>
__device__ __forceinline__ void sum_rows(int4* dst, const int4* const* terms, const float* w, int count,
                                         bool weighted, int vectors, int lane) {
  for (int v0 = lane; v0 < vectors; v0 += 32 * kVectors) {
    Float8 acc[kVectors];
#pragma unroll
    for (int c = 0; c < kVectors; ++c) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[c].v[i] = 0.f;
    }
    for (int j0 = 0; j0 < count; j0 += kTermsInFlight) {
      int4 raw[kTermsInFlight][kVectors];
#pragma unroll
      for (int j = 0; j < kTermsInFlight; ++j) {
#pragma unroll
        for (int c = 0; c < kVectors; ++c) {
          const int v = v0 + 32 * c;
          if (j0 + j < count && v < vectors) {
            raw[j][c] = kReadOnly ? ptx::ld_nc_v4(terms[j0 + j] + v) : ptx::ld_global_v4(terms[j0 + j] + v);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kTermsInFlight; ++j) {
        if (j0 + j < count) accumulate(acc, raw[j], weighted ? w[j0 + j] : 1.f, weighted);
      }
    }
#pragma unroll
    for (int c = 0; c < kVectors; ++c) {
      if (v0 + 32 * c < vectors) ptx::st_global_v4(dst + v0 + 32 * c, pack_bf16x8_rn(acc[c]));
    }
  }
}

__device__ __forceinline__ __nv_bfloat16* partials(void* workspace, const Sizes& s, const WorkspaceOffsets& o,
                                                   int parity, int destination, int token) {
  const int64_t row = ((int64_t)parity * s.world + destination) * s.max_tokens + token;
  return at<__nv_bfloat16>(workspace, o.combine_partials) + row * s.hidden;
}

__device__ __forceinline__ uint64_t current_combine(const CombineParams& p) {
  return *at<const uint64_t>(p.local, p.off.combine_epoch) + 1;
}

// The partial this rank sends to `source` (on another node) for its token t, summed
// here before the put: [parity][source][t], in the local workspace.
__device__ __forceinline__ __nv_bfloat16* net_partial(void* workspace, const Sizes& s, const WorkspaceOffsets& o,
                                                      int parity, int source, int token) {
  const int64_t row = ((int64_t)parity * s.world + source) * s.max_tokens + token;
  return at<__nv_bfloat16>(workspace, o.net_partials) + row * s.hidden;
}

// Reduce role. Items (chunk c, source, column slice) in chunk-major order, sources rotated
// from rank + 1: per received token of the chunk, the slice's columns of the bf16 partial
// written into the source's partials; then one release of the chunk's flag there if any
// token of it had rows here, by the last of the chunk's slices to finish (a count per
// chunk in reduce_slices_done). A chunk is split into up to kMaxReduceSlices slices where
// the items are fewer than the warps (small n: one warp per token was most of the
// reduce's time). A source on another node gets each partial summed here, then put with
// the chunk's flag as the signal (chunks of one token there: hep_context_attach); those
// buffers keep one slice, as the put sends the whole row.
__device__ void reduce_tokens(const CombineParams& p, uint64_t combine, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  const int W = s.world, K = s.top_k, T = s.max_tokens, C = p.chunk_tokens;
  const int parity = static_cast<int>(combine & 1);
  const int32_t* src_tokens = at<const int32_t>(p.local, p.off.src_tokens);
  const int32_t* first_row = at<const int32_t>(p.local, p.off.first_row);
  const int32_t* row_of = at<const int32_t>(p.local, p.off.row_of);
  const float* weights = at<const float>(p.local, p.off.weights);
  const int vectors = s.hidden / 8;
  __shared__ const int4* warp_rows[kWarps][kMaxTopK];
  __shared__ float warp_weights[kWarps][kMaxTopK];
  const int4** rows = warp_rows[threadIdx.x / 32];
  float* row_weights = warp_weights[threadIdx.x / 32];
  int max_n = 0;
  for (int r = 0; r < W; ++r) max_n = max(max_n, src_tokens[r]);
  const int chunks = (max_n + C - 1) / C;
  const int64_t pairs = (int64_t)chunks * W;
  const int64_t warps_per_pair = warps / (pairs > 0 ? pairs : 1);
  const int slices = s.spans_nodes() || warps_per_pair < 1 ? 1
                     : warps_per_pair > kMaxReduceSlices ? kMaxReduceSlices : static_cast<int>(warps_per_pair);
  const int slice_vectors = (vectors + slices - 1) / slices;
  uint32_t* slices_done = at<uint32_t>(p.local, p.off.reduce_slices_done);

  for (int64_t item = warp; item < pairs * slices; item += warps) {
    const int64_t pair = item / slices;
    const int c = static_cast<int>(pair / W), source = (s.rank + 1 + static_cast<int>(pair % W)) % W;
    const int begin = min(vectors, static_cast<int>(item % slices) * slice_vectors);
    const int columns = min(vectors, begin + slice_vectors) - begin;
    const int end = min(src_tokens[source], (c + 1) * C);
    bool wrote = false;
    for (int t = c * C; t < end; ++t) {
      const int64_t token = (int64_t)source * T + t;
      if (first_row[token] < 0) continue;
      wrote = true;
      // The token's rows here and their weights, ascending k, shared by the warp's lanes.
      __syncwarp();
      const int32_t row = lane < K ? row_of[token * K + lane] : -1;
      const uint32_t valid = __ballot_sync(0xffffffffu, row >= 0);
      if (row >= 0) {
        const int j = __popc(valid & ((1u << lane) - 1));
        rows[j] = static_cast<const int4*>(p.y) + (int64_t)row * vectors + begin;
        row_weights[j] = weights[row];
      }
      __syncwarp();
      if (s.across_nodes(source)) {
        __nv_bfloat16* sum = net_partial(p.local, s, p.off, parity, source, t);
        sum_rows<true>(reinterpret_cast<int4*>(sum), rows, row_weights, __popc(valid), p.weighted, vectors, lane);
        __syncwarp();
        put_then_set_flag(partials(p.peers[source], s, p.off, parity, s.rank, t), sum, 2 * (int64_t)s.hidden,
                          at<uint64_t>(p.peers[source], p.off.combine_flags) + (int64_t)s.rank * T + c, combine,
                          source);
        continue;
      }
      int4* dst = reinterpret_cast<int4*>(partials(p.peers[source], s, p.off, parity, s.rank, t)) + begin;
      sum_rows<true>(dst, rows, row_weights, __popc(valid), p.weighted, columns, lane);
    }
    if (!wrote || s.across_nodes(source)) continue;  // the same in every lane
    if (slices > 1) {  // the last slice to finish the chunk releases its flag
      __syncwarp();
      bool last = false;
      if (lane == 0) {
        uint32_t* done = slices_done + (int64_t)source * T + c;
        ptx::fence_acq_rel_sys();  // this slice's partials before its count: the release below covers them
        last = atomicAdd(done, 1u) == static_cast<uint32_t>(slices - 1);
        if (last) {
          *done = 0;  // for the next combine (a later kernel)
          ptx::fence_acq_rel_sys();  // every other slice's partials before the release below
        }
      }
      if (!__shfl_sync(0xffffffffu, last, 0)) continue;
    }
    warp_release_flag(lane == 0, at<uint64_t>(p.peers[source], p.off.combine_flags) + (int64_t)s.rank * T + c,
                      combine);
  }
}

// The stale-combine check for token t of this rank (every lane calls it): its row of
// p.topk_idx, sanitized by the rule of routing_rules.cuh (lane k holds slot k: ids
// outside [0, E) and repeats of a lower slot's id become -1), against `published`, the
// ids the latest dispatch published for this rank. True if any slot differs.
__device__ __forceinline__ bool routing_differs(const CombineParams& p, const int32_t* published, int t, int lane) {
  const int K = p.sizes.top_k;
  int64_t id = -1;
  if (lane < K) {
    const int64_t at_k = (int64_t)t * K + lane;
    id = p.idx_is_int64 ? static_cast<const int64_t*>(p.topk_idx)[at_k]
                        : static_cast<int64_t>(static_cast<const int32_t*>(p.topk_idx)[at_k]);
  }
  const bool valid = lane < K && id >= 0 && id < p.sizes.num_experts;
  // Lanes without a valid id get keys no other lane has; a valid id is kept in the
  // lowest lane holding it.
  const unsigned long long key = valid ? static_cast<unsigned long long>(id) : (1ull << 63) | lane;
  const uint32_t same = __match_any_sync(0xffffffffu, key);
  const int32_t kept = valid && (same & ((1u << lane) - 1)) == 0 ? static_cast<int32_t>(id) : -1;
  return __any_sync(0xffffffffu, lane < K && kept != published[(int64_t)t * K + lane]);
}

// The stale-combine check over the gather warp's tokens t < n (t = warp, warp + warps, ...),
// before its sums; out of line, so that the sums keep their registers. Sets combine_stale
// on the first difference.
__device__ __noinline__ void check_routing(const CombineParams& p, int n, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  // This rank's routing as the latest dispatch (the epoch it ended with) published it.
  const int dispatch_parity = static_cast<int>(*at<const uint64_t>(p.local, p.off.epoch) & 1);
  const int32_t* published = routing_slot(p.local, s, p.off, dispatch_parity, s.rank).ids;
  for (int t = warp; t < min(n, p.num_rows); t += warps) {
    if (routing_differs(p, published, t, lane)) {
      if (lane == 0) atomicExch(at<uint32_t>(p.local, p.off.combine_stale), 1u);  // read by the last block
      return;
    }
  }
}

// Gather role. Items (token t of this rank, column slice), t-major: once the chunk of t
// from every destination with rows of t is here, the slice's columns of their sum in
// ascending destination rank (ranks without rows of t wrote none: skipping them equals
// adding +0.0). A token is split into up to kMaxGatherSlices slices, one warp each, where
// the tokens are fewer than the warps (small n: one warp per token was most of the
// gather's time). Returns false if a wait timed out.
__device__ bool gather_tokens(const CombineParams& p, uint64_t combine, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  const int W = s.world, T = s.max_tokens;
  const int parity = static_cast<int>(combine & 1);
  const int n = at<const int32_t>(p.local, p.off.src_tokens)[s.rank];
  const int32_t* send_row = at<const int32_t>(p.local, p.off.send_row);
  const uint64_t* flags = at<const uint64_t>(p.local, p.off.combine_flags);
  const int vectors = s.hidden / 8;
  __shared__ const int4* warp_terms[kWarps][kMaxRanks];
  const int4** terms = warp_terms[threadIdx.x / 32];
  if (p.topk_idx != nullptr) check_routing(p, n, warp, warps, lane);
  const int warps_per_token = warps / (p.num_rows > 0 ? p.num_rows : 1);
  const int slices = warps_per_token < 1 ? 1 : min(warps_per_token, kMaxGatherSlices);
  const int slice_vectors = (vectors + slices - 1) / slices;

  for (int64_t item = warp; item < (int64_t)p.num_rows * slices; item += warps) {
    const int t = static_cast<int>(item / slices);
    const int begin = min(vectors, static_cast<int>(item % slices) * slice_vectors);
    const int end = min(vectors, begin + slice_vectors);
    int count = 0;
    __syncwarp();
    for (int base = 0; base < W; base += 32) {
      const int r = base + lane;
      const bool has_rows = t < n && r < W && send_row[(int64_t)t * W + r] >= 0;
      const uint64_t* flag = flags + (int64_t)r * T + t / p.chunk_tokens;
      if (!warp_acquire_flags(has_rows, flag, combine, wait_context(p), kPhaseCombinePartials, r)) {
        return false;
      }
      const uint32_t holders = __ballot_sync(0xffffffffu, has_rows);
      if (has_rows) terms[count + __popc(holders & ((1u << lane) - 1))] =
          reinterpret_cast<const int4*>(partials(p.local, s, p.off, parity, r, t)) + begin;
      count += __popc(holders);
    }
    __syncwarp();
    int4* dst = reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(p.out) + (int64_t)t * s.hidden) + begin;
    sum_rows<false>(dst, terms, nullptr, count, false, end - begin, lane);
  }
  return true;
}

// Both roles in one kernel, so the sums on the source overlap the transfer of partials;
// or one role per launch (the split halves).
__global__ void __launch_bounds__(kThreads) combine_kernel(const __grid_constant__ CombineParams p) {
  const Sizes& s = p.sizes;
  const int W = s.world;
  const uint64_t combine = current_combine(p);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x == 0) phase_clock::mark(kMarkCombineEntered);
  // A timed-out buffer writes no peer (a graph may replay after the host saw the timeout);
  // one read per block, so its threads take the same barriers.
  bool ok = !__syncthreads_or(threadIdx.x == 0 && timed_out_before(wait_context(p)));
  if (ok && p.roles == kCombineReduce && p.topk_idx != nullptr) {  // the send half checks the routing
    const int n = at<const int32_t>(p.local, p.off.src_tokens)[s.rank];
    check_routing(p, n, blockIdx.x * kWarps + warp, gridDim.x * kWarps, lane);
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
      reduce_tokens(p, combine, blockIdx.x * reduce_warps + warp, gridDim.x * reduce_warps, lane);
      if (lane == 0) phase_clock::mark(kMarkCombineReduced);
    } else {
      ok = gather_tokens(p, combine, blockIdx.x * gather_warps + warp - reduce_warps, gridDim.x * gather_warps, lane);
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
