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
constexpr int kLoadsInFlight = 8;  // 16-byte loads a lane issues before it needs the first

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
  __shared__ int32_t warp_rows[kWarps][kMaxTopK];
  __shared__ float warp_weights[kWarps][kMaxTopK];

  for (int64_t item = blockIdx.x * (int64_t)kWarps + threadIdx.x / 32; !broken && item < (int64_t)W * T;
       item += (int64_t)gridDim.x * kWarps) {
    const int source = static_cast<int>(item / T), t = static_cast<int>(item % T);
    if (t >= src_tokens[source] || first_row[item] < 0) continue;
    // The token's rows and weights in slot order, shared by the warp's lanes.
    int32_t* rows = warp_rows[threadIdx.x / 32];
    float* row_weights = warp_weights[threadIdx.x / 32];
    __syncwarp();
    if (lane < K) {
      rows[lane] = row_of[item * K + lane];
      row_weights[lane] = rows[lane] >= 0 ? weights[rows[lane]] : 0.f;
    }
    __syncwarp();
    int4* dst = reinterpret_cast<int4*>(partials(p.peers[source], s, p.off, parity, s.rank, t));
    const int4* y = static_cast<const int4*>(p.y);
    for (int v = lane; v < vectors; v += 32) {
      Float8 acc;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc.v[i] = 0.f;
      for (int k0 = 0; k0 < K; k0 += kLoadsInFlight) {
        // All loads of a group first (latency), then the sums in ascending k (the SPEC's order).
        int4 raw[kLoadsInFlight];
#pragma unroll
        for (int j = 0; j < kLoadsInFlight; ++j) {
          const int k = k0 + j;
          if (k < K && rows[k] >= 0) raw[j] = ptx::ld_nc_v4(y + (int64_t)rows[k] * vectors + v);
        }
#pragma unroll
        for (int j = 0; j < kLoadsInFlight; ++j) {
          const int k = k0 + j;
          if (k >= K || rows[k] < 0) continue;
          const Float8 term = unpack_bf16x8(raw[j]);
          const float w = row_weights[k];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc.v[i] = __fadd_rn(acc.v[i], p.weighted ? __fmul_rn(term.v[i], w) : term.v[i]);
        }
      }
      ptx::st_global_v4(dst + v, pack_bf16x8_rn(acc));
    }
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
  const int32_t* send_row = at<const int32_t>(p.local, p.off.send_row);
  const int lane = threadIdx.x % 32;
  const int vectors = s.hidden / 8;

  for (int t = blockIdx.x * kWarps + threadIdx.x / 32; ok && t < p.num_rows; t += gridDim.x * kWarps) {
    int4* dst = reinterpret_cast<int4*>(static_cast<__nv_bfloat16*>(p.out) + (int64_t)t * s.hidden);
    // Bit r: destination r holds a row of token t (W <= 64: two ballots).
    uint64_t holders = 0;
    for (int base = 0; base < W; base += 32) {
      const int r = base + lane;
      const bool has_rows = t < n && r < W && send_row[(int64_t)t * W + r] >= 0;
      holders |= (uint64_t)__ballot_sync(0xffffffffu, has_rows) << base;
    }
    for (int v = lane; v < vectors; v += 32) {
      Float8 acc;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc.v[i] = 0.f;
      for (uint64_t left = holders; left;) {
        // Loads of up to kLoadsInFlight partials first, then the sums in ascending rank.
        int4 raw[kLoadsInFlight];
        int taken = 0;
#pragma unroll
        for (int j = 0; j < kLoadsInFlight; ++j) {
          if (left == 0) break;
          const int r = __ffsll(static_cast<long long>(left)) - 1;
          left &= left - 1;
          raw[j] = ptx::ld_global_v4(reinterpret_cast<const int4*>(partials(p.local, s, p.off, parity, r, t)) + v);
          ++taken;
        }
#pragma unroll
        for (int j = 0; j < kLoadsInFlight; ++j) {
          if (j >= taken) break;
          const Float8 part = unpack_bf16x8(raw[j]);
#pragma unroll
          for (int i = 0; i < 8; ++i) acc.v[i] = __fadd_rn(acc.v[i], part.v[i]);
        }
      }
      ptx::st_global_v4(dst + v, pack_bf16x8_rn(acc));
    }
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
