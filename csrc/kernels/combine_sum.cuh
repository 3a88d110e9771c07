// The SPEC's fixed-order sum of bf16 rows (docs/SPEC.md section 4), shared by combine's
// two roles (combine_reduce.cuh, combine_gather.cuh), and where the partials live. A warp
// sums; each lane owns 8 columns (one 16-byte vector of bf16) at a time. Device code only;
// the kernel is in combine.cu.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>

#include "common/ptx.cuh"
#include "kernels/combine.cuh"
#include "kernels/dispatch.cuh"

namespace hep::combining {

constexpr int kThreads = kCopyThreads;
constexpr int kWarps = kCopyWarps;
// A lane sums kVectors 16-byte columns at once (v, v+32, ...), loading kTermsInFlight
// terms (rows or partials) of each before the first add: 16 loads in flight per lane.
// At 24 SMs the kernel is bound by memory latency, not bandwidth: more loads in flight per
// lane is what shortens it (docs/DESIGN.md, "Loads in flight").
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

// The partial this rank sends to `source` (on another node) for its token t, summed
// here before the put: [parity][source][t], in the local workspace.
__device__ __forceinline__ __nv_bfloat16* net_partial(void* workspace, const Sizes& s, const WorkspaceOffsets& o,
                                                      int parity, int source, int token) {
  const int64_t row = ((int64_t)parity * s.world + source) * s.max_tokens + token;
  return at<__nv_bfloat16>(workspace, o.net_partials) + row * s.hidden;
}

}  // namespace hep::combining
