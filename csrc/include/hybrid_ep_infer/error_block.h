/*
 * The sticky error block (docs/SPEC.md section 6), one per context, in host-mapped memory.
 *
 * Kernels never fail loudly on bad data: they drop the offending item and add one
 * to its counter here with a system-scope atomic. The host reads the block without
 * synchronizing and raises from check_errors(). The Python package mirrors this
 * layout in hybrid_ep_infer/errors.py; a test compares the two.
 */
#ifndef HYBRID_EP_INFER_ERROR_BLOCK_H_
#define HYBRID_EP_INFER_ERROR_BLOCK_H_

#include <stdint.h>

/* Index of each counter in hep_error_block_t::counts. */
enum hep_error_kind {
  HEP_ERROR_INVALID_EXPERT_ID = 0,  /* id outside [-1, E): that (t, k) dropped */
  HEP_ERROR_REPEATED_EXPERT_ID = 1, /* id repeated within a token's row: the repeat dropped */
  HEP_ERROR_BAD_NUM_TOKENS = 2,     /* device num_tokens outside [0, m]: the rank sent nothing */
  HEP_ERROR_CAPACITY_OVERFLOW = 3,  /* a row landed at or past capacity: not written */
  HEP_ERROR_TIMEOUT = 4,            /* a bounded wait expired; see timeout_phase / timeout_peer */
  HEP_ERROR_STALE_COMBINE = 5,      /* combine routing != the latest dispatch's: output zeroed */
  HEP_ERROR_NUM_KINDS = 6,
};

typedef struct hep_error_block {
  uint32_t counts[HEP_ERROR_NUM_KINDS];
  uint32_t timeout_phase; /* which wait timed out first (a phase code of the kernel) */
  uint32_t timeout_peer;  /* the rank it waited for */
  uint32_t reserved;
} hep_error_block_t;

#ifdef __cplusplus
static_assert(sizeof(hep_error_block_t) == 36, "Python mirrors this layout: 9 x uint32");
#endif

#endif /* HYBRID_EP_INFER_ERROR_BLOCK_H_ */
