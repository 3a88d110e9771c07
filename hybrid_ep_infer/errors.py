"""Exceptions and the sticky error block of docs/SPEC.md section 6.

Bad arguments raise ``ValueError``/``TypeError`` before anything is launched.
Problems only the device can see (bad expert ids, a device ``num_tokens`` out of
range, capacity overflow, a combine given other routing than the latest dispatch's)
drop the offending item (a stale combine outputs zeros) and are counted in an error
block; :meth:`EPBuffer.check_errors` turns the counts into a
:class:`RoutingDataError`. A peer that never arrives becomes a
:class:`PeerTimeoutError`.

The layout mirrors ``csrc/include/hybrid_ep_infer/error_block.h``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ErrorKind(enum.IntEnum):
    """Index of each counter in the error block (same numbers as the C header)."""

    INVALID_EXPERT_ID = 0
    REPEATED_EXPERT_ID = 1
    BAD_NUM_TOKENS = 2
    CAPACITY_OVERFLOW = 3
    TIMEOUT = 4
    STALE_COMBINE = 5


NUM_ERROR_KINDS = len(ErrorKind)
ERROR_BLOCK_WORDS = 9  # counts[6], timeout_phase, timeout_peer, reserved (uint32 each)

_DESCRIPTIONS = {
    ErrorKind.INVALID_EXPERT_ID: "expert id outside [-1, {num_experts}) (that slot was dropped)",
    ErrorKind.REPEATED_EXPERT_ID: "expert id repeated within a token's row (the repeat was dropped)",
    ErrorKind.BAD_NUM_TOKENS: "device num_tokens outside [0, m] (that rank sent no tokens)",
    ErrorKind.CAPACITY_OVERFLOW: ("dispatch rows past the buffer's capacity (not written; combine treats them as "
                                  "absent)"),
    ErrorKind.TIMEOUT: "wait for a peer timed out",
    ErrorKind.STALE_COMBINE: ("combine whose topk_idx is not the routing of the latest dispatch on this buffer "
                              "(a stale combine: its output was set to zero)"),
}

# Wait phases of csrc/common/wait.cuh (timeout_phase in the error block), for messages.
PHASE_NAMES = {1: "dispatch (routing exchange)", 2: "dispatch (token rows)", 3: "combine (partials)"}


class HybridEPError(RuntimeError):
    """Base class of the library's runtime errors."""


class RoutingDataError(HybridEPError):
    """Data errors counted on the device since the last :meth:`check_errors`."""

    def __init__(self, message: str, counts: dict[ErrorKind, int], rank: int):
        super().__init__(message)
        self.counts = counts
        self.rank = rank


class PeerTimeoutError(HybridEPError):
    """A bounded wait for a peer expired; the buffer is unusable until ``close()``."""

    def __init__(self, message: str, phase: str, peer: int, rank: int):
        super().__init__(message)
        self.phase = phase
        self.peer = peer
        self.rank = rank


class BufferClosedError(HybridEPError):
    """The buffer was closed (or broken by a timeout) and can no longer be used."""


@dataclass(frozen=True)
class ErrorSnapshot:
    """One read of the error block: counts per kind, and where a timeout happened."""

    counts: tuple[int, ...]
    timeout_phase: int = 0
    timeout_peer: int = 0

    @classmethod
    def from_words(cls, words) -> ErrorSnapshot:
        words = [int(w) for w in words]
        if len(words) != ERROR_BLOCK_WORDS:
            raise ValueError(f"error block has {ERROR_BLOCK_WORDS} words, got {len(words)}")
        return cls(tuple(words[:NUM_ERROR_KINDS]), words[NUM_ERROR_KINDS], words[NUM_ERROR_KINDS + 1])

    def __bool__(self) -> bool:
        return any(self.counts)

    def count(self, kind: ErrorKind) -> int:
        return self.counts[kind]


def raise_for_errors(snapshot: ErrorSnapshot, *, rank: int, num_experts: int, phase_names=None) -> None:
    """Raise the exception a non-empty snapshot stands for (timeout first)."""
    if not snapshot:
        return
    if snapshot.count(ErrorKind.TIMEOUT):
        phase = (phase_names or {}).get(snapshot.timeout_phase, f"phase {snapshot.timeout_phase}")
        raise PeerTimeoutError(
            f"rank {rank}: timed out in {phase} waiting for rank {snapshot.timeout_peer}; "
            "the buffer must be closed and recreated",
            phase=phase,
            peer=snapshot.timeout_peer,
            rank=rank,
        )
    counts = {kind: snapshot.count(kind) for kind in ErrorKind if snapshot.count(kind)}
    lines = [f"{n} x {_DESCRIPTIONS[kind].format(num_experts=num_experts)}" for kind, n in counts.items()]
    raise RoutingDataError(f"rank {rank}: data errors since the last check: " + "; ".join(lines), counts, rank)
