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
#define HEP_API_VERSION 6

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

typedef enum hep_layout {
  HEP_LAYOUT_CONTIGUOUS = 0, /* hidden [capacity, H], per-expert offsets */
  HEP_LAYOUT_BATCHED = 1,    /* hidden [L, capacity, H] */
} hep_layout_t;

/* Everything a buffer is built for (docs/SPEC.md section 1). Versioned like the context config. */
typedef struct hep_buffer_desc {
  size_t size;
  uint32_t version;
  int32_t rank;
  int32_t world_size;   /* W */
  int32_t hidden;       /* H */
  int32_t max_tokens;   /* T_max */
  int32_t num_experts;  /* E = W * L */
  int32_t top_k;        /* K */
  int32_t payload_bytes; /* bytes per payload element: 2 (bf16) or 1 (FP8) */
  int32_t has_scales;   /* FP8: one fp32 scale per 128 elements travels with each row */
  hep_layout_t layout;
  int32_t pad_multiple; /* contiguous layout */
  int32_t capacity;     /* contiguous: total rows; batched: rows per expert */
  int32_t num_sms;      /* blocks of the copy kernels; fixed for the buffer's life */
  uint64_t timeout_ns;  /* bound on every wait for a peer */
  /* 1: the buffer also has the low-latency dispatch (hep_dispatch_path_t) and the
   * split halves; costs 2 * W * max_tokens staged rows per rank. 0: neither. */
  int32_t low_latency;
  /* G: ranks [i*G, (i+1)*G) form node i (an NVLink domain); 0 or world_size: one node.
   * Below world_size only the multi-node library (libhybrid_ep_infer_mn.so) takes it,
   * with low_latency = 1: ranks of other nodes are written through NVSHMEM (the
   * workspaces are then symmetric allocations, hep_mn_workspace_alloc); this library
   * answers HEP_NOT_SUPPORTED. */
  int32_t ranks_per_node;
} hep_buffer_desc_t;

/* Byte offsets of each region inside one rank's workspace (same on every rank).
 * Regions marked "peer-written" are written by other GPUs over NVLink. */
typedef struct hep_workspace_layout {
  size_t total_bytes;
  size_t hidden;            /* peer-written: [slots, H] payload */
  size_t scales;            /* peer-written: [slots, H/128] fp32 (FP8 only) */
  size_t weights;           /* [slots] fp32 */
  size_t row_expert;        /* [slots] int32 */
  size_t tokens_per_expert; /* [L] int32 */
  size_t offsets;           /* [L + 1] int32 (contiguous) */
  size_t combine_out;       /* [T_max, H] bf16 */
} hep_workspace_layout_t;

/* How hep_dispatch moves rows (hep_tuning_t::dispatch_path); every path gives the
 * same results bit for bit.
 *   PLANNED      routing exchange, then a global plan, then each row straight to its
 *                final rows on every destination (four kernels; best for large batches).
 *   LOW_LATENCY  each row goes to a staging slot on its destinations at once, before any
 *                plan; each destination then places its rows locally (one kernel; needs
 *                a buffer with low_latency = 1). */
typedef enum hep_dispatch_path {
  HEP_DISPATCH_PLANNED = 0,
  HEP_DISPATCH_LOW_LATENCY = 1,
} hep_dispatch_path_t;

/* Arguments of hep_dispatch and hep_dispatch_send; tensors row-major and contiguous on
 * the context's device. */
typedef struct hep_dispatch_args {
  const void* x;                     /* [m, H] payload */
  const float* scales;               /* [m, H/128] fp32 (FP8) or NULL */
  const void* topk_idx;              /* [m, K] int32/int64 */
  hep_index_dtype_t idx_dtype;
  const float* topk_weights;         /* [m, K] fp32 */
  int32_t num_rows;                  /* m */
  const int32_t* num_tokens_device;  /* n on the device, or NULL */
  int32_t num_tokens_host;           /* n when num_tokens_device is NULL */
} hep_dispatch_args_t;

/* Arguments of hep_combine. */
typedef struct hep_combine_args {
  const void* y;     /* expert outputs in the dispatch layout: [slots, H] bf16, contiguous */
  void* out;         /* [num_rows, H] bf16, contiguous */
  int32_t num_rows;  /* m of the matching dispatch */
  int32_t weighted;  /* multiply each row by its dispatched weight */
  /* The stale-combine check (optional; NULL: none): the routing [num_rows, K] of the
   * dispatch this combine is for. Its rows t < n, sanitized as dispatch does, must equal
   * those of the latest hep_dispatch on this context; if any differ, this rank's output
   * is all +0.0 and HEP_ERROR_STALE_COMBINE is counted once. The exchange runs as usual
   * either way (it is a collective). */
  const void* topk_idx;
  hep_index_dtype_t idx_dtype;
} hep_combine_args_t;

/* How the two copy kernels divide their work. Never changes results, but the chunk
 * sizes must be the same on every rank: set it on every rank to the same values,
 * between calls (the Python package's construction-time tuner does; rank 0 decides).
 * hep_context_attach sets the defaults. Calls already captured in a CUDA graph keep
 * the tuning they were captured with. */
typedef struct hep_tuning {
  size_t size;                   /* sizeof(hep_tuning_t) */
  uint32_t version;              /* HEP_API_VERSION */
  int32_t dispatch_send_warps;   /* of the 16 warps of a block, 1..15; the rest expand */
  int32_t dispatch_chunk_tokens; /* consecutive tokens a sender warp moves per flag release, >= 1 */
  int32_t combine_reduce_warps;  /* of 16, 1..15; the rest gather */
  int32_t combine_chunk_tokens;  /* consecutive tokens a reducer warp sums per flag release, >= 1 */
  int32_t dispatch_expand_tma;   /* 1: the per-expert copies go through the bulk copy engine; 0: warp copies */
  int32_t dispatch_send_tma;     /* 1: the NVLink writes go through the bulk copy engine; 0: warp copies */
  int32_t dispatch_path;         /* hep_dispatch_path_t of hep_dispatch (the send half is always LOW_LATENCY) */
} hep_tuning_t;

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

/* The workspace a buffer with this description needs, and where each output lives. */
HEP_API hep_status_t hep_workspace_layout(const hep_buffer_desc_t* desc, hep_workspace_layout_t* out);

/* Binds a buffer to the context: `workspaces[r]` is rank r's workspace as mapped in
 * this process (workspaces[desc->rank] is the local one), each of
 * hep_workspace_layout().total_bytes, zeroed before any rank's first call. The
 * context keeps the pointers; the caller keeps the memory alive until destroy.
 * Across nodes (ranks_per_node below world_size), a rank r on another node is given
 * this rank's own symmetric workspace (the address NVSHMEM translates for PE r). */
HEP_API hep_status_t hep_context_attach(hep_context_t* context, const hep_buffer_desc_t* desc,
                                        void* const* workspaces);

/* Sets or reads the attached buffer's tuning (see hep_tuning_t). */
HEP_API hep_status_t hep_context_set_tuning(hep_context_t* context, const hep_tuning_t* tuning);
HEP_API hep_status_t hep_context_get_tuning(hep_context_t* context, hep_tuning_t* out);

/* docs/SPEC.md sections 2-3 on the device: routing exchange, placement, payload transfer and
 * the per-expert copies, all asynchronous on `stream`; no host sync, no allocation. A
 * collective: every rank calls it in the same order. */
HEP_API hep_status_t hep_dispatch(hep_context_t* context, const hep_dispatch_args_t* args, uint64_t stream);

/* docs/SPEC.md section 4 on the device: per-destination partial sums in fixed order, one bf16
 * partial per (token, destination) over NVLink, summed by the source in ascending rank.
 * Uses the plan of the latest hep_dispatch on this context (see the stale-combine
 * check in hep_combine_args_t). A collective. */
HEP_API hep_status_t hep_combine(hep_context_t* context, const hep_combine_args_t* args, uint64_t stream);

/* Split halves, so that other work can run on the stream in between (for example
 * another micro-batch's experts). hep_dispatch_send + hep_dispatch_recv equals
 * hep_dispatch on the LOW_LATENCY path (the buffer needs low_latency = 1); hep_combine_send + hep_combine_recv equals
 * hep_combine. A send half waits for no peer: it writes this rank's routing and rows
 * (or partials) into its peers' workspaces and returns; the receive half waits for the
 * peers' and completes the op. Both are collectives, asynchronous on their stream, and
 * capturable in CUDA graphs. At most one half is pending per context: a send while one
 * is pending, a receive with none (or of the other op), and hep_dispatch/hep_combine
 * while one is pending are refused with HEP_INVALID_ARGUMENT. The inputs of a send may
 * be overwritten (in stream order) once it is enqueued; a dispatch's outputs and a
 * combine's `out` are complete after the receive. */
HEP_API hep_status_t hep_dispatch_send(hep_context_t* context, const hep_dispatch_args_t* args, uint64_t stream);
HEP_API hep_status_t hep_dispatch_recv(hep_context_t* context, uint64_t stream);
HEP_API hep_status_t hep_combine_send(hep_context_t* context, const hep_combine_args_t* args, uint64_t stream);
HEP_API hep_status_t hep_combine_recv(hep_context_t* context, uint64_t stream);

#ifdef __cplusplus
}
#endif

#endif /* HYBRID_EP_INFER_H_ */
