// Status plumbing for the C interfaces: the per-thread last-error string (status.cpp)
// and the macros that turn a failed check or CUDA call into a returned hep_status_t.
#pragma once

#include <cuda_runtime.h>

#include "hybrid_ep_infer/hybrid_ep_infer.h"

namespace hep {

// Formats into the calling thread's last-error string (printf-style).
void set_last_error(const char* format, ...) __attribute__((format(printf, 1, 2)));
void clear_last_error();
const char* last_error();  // the calling thread's ("" if none)

}  // namespace hep

// Returns HEP_INVALID_ARGUMENT with a message when `cond` is false.
#define HEP_REQUIRE(cond, ...)             \
  do {                                     \
    if (!(cond)) {                         \
      ::hep::set_last_error(__VA_ARGS__);  \
      return HEP_INVALID_ARGUMENT;         \
    }                                      \
  } while (0)

// Returns HEP_CUDA_ERROR naming the call and CUDA's reason when `call` fails.
#define HEP_CUDA_CALL(call)                                                                      \
  do {                                                                                           \
    cudaError_t hep_err_ = (call);                                                               \
    if (hep_err_ != cudaSuccess) {                                                               \
      ::hep::set_last_error("%s failed: %s (%s:%d)", #call, cudaGetErrorString(hep_err_), __FILE__, \
                            __LINE__);                                                           \
      return HEP_CUDA_ERROR;                                                                     \
    }                                                                                            \
  } while (0)
