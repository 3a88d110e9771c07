// Combine kernels (see combine.cuh). One warp per token; each lane owns 8 columns
// (one 16-byte vector of bf16) at a time.
#include <cuda_bf16.h>

#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "kernels/combine.cuh"

namespace hep {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// A lane sums kVectors 16-byte columns at once (v, v+32, ...), loading kTermsInFlight
// terms (rows or partials) of each before the first add: 16 loads in flight per lane.
// The kernels are bound by memory latency, not bandwidth, at 24 SMs (NOTES.md #4).
constexpr int kVectors = 4;
constexpr int kTermsInFlight = 4;

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

// 1. Per (source, token) with rows here: the bf16 partial, written to the source.
__global__ void __launch_bounds__(kThreads) reduce_kernel(const __grid_constant__ CombineParams p) {
  const Sizes& s = p.sizes;
  const int W = s.world, K = s.top_k, T = s.max_tokens;
  const bool broken = timed_out_before(wait_context(p));
  const int parity = static_cast<int>(current_combine(p) & 1);
  const int32_t* src_tokens = at<const int32_t>(p.local, p.off.src_tokens);
  const int32_t* first_row = at<const int32_t>(p.local, p.off.first_row);
  const int32_t* row_of = at<const int32_t>(p.local, p.off.row_of);
  const float* weights = at<const float>(p.local, p.off.weights);
  const int lane = threadIdx.x % 32;
  const int vectors = s.hidden / 8;
  __shared__ const int4* warp_rows[kWarps][kMaxTopK];
  __shared__ float warp_weights[kWarps][kMaxTopK];

  for (int64_t item = blockIdx.x * (int64_t)kWarps + threadIdx.x / 32; !broken && item < (int64_t)W * T;
       item += (int64_t)gridDim.x * kWarps) {
    const int source = static_cast<int>(item / T), t = static_cast<int>(item % T);
    if (t >= src_tokens[source] || first_row[item] < 0) continue;
    // The token's rows here and their weights, ascending k, shared by the warp's lanes.
    const int4** rows = warp_rows[threadIdx.x / 32];
    float* row_weights = warp_weights[threadIdx.x / 32];
    __syncwarp();
    const int32_t row = lane < K ? row_of[item * K + lane] : -1;
    const uint32_t valid = __ballot_sync(0xffffffffu, row >= 0);
    if (row >= 0) {
      const int j = __popc(valid & ((1u << lane) - 1));
      rows[j] = static_cast<const int4*>(p.y) + (int64_t)row * vectors;
      row_weights[j] = weights[row];
    }
    __syncwarp();
    int4* dst = reinterpret_cast<int4*>(partials(p.peers[source], s, p.off, parity, s.rank, t));
    sum_rows<true>(dst, rows, row_weights, __popc(valid), p.weighted, vectors, lane);
  }
  // Publishes this block's partials to every source; acquired by gather_kernel there.
  __syncthreads();
  if (!broken && threadIdx.x < W) {
    ptx::fence_acq_rel_sys();
    ptx::red_add_release_sys(at<uint64_t>(p.peers[threadIdx.x], p.off.combine_arrivals) + s.rank, 1);
  }
}

// 2. Per token of this rank: the sum of its partials in ascending destination rank.
__global__ void __launch_bounds__(kThreads) gather_kernel(const __grid_constant__ CombineParams p) {
  const Sizes& s = p.sizes;
  const int W = s.world;
  const uint64_t combine = current_combine(p);
  const int parity = static_cast<int>(combine & 1);
  const bool ok = block_wait_all_peers(at<uint64_t>(p.local, p.off.combine_arrivals), W,
                                       combine * static_cast<uint64_t>(p.send_blocks), wait_context(p), kPhaseCombinePartials);
  const int n = at<const int32_t>(p.local, p.off.src_tokens)[s.rank];
  __shared__ const int4* warp_terms[kWarps][kMaxRanks];
  const int32_t* send_row = at<const int32_t>(p.local, p.off.send_row);
  const int lane = threadIdx.x % 32;
  const int vectors = s.hidden / 8;

  for (int t = blockIdx.x * kWarps + threadIdx.x / 32; ok && t < p.num_rows; t += gridDim.x * kWarps) {
    int4* dst = reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(p.out) + (int64_t)t * s.hidden);
    // The partials of token t, ascending destination rank (ranks without rows of t
    // wrote none: skipping them equals adding +0.0).
    const int4** terms = warp_terms[threadIdx.x / 32];
    int count = 0;
    __syncwarp();
    for (int base = 0; base < W; base += 32) {
      const int r = base + lane;
      const bool has_rows = t < n && r < W && send_row[(int64_t)t * W + r] >= 0;
      const uint32_t holders = __ballot_sync(0xffffffffu, has_rows);
      if (has_rows) {
        terms[count + __popc(holders & ((1u << lane) - 1))] =
            reinterpret_cast<const int4*>(partials(p.local, s, p.off, parity, r, t));
      }
      count += __popc(holders);
    }
    __syncwarp();
    sum_rows<false>(dst, terms, nullptr, count, false, vectors, lane);
  }

  // End of the call: the last block advances the combine count.
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* done = at<uint32_t>(p.local, p.off.combine_epoch + 8);
    __threadfence();
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
      *done = 0;
      *at<uint64_t>(p.local, p.off.combine_epoch) = combine;
    }
  }
}

}  // namespace

cudaError_t launch_combine(const CombineParams& p, cudaStream_t stream) {
  reduce_kernel<<<p.send_blocks, kThreads, 0, stream>>>(p);
  gather_kernel<<<p.send_blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hep
