#include "kernels/validate_routing.cuh"

#include "hybrid_ep_infer/error_block.h"

namespace hep {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kMaxBlocks = 1024;

template <typename IndexT>
__device__ __forceinline__ int64_t load_id(const void* base, int64_t i) {
  return static_cast<int64_t>(static_cast<const IndexT*>(base)[i]);
}

// One thread per token row. Rows >= n are written as -1 without being read.
template <typename IndexT>
__global__ void __launch_bounds__(kThreadsPerBlock)
    validate_routing_kernel(const __grid_constant__ ValidateRoutingParams p) {
  __shared__ uint32_t block_counts[2];  // invalid, repeated
  if (threadIdx.x == 0) block_counts[0] = block_counts[1] = 0;

  int32_t n = p.num_tokens_host;
  if (p.num_tokens_device != nullptr) {
    n = *p.num_tokens_device;
    if (n < 0 || n > p.num_rows) {
      // The rank then sends nothing; counted once per call, by one thread.
      if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd_system(&p.error_counts[HEP_ERROR_BAD_NUM_TOKENS], 1u);
      n = 0;
    }
  }
  __syncthreads();

  uint32_t invalid = 0, repeated = 0;
  const int K = p.top_k;
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < p.num_rows;
       t += (int64_t)gridDim.x * blockDim.x) {
    int32_t* out = p.sanitized_idx + t * K;
    if (t >= n) {
      for (int k = 0; k < K; ++k) out[k] = -1;
      continue;
    }
    for (int k = 0; k < K; ++k) {
      const int64_t id = load_id<IndexT>(p.topk_idx, t * K + k);
      int32_t kept = -1;
      if (id < -1 || id >= p.num_experts) {
        ++invalid;
      } else if (id >= 0) {
        bool seen = false;
        for (int j = 0; j < k; ++j) seen |= (out[j] == id);  // this thread's own earlier writes
        if (seen) ++repeated; else kept = static_cast<int32_t>(id);
      }
      out[k] = kept;
    }
  }

  // Block-wide sums first, so the host-mapped counters see one atomic per block.
  invalid = __reduce_add_sync(0xffffffffu, invalid);
  repeated = __reduce_add_sync(0xffffffffu, repeated);
  if (threadIdx.x % 32 == 0) {
    if (invalid) atomicAdd(&block_counts[0], invalid);
    if (repeated) atomicAdd(&block_counts[1], repeated);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (block_counts[0]) atomicAdd_system(&p.error_counts[HEP_ERROR_INVALID_EXPERT_ID], block_counts[0]);
    if (block_counts[1]) atomicAdd_system(&p.error_counts[HEP_ERROR_REPEATED_EXPERT_ID], block_counts[1]);
  }
}

}  // namespace

cudaError_t launch_validate_routing(const ValidateRoutingParams& params, cudaStream_t stream) {
  // At least one block, so a device n is checked even when m == 0.
  int blocks = (params.num_rows + kThreadsPerBlock - 1) / kThreadsPerBlock;
  blocks = blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
  if (params.idx_is_int64) {
    validate_routing_kernel<int64_t><<<blocks, kThreadsPerBlock, 0, stream>>>(params);
  } else {
    validate_routing_kernel<int32_t><<<blocks, kThreadsPerBlock, 0, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace hep
