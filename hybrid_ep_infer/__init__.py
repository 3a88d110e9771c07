"""hybrid_ep_infer: MoE expert-parallel dispatch/combine that fits inside CUDA graphs.

Main entry point: :class:`EPBuffer`. The contract is the project's SPEC (``docs/SPEC.md``); the
reference backend (pure torch) defines the semantics and runs anywhere.
"""

from . import ops  # registers torch.ops.hybrid_ep_infer.{dispatch,combine} and the split halves' ops
from .buffer import DispatchHandle, DispatchResult, EPBuffer, cuda_backend_unavailable_reason
from .config import BATCHED, CONTIGUOUS
from .errors import BufferClosedError, ErrorKind, HybridEPError, PeerTimeoutError, RoutingDataError
from .peer_memory import mapped_peer_buffers

__version__ = "0.1.0"

__all__ = [
    "BATCHED",
    "CONTIGUOUS",
    "BufferClosedError",
    "DispatchHandle",
    "DispatchResult",
    "EPBuffer",
    "ErrorKind",
    "HybridEPError",
    "PeerTimeoutError",
    "RoutingDataError",
    "cuda_backend_unavailable_reason",
    "mapped_peer_buffers",
    "ops",
]
