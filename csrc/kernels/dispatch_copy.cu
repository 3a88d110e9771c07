// Dispatch, second half: payload over NVLink and the per-expert copies (kernels 4-5
// of dispatch.cuh). One warp moves one token row with 16-byte vectors.
#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "kernels/dispatch.cuh"

namespace hep {
namespace {

constexpr int kCopyThreads = 512;
constexpr int kCopyWarps = kCopyThreads / 32;
// 16-byte loads in flight per lane before the first store: 4 keep the NVLink writes of
// the send kernel at the link rate; the local copies of expand want more (NOTES.md #4).
constexpr int kSendUnroll = 4;
constexpr int kExpandUnroll = 8;

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

__device__ __forceinline__ uint64_t call_epoch(const DispatchParams& p) {
  return *at<const uint64_t>(p.local, p.off.epoch) + 1;
}

// 4. Every (my token, destination) pair with a row there: one NVLink write of the row
// (and its FP8 scales) into its first row on the destination.
__global__ void __launch_bounds__(kCopyThreads) send_kernel(const __grid_constant__ DispatchParams p) {
  const Sizes& s = p.sizes;
  const int W = s.world;
  const bool broken = timed_out_before(wait_context(p));
  const int n = *at<const int32_t>(p.local, p.off.src_tokens + 4 * s.rank);
  const int32_t* send_row = at<const int32_t>(p.local, p.off.send_row);
  const int lane = threadIdx.x % 32;

  for (int64_t item = blockIdx.x * (int64_t)kCopyWarps + threadIdx.x / 32; !broken && item < (int64_t)n * W;
       item += (int64_t)gridDim.x * kCopyWarps) {
    const int t = static_cast<int>(item / W), r = static_cast<int>(item % W);
    const int32_t row = send_row[(int64_t)t * W + r];
    if (row < 0) continue;
    char* dst = at<char>(p.peers[r], p.off.hidden) + row * s.row_bytes;
    warp_copy<true, kSendUnroll>(dst, static_cast<const char*>(p.x) + t * s.row_bytes, s.row_bytes, lane);
    if (s.scale_cols) {
      warp_copy_words(at<float>(p.peers[r], p.off.scales) + (int64_t)row * s.scale_cols,
                      p.scales + (int64_t)t * s.scale_cols, s.scale_cols, lane);
    }
  }
  // Publishes this block's rows to every destination; acquired by expand_kernel there.
  __syncthreads();
  if (!broken && threadIdx.x < W) {
    ptx::fence_acq_rel_sys();
    ptx::red_add_release_sys(at<uint64_t>(p.peers[threadIdx.x], p.off.data_arrivals) + s.rank, 1);
  }
}

// 5. Once every sender's rows are here: copy each received token from the row it was
// written to into its other experts' rows. The last block to finish ends the call.
__global__ void __launch_bounds__(kCopyThreads) expand_kernel(const __grid_constant__ DispatchParams p) {
  const Sizes& s = p.sizes;
  const int W = s.world, K = s.top_k, T = s.max_tokens;
  const uint64_t epoch = call_epoch(p);
  const bool ok = block_wait_all_peers(at<uint64_t>(p.local, p.off.data_arrivals), W,
                                       epoch * static_cast<uint64_t>(p.send_blocks), wait_context(p), kPhaseDispatchPayload);
  const int32_t* src_tokens = at<const int32_t>(p.local, p.off.src_tokens);
  const int32_t* first_row = at<const int32_t>(p.local, p.off.first_row);
  const int32_t* row_of = at<const int32_t>(p.local, p.off.row_of);
  char* hidden = at<char>(p.local, p.off.hidden);
  float* scales = at<float>(p.local, p.off.scales);
  const int lane = threadIdx.x % 32;

  for (int64_t item = blockIdx.x * (int64_t)kCopyWarps + threadIdx.x / 32; ok && item < (int64_t)W * T;
       item += (int64_t)gridDim.x * kCopyWarps) {
    const int source = static_cast<int>(item / T), t = static_cast<int>(item % T);
    if (t >= src_tokens[source]) continue;
    const int32_t first = first_row[item];
    if (first < 0) continue;
    for (int k = 0; k < K; ++k) {
      const int32_t row = row_of[item * K + k];
      if (row < 0 || row == first) continue;
      warp_copy<false, kExpandUnroll>(hidden + row * s.row_bytes, hidden + first * s.row_bytes, s.row_bytes, lane);
      if (s.scale_cols) {
        warp_copy_words(scales + (int64_t)row * s.scale_cols, scales + (int64_t)first * s.scale_cols, s.scale_cols, lane);
      }
    }
  }

  // End of the call: the last block advances the epoch (every block has read it).
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* done = at<uint32_t>(p.local, p.off.epoch + 8);
    __threadfence();
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
      *done = 0;
      *at<uint64_t>(p.local, p.off.epoch) = epoch;
    }
  }
}

}  // namespace

cudaError_t launch_copy_kernels(const DispatchParams& p, cudaStream_t stream) {
  send_kernel<<<p.send_blocks, kCopyThreads, 0, stream>>>(p);
  expand_kernel<<<p.send_blocks, kCopyThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hep
