/*
 * hybrid_ep_infer: the C interface of the compiled library.
 *
 * Small on purpose: an opaque context, plain pointers and sizes, the CUDA stream
 * as an integer, status codes and a per-thread last-error string. No torch, no
 * Python: one build serves every torch and Python version (the Python package
 * loads it with ctypes).
 *
 * Every function returns hep_status_t. On failure, hep_last_error() describes
 * what went wrong in the calling thread. C++ exceptions never cross this
 * boundary.
 */
#ifndef HYBRID_EP_INFER_H_
#define HYBRID_EP_INFER_H_

#include <stddef.h>
#include <stdint.h>

#include "hybrid_ep_infer/error_block.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define HEP_API __attribute__((visibility("default")))
#else
#define HEP_API
#endif

/* Bumped whenever a struct or signature below changes; Python checks it at load. */
#define HEP_API_VERSION 1

typedef enum hep_status {
  HEP_SUCCESS = 0,
  HEP_INVALID_ARGUMENT = 1, /* a pointer, size or config field is out of range */
  HEP_CUDA_ERROR = 2,       /* a CUDA runtime call failed (no GPU, no driver, launch failure) */
  HEP_NOT_SUPPORTED = 3,    /* the device or build cannot do this (e.g. not sm_90) */
  HEP_INTERNAL_ERROR = 4,
} hep_status_t;

typedef enum hep_index_dtype {
  HEP_INDEX_INT32 = 0,
  HEP_INDEX_INT64 = 1,
} hep_index_dtype_t;

/* Versioned config: callers set size = sizeof(hep_context_config_t) and version =
 * HEP_API_VERSION, so the library can reject a mismatched caller instead of
 * reading garbage. */
typedef struct hep_context_config {
  size_t size;
  uint32_t version;
  int32_t device; /* CUDA device ordinal the context lives on */
} hep_context_config_t;

typedef struct hep_context hep_context_t; /* opaque */

/* Arguments of hep_validate_routing. Tensors are row-major and contiguous. */
typedef struct hep_validate_routing_args {
  const void* topk_idx;              /* [num_rows, top_k], int32 or int64 (idx_dtype) */
  hep_index_dtype_t idx_dtype;
  int32_t num_rows;                  /* m: rows allocated in topk_idx */
  int32_t top_k;                     /* K */
  int32_t num_experts;               /* E: valid ids are [0, E); -1 means "no expert" */
  const int32_t* num_tokens_device;  /* n on the device (1 element) or NULL */
  int32_t num_tokens_host;           /* n when num_tokens_device is NULL; 0 <= n <= m */
  int32_t* sanitized_idx;            /* out [num_rows, top_k] int32 */
} hep_validate_routing_args_t;

HEP_API int hep_api_version(void);
HEP_API const char* hep_version_string(void);
HEP_API const char* hep_status_string(hep_status_t status);
/* Description of the last failure in this thread ("" if none). */
HEP_API const char* hep_last_error(void);

HEP_API hep_status_t hep_context_create(const hep_context_config_t* config, hep_context_t** out);
/* Frees everything the context owns. NULL is accepted. */
HEP_API hep_status_t hep_context_destroy(hep_context_t* context);

/* The context's sticky error block, in host-mapped memory: the host reads it
 * without synchronizing; kernels add to it with system-scope atomics. */
HEP_API hep_status_t hep_context_error_block(hep_context_t* context, const hep_error_block_t** out);
/* Copies the error block into *out and clears it (each word atomically). */
HEP_API hep_status_t hep_context_take_errors(hep_context_t* context, hep_error_block_t* out);

/* SPEC section 6 routing validation, on the device: writes sanitized_idx with
 * every id that is kept, and -1 for "no expert", ids outside [-1, E), an id
 * repeated within its row (the first occurrence is kept) and every row >= n.
 * Rows >= n of topk_idx are never read. A device n outside [0, m] counts as
 * HEP_ERROR_BAD_NUM_TOKENS and is treated as 0. Counts go to the context's
 * error block. Asynchronous on `stream`; never synchronizes the host. */
HEP_API hep_status_t hep_validate_routing(hep_context_t* context, const hep_validate_routing_args_t* args,
                                          uint64_t stream);

#ifdef __cplusplus
}
#endif

#endif /* HYBRID_EP_INFER_H_ */
