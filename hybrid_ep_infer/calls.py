"""What one dispatch or combine call carries through every layer, from the checks to C.

``validation.py`` builds :class:`DispatchArgs` and :class:`CombineArgs` once, after all
checks pass; the buffer hands them to its backend, and the CUDA backend hands them on to
``_native.NativeContext``, which turns each into its C struct. Nothing below the checks
converts an argument into another form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class DispatchOutputs(NamedTuple):
    """The tensors a dispatch writes (docs/SPEC.md section 3), indexed like the rows.

    A backend keeps one set for the buffer's lifetime (``Backend.outputs``); the custom
    op may be given another set (a compiler's functional copies of those). The set the
    combine op passes on (``CombineArgs.dispatched``) has no payload: hidden and scales
    are None there.
    """

    hidden: torch.Tensor  # [*R, H] payload dtype
    scales: torch.Tensor | None  # [*R, H / 128] float32, FP8 payloads only
    weights: torch.Tensor  # [*R] float32
    row_expert: torch.Tensor  # [*R] int32, -1 where no row was written
    tokens_per_expert: torch.Tensor  # [L] int32
    offsets: torch.Tensor | None  # [L + 1] int32, contiguous layout only


@dataclass(frozen=True)
class DispatchArgs:
    """Checked dispatch inputs (``validation.check_dispatch_args``)."""

    x: torch.Tensor  # [m, H] payload dtype
    topk_idx: torch.Tensor  # [m, K] int32 or int64
    topk_weights: torch.Tensor  # [m, K] float32
    scales: torch.Tensor | None  # [m, H / 128] float32, FP8 payloads only
    # n: a host int in [0, m] (the caller's None already resolved to m), or a 1-element
    # int32 tensor on the buffer's device whose value only the device reads.
    num_tokens: int | torch.Tensor

    @property
    def num_rows(self) -> int:
        """m, the rows of ``x``."""
        return self.x.shape[0]


@dataclass(frozen=True)
class CombineArgs:
    """Checked combine inputs (``validation.check_combine_args``)."""

    y: torch.Tensor  # [*R, H] bfloat16, in the dispatch layout
    out: torch.Tensor  # [num_rows, H] bfloat16: the caller's, or the backend's combine_output view
    num_rows: int  # m of the dispatch this combine is for
    weighted: bool
    # The custom op's routing [m, K], for the stale-combine check (docs/SPEC.md section 7);
    # None for the eager API, whose handle already names the dispatch.
    topk_idx: torch.Tensor | None = None
    # The dispatch outputs the custom op was given (under torch.compile, functional copies
    # of the backend's own). A backend that reads dispatch results from tensors must read
    # these; None: its own outputs.
    dispatched: DispatchOutputs | None = None
