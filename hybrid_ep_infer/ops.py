"""torch custom ops (namespace ``hybrid_ep_infer``), for torch.compile and CUDA graphs.

Users call :func:`dispatch` and :func:`combine`; they call the ops
``torch.ops.hybrid_ep_infer.dispatch`` / ``.combine``, which never allocate: every
tensor an op writes is an argument (listed as mutated in the schema), and every
tensor that ties a combine to its dispatch (routing, weights, row_expert, counts,
offsets) is an argument too, so a compiler can neither reorder nor drop them. The
buffer is reached through its integer id (a registry of live buffers), so no Python
object crosses the graph. Fake implementations return nothing: all outputs are
arguments, so shapes are static.

Both backends sit behind the ops. Validation runs inside the op (at run time, before
any launch), so tracing sees no data-dependent Python.

The split halves have ops too (``dispatch_send``/``dispatch_recv``,
``combine_send``/``combine_recv``; :meth:`EPBuffer.dispatch_send` says what runs
between them). Every op of a buffer, the one-call ones included, takes the buffer's
:attr:`EPBuffer.op_state` as a mutated argument: each op depends on the one before, so
a compiler keeps them in program order and drops none (a send has no output anyone
reads). ``dispatch_recv`` lists the dispatch outputs as mutated, and ``combine_send``
and ``combine_recv`` both list ``out``, whose result the receive completes.

A combine works on the latest dispatch of its buffer, and its ``topk_idx`` says which
dispatch the caller meant: if its rows ``t < n`` (sanitized as dispatch does) differ
from the routing the latest dispatch was given, the combine is *stale* (say, one left
over from before another dispatch, or replayed from a CUDA graph after one). It still
takes part in the exchange, a collective, but its output is all +0.0 and it is counted
as ``ErrorKind.STALE_COMBINE``, which ``check_errors()`` raises (no host sync: the CUDA
backend compares on the device).
"""

from __future__ import annotations

import contextlib

import torch

from .buffer import DispatchResult, EPBuffer, live_buffer
from .calls import DispatchOutputs

try:  # NVTX ranges: the nvtx package if present, else torch's, else none (CPU-only torch)
    import nvtx as _nvtx_package

    def _nvtx_range(name: str):
        return _nvtx_package.annotate(name)
except ImportError:
    def _nvtx_range(name: str):
        if torch.cuda.is_available():
            return torch.cuda.nvtx.range(name)
        return contextlib.nullcontext()


_lib = torch.library.Library("hybrid_ep_infer", "DEF")
# ``state`` (EPBuffer.op_state) is optional on the one-call ops only so that callers of
# the raw ops from before it existed keep working; the wrappers always pass it.
_lib.define(
    "dispatch(int buffer, Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor? scales, "
    "Tensor? num_tokens_device, int num_tokens, Tensor(a!) hidden, Tensor(b!)? out_scales, Tensor(c!) weights, "
    "Tensor(d!) row_expert, Tensor(e!) tokens_per_expert, Tensor(f!)? offsets, Tensor(g!)? state=None) -> ()")
_lib.define(
    "combine(int buffer, Tensor y, Tensor topk_idx, Tensor weights, Tensor row_expert, Tensor tokens_per_expert, "
    "Tensor? offsets, bool weighted, Tensor(a!) out, Tensor(b!)? state=None) -> ()")
_lib.define(
    "dispatch_send(int buffer, Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor? scales, "
    "Tensor? num_tokens_device, int num_tokens, Tensor(a!) state) -> ()")
_lib.define(
    "dispatch_recv(int buffer, Tensor(a!) state, Tensor(b!) hidden, Tensor(c!)? out_scales, Tensor(d!) weights, "
    "Tensor(e!) row_expert, Tensor(f!) tokens_per_expert, Tensor(g!)? offsets) -> ()")
_lib.define(
    "combine_send(int buffer, Tensor y, Tensor topk_idx, Tensor weights, Tensor row_expert, "
    "Tensor tokens_per_expert, Tensor? offsets, bool weighted, Tensor(a!) out, Tensor(b!) state) -> ()")
_lib.define("combine_recv(int buffer, Tensor(a!) out, Tensor(b!) state) -> ()")


# The schema cannot say "an int or a tensor", so num_tokens crosses the op as two
# arguments: a device tensor, else a host int with -1 for "not given" (= m).
def _num_tokens_to_schema(num_tokens) -> tuple[torch.Tensor | None, int]:
    if isinstance(num_tokens, torch.Tensor):
        return num_tokens, -1
    # (a negative count would read as "not given" on the other side)
    if isinstance(num_tokens, int) and num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return None, -1 if num_tokens is None else num_tokens


def _num_tokens_from_schema(num_tokens_device: torch.Tensor | None, num_tokens: int):
    if num_tokens_device is not None:
        return num_tokens_device
    return None if num_tokens < 0 else num_tokens


def _dispatch_impl(buffer_id, x, topk_idx, topk_weights, scales, num_tokens_device, num_tokens, hidden, out_scales,
                   weights, row_expert, tokens_per_expert, offsets, state=None) -> None:
    buffer = live_buffer(buffer_id)
    with _nvtx_range("hybrid_ep_infer.dispatch"):
        # The output tensors the op was given, which may be functional copies of the buffer's.
        into = DispatchOutputs(hidden, out_scales, weights, row_expert, tokens_per_expert, offsets)
        buffer.dispatch_into(into, x, topk_idx, topk_weights, scales=scales,
                             num_tokens=_num_tokens_from_schema(num_tokens_device, num_tokens))


def _combine_impl(buffer_id, y, topk_idx, weights, row_expert, tokens_per_expert, offsets, weighted, out,
                  state=None) -> None:
    buffer = live_buffer(buffer_id)
    with _nvtx_range("hybrid_ep_infer.combine"):
        # The dispatch outputs the op was given (maybe functional copies): combine reads these.
        # It reads no payload, so the op takes none.
        dispatched = DispatchOutputs(hidden=None, scales=None, weights=weights, row_expert=row_expert,
                                     tokens_per_expert=tokens_per_expert, offsets=offsets)
        buffer.combine_latest(y, topk_idx, dispatched, out, weighted=weighted)


def _dispatch_send_impl(buffer_id, x, topk_idx, topk_weights, scales, num_tokens_device, num_tokens,
                        state) -> None:
    buffer = live_buffer(buffer_id)
    with _nvtx_range("hybrid_ep_infer.dispatch_send"):
        # The buffer keeps the pending half; dispatch_recv receives it.
        buffer.dispatch_send(x, topk_idx, topk_weights, scales=scales,
                             num_tokens=_num_tokens_from_schema(num_tokens_device, num_tokens))


def _dispatch_recv_impl(buffer_id, state, hidden, out_scales, weights, row_expert, tokens_per_expert,
                        offsets) -> None:
    buffer = live_buffer(buffer_id)
    with _nvtx_range("hybrid_ep_infer.dispatch_recv"):
        buffer.dispatch_recv_into(DispatchOutputs(hidden, out_scales, weights, row_expert, tokens_per_expert, offsets))


def _combine_send_impl(buffer_id, y, topk_idx, weights, row_expert, tokens_per_expert, offsets, weighted, out,
                       state) -> None:
    buffer = live_buffer(buffer_id)
    with _nvtx_range("hybrid_ep_infer.combine_send"):
        dispatched = DispatchOutputs(hidden=None, scales=None, weights=weights, row_expert=row_expert,
                                     tokens_per_expert=tokens_per_expert, offsets=offsets)
        buffer.combine_send_latest(y, topk_idx, dispatched, out, weighted=weighted)


def _combine_recv_impl(buffer_id, out, state) -> None:
    buffer = live_buffer(buffer_id)
    with _nvtx_range("hybrid_ep_infer.combine_recv"):
        buffer.combine_recv_into(out)


_IMPLS = {"dispatch": _dispatch_impl, "combine": _combine_impl, "dispatch_send": _dispatch_send_impl,
          "dispatch_recv": _dispatch_recv_impl, "combine_send": _combine_send_impl,
          "combine_recv": _combine_recv_impl}


def _fake(*args, **kwargs) -> None:
    return None  # every output is a (mutated) argument: nothing to describe


for _name, _impl in _IMPLS.items():
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"hybrid_ep_infer::{_name}", _fake, lib=_lib)


def dispatch(buffer: EPBuffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
             scales: torch.Tensor | None = None, num_tokens=None) -> DispatchResult:
    """:meth:`EPBuffer.dispatch` through the custom op (traceable by torch.compile).

    Same arguments and result as the method, except that ``result.handle`` is ``None``:
    pass the whole result to :func:`combine` instead.
    """
    out = buffer.dispatch_outputs
    num_tokens_device, host_num_tokens = _num_tokens_to_schema(num_tokens)
    torch.ops.hybrid_ep_infer.dispatch(buffer.id, x, topk_idx, topk_weights, scales, num_tokens_device,
                                       host_num_tokens, out.hidden, out.scales, out.weights, out.row_expert,
                                       out.tokens_per_expert, out.offsets, buffer.op_state)
    return DispatchResult.from_outputs(out, None)


def combine(buffer: EPBuffer, y: torch.Tensor, dispatched: DispatchResult, topk_idx: torch.Tensor, *,
            out: torch.Tensor | None = None, weighted: bool = True) -> torch.Tensor:
    """:meth:`EPBuffer.combine` through the custom op, for the latest dispatch on ``buffer``.

    ``dispatched`` is what :func:`dispatch` returned and ``topk_idx`` the routing it
    was given (both tie this combine to that dispatch for the compiler). A combine
    whose ``topk_idx`` is not the latest dispatch's routing is stale: it outputs zeros
    and is counted as ``ErrorKind.STALE_COMBINE`` (module doc). ``out`` ``[m, H]`` bf16
    defaults to a view of buffer memory.
    """
    if out is None:
        out = buffer.combine_output(topk_idx.shape[0])
    torch.ops.hybrid_ep_infer.combine(buffer.id, y, topk_idx, dispatched.weights, dispatched.row_expert,
                                      dispatched.tokens_per_expert, dispatched.offsets, weighted, out,
                                      buffer.op_state)
    return out


def dispatch_send(buffer: EPBuffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                  scales: torch.Tensor | None = None, num_tokens=None) -> None:
    """:meth:`EPBuffer.dispatch_send` through the custom op: same arguments. The buffer keeps
    the pending half; :func:`dispatch_recv` on the same buffer completes it."""
    num_tokens_device, host_num_tokens = _num_tokens_to_schema(num_tokens)
    torch.ops.hybrid_ep_infer.dispatch_send(buffer.id, x, topk_idx, topk_weights, scales, num_tokens_device,
                                            host_num_tokens, buffer.op_state)


def dispatch_recv(buffer: EPBuffer) -> DispatchResult:
    """:meth:`EPBuffer.dispatch_recv` of the pending :func:`dispatch_send` through the custom op.
    Returns what :func:`dispatch` returns (``handle`` is ``None``)."""
    out = buffer.dispatch_outputs
    torch.ops.hybrid_ep_infer.dispatch_recv(buffer.id, buffer.op_state, out.hidden, out.scales, out.weights,
                                            out.row_expert, out.tokens_per_expert, out.offsets)
    return DispatchResult.from_outputs(out, None)


def combine_send(buffer: EPBuffer, y: torch.Tensor, dispatched: DispatchResult, topk_idx: torch.Tensor, *,
                 out: torch.Tensor | None = None, weighted: bool = True) -> torch.Tensor:
    """:meth:`EPBuffer.combine_send` through the custom op, for the latest dispatch on ``buffer``
    (arguments as :func:`combine`, stale combines included). Returns ``out`` (default: a view
    of buffer memory), which is complete only after :func:`combine_recv` is given it."""
    if out is None:
        out = buffer.combine_output(topk_idx.shape[0])
    torch.ops.hybrid_ep_infer.combine_send(buffer.id, y, topk_idx, dispatched.weights, dispatched.row_expert,
                                           dispatched.tokens_per_expert, dispatched.offsets, weighted, out,
                                           buffer.op_state)
    return out


def combine_recv(buffer: EPBuffer, out: torch.Tensor) -> torch.Tensor:
    """:meth:`EPBuffer.combine_recv` of the pending :func:`combine_send` through the custom op;
    ``out`` is what :func:`combine_send` returned. Returns ``out``, now complete."""
    torch.ops.hybrid_ep_infer.combine_recv(buffer.id, out, buffer.op_state)
    return out
