"""Loading the compiled library (``libhybrid_ep_infer.so``) through ctypes.

The library has a C interface only (``csrc/include/hybrid_ep_infer/hybrid_ep_infer.h``),
so one build works with any torch and Python. Where it is missing or cannot be
loaded, the package still imports and the reference backend works;
:func:`library_status` says why the CUDA backend is unavailable.

Search order: ``$HYBRID_EP_INFER_LIBRARY``; next to this file (a wheel install);
the installed distribution's files (an editable install); ``build/`` of a
source checkout (``cmake -B build && cmake --build build``).

An install also carries ``_cuda_build.txt``, one line written by CMake: whether the
library was built, and if not, why (no CUDA compiler, or ``HEP_CUDA=OFF``).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
from pathlib import Path

import torch

from .calls import CombineArgs, DispatchArgs
from .errors import ERROR_BLOCK_WORDS, ErrorKind, ErrorSnapshot, HybridEPError

LIBRARY_NAME = "libhybrid_ep_infer.so"
API_VERSION = 6  # HEP_API_VERSION in the C header

HEP_SUCCESS = 0
HEP_INDEX_INT32 = 0
HEP_INDEX_INT64 = 1


class NativeError(HybridEPError):
    """A call into the compiled library failed; the message is the library's last error."""


class ErrorBlock(ctypes.Structure):
    _fields_ = [("words", ctypes.c_uint32 * ERROR_BLOCK_WORDS)]


class ContextConfig(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("version", ctypes.c_uint32), ("device", ctypes.c_int32)]


class BufferDesc(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("version", ctypes.c_uint32),
        ("rank", ctypes.c_int32),
        ("world_size", ctypes.c_int32),
        ("hidden", ctypes.c_int32),
        ("max_tokens", ctypes.c_int32),
        ("num_experts", ctypes.c_int32),
        ("top_k", ctypes.c_int32),
        ("payload_bytes", ctypes.c_int32),
        ("has_scales", ctypes.c_int32),
        ("layout", ctypes.c_int),
        ("pad_multiple", ctypes.c_int32),
        ("capacity", ctypes.c_int32),
        ("num_sms", ctypes.c_int32),
        ("timeout_ns", ctypes.c_uint64),
        ("low_latency", ctypes.c_int32),
        ("ranks_per_node", ctypes.c_int32),
    ]


class WorkspaceLayout(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "total_bytes", "hidden", "scales", "weights", "row_expert", "tokens_per_expert", "offsets", "combine_out")]


class HepDispatchArgs(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("topk_idx", ctypes.c_void_p),
        ("idx_dtype", ctypes.c_int),
        ("topk_weights", ctypes.c_void_p),
        ("num_rows", ctypes.c_int32),
        ("num_tokens_device", ctypes.c_void_p),
        ("num_tokens_host", ctypes.c_int32),
    ]


class Tuning(ctypes.Structure):
    """hep_tuning_t: how the copy kernels divide their work (never changes results)."""

    _fields_ = [
        ("size", ctypes.c_size_t),
        ("version", ctypes.c_uint32),
        ("dispatch_send_warps", ctypes.c_int32),
        ("dispatch_chunk_tokens", ctypes.c_int32),
        ("combine_reduce_warps", ctypes.c_int32),
        ("combine_chunk_tokens", ctypes.c_int32),
        ("dispatch_expand_tma", ctypes.c_int32),
        ("dispatch_send_tma", ctypes.c_int32),
        ("dispatch_path", ctypes.c_int32),
    ]


class HepCombineArgs(ctypes.Structure):
    _fields_ = [("y", ctypes.c_void_p), ("out", ctypes.c_void_p), ("num_rows", ctypes.c_int32),
                ("weighted", ctypes.c_int32), ("topk_idx", ctypes.c_void_p), ("idx_dtype", ctypes.c_int)]


_SIGNATURES = {
    "hep_api_version": (ctypes.c_int, []),
    "hep_version_string": (ctypes.c_char_p, []),
    "hep_status_string": (ctypes.c_char_p, [ctypes.c_int]),
    "hep_last_error": (ctypes.c_char_p, []),
    "hep_context_create": (ctypes.c_int, [ctypes.POINTER(ContextConfig), ctypes.POINTER(ctypes.c_void_p)]),
    "hep_context_destroy": (ctypes.c_int, [ctypes.c_void_p]),
    "hep_context_take_errors": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ErrorBlock)]),
    "hep_context_error_block": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]),
    "hep_workspace_layout": (ctypes.c_int, [ctypes.POINTER(BufferDesc), ctypes.POINTER(WorkspaceLayout)]),
    "hep_context_attach": (ctypes.c_int,
                           [ctypes.c_void_p, ctypes.POINTER(BufferDesc), ctypes.POINTER(ctypes.c_void_p)]),
    "hep_dispatch": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(HepDispatchArgs), ctypes.c_uint64]),
    "hep_combine": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(HepCombineArgs), ctypes.c_uint64]),
    "hep_dispatch_send": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(HepDispatchArgs), ctypes.c_uint64]),
    "hep_dispatch_recv": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint64]),
    "hep_combine_send": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(HepCombineArgs), ctypes.c_uint64]),
    "hep_combine_recv": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint64]),
    "hep_context_set_tuning": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(Tuning)]),
    "hep_context_get_tuning": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(Tuning)]),
}


BUILD_NOTE_NAME = "_cuda_build.txt"


def _installed_files(name: str) -> list[Path]:
    """Where the installed distribution put files called ``name`` (next to this file
    for a wheel; elsewhere in site-packages for an editable install)."""
    paths = [Path(__file__).resolve().parent / name]
    try:
        for f in importlib.metadata.files("hybrid-ep-infer") or []:
            if f.name == name:
                paths.append(Path(f.locate()).resolve())
    except importlib.metadata.PackageNotFoundError:
        pass
    return paths


def _candidate_paths() -> list[Path]:
    paths = []
    if os.environ.get("HYBRID_EP_INFER_LIBRARY"):
        paths.append(Path(os.environ["HYBRID_EP_INFER_LIBRARY"]))
    paths.extend(_installed_files(LIBRARY_NAME))
    paths.append(Path(__file__).resolve().parent.parent / "build" / LIBRARY_NAME)
    return paths


def build_note() -> str | None:
    """What the install's build said about the compiled library, or None (not installed by pip)."""
    for path in _installed_files(BUILD_NOTE_NAME):
        try:
            return path.read_text().strip()
        except OSError:
            continue
    return None


def bind_functions(target, path: Path, signatures: dict) -> ctypes.CDLL:
    """Loads the library at ``path`` and sets each of its ``signatures`` (name ->
    (restype, argtypes)), typed, as an attribute of ``target``."""
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
        setattr(target, name, fn)
    return lib


def load_first(paths: list[Path], make):
    """``(make(path), [])`` for the first existing path ``make`` loads, else ``(None, why
    each existing path failed)``."""
    tried = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            return make(path), tried
        except (OSError, AttributeError) as e:  # unloadable, or an older build missing a symbol
            tried.append(f"{path}: {e}")
    return None, tried


class NativeLibrary:
    """The loaded library with typed functions; ``check`` turns a status into an exception."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = bind_functions(self, path, _SIGNATURES)
        found = self.hep_api_version()
        if found != API_VERSION:
            raise OSError(f"{path} has C API version {found}; this package needs {API_VERSION} (rebuild it)")
        self.version = self.hep_version_string().decode()

    def check(self, status: int, what: str) -> None:
        if status != HEP_SUCCESS:
            reason = self.hep_last_error().decode() or self.hep_status_string(status).decode()
            raise NativeError(f"{what}: {reason}")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[NativeLibrary | None, str]:
    lib, tried = load_first(_candidate_paths(), NativeLibrary)
    if lib is not None:
        return lib, f"loaded {lib.path}"
    if not tried:
        note = build_note()
        if note is not None and note.startswith("not built"):
            return None, (f"the compiled library was not built: {note.removeprefix('not built: ')}; "
                          "reinstall the package with the CUDA toolkit (nvcc) on PATH, "
                          "or set HYBRID_EP_INFER_LIBRARY")
        return None, f"{LIBRARY_NAME} not found (install the package with the CUDA toolkit present, " \
                     "or set HYBRID_EP_INFER_LIBRARY)"
    return None, "could not load the compiled library: " + "; ".join(tried)


def library_status() -> tuple[NativeLibrary | None, str]:
    """``(library or None, a sentence saying what was loaded or why nothing was)``."""
    return _load()


def load_library() -> NativeLibrary:
    lib, reason = _load()
    if lib is None:
        raise NativeError(reason)
    return lib


def workspace_layout(desc: BufferDesc, lib: NativeLibrary | None = None) -> WorkspaceLayout:
    """The workspace of ``desc`` as ``lib`` (default: this library) lays it out."""
    lib = lib if lib is not None else load_library()
    layout = WorkspaceLayout()
    lib.check(lib.hep_workspace_layout(ctypes.byref(desc), ctypes.byref(layout)), "sizing the workspace")
    return layout


class NativeContext:
    """One ``hep_context_t``: the device-side state of a buffer (error block, bound workspaces),
    in ``lib`` (default: this library; the multi-node library has the same interface)."""

    def __init__(self, device: torch.device, lib: NativeLibrary | None = None):
        if device.type != "cuda":
            raise ValueError(f"a native context needs a CUDA device, got {device}")
        self.lib = lib if lib is not None else load_library()
        self.device = device
        config = ContextConfig(ctypes.sizeof(ContextConfig), API_VERSION, device.index)
        handle = ctypes.c_void_p()
        self.lib.check(self.lib.hep_context_create(ctypes.byref(config), ctypes.byref(handle)),
                       "creating the CUDA context state")
        self._handle = handle

    def close(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self.lib.check(self.lib.hep_context_destroy(handle), "releasing the CUDA context state")

    def _live_handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise NativeError("the native context was closed")
        return self._handle

    def take_errors(self) -> ErrorSnapshot:
        block = ErrorBlock()
        self.lib.check(self.lib.hep_context_take_errors(self._live_handle(), ctypes.byref(block)),
                       "reading the error block")
        return ErrorSnapshot.from_words(block.words)

    def attach(self, desc: BufferDesc, workspaces: list[int]) -> None:
        pointers = (ctypes.c_void_p * len(workspaces))(*workspaces)
        self.lib.check(self.lib.hep_context_attach(self._live_handle(), ctypes.byref(desc), pointers),
                       "binding the buffer's workspaces")

    def dispatch(self, args: DispatchArgs, *, half: str = "") -> None:
        """Launch dispatch on the current stream; ``args`` already checked (validation.py).
        ``half="send"``: only the send half (hep_dispatch_send; dispatch_recv completes it)."""
        device_n = isinstance(args.num_tokens, torch.Tensor)
        c_args = HepDispatchArgs(
            x=args.x.data_ptr(),
            scales=args.scales.data_ptr() if args.scales is not None else None,
            topk_idx=args.topk_idx.data_ptr(),
            idx_dtype=_index_dtype(args.topk_idx),
            topk_weights=args.topk_weights.data_ptr(),
            num_rows=args.num_rows,
            # The C struct takes n either as a device pointer (read by the kernels) or a host value.
            num_tokens_device=args.num_tokens.data_ptr() if device_n else None,
            num_tokens_host=0 if device_n else args.num_tokens,
        )
        name = "hep_dispatch_send" if half == "send" else "hep_dispatch"
        self.lib.check(getattr(self.lib, name)(self._live_handle(), ctypes.byref(c_args), self._stream()), name)

    def dispatch_recv(self) -> None:
        """Launch the receive half of the pending dispatch send on the current stream."""
        self.lib.check(self.lib.hep_dispatch_recv(self._live_handle(), self._stream()), "hep_dispatch_recv")

    def combine(self, args: CombineArgs, *, half: str = "") -> None:
        """Launch combine on the current stream for the latest dispatch; ``args`` already checked.
        ``half="send"``: only the send half (hep_combine_send; combine_recv completes it).

        ``args.topk_idx``, if given, is the routing the combine is for: if its rows ``t < n``
        (sanitized) differ from the latest dispatch's, the combine is stale: the output is all
        zeros and ``ErrorKind.STALE_COMBINE`` is counted. ``args.dispatched`` is not read: the
        kernels read the latest dispatch from the workspace.
        """
        topk_idx = args.topk_idx
        c_args = HepCombineArgs(y=args.y.data_ptr(), out=args.out.data_ptr(), num_rows=args.num_rows,
                                weighted=int(args.weighted),
                                topk_idx=topk_idx.data_ptr() if topk_idx is not None else None,
                                idx_dtype=_index_dtype(topk_idx) if topk_idx is not None else HEP_INDEX_INT32)
        name = "hep_combine_send" if half == "send" else "hep_combine"
        self.lib.check(getattr(self.lib, name)(self._live_handle(), ctypes.byref(c_args), self._stream()), name)

    def combine_recv(self) -> None:
        """Launch the receive half of the pending combine send on the current stream."""
        self.lib.check(self.lib.hep_combine_recv(self._live_handle(), self._stream()), "hep_combine_recv")

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def get_tuning(self) -> dict[str, int]:
        tuning = Tuning()
        self.lib.check(self.lib.hep_context_get_tuning(self._live_handle(), ctypes.byref(tuning)), "reading the tuning")
        return {name: getattr(tuning, name) for name, _ in Tuning._fields_[2:]}

    def set_tuning(self, **fields: int) -> None:
        """Changes the named fields of the tuning (the others keep their values)."""
        tuning = Tuning()
        self.lib.check(self.lib.hep_context_get_tuning(self._live_handle(), ctypes.byref(tuning)), "reading the tuning")
        for name, value in fields.items():
            if name not in dict(Tuning._fields_[2:]):
                raise ValueError(f"unknown tuning field {name!r}")
            setattr(tuning, name, value)
        self.lib.check(self.lib.hep_context_set_tuning(self._live_handle(), ctypes.byref(tuning)), "setting the tuning")

    def peek_timeout(self) -> ErrorSnapshot | None:
        """The error block if a wait has timed out (read without clearing), else None."""
        block = ErrorBlock.from_address(self._error_block_address())
        snapshot = ErrorSnapshot.from_words(block.words)
        return snapshot if snapshot.count(ErrorKind.TIMEOUT) else None

    def _error_block_address(self) -> int:
        pointer = ctypes.c_void_p()
        self.lib.check(self.lib.hep_context_error_block(self._live_handle(), ctypes.byref(pointer)),
                       "reading the error block")
        return pointer.value


def _index_dtype(topk_idx: torch.Tensor) -> int:
    """The C enum of an expert-id tensor's dtype (int32 or int64, as validation.py allows)."""
    return HEP_INDEX_INT64 if topk_idx.dtype == torch.int64 else HEP_INDEX_INT32
