// Row copies by one warp: 16-byte vectors, several loads in flight per lane.
#pragma once

#include <cstdint>

#include "common/ptx.cuh"

namespace hep {

// Copies `bytes` (a multiple of 16) from src to dst with the calling warp.
template <bool kSourceReadOnly, int kUnroll>
__device__ __forceinline__ void warp_copy(char* dst, const char* src, int64_t bytes, int lane) {
  const int64_t vectors = bytes / 16;
  int4* d = reinterpret_cast<int4*>(dst);
  const int4* s = reinterpret_cast<const int4*>(src);
  int64_t v = lane;
  for (; v + 32 * (kUnroll - 1) < vectors; v += 32 * kUnroll) {
    int4 buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) buf[u] = kSourceReadOnly ? ptx::ld_nc_v4(s + v + 32 * u) : ptx::ld_global_v4(s + v + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) ptx::st_global_v4(d + v + 32 * u, buf[u]);
  }
  for (; v < vectors; v += 32) ptx::st_global_v4(d + v, kSourceReadOnly ? ptx::ld_nc_v4(s + v) : ptx::ld_global_v4(s + v));
}

// Copies `words` 4-byte words (FP8 scale rows: H/128 of them, not always a multiple of 4).
__device__ __forceinline__ void warp_copy_words(float* dst, const float* src, int64_t words, int lane) {
  for (int64_t i = lane; i < words; i += 32) dst[i] = src[i];
}

}  // namespace hep
