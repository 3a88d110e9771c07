"""The sizes a buffer is built for (docs/SPEC.md section 1) and the shapes they imply.

Shared by every backend, so the reference and the CUDA backend agree on layout,
capacity and memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CONTIGUOUS = "contiguous"
BATCHED = "batched"
LAYOUTS = (CONTIGUOUS, BATCHED)

PAYLOAD_DTYPES = (torch.bfloat16, torch.float8_e4m3fn, torch.uint8)
FP8_BLOCK = 128  # elements per FP8 scale (docs/SPEC.md section 2)


def align_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class BufferConfig:
    """Everything fixed at construction. Build it with :meth:`create`, which checks it."""

    rank: int
    world_size: int
    hidden: int
    max_tokens: int
    num_experts: int
    top_k: int
    dtype: torch.dtype
    layout: str
    pad_multiple: int
    capacity: int  # contiguous: total rows; batched: rows per expert

    @classmethod
    def create(
        cls,
        *,
        rank: int,
        world_size: int,
        hidden: int,
        max_tokens: int,
        num_experts: int,
        top_k: int,
        dtype: torch.dtype,
        layout: str,
        pad_multiple: int,
        capacity: int | None,
    ) -> BufferConfig:
        for name, value in (("hidden", hidden), ("max_tokens", max_tokens), ("num_experts", num_experts),
                            ("top_k", top_k), ("pad_multiple", pad_multiple)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dtype not in PAYLOAD_DTYPES:
            raise TypeError(f"dtype must be one of {PAYLOAD_DTYPES}, got {dtype}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if num_experts % world_size:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group size ({world_size})")
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must not exceed num_experts ({num_experts})")
        if dtype != torch.bfloat16 and hidden % FP8_BLOCK:
            raise ValueError(f"FP8 payloads need hidden % {FP8_BLOCK} == 0, got hidden={hidden}")
        if (hidden * _itemsize(dtype)) % 16:
            raise ValueError(f"a token row must be a multiple of 16 bytes; hidden={hidden} of {dtype} is not")
        if layout == BATCHED and pad_multiple != 1:
            raise ValueError("pad_multiple applies to the contiguous layout only; leave it at 1 for batched")

        num_local = num_experts // world_size
        if capacity is None:
            capacity = _worst_case_capacity(world_size, max_tokens, top_k, num_local, layout, pad_multiple)
        elif not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int or None, got {type(capacity).__name__}")
        elif capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        elif layout == CONTIGUOUS and capacity % pad_multiple:
            raise ValueError(f"capacity ({capacity}) must be a multiple of pad_multiple ({pad_multiple}) so that "
                             "padding never crosses it")
        return cls(rank, world_size, hidden, max_tokens, num_experts, top_k, dtype, layout, pad_multiple, capacity)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size

    @property
    def is_fp8(self) -> bool:
        return self.dtype != torch.bfloat16

    @property
    def itemsize(self) -> int:
        """Bytes per payload element."""
        return _itemsize(self.dtype)

    @property
    def num_scale_blocks(self) -> int:
        """Scales per token row (FP8 only)."""
        return self.hidden // FP8_BLOCK if self.is_fp8 else 0

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of the per-row outputs (weights, row_expert): ``[cap]`` or ``[L, cap_e]``."""
        if self.layout == CONTIGUOUS:
            return (self.capacity,)
        return (self.num_local_experts, self.capacity)

    @property
    def expert_range(self) -> tuple[int, int]:
        """Global ids ``[first, last)`` of this rank's experts."""
        L = self.num_local_experts
        return self.rank * L, (self.rank + 1) * L


def _worst_case_capacity(world_size, max_tokens, top_k, num_local, layout, pad_multiple) -> int:
    """The SPEC's default capacity: nothing can overflow."""
    if layout == BATCHED:
        return world_size * max_tokens
    rows = world_size * max_tokens * min(top_k, num_local) + num_local * (pad_multiple - 1)
    # Rounded up so that the last expert's padding also fits (capacity % pad_multiple == 0).
    return align_up(rows, pad_multiple)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
