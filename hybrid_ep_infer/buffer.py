"""The public buffer object: dispatch (with permute) and combine (with unpermute).

See ``docs/SPEC.md`` (the contract) and ``memory.py`` for the memory formula.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _native
from .backends import Backend, CudaBackend, MultinodeBackend, ReferenceBackend
from .calls import DispatchOutputs
from .config import BufferConfig
from .errors import PHASE_NAMES, BufferClosedError, PeerTimeoutError, raise_for_errors
from .multinode import multinode_unavailable_reason
from .validation import check_combine_args, check_dispatch_args

BACKENDS = ("auto", "cuda", "reference")
DEFAULT_TIMEOUT_S = 100.0

_buffer_ids = itertools.count(1)
# Live buffers by id: how the custom ops (ops.py) reach a buffer without passing a
# Python object through a traced graph.
_live_buffers: weakref.WeakValueDictionary[int, EPBuffer] = weakref.WeakValueDictionary()


def _check_ranks_per_node(ranks_per_node: int | None, world_size: int) -> int:
    """G for ``ranks_per_node`` (the group size for None); ValueError/TypeError naming it."""
    if ranks_per_node is None:
        return world_size
    if not isinstance(ranks_per_node, int) or isinstance(ranks_per_node, bool):
        raise TypeError(f"ranks_per_node must be an int or None, got {type(ranks_per_node).__name__}")
    if ranks_per_node < 1 or world_size % ranks_per_node:
        raise ValueError(f"ranks_per_node must be >= 1 and divide the group size ({world_size}), "
                         f"got {ranks_per_node}")
    return ranks_per_node


def live_buffer(buffer_id: int) -> EPBuffer:
    buffer = _live_buffers.get(buffer_id)
    if buffer is None:
        raise ValueError(f"no live EPBuffer has id {buffer_id} (closed or garbage-collected?)")
    return buffer


@dataclass(frozen=True)
class DispatchHandle:
    """What :meth:`EPBuffer.combine` needs from the matching :meth:`EPBuffer.dispatch`.

    Opaque to users. It is valid until the next dispatch on the same buffer; a
    combine with an older handle raises ``ValueError``.
    """

    buffer_id: int
    generation: int
    num_rows: int  # m: rows of the dispatched x, and of combine's output
    state: object  # what Backend.dispatch returned (reference: where each written row came from)


@dataclass(frozen=True)
class PendingDispatch:
    """A dispatch whose send half ran (:meth:`EPBuffer.dispatch_send`); pass it to
    :meth:`EPBuffer.dispatch_recv`. Opaque to users."""

    buffer_id: int
    sequence: int  # which send of this buffer
    num_rows: int  # m of the dispatched x
    sent: object  # what Backend.dispatch_send returned


@dataclass(frozen=True)
class PendingCombine:
    """A combine whose send half ran (:meth:`EPBuffer.combine_send`); pass it to
    :meth:`EPBuffer.combine_recv`. Opaque to users."""

    buffer_id: int
    sequence: int
    sent: object  # what Backend.combine_send returned


# DispatchResult's fields: those of DispatchOutputs, in their order, then the handle.
_DispatchResultFields = NamedTuple("DispatchResult", [*DispatchOutputs.__annotations__.items(),
                                                      ("handle", "DispatchHandle | None")])


class DispatchResult(_DispatchResultFields):
    """Dispatch output on this rank (docs/SPEC.md section 3), expert-major.

    Every tensor is a **view of buffer memory**, valid until the next ``dispatch``
    on this buffer (which overwrites it); copy what must live longer. Row shape R
    is ``[capacity]`` (contiguous layout) or ``[L, capacity]`` (batched), with L
    the local experts.

    Attributes:
        hidden: ``[*R, H]`` payload dtype. Contiguous: expert e's rows are
            ``hidden[offsets[e] : offsets[e] + tokens_per_expert[e]]``, followed
            by zero padding up to ``offsets[e + 1]``. Batched:
            ``hidden[e, :tokens_per_expert[e]]``. Rows are ordered by
            (source rank, source token, top-k slot).
        scales: ``[*R, H / 128]`` float32 for FP8 payloads (carried verbatim;
            zero on padding rows), else ``None``.
        weights: ``[*R]`` float32, the row's ``topk_weights`` (0 on padding rows).
        row_expert: ``[*R]`` int32, the row's local expert, -1 for every row index
            that is not a written row (padding and unused rows included).
        tokens_per_expert: ``[L]`` int32, rows written per local expert.
        offsets: ``[L + 1]`` int32 row offsets (contiguous layout), else ``None``.
        handle: pass to :meth:`EPBuffer.combine` (``None`` from :func:`ops.dispatch`).
    """

    __slots__ = ()

    @classmethod
    def from_outputs(cls, outputs: DispatchOutputs, handle: DispatchHandle | None) -> DispatchResult:
        return cls(*outputs, handle)


class EPBuffer:
    """Expert-parallel dispatch/combine buffer for one group and one set of sizes.

    Created once per (group, hidden, max_tokens, num_experts, top_k, dtype, layout);
    rank r owns experts ``[r*L, (r+1)*L)`` with ``L = num_experts / group size``.
    **Calls are collectives**: every rank makes the same sequence of
    ``dispatch``/``combine`` calls, in the same order (a rank with no tokens still
    calls, with ``num_tokens=0``).

    Args (keyword-only):
        group: the ``torch.distributed`` process group (default: the world group).
        hidden: H, elements per token row.
        max_tokens: T_max, the most rows of ``x`` any call passes.
        num_experts: E, experts over the whole group.
        top_k: K, expert slots per token.
        dtype: payload dtype: ``torch.bfloat16``, ``torch.float8_e4m3fn`` or
            ``torch.uint8`` (raw FP8 bytes); FP8 needs ``hidden % 128 == 0``.
        layout: ``"contiguous"`` (``[capacity, H]`` with per-expert offsets) or
            ``"batched"`` (``[L, capacity, H]``).
        pad_multiple: contiguous layout: each expert's rows start at a multiple of it.
        capacity: contiguous: total rows; batched: rows per expert. Default: the
            worst case, so nothing can overflow. A smaller one is opt-in: rows past
            it are dropped and counted (see :meth:`check_errors`).
        num_sms: CUDA backend: blocks (one per SM) of each of the two copy kernels —
            dispatch's transfer and combine. ``None``: 24, lowered where ranks share
            this GPU (processes under CUDA MPS) to ``SMs // ranks on the GPU``, so that
            every rank's blocks are resident at once. An explicit value above that
            raises ``ValueError``. Dispatch's planning kernels use at most as many
            blocks, except the routing publish (16 blocks, which wait for nobody).
        timeout_s: bound on every wait for a peer (CUDA backend).
        low_latency: CUDA backend: also build the low-latency dispatch (rows go to
            staging slots on their destinations before any plan; one kernel; the
            tuner keeps it where it is faster) and the split halves
            (:meth:`dispatch_send` ...). Costs ``2 * W * max_tokens`` staged rows per
            rank. ``None``: on when ``max_tokens <= 1024`` and its per-block plan tables
            fit in 160 KB of shared memory (``backends/cuda.py``).
        tune: CUDA backend: time a few splits of the copy kernels' warps, chunk sizes
            and copy methods on synthetic routing of this shape at construction and
            keep the fastest
            (collective; cached per shape in this process; never changes results).
            Every rank must pass the same value. ``False``: the built-in defaults.
        backend: ``"auto"`` (CUDA where available, else reference), ``"cuda"``,
            or ``"reference"`` (pure torch; may allocate and synchronize).
        device: where outputs live. Default: the current CUDA device for the CUDA
            backend or an NCCL group, else the CPU.
        debug: run :meth:`check_errors` after every eager call (not while capturing).
        ranks_per_node: G, the ranks of one NVLink domain (a node): ranks ``[i*G,
            (i+1)*G)`` form node i, the order torchrun gives. ``None`` or the group size:
            one domain. Fewer, on the CUDA backend: the multi-node library's kernels
            write ranks on other nodes through NVSHMEM (``docs/MULTINODE.md``, a
            prototype: low-latency dispatch only, not tuned; the NVSHMEM runtime starts
            over ``group`` at the first such buffer, and construction and :meth:`close`
            are collectives of the group). Where that library is missing,
            ``backend="cuda"`` (and ``"auto"`` where CUDA is available) raises
            ``RuntimeError`` with
            :func:`hybrid_ep_infer.multinode.multinode_unavailable_reason`. The reference
            backend accepts it (results do not depend on it). Every rank passes the same.
    """

    def __init__(
        self,
        *,
        group: dist.ProcessGroup | None = None,
        hidden: int,
        max_tokens: int,
        num_experts: int,
        top_k: int,
        dtype: torch.dtype = torch.bfloat16,
        layout: str = "contiguous",
        pad_multiple: int = 1,
        capacity: int | None = None,
        num_sms: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tune: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        debug: bool = False,
        low_latency: bool | None = None,
        ranks_per_node: int | None = None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("EPBuffer needs torch.distributed to be initialized (init_process_group)")
        group = group if group is not None else dist.group.WORLD
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if num_sms is not None and (not isinstance(num_sms, int) or num_sms < 1):
            raise ValueError(f"num_sms must be None or a positive int, got {num_sms!r}")
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")

        self.config = BufferConfig.create(
            rank=dist.get_rank(group), world_size=dist.get_world_size(group), hidden=hidden,
            max_tokens=max_tokens, num_experts=num_experts, top_k=top_k, dtype=dtype, layout=layout,
            pad_multiple=pad_multiple, capacity=capacity)
        self.ranks_per_node = _check_ranks_per_node(ranks_per_node, self.config.world_size)
        self.group = group
        self.num_sms = num_sms
        self.timeout_s = float(timeout_s)
        self.debug = debug

        if backend == "auto":
            backend = "cuda" if cuda_backend_unavailable_reason() is None else "reference"
        if backend == "cuda":
            reason = cuda_backend_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"backend='cuda' is not available: {reason}. Use backend='reference'.")
            across_nodes_reason = multinode_unavailable_reason()
            if self.ranks_per_node < self.config.world_size and across_nodes_reason is not None:
                raise RuntimeError(f"ranks_per_node={self.ranks_per_node} (fewer than the group's "
                                   f"{self.config.world_size} ranks) needs the multi-node backend: "
                                   f"{across_nodes_reason}. Use backend='reference'.")
        self.device = _resolve_device(device, backend, group)
        self._backend: Backend
        if backend == "cuda" and self.ranks_per_node < self.config.world_size:
            self._backend = MultinodeBackend(self.config, group, self.device, num_sms, self.timeout_s,
                                             self.ranks_per_node,
                                             low_latency=low_latency if low_latency is None else bool(low_latency))
            self.num_sms = self._backend.desc.num_sms
        elif backend == "cuda":
            self._backend = CudaBackend(self.config, group, self.device, num_sms, self.timeout_s, tune=bool(tune),
                                        low_latency=low_latency if low_latency is None else bool(low_latency))
            self.num_sms = self._backend.desc.num_sms  # as fitted to the ranks that share this GPU
        else:
            self._backend = ReferenceBackend(self.config, group, self.device)
        self._id = next(_buffer_ids)
        self._generation = 0
        self._latest: DispatchHandle | None = None
        self._sends = 0
        self._pending: PendingDispatch | PendingCombine | None = None  # at most one half awaits its receive
        # The custom ops' ordering token (see op_state): never written, so no op pays a launch for it.
        self._op_state = torch.zeros(1, dtype=torch.int64, device=self.device)
        _live_buffers[self._id] = self
        self._closed = False
        self._broken: str | None = None

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> str:
        """``"cuda"`` or ``"reference"``."""
        return self._backend.name

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def num_local_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def num_nodes(self) -> int:
        """Nodes (NVLink domains) the group spans: ``world_size // ranks_per_node``."""
        return self.config.world_size // self.ranks_per_node

    @property
    def capacity(self) -> int:
        """Contiguous: total rows; batched: rows per expert."""
        return self.config.capacity

    @property
    def nbytes(self) -> int:
        """Device bytes this buffer holds (the formula: ``memory.py``)."""
        self._check_usable()
        return self._backend.nbytes

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def supports_split(self) -> bool:
        """Whether :meth:`dispatch_send` and the other halves work on this buffer (the
        reference backend always; the CUDA backend when built with ``low_latency``)."""
        return self._backend.supports_split

    # ------------------------------------------------------------------ collectives

    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                 scales: torch.Tensor | None = None, num_tokens=None) -> DispatchResult:
        """Send each token to the ranks of its experts, grouped by expert (docs/SPEC.md section 3).

        Args:
            x: ``[m, H]`` payload dtype, contiguous, ``m <= max_tokens``.
            topk_idx: ``[m, K]`` int32 or int64 global expert ids; -1 = no expert.
                Ids outside ``[-1, E)`` and repeats within a row are dropped and
                counted (:meth:`check_errors`).
            topk_weights: ``[m, K]`` float32, carried to each row (used by combine).
            scales: ``[m, H / 128]`` float32, required for FP8 payloads only.
            num_tokens: n, rows of ``x`` to send: ``None`` (= m), an int in
                ``[0, m]``, or a 1-element int32 tensor on the buffer's device (the
                form a captured CUDA graph can change between replays; a device
                value outside ``[0, m]`` is counted and the rank sends nothing).
                Rows ``>= n`` are never read.

        Returns:
            :class:`DispatchResult`, views of buffer memory valid until the next
            dispatch on this buffer.
        """
        handle = self._run_dispatch(x, topk_idx, topk_weights, scales, num_tokens, into=None)
        return DispatchResult.from_outputs(self._backend.outputs, handle)

    def combine(self, y: torch.Tensor, handle: DispatchHandle, *, out: torch.Tensor | None = None,
                weighted: bool = True) -> torch.Tensor:
        """Bring expert outputs back to their tokens and reduce them (docs/SPEC.md section 4).

        Args:
            y: expert outputs in the dispatch layout: ``[*R, H]`` bfloat16 (same row
                shape as ``DispatchResult.hidden``); only written rows are read.
            handle: ``DispatchResult.handle`` of the latest dispatch on this buffer.
            out: optional ``[m, H]`` bfloat16 contiguous tensor to write into.
            weighted: multiply each row by its weight (``DispatchResult.weights``,
                i.e. the dispatched ``topk_weights``) before summing.

        Returns:
            ``[m, H]`` bfloat16: ``out`` if given, else a view of buffer memory valid
            until the next combine on this buffer. Row t sums the token's rows over
            its experts in a fixed order (bit-reproducible); rows ``t >= n`` and
            tokens with no valid expert are +0.0.
        """
        self._check_usable()
        self._check_no_pending("combine")
        self._check_handle(handle)
        return self._run_combine(y, handle, out, weighted)

    # ------------------------------------------------------------------ split halves

    def dispatch_send(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                      scales: torch.Tensor | None = None, num_tokens=None) -> PendingDispatch:
        """The send half of :meth:`dispatch` (same arguments and checks): this rank's routing
        and rows go out to their destinations; nothing waits for a peer. Any work may run
        on any stream before :meth:`dispatch_recv` (for instance another micro-batch's
        experts, or ops on another buffer), and ``x``, ``topk_*`` and ``scales`` may be
        overwritten in stream order. Until the receive, this buffer refuses every other
        call and its dispatch outputs are undefined. A collective, like :meth:`dispatch`.
        """
        self._check_usable()
        self._check_no_pending("dispatch_send")
        self._check_split()
        args = check_dispatch_args(self.config, self.device, x, topk_idx, topk_weights, scales, num_tokens)
        sent = self._backend.dispatch_send(args)
        self._sends += 1
        self._pending = PendingDispatch(self._id, self._sends, args.num_rows, sent)
        return self._pending

    def dispatch_recv(self, pending: PendingDispatch) -> DispatchResult:
        """The receive half: waits for the peers' rows and completes the dispatch. Returns
        what :meth:`dispatch` returns (the same views, and a handle for combine)."""
        self._check_usable()
        self._take_pending(pending, PendingDispatch, "dispatch_recv")
        self._receive_dispatch(pending, into=None)
        return DispatchResult.from_outputs(self._backend.outputs, self._latest)

    def combine_send(self, y: torch.Tensor, handle: DispatchHandle, *, out: torch.Tensor | None = None,
                     weighted: bool = True) -> PendingCombine:
        """The send half of :meth:`combine` (same arguments and checks): this rank's partial
        sums go out to their tokens' ranks; ``y`` may be overwritten in stream order after
        it. ``out`` is complete after :meth:`combine_recv`. A collective."""
        self._check_usable()
        self._check_no_pending("combine_send")
        self._check_split()
        self._check_handle(handle)
        if out is None:
            out = self._backend.combine_output(handle.num_rows)
        args = check_combine_args(self.config, self.device, y, out, handle.num_rows, weighted)
        sent = self._backend.combine_send(args, handle.state)
        self._sends += 1
        self._pending = PendingCombine(self._id, self._sends, sent)
        return self._pending

    def combine_recv(self, pending: PendingCombine) -> torch.Tensor:
        """The receive half: waits for the peers' partials and sums them. Returns what
        :meth:`combine` returns."""
        self._check_usable()
        self._take_pending(pending, PendingCombine, "combine_recv")
        result = self._backend.combine_recv(pending.sent)
        self._maybe_check_errors()
        return result

    def _receive_dispatch(self, pending: PendingDispatch, *, into: DispatchOutputs | None) -> None:
        state = self._backend.dispatch_recv(pending.sent, into=into)
        self._generation += 1
        self._latest = DispatchHandle(self._id, self._generation, pending.num_rows, state)
        self._maybe_check_errors()

    # ------------------------------------------------------------------ what the custom ops (ops.py) use

    @property
    def id(self) -> int:
        """This buffer's id, by which the custom ops reach it (no Python object crosses a traced graph)."""
        return self._id

    @property
    def dispatch_outputs(self) -> DispatchOutputs:
        """The tensors every dispatch writes: views of buffer memory (what :meth:`dispatch`
        returns, without the handle). The custom op takes them as its mutated outputs."""
        self._check_open()
        return self._backend.outputs

    def combine_output(self, num_rows: int) -> torch.Tensor:
        """``[num_rows, H]`` bf16 view of buffer memory: combine's output when no ``out`` is given."""
        self._check_open()
        return self._backend.combine_output(num_rows)

    def dispatch_into(self, into: DispatchOutputs, x: torch.Tensor, topk_idx: torch.Tensor,
                      topk_weights: torch.Tensor, *, scales: torch.Tensor | None = None, num_tokens=None) -> None:
        """:meth:`dispatch` (same arguments and checks), leaving its results in ``into``: the
        custom op's output tensors, which under torch.compile are functional copies of
        :attr:`dispatch_outputs` rather than those views."""
        self._run_dispatch(x, topk_idx, topk_weights, scales, num_tokens, into=into)

    def combine_latest(self, y: torch.Tensor, topk_idx: torch.Tensor, dispatched: DispatchOutputs,
                       out: torch.Tensor, *, weighted: bool = True) -> torch.Tensor:
        """:meth:`combine` for the latest dispatch on this buffer, found without a handle.

        ``topk_idx`` is the routing the caller means: if it is not the latest dispatch's, the
        combine is stale (docs/SPEC.md section 7: zeros, counted). ``dispatched`` are the
        dispatch outputs the custom op was given (maybe functional copies), which the
        backend reads instead of its own.
        """
        self._check_usable()
        self._check_no_pending("combine")
        if self._latest is None:
            raise ValueError("combine before any dispatch on this buffer")
        return self._run_combine(y, self._latest, out, weighted, topk_idx=topk_idx, dispatched=dispatched)

    @property
    def op_state(self) -> torch.Tensor:
        """``[1]`` int64 on the buffer's device: the custom ops' ordering token.

        Every op on this buffer (``ops.dispatch``, ``ops.combine`` and the four halves)
        takes it as a mutated argument, so a compiler sees each op depend on the one
        before it and keeps them all in program order, and cannot drop one (a send
        whose outputs nobody reads still writes this buffer's state). The ops do not
        actually write it, so it costs no launch; its value means nothing.
        """
        self._check_open()
        return self._op_state

    def dispatch_recv_into(self, into: DispatchOutputs) -> None:
        """:meth:`dispatch_recv` of the pending :meth:`dispatch_send`, leaving its results in
        ``into`` (the custom op's output tensors, as :meth:`dispatch_into`). The op has no
        :class:`PendingDispatch` to pass: it receives whatever send is pending here."""
        self._check_usable()
        pending = self._pending_of(PendingDispatch, "dispatch_recv")
        self._pending = None
        self._receive_dispatch(pending, into=into)

    def combine_send_latest(self, y: torch.Tensor, topk_idx: torch.Tensor, dispatched: DispatchOutputs,
                            out: torch.Tensor, *, weighted: bool = True) -> None:
        """:meth:`combine_send` for the latest dispatch on this buffer, found without a handle;
        ``topk_idx`` and ``dispatched`` as in :meth:`combine_latest` (a stale combine_send
        takes part in the exchange; its receive writes zeros and it is counted)."""
        self._check_usable()
        self._check_no_pending("combine_send")
        self._check_split()
        if self._latest is None:
            raise ValueError("combine_send before any dispatch on this buffer")
        args = check_combine_args(self.config, self.device, y, out, self._latest.num_rows, weighted,
                                  topk_idx=topk_idx, dispatched=dispatched)
        sent = self._backend.combine_send(args, self._latest.state)
        self._sends += 1
        self._pending = PendingCombine(self._id, self._sends, sent)

    def combine_recv_into(self, out: torch.Tensor) -> None:
        """:meth:`combine_recv` of the pending combine send, leaving the result in ``out``:
        the tensor the receive op was given, which under torch.compile may be a functional
        copy of the one the send was given (then the result is copied over)."""
        self._check_usable()
        pending = self._pending_of(PendingCombine, "combine_recv")
        self._pending = None
        result = self._backend.combine_recv(pending.sent)
        if result.data_ptr() != out.data_ptr():
            out.copy_(result)
        self._maybe_check_errors()

    # ------------------------------------------------------------------ shared by the eager API and the custom ops

    def _run_dispatch(self, x, topk_idx, topk_weights, scales, num_tokens, *,
                      into: DispatchOutputs | None) -> DispatchHandle:
        self._check_usable()
        self._check_no_pending("dispatch")
        args = check_dispatch_args(self.config, self.device, x, topk_idx, topk_weights, scales, num_tokens)
        state = self._backend.dispatch(args, into=into)
        self._generation += 1
        self._latest = DispatchHandle(self._id, self._generation, args.num_rows, state)
        self._maybe_check_errors()
        return self._latest

    def _run_combine(self, y, handle: DispatchHandle, out, weighted, *, topk_idx=None,
                     dispatched: DispatchOutputs | None = None) -> torch.Tensor:
        if out is None:
            out = self._backend.combine_output(handle.num_rows)
        args = check_combine_args(self.config, self.device, y, out, handle.num_rows, weighted, topk_idx=topk_idx,
                                  dispatched=dispatched)
        result = self._backend.combine(args, handle.state)
        self._maybe_check_errors()
        return result

    # ------------------------------------------------------------------ errors and lifetime

    def check_errors(self, *, synchronize: bool = False) -> None:
        """Raise for data errors counted since the last check, then clear them.

        Raises :class:`~hybrid_ep_infer.errors.RoutingDataError` naming each kind,
        its count and this rank, or :class:`~hybrid_ep_infer.errors.PeerTimeoutError`
        (after which the buffer is unusable until ``close()``). The counters are
        read without a device sync, so work still in flight is reported by a later
        check; ``synchronize=True`` waits for the current stream first.
        """
        self._check_usable()
        if synchronize and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        snapshot = self._backend.take_errors()
        try:
            raise_for_errors(snapshot, rank=self.rank, num_experts=self.config.num_experts, phase_names=PHASE_NAMES)
        except PeerTimeoutError as e:
            self._broken = str(e)
            raise

    def close(self) -> None:
        """Release every allocation (and peer mapping). Idempotent."""
        if not self._closed:
            self._closed = True
            self._pending = None  # a pending half is dropped (the CUDA backend waits for it in close)
            self._op_state = None
            _live_buffers.pop(self._id, None)
            self._backend.close()

    def __enter__(self) -> EPBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"EPBuffer(rank={c.rank}/{c.world_size}, hidden={c.hidden}, max_tokens={c.max_tokens}, "
                f"num_experts={c.num_experts}, top_k={c.top_k}, dtype={c.dtype}, layout={c.layout!r}, "
                f"capacity={c.capacity}, backend={self.backend!r}, closed={self._closed})")

    def _check_open(self) -> None:
        """The part of :meth:`_check_usable` that torch.compile can trace (no ctypes call)."""
        if self._closed:
            raise BufferClosedError("this EPBuffer was closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._broken is not None:
            raise BufferClosedError(f"this EPBuffer is unusable after a timeout ({self._broken}); close it")
        snapshot = self._backend.timed_out()
        if snapshot is not None:  # a kernel gave up waiting for a peer: refuse every call from now on
            try:
                raise_for_errors(snapshot, rank=self.rank, num_experts=self.config.num_experts,
                                 phase_names=PHASE_NAMES)
            except PeerTimeoutError as e:
                self._broken = str(e)
                raise

    def _check_handle(self, handle) -> None:
        if not isinstance(handle, DispatchHandle) or handle.buffer_id != self._id:
            raise ValueError("handle must be the DispatchResult.handle of a dispatch on this buffer")
        if handle.generation != self._generation:
            raise ValueError("handle is stale: another dispatch ran on this buffer since; combine must follow its "
                             "own dispatch")

    def _check_split(self) -> None:
        if not self._backend.supports_split:
            raise RuntimeError("this buffer has no split halves: the CUDA backend needs low_latency=True "
                               "(the default up to max_tokens = 1024)")

    def _check_no_pending(self, call: str) -> None:
        """One half at a time: a call while a send awaits its receive is refused before
        anything runs (the peers would pair it with the pending half)."""
        if self._pending is not None:
            half = "dispatch_send" if isinstance(self._pending, PendingDispatch) else "combine_send"
            receive = "dispatch_recv" if half == "dispatch_send" else "combine_recv"
            raise RuntimeError(f"{call} while a {half} is pending on this buffer: call {receive} first")

    def _take_pending(self, pending, kind: type, call: str):
        """Check that ``pending`` is this buffer's pending half of ``kind``; clear and return it."""
        send = "dispatch_send" if kind is PendingDispatch else "combine_send"
        if not isinstance(pending, kind) or pending.buffer_id != self._id:
            raise ValueError(f"{call} needs the {kind.__name__} that this buffer's {send} returned"
                             f"{self._pending_note()}")
        if pending is not self._pending:
            raise ValueError(f"{call}: this {kind.__name__} was already received (or is not the pending "
                             f"send){self._pending_note()}")
        self._pending = None
        return pending

    def _pending_of(self, kind: type, call: str):
        """The pending half, which must be of ``kind`` (the custom ops hold no pending object)."""
        if not isinstance(self._pending, kind):
            send = "dispatch_send" if kind is PendingDispatch else "combine_send"
            raise RuntimeError(f"{call} without a pending {send} on this buffer{self._pending_note()}")
        return self._pending

    def _pending_note(self) -> str:
        """What is pending on this buffer, for error messages."""
        if self._pending is None:
            return " (nothing is pending on this buffer)"
        half = "dispatch_send" if isinstance(self._pending, PendingDispatch) else "combine_send"
        return f" (a {half} is pending on this buffer)"

    def _maybe_check_errors(self) -> None:
        if self.debug and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            self.check_errors(synchronize=True)


def cuda_backend_unavailable_reason() -> str | None:
    """``None`` if ``backend="cuda"`` can be used here, else why not (every reason that applies:
    no GPU, and the compiled library missing or not built at install time)."""
    lib, status = _native.library_status()
    if not torch.cuda.is_available():
        reason = "no CUDA device is visible (torch.cuda.is_available() is False)"
        return reason if lib is not None else f"{reason}; also, {status}"
    if lib is None:
        return status
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"the current GPU has compute capability {major}.{minor}; the kernels need sm_90 (Hopper) or newer"
    try:
        import cuda.bindings.driver  # noqa: F401
    except ImportError:
        return "cuda-python is not installed (pip install 'cuda-bindings>=12.8')"
    return None


def _resolve_device(device, backend: str, group) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if backend == "cuda" or dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
