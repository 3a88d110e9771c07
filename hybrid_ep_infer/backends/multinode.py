"""The CUDA backend across nodes (``EPBuffer(ranks_per_node=G)``, G below the group size):
the same kernels, from the multi-node library, where a write to a rank on another node
is an NVSHMEM put with a signal instead of an NVLink store (docs/MULTINODE.md, section 9,
the flat low-latency prototype). Node peers keep loads and stores.

What differs from :class:`CudaBackend`: the workspace lives in NVSHMEM's symmetric heap
(so construction and ``close`` are collectives of the group, as NVSHMEM's allocations
are), only the low-latency dispatch runs (the planned one does not cross nodes), and
the tuner does not run (the built-in split, combine chunks of one token).
"""

from __future__ import annotations

import torch

from .. import multinode
from ..config import BufferConfig
from ..errors import ErrorKind
from .cuda import CudaBackend


class MultinodeBackend(CudaBackend):
    name = "cuda"

    def __init__(self, config: BufferConfig, group, device: torch.device, num_sms: int | None, timeout_s: float,
                 ranks_per_node: int, low_latency: bool | None = None):
        if low_latency is False:
            raise ValueError(f"ranks_per_node={ranks_per_node} below the group size needs low_latency "
                             "(the planned dispatch does not cross nodes)")
        if not multinode.initialized():
            multinode.init(group, device)
        rank, world = multinode.runtime_rank_and_size()
        if (rank, world) != (config.rank, config.world_size):
            raise ValueError(f"the multi-node runtime runs as rank {rank} of {world}, this buffer's group as rank "
                             f"{config.rank} of {config.world_size}: start it over the buffer's group "
                             "(multinode.init(group))")
        self._peer_timed_out = False  # sticky: check_errors clears the count a later close must see
        super().__init__(config, group, device, num_sms, timeout_s, tune=False, low_latency=True,
                         ranks_per_node=ranks_per_node)

    def take_errors(self):
        snapshot = super().take_errors()
        self._peer_timed_out |= bool(snapshot.count(ErrorKind.TIMEOUT))
        return snapshot

    def _saw_timeout(self) -> bool:
        """A wait of this buffer timed out (a peer may be gone): close must not run a collective."""
        if self.context is not None and self.context.peek_timeout() is not None:
            self._peer_timed_out = True
        return self._peer_timed_out

    def _native_library(self):
        return multinode.library()

    def _allocate_workspace(self, group) -> multinode.SymmetricWorkspace:
        c = self.config
        return multinode.SymmetricWorkspace(
            self.device, self.layout.total_bytes, c.rank, c.world_size, self.desc.ranks_per_node,
            peer_timed_out=self._saw_timeout)
