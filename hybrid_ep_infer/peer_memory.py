"""Peer-visible device memory through cuda-python (no private torch APIs).

Each rank allocates one workspace with ``cuMemAlloc``, zeroes it, exports a CUDA
IPC handle, and all-gathers the handles once over the buffer's process group; every
rank then maps every peer's workspace. All of it happens at construction; ``close``
unmaps and frees. The module counts the peer mappings it holds
(:func:`mapped_peer_buffers`), so tests can check that nothing leaks.

CUDA IPC handles suit one NVLink node. Multi-node NVLink (fabric handles through
``cuMemCreate``/``cuMemExportToShareableHandle``) would slot in as another
:class:`PeerWorkspace` constructor with the same ``pointers`` contract.
"""

from __future__ import annotations

import threading

import torch

from .errors import HybridEPError
from .placement import all_gather_bytes

_lock = threading.Lock()
_mapped = 0


def mapped_peer_buffers() -> int:
    """Peer workspaces currently mapped into this process (all buffers together)."""
    return _mapped


def _count_mapping(delta: int) -> None:
    global _mapped
    with _lock:
        _mapped += delta


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise HybridEPError("the CUDA backend needs cuda-python: pip install 'cuda-bindings>=12.8' "
                            "(or install this package with the [cuda] extra)") from e
    return driver


def _call(result, what: str):
    """Unpack a cuda-python ``(CUresult, *values)`` tuple, raising on failure."""
    cu = _driver()
    err, *values = result
    if err != cu.CUresult.CUDA_SUCCESS:
        _, name = cu.cuGetErrorName(err)
        raise HybridEPError(f"{what} failed: {name.decode() if name else err}")
    return values[0] if len(values) == 1 else values


class PeerWorkspace:
    """One zeroed device allocation per rank, mapped by every rank of ``group``.

    ``pointers[r]`` is rank r's workspace as seen from this process (``pointers[rank]``
    is the local one). Construction is a collective over ``group``.
    """

    def __init__(self, device: torch.device, nbytes: int, group, rank: int, world_size: int):
        cu = _driver()
        self.device = device
        self.nbytes = nbytes
        self._opened: list[int] = []
        self._local = None
        torch.cuda.init()
        with torch.cuda.device(device):
            torch.empty(1, device=device)  # makes torch's primary context current on this thread
            _call(cu.cuInit(0), "cuInit")
            self._local = _call(cu.cuMemAlloc(nbytes), f"allocating {nbytes} bytes of peer memory")
            try:
                _call(cu.cuMemsetD8(self._local, 0, nbytes), "zeroing the workspace")
                _call(cu.cuCtxSynchronize(), "zeroing the workspace")  # zero before any peer can map it
                blob = bytes(_call(cu.cuIpcGetMemHandle(self._local), "exporting the workspace").reserved)
                blobs = all_gather_bytes(blob, group)
                self.pointers = []
                for r, peer_blob in enumerate(blobs):
                    if r == rank:
                        self.pointers.append(int(self._local))
                        continue
                    handle = cu.CUipcMemHandle()
                    handle.reserved = peer_blob
                    flags = cu.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
                    mapped = _call(cu.cuIpcOpenMemHandle(handle, flags), f"mapping rank {r}'s workspace")
                    self._opened.append(mapped)
                    _count_mapping(+1)
                    self.pointers.append(int(mapped))
            except BaseException:
                self.close()
                raise

    def tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor viewing ``[offset, offset + nbytes)`` of the local workspace (no copy)."""
        return torch.as_tensor(_RawDeviceBytes(int(self._local) + offset, nbytes), device=self.device)

    def close(self) -> None:
        """Unmap every peer and free the local workspace. Idempotent."""
        cu = _driver()
        with torch.cuda.device(self.device):
            while self._opened:
                _call(cu.cuIpcCloseMemHandle(self._opened.pop()), "unmapping a peer workspace")
                _count_mapping(-1)
            if self._local is not None:
                local, self._local = self._local, None
                _call(cu.cuMemFree(local), "freeing the workspace")


class _RawDeviceBytes:
    """Exposes raw device memory to ``torch.as_tensor`` (``__cuda_array_interface__``, v2)."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (pointer, False),
                                         "version": 2}
