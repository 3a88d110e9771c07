// Which warp takes which item. Every role hands its items (tokens, rows, chunks, column
// slices) to warps by one global warp index. Numbered SM-first (the warp within its block
// times the blocks, plus the block), consecutive items run on different SMs: a few items
// (small n) then use as many SMs as there are items, instead of all landing on the first
// block, where that one SM's writes set the time.
#pragma once

namespace hep {

// The calling warp's global index, counted over the blocks from `first_block` on (blocks
// before it have other roles); `warp_in_block` is its index within the role's warps of
// its block.
__device__ __forceinline__ int spread_warp(int warp_in_block, int first_block = 0) {
  return warp_in_block * (static_cast<int>(gridDim.x) - first_block) + (static_cast<int>(blockIdx.x) - first_block);
}

}  // namespace hep
