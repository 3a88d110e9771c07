"""The multi-node engine (docs/MULTINODE.md): NVSHMEM's runtime under this library, the
symmetric workspaces of buffers whose ranks span nodes (``EPBuffer(ranks_per_node=G)``,
run by ``backends/multinode.py``), and the network leg's exchange step.

``libhybrid_ep_infer_mn.so`` is a second compiled library, built only where NVSHMEM is
found (the README's "Multi-node engine": NVSHMEM from the ``nvidia-nvshmem-cu13`` wheel,
``NVSHMEM_HOME`` at install time; CMake option ``HEP_MULTINODE``). Without it this module
imports and :func:`library_status` says why nothing loads.

One NVSHMEM runtime per process, over one group: :func:`init` and :func:`shutdown` are
collectives of that group, and so are the construction and ``close()`` of an
:class:`Exchange` or a :class:`SymmetricWorkspace` (so of a buffer across nodes).
On one GPU shared by several ranks (CUDA MPS), NVSHMEM runs several PEs per GPU when
``NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=1`` (set here unless the caller set it).

    import torch.distributed as dist
    from hybrid_ep_infer import multinode
    multinode.init()                       # the default group: PE = rank
    ex = multinode.Exchange(1 << 20, peers=[r for r in range(W) if r % G == rank % G and r != rank])
    ex.send.copy_(...)                     # then, on every rank, eagerly or in a CUDA graph:
    ex.run()                               # ex.recv[r] holds rank r's bytes for every peer r
    ex.check_errors()                      # a peer that never ran it: PeerTimeoutError
    ex.close(); multinode.shutdown()
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

import torch
import torch.distributed as dist

from . import _native
from .errors import ERROR_BLOCK_WORDS, ErrorKind, ErrorSnapshot, PeerTimeoutError
from .peer_memory import _RawDeviceBytes

MN_LIBRARY_NAME = "libhybrid_ep_infer_mn.so"
MN_API_VERSION = 2  # HEP_MN_API_VERSION in csrc/include/hybrid_ep_infer/hybrid_ep_infer_mn.h
UNIQUE_ID_BYTES = 128
MAX_PEERS = 64
PHASE_NAMES = {8: "multi-node exchange (network leg)"}

_runtime = {"rank": -1, "world": 0}  # this process's PE and the runtime's size, set by init()


class MultinodeError(_native.NativeError):
    """The multi-node library is missing, or one of its calls failed."""


class _ExchangeDesc(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_int64), ("num_peers", ctypes.c_int32), ("peers", ctypes.c_int32 * MAX_PEERS),
                ("blocks_per_peer", ctypes.c_int32), ("timeout_ns", ctypes.c_uint64)]


_SIGNATURES = {
    "hep_mn_api_version": (ctypes.c_int, []),
    "hep_mn_last_error": (ctypes.c_char_p, []),
    "hep_mn_unique_id": (ctypes.c_int, [ctypes.c_void_p]),
    "hep_mn_init": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "hep_mn_initialized": (ctypes.c_int, []),
    "hep_mn_finalize": (ctypes.c_int, []),
    "hep_mn_exchange_create": (ctypes.c_int, [ctypes.POINTER(_ExchangeDesc), ctypes.POINTER(ctypes.c_void_p)]),
    "hep_mn_exchange_buffers": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                               ctypes.POINTER(ctypes.c_void_p)]),
    "hep_mn_exchange_run": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint64]),
    "hep_mn_exchange_error_block": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]),
    "hep_mn_exchange_destroy": (ctypes.c_int, [ctypes.c_void_p]),
    "hep_mn_workspace_alloc": (ctypes.c_int, [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]),
    "hep_mn_workspace_peer": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]),
    "hep_mn_workspace_free": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
}


def nvshmem_lib_dir() -> Path | None:
    """NVSHMEM's ``lib/``: ``$NVSHMEM_HOME/lib``, else the ``nvidia-nvshmem-cu13`` package's."""
    if os.environ.get("NVSHMEM_HOME"):
        return Path(os.environ["NVSHMEM_HOME"]) / "lib"
    spec = importlib.util.find_spec("nvidia.nvshmem") if importlib.util.find_spec("nvidia") else None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "lib"


def _candidate_paths() -> list[Path]:
    """As the main library's (_native.py): the environment's, the install's, build/."""
    paths = []
    if os.environ.get("HYBRID_EP_INFER_MN_LIBRARY"):
        paths.append(Path(os.environ["HYBRID_EP_INFER_MN_LIBRARY"]))
    paths.extend(_native._installed_files(MN_LIBRARY_NAME))
    paths.append(Path(__file__).resolve().parent.parent / "build" / MN_LIBRARY_NAME)
    return paths


class _Library(_native.NativeLibrary):
    """The multi-node library: the main library's C interface, built with the network leg,
    and the engine's own calls (``hep_mn_*``)."""

    def __init__(self, path: Path):
        nvshmem = nvshmem_lib_dir()
        host = sorted(nvshmem.glob("libnvshmem_host.so*")) if nvshmem and nvshmem.is_dir() else []
        if not host:
            raise OSError(f"NVSHMEM's host library was not found (looked in {nvshmem}); "
                          "pip install nvidia-nvshmem-cu13 or set NVSHMEM_HOME")
        ctypes.CDLL(str(host[0]), mode=ctypes.RTLD_GLOBAL)  # ours links to it by name
        super().__init__(path)
        _native.bind_functions(self, path, _SIGNATURES)
        if self.hep_mn_api_version() != MN_API_VERSION:
            raise OSError(f"{path} has API version {self.hep_mn_api_version()}; this package needs {MN_API_VERSION}")

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise MultinodeError(f"{what}: {self.hep_mn_last_error().decode() or f'status {status}'}")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[_Library | None, str]:
    lib, tried = _native.load_first(_candidate_paths(), _Library)
    if lib is not None:
        return lib, f"loaded {lib.path}"
    if not tried:
        return None, (f"{MN_LIBRARY_NAME} not found: it is built only where NVSHMEM is found (pip install "
                      "nvidia-nvshmem-cu13, then reinstall with NVSHMEM_HOME set: README, 'Multi-node engine')")
    return None, "could not load the multi-node library: " + "; ".join(tried)


def library_status() -> tuple[bool, str]:
    """``(loaded, a sentence saying what was loaded or why nothing was)``."""
    lib, reason = _load()
    return lib is not None, reason


def multinode_unavailable_reason() -> str | None:
    """Why ``EPBuffer(ranks_per_node=G)`` with G below the group size cannot run on the
    CUDA backend here (the multi-node library is missing or does not load), or None."""
    loaded, reason = library_status()
    return None if loaded else reason


def _lib() -> _Library:
    lib, reason = _load()
    if lib is None:
        raise MultinodeError(reason)
    return lib


def library() -> _Library:
    """The loaded multi-node library (MultinodeError where it is missing)."""
    return _lib()


def initialized() -> bool:
    """Whether this process's runtime is started (:func:`init`)."""
    lib, _ = _load()
    return lib is not None and bool(lib.hep_mn_initialized())


def runtime_rank_and_size() -> tuple[int, int]:
    """This process's PE and the runtime's number of PEs (after :func:`init`)."""
    return _runtime["rank"], _runtime["world"]


def init(group: dist.ProcessGroup | None = None, device: torch.device | int | None = None) -> None:
    """Starts NVSHMEM in this process with PE = the rank in ``group`` (a collective of the
    group; any backend, gloo included). NVSHMEM ends the process if its start fails."""
    lib = _lib()
    if lib.hep_mn_initialized():
        raise MultinodeError("the multi-node runtime is already started in this process (one per process)")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device("cuda", device) \
        if isinstance(device, int) else device
    if device.type != "cuda":
        raise ValueError(f"the multi-node runtime needs a CUDA device, got {device}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    os.environ.setdefault("NVSHMEM_IGNORE_CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "1")  # several PEs per GPU
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")  # no multicast: shared hosts (and no collectives used)
    uid = [None]
    if rank == 0:
        raw = ctypes.create_string_buffer(UNIQUE_ID_BYTES)
        lib.check(lib.hep_mn_unique_id(raw), "creating NVSHMEM's unique id")
        uid[0] = raw.raw
    dist.broadcast_object_list(uid, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    lib.check(lib.hep_mn_init(ctypes.create_string_buffer(uid[0], UNIQUE_ID_BYTES), rank, world, device.index),
              "starting NVSHMEM")
    _runtime.update(rank=rank, world=world)


def shutdown() -> None:
    """Ends the runtime (a collective of init's group); every :class:`Exchange` must be closed."""
    lib = _lib()
    if lib.hep_mn_initialized():
        lib.check(lib.hep_mn_finalize(), "ending NVSHMEM")


class SymmetricWorkspace:
    """A buffer's workspace in NVSHMEM's symmetric heap (the same size on every rank, zeroed),
    with ``pointers`` as the compiled library's attach takes them: a rank of this node's
    workspace mapped here, this rank's own for a rank on another node (the kernels reach
    that one by NVSHMEM puts to the same address). Construction and ``close`` are
    collectives of the runtime's group; ``close`` frees locally only where
    ``peer_timed_out()`` says a wait timed out (a peer may be gone)."""

    def __init__(self, device: torch.device, nbytes: int, rank: int, world_size: int, ranks_per_node: int,
                 peer_timed_out):
        lib = _lib()
        self._lib, self.device, self.nbytes, self._peer_timed_out = lib, device, nbytes, peer_timed_out
        local = ctypes.c_void_p()
        lib.check(lib.hep_mn_workspace_alloc(nbytes, ctypes.byref(local)), "allocating the symmetric workspace")
        self._local = local.value
        self.pointers = []
        try:
            for r in range(world_size):
                if r // ranks_per_node != rank // ranks_per_node:
                    self.pointers.append(self._local)
                    continue
                peer = ctypes.c_void_p()
                lib.check(lib.hep_mn_workspace_peer(local, r, ctypes.byref(peer)), f"mapping rank {r}'s workspace")
                if not peer.value:
                    raise MultinodeError(f"rank {r} is on this rank's node (ranks_per_node={ranks_per_node}) but "
                                         "NVSHMEM cannot map its memory here (no load/store path between the GPUs)")
                self.pointers.append(peer.value)
        except BaseException:
            self.close()
            raise

    def tensor(self, offset: int, nbytes: int) -> torch.Tensor:
        """A uint8 tensor viewing ``[offset, offset + nbytes)`` of the local workspace (no copy)."""
        return torch.as_tensor(_RawDeviceBytes(self._local + offset, nbytes), device=self.device)

    def close(self) -> None:
        """Frees the workspace (see the class). Idempotent."""
        if self._local is not None:
            local, self._local = self._local, None
            self._lib.check(self._lib.hep_mn_workspace_free(ctypes.c_void_p(local), int(bool(self._peer_timed_out()))),
                            "freeing the symmetric workspace")


class Exchange:
    """One exchange step of the network leg on static symmetric buffers: every rank puts
    ``send`` into its row of each peer's ``recv`` with a signal, then waits (bounded) for
    every peer's row of this call. ``run`` is capturable in a CUDA graph and replayable.

    Args:
        nbytes: bytes each rank sends to each peer (a positive multiple of 16).
        peers: the ranks to exchange with; each must name this rank too.
        blocks_per_peer: thread blocks putting to one peer.
        timeout_s: the bound of every wait.
    """

    def __init__(self, nbytes: int, peers: list[int], *, blocks_per_peer: int = 1, timeout_s: float = 10.0):
        lib = _lib()
        if not 1 <= len(peers) <= MAX_PEERS:
            raise ValueError(f"peers: 1 to {MAX_PEERS} ranks, got {len(peers)}")
        desc = _ExchangeDesc(bytes=nbytes, num_peers=len(peers), blocks_per_peer=blocks_per_peer,
                             timeout_ns=int(timeout_s * 1e9))
        for i, pe in enumerate(peers):
            desc.peers[i] = pe
        handle = ctypes.c_void_p()
        lib.check(lib.hep_mn_exchange_create(ctypes.byref(desc), ctypes.byref(handle)), "creating an exchange")
        self._lib, self._handle, self.peers = lib, handle, list(peers)
        send, recv = ctypes.c_void_p(), ctypes.c_void_p()
        lib.check(lib.hep_mn_exchange_buffers(handle, ctypes.byref(send), ctypes.byref(recv)), "exchange buffers")
        world = _runtime["world"]
        device = torch.device("cuda", torch.cuda.current_device())
        self.send = torch.as_tensor(_RawDeviceBytes(send.value, nbytes), device=device)
        self.recv = torch.as_tensor(_RawDeviceBytes(recv.value, world * nbytes), device=device).view(world, nbytes)
        block = ctypes.c_void_p()
        lib.check(lib.hep_mn_exchange_error_block(handle, ctypes.byref(block)), "exchange error block")
        self._errors = (ctypes.c_uint32 * ERROR_BLOCK_WORDS).from_address(block.value)

    def run(self, stream: torch.cuda.Stream | None = None) -> None:
        """One step on ``stream`` (default: the current one). A collective of this rank and its peers."""
        stream = torch.cuda.current_stream() if stream is None else stream
        self._lib.check(self._lib.hep_mn_exchange_run(self._live(), stream.cuda_stream), "running the exchange")

    def check_errors(self, synchronize: bool = True) -> None:
        """Raises :class:`PeerTimeoutError` (phase and peer named) if a wait has timed out."""
        if synchronize:
            torch.cuda.synchronize()
        snapshot = ErrorSnapshot.from_words(list(self._errors))
        if snapshot.count(ErrorKind.TIMEOUT):
            phase = PHASE_NAMES.get(snapshot.timeout_phase, f"phase {snapshot.timeout_phase}")
            rank = _runtime["rank"]
            raise PeerTimeoutError(f"rank {rank}: timed out in {phase} waiting for rank {snapshot.timeout_peer}; "
                                   "the process must restart to use NVSHMEM again",
                                   phase=phase, peer=snapshot.timeout_peer, rank=rank)

    def close(self) -> None:
        """Frees the exchange (a collective of the group, unless a wait timed out: then the
        symmetric memory stays until the process ends)."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self.send = self.recv = None
            self._lib.check(self._lib.hep_mn_exchange_destroy(handle), "closing the exchange")

    def _live(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise MultinodeError("the exchange is closed")
        return self._handle

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
