// Routing validation (docs/SPEC.md section 6): the first kernel of every dispatch, also
// callable on its own. Torch-free launcher that returns a CUDA error code.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace hep {

struct ValidateRoutingParams {
  const void* topk_idx;              // [num_rows, top_k], int32 or int64
  bool idx_is_int64;
  int32_t num_rows;                  // m
  int32_t top_k;                     // K
  int32_t num_experts;               // E
  const int32_t* num_tokens_device;  // device n, or nullptr to use num_tokens_host
  int32_t num_tokens_host;
  int32_t* sanitized_idx;            // out [num_rows, top_k] int32
  uint32_t* error_counts;            // device view of hep_error_block_t::counts
};

cudaError_t launch_validate_routing(const ValidateRoutingParams& params, cudaStream_t stream);

}  // namespace hep
