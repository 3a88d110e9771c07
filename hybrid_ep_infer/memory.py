"""The bytes a buffer holds: the memory formula, written here once.

The README's "Memory per buffer" cites these two functions; ``tests/test_validation.py``
checks the first against the reference backend's tensors and ``tests/test_native.py``
both against the CUDA workspace that the compiled library lays out (``csrc/workspace.h``).
"""

from __future__ import annotations

from .config import CONTIGUOUS, BufferConfig


def output_bytes(config: BufferConfig) -> int:
    """The outputs every backend keeps between calls (all that the reference backend holds)."""
    c = config
    H, T, L = c.hidden, c.max_tokens, c.num_local_experts
    R = c.capacity if c.layout == CONTIGUOUS else L * c.capacity  # row slots
    s = c.itemsize  # payload bytes per element
    return (R * H * s  # dispatch payload
            + R * c.num_scale_blocks * 4  # FP8 scales (FP8 only: H/128 per row)
            + R * 8  # weights (fp32) and row_expert (int32)
            + L * 4  # tokens_per_expert
            + ((L + 1) * 4 if c.layout == CONTIGUOUS else 0)  # offsets (contiguous only)
            + T * H * 2)  # combine output (bf16)


def cuda_exchange_bytes(config: BufferConfig, low_latency: bool = False, across_nodes: bool = False) -> int:
    """What the CUDA backend's workspace holds besides the outputs, without the rounding of
    each region up to 128 bytes and a few counters (under 24 bytes per rank).
    ``low_latency``: with the low-latency dispatch's staging slots. ``across_nodes``
    (ranks_per_node below the group size): with the partials summed for other nodes."""
    c = config
    W, H, T, E, K = c.world_size, c.hidden, c.max_tokens, c.num_experts, c.top_k
    staged_row = H * c.itemsize + -(-c.num_scale_blocks * 4 // 16) * 16  # payload, FP8 scales 16-byte aligned
    staging = (2 * W * T * staged_row  # staged rows (two halves, written by peers)
               + 8 * W * T)  # a flag per staged row
    return (2 * W * T * H * 2  # combine partials (two halves, written by peers)
            + 2 * W * (16 + 8 * T * K)  # routing slots (two halves, written by peers)
            + 8 * W * T * K + 8 * W * T  # the dispatch plan (row of each (source, token, slot), first rows)
            + 4 * W * T  # combine's count of reduce slices done per chunk of tokens
            + 16 * W * T  # arrival flags per chunk of tokens (dispatch payload, combine partials)
            + 4 * W * E  # per-source expert histogram
            + (staging if low_latency else 0)
            + (2 * W * T * H * 2 if across_nodes else 0))  # partials for other nodes (two halves)
