// Combine's reduce role, the send half (see combine.cuh). Device code only; the kernel is
// in combine.cu.
#pragma once

#include <cstdint>

#include "common/column_slices.cuh"
#include "common/ptx.cuh"
#include "common/wait.cuh"
#include "kernels/combine_sum.cuh"
#include "kernels/peer_write.cuh"

namespace hep::combining {

// Reduce role. Items (chunk c, source, column slice) in chunk-major order, sources rotated
// from rank + 1: per received token of the chunk, the slice's columns of the bf16 partial
// written into the source's partials; then one release of the chunk's flag there if any
// token of it had rows here, by the last of the chunk's slices to finish (a count per
// chunk in reduce_slices_done). A chunk is split into up to kMaxColumnSlices slices where
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
  const ColumnSlices<int> slices =
      column_slices(static_cast<int>(pairs), warps, vectors, s.spans_nodes() ? 1 : kMaxColumnSlices);
  uint32_t* slices_done = at<uint32_t>(p.local, p.off.reduce_slices_done);

  for (int64_t item = warp; item < pairs * slices.count; item += warps) {
    const int64_t pair = item / slices.count;
    const int c = static_cast<int>(pair / W), source = (s.rank + 1 + static_cast<int>(pair % W)) % W;
    const auto [begin, end_column] = slices[static_cast<int>(item % slices.count)];
    const int columns = end_column - begin;
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
    if (slices.count > 1) {  // the last slice to finish the chunk releases its flag
      __syncwarp();
      bool last = false;
      if (lane == 0) {
        uint32_t* done = slices_done + (int64_t)source * T + c;
        ptx::fence_acq_rel_sys();  // this slice's partials before its count: the release below covers them
        last = atomicAdd(done, 1u) == static_cast<uint32_t>(slices.count - 1);
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

}  // namespace hep::combining
