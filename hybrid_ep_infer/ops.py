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
from .validation import DispatchOutputs, check_combine_args, check_dispatch_args

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
_lib.define(
    "dispatch(int buffer, Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor? scales, "
    "Tensor? num_tokens_device, int num_tokens, Tensor(a!) hidden, Tensor(b!)? out_scales, Tensor(c!) weights, "
    "Tensor(d!) row_expert, Tensor(e!) tokens_per_expert, Tensor(f!)? offsets) -> ()")
_lib.define(
    "combine(int buffer, Tensor y, Tensor topk_idx, Tensor weights, Tensor row_expert, Tensor tokens_per_expert, "
    "Tensor? offsets, bool weighted, Tensor(a!) out) -> ()")


def _dispatch_impl(buffer_id, x, topk_idx, topk_weights, scales, num_tokens_device, num_tokens, hidden, out_scales,
                   weights, row_expert, tokens_per_expert, offsets) -> None:
    buffer = live_buffer(buffer_id)
    with _nvtx_range("hybrid_ep_infer.dispatch"):
        buffer._check_usable()
        n = num_tokens_device if num_tokens_device is not None else (None if num_tokens < 0 else num_tokens)
        args = check_dispatch_args(buffer.config, buffer.device, x, topk_idx, topk_weights, scales, n)
        buffer._dispatch(args, DispatchOutputs(hidden, out_scales, weights, row_expert, tokens_per_expert, offsets))
        buffer._maybe_check_errors()


def _combine_impl(buffer_id, y, topk_idx, weights, row_expert, tokens_per_expert, offsets, weighted, out) -> None:
    buffer = live_buffer(buffer_id)
    with _nvtx_range("hybrid_ep_infer.combine"):
        buffer._check_usable()
        latest = buffer._latest
        if latest is None:
            raise ValueError("combine before any dispatch on this buffer")
        if out.shape[0] != latest.num_rows:
            raise ValueError(f"out must have {latest.num_rows} rows (those of the latest dispatch), "
                             f"got {out.shape[0]}")
        check_combine_args(buffer.config, buffer.device, y, out, latest.num_rows, topk_idx=topk_idx)
        buffer._backend.combine(y, latest.state, latest.num_rows, out, weighted, weights, topk_idx=topk_idx)
        buffer._maybe_check_errors()


_lib.impl("dispatch", _dispatch_impl, "CompositeExplicitAutograd")
_lib.impl("combine", _combine_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("hybrid_ep_infer::dispatch", lib=_lib)
def _dispatch_fake(*args, **kwargs) -> None:
    return None


@torch.library.register_fake("hybrid_ep_infer::combine", lib=_lib)
def _combine_fake(*args, **kwargs) -> None:
    return None


def dispatch(buffer: EPBuffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
             scales: torch.Tensor | None = None, num_tokens=None) -> DispatchResult:
    """:meth:`EPBuffer.dispatch` through the custom op (traceable by torch.compile).

    Same arguments and result as the method, except that ``result.handle`` is ``None``:
    pass the whole result to :func:`combine` instead.
    """
    out = buffer._backend.outputs
    device_n = num_tokens if isinstance(num_tokens, torch.Tensor) else None
    host_n = -1 if num_tokens is None or device_n is not None else num_tokens
    torch.ops.hybrid_ep_infer.dispatch(buffer._id, x, topk_idx, topk_weights, scales, device_n, host_n, out.hidden,
                                       out.scales, out.weights, out.row_expert, out.tokens_per_expert, out.offsets)
    return DispatchResult(*out, None)


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
        out = buffer._backend.combine_out[: topk_idx.shape[0]]
    torch.ops.hybrid_ep_infer.combine(buffer._id, y, topk_idx, dispatched.weights, dispatched.row_expert,
                                      dispatched.tokens_per_expert, dispatched.offsets, weighted, out)
    return out
