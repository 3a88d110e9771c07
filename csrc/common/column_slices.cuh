// Column slices: where a role has fewer items (tokens, chunks) than warps, each item's
// columns are split among up to kMaxColumnSlices warps, so that one warp does not work
// through a whole row alone while the others idle. Every column gets the same work in the
// same order as with one slice, so results do not change.
#pragma once

#include <cstdint>

namespace hep {

constexpr int kMaxColumnSlices = 8;

template <typename Int>
struct ColumnRange {
  Int begin, end;
};

// An item's `columns` columns split into `count` slices of `width` (the last may be
// narrower, or empty). Int is the caller's index type (32-bit indices keep combine's
// registers).
template <typename Int>
struct ColumnSlices {
  int count;
  Int columns, width;

  // Slice `slice`: columns [begin, end).
  __device__ __forceinline__ ColumnRange<Int> operator[](int slice) const {
    const Int begin = min(columns, slice * width);
    return {begin, min(columns, begin + width)};
  }
};

// The slices of each of `items` items taken by `warps` warps: as many as the warps allow,
// at most `max_slices`, at least 1.
template <typename Int>
__device__ __forceinline__ ColumnSlices<Int> column_slices(Int items, Int warps, Int columns,
                                                           int max_slices = kMaxColumnSlices) {
  const Int per_item = warps / (items > 0 ? items : 1);
  const int count = per_item < 1 ? 1 : per_item > max_slices ? max_slices : static_cast<int>(per_item);
  return {count, columns, (columns + count - 1) / count};
}

}  // namespace hep
