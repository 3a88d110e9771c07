// Dispatch, second half: the payload over NVLink and the per-expert copies, in one
// kernel (kernel 4 of dispatch.cuh). Each block's warps have one of two roles, so the
// copies on this GPU overlap the transfer instead of waiting for all of it:
//
//   senders    one warp per chunk of C consecutive tokens of this rank: each row (and FP8
//              scales) into its first row on every destination that has one, then one
//              release of the chunk's flag on each destination that got a row of it
//              (a release waits for the warp's NVLink writes, so fewer is cheaper).
//   expanders  one warp per received (token, source), in token order (the order the
//              senders go in): acquire the token's chunk flag, then copy the row from its
//              first row into its other experts' rows here (the fused permute).
//
// The split of warps between roles, C, and whether each role moves rows with warp
// copies or through the bulk copy engine come from the tuning (hep_tuning_t).
//
// An expander waits for every token that lands here, even one with a single row, so
// the call's outputs are complete when the kernel ends.
#include "common/ptx.cuh"
#include "common/tma.cuh"
#include "common/wait.cuh"
#include "common/warp_copy.cuh"
#include "kernels/dispatch.cuh"

namespace hep {
namespace {

constexpr int kThreads = kCopyThreads;
constexpr int kWarps = kCopyWarps;
// 16-byte loads in flight per lane before the first store: 4 keep the NVLink writes near
// the link rate (8 spilled registers when tried); the local copies use 8, as fast as 4,
// while 16 measured slower (docs/DESIGN.md, "Loads in flight").
constexpr int kSendUnroll = 4;
constexpr int kExpandUnroll = 8;
// The copy-engine paths (tuning.dispatch_send_tma, dispatch_expand_tma): per warp a ring
// of two shared-memory stages; one load of a row piece, then one bulk store per row it
// goes to. 16 warps x 2 x 7 KB (+ barriers) = 229,632 bytes fit in a block's 227 KB.
constexpr int kStages = 2;
constexpr int kStageBytes = 7168;

// Chunks c = warp, warp + warps, ... of this rank's tokens: one NVLink write per token
// and destination with a row of it, destinations rotated from rank + 1 so the ranks'
// warps start on different links; then one release per destination that got a row.
__device__ void send_tokens(const DispatchParams& p, uint64_t call, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  const int W = s.world, T = s.max_tokens, C = p.chunk_tokens;
  const int n = *at<const int32_t>(p.local, p.off.src_tokens + 4 * s.rank);
  const int32_t* send_row = at<const int32_t>(p.local, p.off.send_row);
  const int chunks = (n + C - 1) / C;
  for (int c = warp; c < chunks; c += warps) {
    uint64_t got_rows = 0;  // bit r: destination r got a row of this chunk (same in every lane)
    for (int t = c * C; t < min(n, (c + 1) * C); ++t) {
      const int32_t* rows = send_row + (int64_t)t * W;
      for (int i = 1; i <= W; ++i) {
        const int r = (s.rank + i) % W;
        const int32_t row = rows[r];
        if (row < 0) continue;
        got_rows |= 1ull << r;
        warp_copy<true, kSendUnroll>(at<char>(p.peers[r], p.off.hidden) + row * s.row_bytes,
                                     static_cast<const char*>(p.x) + t * s.row_bytes, s.row_bytes, lane);
        if (s.scale_cols) {
          warp_copy_words(at<float>(p.peers[r], p.off.scales) + (int64_t)row * s.scale_cols,
                          p.scales + (int64_t)t * s.scale_cols, s.scale_cols, lane);
        }
      }
    }
    // Lanes 0..W-1 (then 32..63, ...) release the chunk's flag on their destination.
    for (int base = 0; base < W; base += 32) {
      const int r = base + lane;
      const bool signal = r < W && ((got_rows >> r) & 1);
      warp_release_flag(signal, signal ? at<uint64_t>(p.peers[r], p.off.data_flags) + (int64_t)s.rank * T + c : nullptr,
                        call);
    }
  }
}

// send_tokens through the copy engine: lane 0 loads each row piece into one of the
// warp's two stages and writes it to every destination with one bulk store each; the
// next piece loads while those stores drain. Before a chunk's releases lane 0 waits for
// its bulk stores to complete and fences them (async proxy) before the release (generic
// proxy), so a reader that acquires the flag sees the rows. FP8 scales go with warp
// copies. Returns false if a wait timed out. `ring`/`bars`: this warp's stages.
__device__ bool send_tokens_tma(const DispatchParams& p, uint64_t call, int warp, int warps, int lane, char* ring,
                                uint64_t* bars) {
  const Sizes& s = p.sizes;
  const int W = s.world, T = s.max_tokens, C = p.chunk_tokens;
  const int n = *at<const int32_t>(p.local, p.off.src_tokens + 4 * s.rank);
  const int32_t* send_row = at<const int32_t>(p.local, p.off.send_row);
  const int chunks = (n + C - 1) / C;
  uint32_t parity = 0;  // bit i: the phase stage i waits for next
  int stage = 0;
  bool ok = true;
  for (int c = warp; ok && c < chunks; c += warps) {
    uint64_t got_rows = 0;  // bit r: destination r got a row of this chunk (same in every lane)
    for (int t = c * C; t < min(n, (c + 1) * C); ++t) {
      const int32_t* rows = send_row + (int64_t)t * W;
      uint64_t dests = 0;
      for (int r = 0; r < W; ++r) dests |= static_cast<uint64_t>(rows[r] >= 0) << r;
      if (dests == 0) continue;
      got_rows |= dests;
      if (lane == 0) {
        const char* src = static_cast<const char*>(p.x) + t * s.row_bytes;
        for (int64_t off = 0; off < s.row_bytes; off += kStageBytes) {
          const uint32_t bytes = static_cast<uint32_t>(min(static_cast<int64_t>(kStageBytes), s.row_bytes - off));
          char* piece = ring + stage * kStageBytes;
          tma::wait_group_read<kStages - 1>();  // this stage's last stores have read it
          tma::load(piece, src + off, bytes, &bars[stage]);
          ok = tma::mbarrier_wait(&bars[stage], (parity >> stage) & 1, wait_context(p), kPhaseDispatchPayload, s.rank);
          parity ^= 1u << stage;
          if (!ok) break;
          for (int i = 1; i <= W; ++i) {  // rotated from rank + 1, as send_tokens
            const int r = (s.rank + i) % W;
            if ((dests >> r) & 1) tma::store(at<char>(p.peers[r], p.off.hidden) + rows[r] * s.row_bytes + off, piece, bytes);
          }
          tma::commit_group();
          stage ^= 1;
        }
      }
      ok = __shfl_sync(0xffffffffu, ok, 0);
      if (!ok) break;
      if (s.scale_cols) {
        for (int r = 0; r < W; ++r) {
          if (rows[r] < 0) continue;
          warp_copy_words(at<float>(p.peers[r], p.off.scales) + (int64_t)rows[r] * s.scale_cols,
                          p.scales + (int64_t)t * s.scale_cols, s.scale_cols, lane);
        }
      }
    }
    if (!ok) break;
    if (lane == 0) {
      tma::wait_all();                   // the chunk's bulk stores are complete ...
      tma::fence_proxy_async_global();   // ... and ordered before the generic-proxy release below
    }
    for (int base = 0; base < W; base += 32) {  // warp_release_flag starts with __syncwarp
      const int r = base + lane;
      const bool signal = r < W && ((got_rows >> r) & 1);
      warp_release_flag(signal, signal ? at<uint64_t>(p.peers[r], p.off.data_flags) + (int64_t)s.rank * T + c : nullptr,
                        call);
    }
  }
  if (lane == 0) tma::wait_all();  // the stages are free before the warp ends
  __syncwarp();
  return ok;
}

// Items (t, source) in token-major order: once source's chunk of token t is here, copy
// t from its first row into its other rows. Returns false if a wait timed out.
__device__ bool expand_tokens(const DispatchParams& p, uint64_t call, int warp, int warps, int lane) {
  const Sizes& s = p.sizes;
  const int W = s.world, K = s.top_k, T = s.max_tokens;
  const int32_t* src_tokens = at<const int32_t>(p.local, p.off.src_tokens);
  const int32_t* first_row = at<const int32_t>(p.local, p.off.first_row);
  const int32_t* row_of = at<const int32_t>(p.local, p.off.row_of);
  const uint64_t* flags = at<const uint64_t>(p.local, p.off.data_flags);
  char* hidden = at<char>(p.local, p.off.hidden);
  float* scales = at<float>(p.local, p.off.scales);
  int max_n = 0;
  for (int r = 0; r < W; ++r) max_n = max(max_n, src_tokens[r]);

  for (int64_t item = warp; item < (int64_t)max_n * W; item += warps) {
    const int t = static_cast<int>(item / W), source = static_cast<int>(item % W);
    if (t >= src_tokens[source]) continue;
    const int64_t token = (int64_t)source * T + t;
    const int32_t first = first_row[token];
    if (first < 0) continue;
    const uint64_t* flag = flags + (int64_t)source * T + t / p.chunk_tokens;
    if (!warp_acquire_flags(lane == 0, flag, call, wait_context(p), kPhaseDispatchPayload, source)) {
      return false;
    }
    for (int k = 0; k < K; ++k) {
      const int32_t row = row_of[token * K + k];
      if (row < 0 || row == first) continue;
      warp_copy<false, kExpandUnroll>(hidden + row * s.row_bytes, hidden + first * s.row_bytes, s.row_bytes, lane);
      if (s.scale_cols) {
        warp_copy_words(scales + (int64_t)row * s.scale_cols, scales + (int64_t)first * s.scale_cols, s.scale_cols, lane);
      }
    }
  }
  return true;
}

// expand_tokens through the copy engine: lane 0 of the warp moves the rows, piece by
// piece through its two stages (a piece's stores overlap the next piece's load).
// `ring` is this warp's kStages stages, `bars` their mbarriers (initialized).
__device__ bool expand_tokens_tma(const DispatchParams& p, uint64_t call, int warp, int warps, int lane, char* ring,
                                  uint64_t* bars) {
  const Sizes& s = p.sizes;
  const int W = s.world, K = s.top_k, T = s.max_tokens;
  const int32_t* src_tokens = at<const int32_t>(p.local, p.off.src_tokens);
  const int32_t* first_row = at<const int32_t>(p.local, p.off.first_row);
  const int32_t* row_of = at<const int32_t>(p.local, p.off.row_of);
  const uint64_t* flags = at<const uint64_t>(p.local, p.off.data_flags);
  char* hidden = at<char>(p.local, p.off.hidden);
  float* scales = at<float>(p.local, p.off.scales);
  int max_n = 0;
  for (int r = 0; r < W; ++r) max_n = max(max_n, src_tokens[r]);
  uint32_t parity = 0;  // bit i: the phase stage i waits for next
  int stage = 0;
  bool ok = true;

  for (int64_t item = warp; ok && item < (int64_t)max_n * W; item += warps) {
    const int t = static_cast<int>(item / W), source = static_cast<int>(item % W);
    if (t >= src_tokens[source]) continue;
    const int64_t token = (int64_t)source * T + t;
    const int32_t first = first_row[token];
    if (first < 0) continue;
    const uint64_t* flag = flags + (int64_t)source * T + t / p.chunk_tokens;
    if (!warp_acquire_flags(lane == 0, flag, call, wait_context(p), kPhaseDispatchPayload, source)) {
      ok = false;
      break;
    }
    int others = 0;
    for (int k = 0; k < K; ++k) {
      const int32_t row = row_of[token * K + k];
      others += row >= 0 && row != first;
    }
    if (others == 0) continue;
    if (lane == 0) {
      tma::fence_proxy_async_global();  // the peer's rows, acquired above, for the copy engine
      const char* src = hidden + first * s.row_bytes;
      for (int64_t off = 0; ok && off < s.row_bytes; off += kStageBytes) {
        const uint32_t bytes = static_cast<uint32_t>(min(static_cast<int64_t>(kStageBytes), s.row_bytes - off));
        char* piece = ring + stage * kStageBytes;
        tma::wait_group_read<kStages - 1>();  // this stage's last stores have read it
        tma::load(piece, src + off, bytes, &bars[stage]);
        ok = tma::mbarrier_wait(&bars[stage], (parity >> stage) & 1, wait_context(p), kPhaseDispatchPayload,
                                s.rank);
        parity ^= 1u << stage;
        if (!ok) break;
        for (int k = 0; k < K; ++k) {
          const int32_t row = row_of[token * K + k];
          if (row >= 0 && row != first) tma::store(hidden + row * s.row_bytes + off, piece, bytes);
        }
        tma::commit_group();
        stage ^= 1;
      }
    }
    ok = __shfl_sync(0xffffffffu, ok, 0);
    if (ok && s.scale_cols) {
      for (int k = 0; k < K; ++k) {
        const int32_t row = row_of[token * K + k];
        if (row < 0 || row == first) continue;
        warp_copy_words(scales + (int64_t)row * s.scale_cols, scales + (int64_t)first * s.scale_cols, s.scale_cols, lane);
      }
    }
  }
  if (lane == 0) tma::wait_all();  // the rows are written, and the stages free, before the warp ends
  __syncwarp();
  return ok;
}

__global__ void __launch_bounds__(kThreads, 1) transfer_kernel(const __grid_constant__ DispatchParams p) {
  const uint64_t call = *at<const uint64_t>(p.local, p.off.epoch) + 1;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (!timed_out_before(wait_context(p))) {  // else the buffer is dead: touch no peer
    const int send_warps = p.send_warps, expand_warps = kWarps - send_warps;
    const int expander = warp - send_warps;  // index among the block's expanders
    // Copy-engine paths: this warp's stages and mbarriers (the kernel is launched with
    // shared memory for every warp when either path is on).
    extern __shared__ __align__(128) char stages[];  // [kWarps][kStages][kStageBytes], then the barriers
    char* ring = stages + warp * kStages * kStageBytes;
    uint64_t* bars = reinterpret_cast<uint64_t*>(stages + kWarps * kStages * kStageBytes) + warp * kStages;
    const bool uses_ring = warp < send_warps ? p.send_tma : p.expand_tma;
    if (uses_ring) {
      if (lane == 0) {
        for (int i = 0; i < kStages; ++i) tma::mbarrier_init(&bars[i]);
        tma::fence_mbarrier_init();
      }
      __syncwarp();
    }
    if (warp < send_warps) {
      if (p.send_tma) {
        send_tokens_tma(p, call, blockIdx.x * send_warps + warp, gridDim.x * send_warps, lane, ring, bars);
      } else {
        send_tokens(p, call, blockIdx.x * send_warps + warp, gridDim.x * send_warps, lane);
      }
    } else if (p.expand_tma) {
      expand_tokens_tma(p, call, blockIdx.x * expand_warps + expander, gridDim.x * expand_warps, lane, ring, bars);
    } else {
      expand_tokens(p, call, blockIdx.x * expand_warps + expander, gridDim.x * expand_warps, lane);
    }
  }

  // End of the call: the last block advances the call counter (every block has read it).
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* done = at<uint32_t>(p.local, p.off.epoch + 8);
    __threadfence();
    if (atomicAdd(done, 1u) == gridDim.x - 1) {
      *done = 0;
      *at<uint64_t>(p.local, p.off.epoch) = call;
    }
  }
}

}  // namespace

// Dynamic shared memory of the copy-engine paths: two stages and their mbarriers per warp.
constexpr size_t kRingBytes = (size_t)kWarps * kStages * (kStageBytes + sizeof(uint64_t));

cudaError_t prepare_transfer_kernel() {
  return cudaFuncSetAttribute(transfer_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(kRingBytes));
}

cudaError_t launch_transfer_kernel(const DispatchParams& p, cudaStream_t stream) {
  const size_t shared = p.send_tma || p.expand_tma ? kRingBytes : 0;
  transfer_kernel<<<p.blocks, kThreads, shared, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace hep
