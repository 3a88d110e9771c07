#include "kernels/validate_routing.cuh"

#include "hybrid_ep_infer/error_block.h"
#include "kernels/routing_rules.cuh"

namespace hep {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kMaxBlocks = 1024;

// One thread per token row. Rows >= n are written as -1 without being read.
template <typename IndexT>
__global__ void __launch_bounds__(kThreadsPerBlock)
    validate_routing_kernel(const __grid_constant__ ValidateRoutingParams p) {
  int32_t n = p.num_tokens_host;
  if (p.num_tokens_device != nullptr) {
    n = *p.num_tokens_device;
    if (n < 0 || n > p.num_rows) {
      // The rank then sends nothing; counted once per call, by one thread.
      if (blockIdx.x == 0 && threadIdx.x == 0) atomicAdd_system(&p.error_counts[HEP_ERROR_BAD_NUM_TOKENS], 1u);
      n = 0;
    }
  }

  uint32_t invalid = 0, repeated = 0;
  const int K = p.top_k;
  const IndexT* ids = static_cast<const IndexT*>(p.topk_idx);
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < p.num_rows;
       t += (int64_t)gridDim.x * blockDim.x) {
    int32_t* out = p.sanitized_idx + t * K;
    if (t >= n) {
      for (int k = 0; k < K; ++k) out[k] = -1;
    } else {
      sanitize_row(ids + t * K, K, p.num_experts, out, invalid, repeated);  // reads back its own writes
    }
  }
  add_block_counts(invalid, repeated, &p.error_counts[HEP_ERROR_INVALID_EXPERT_ID],
                   &p.error_counts[HEP_ERROR_REPEATED_EXPERT_ID]);
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
