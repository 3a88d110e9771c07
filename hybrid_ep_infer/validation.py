"""Argument checks of dispatch and combine (docs/SPEC.md section 6), shared by every backend.

Each argument gets its own block and its own message naming it; nothing is
launched before all of them pass. ``assert`` is never used: it vanishes under -O.
Each check returns the argument object of its call (``calls.py``), which is all the
layers below it see.
"""

from __future__ import annotations

import torch

from .calls import CombineArgs, DispatchArgs, DispatchOutputs
from .config import BufferConfig


def _check_tensor(name: str, t, *, dtypes, shape, device: torch.device, aligned: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major), got strides {t.stride()}")
    if aligned and t.data_ptr() % 16:
        raise ValueError(f"{name} must start at a 16-byte aligned address (kernels move 16-byte vectors); "
                         "a view at an odd offset is not; pass a copy")


def check_dispatch_args(config: BufferConfig, device: torch.device, x, topk_idx, topk_weights, scales,
                        num_tokens) -> DispatchArgs:
    # x: [m, H] of the payload dtype; m decides every other shape.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [m, hidden], got shape {list(x.shape)}")
    m = x.shape[0]
    if m > config.max_tokens:
        raise ValueError(f"x has {m} rows, more than the buffer's max_tokens ({config.max_tokens})")
    _check_tensor("x", x, dtypes=(config.dtype,), shape=(m, config.hidden), device=device, aligned=True)

    # Routing: [m, K] ids (int32 or int64) and fp32 weights.
    _check_tensor("topk_idx", topk_idx, dtypes=(torch.int32, torch.int64), shape=(m, config.top_k), device=device)
    _check_tensor("topk_weights", topk_weights, dtypes=(torch.float32,), shape=(m, config.top_k), device=device)

    # FP8 scales: [m, H/128] fp32, required for FP8 payloads and refused otherwise.
    if config.is_fp8:
        if scales is None:
            raise ValueError(f"scales [m, {config.num_scale_blocks}] float32 are required for {config.dtype} payloads")
        _check_tensor("scales", scales, dtypes=(torch.float32,), shape=(m, config.num_scale_blocks), device=device)
    elif scales is not None:
        raise ValueError("scales are only accepted for FP8 payloads; this buffer carries bfloat16")

    # num_tokens: None (= m), a Python int in [0, m], or a 1-element int32 tensor on the buffer's device.
    if num_tokens is None:
        num_tokens = m
    elif isinstance(num_tokens, torch.Tensor):
        if num_tokens.dtype != torch.int32 or num_tokens.numel() != 1:
            raise TypeError(f"num_tokens as a tensor must be one int32 element, got {num_tokens.dtype} "
                            f"with {num_tokens.numel()} elements")
        if num_tokens.device != device:
            raise ValueError(f"num_tokens must be on {device}, got {num_tokens.device}")
    elif isinstance(num_tokens, int) and not isinstance(num_tokens, bool):
        if not 0 <= num_tokens <= m:
            raise ValueError(f"num_tokens must be in [0, {m}] (rows of x), got {num_tokens}")
    else:
        raise TypeError(f"num_tokens must be None, an int or an int32 tensor, got {type(num_tokens).__name__}")

    return DispatchArgs(x, topk_idx, topk_weights, scales, num_tokens)


def check_combine_args(config: BufferConfig, device: torch.device, y, out, num_rows: int, weighted, *,
                       topk_idx=None, dispatched: DispatchOutputs | None = None) -> CombineArgs:
    """The checks of both combines (the eager API and the custom op). ``num_rows`` is m of
    the dispatch the combine is for; ``out`` is the caller's or the backend's default view."""
    if not isinstance(weighted, bool):
        raise TypeError(f"weighted must be a bool, got {type(weighted).__name__}")

    # y: the expert outputs in the dispatch layout, [*R, H] bf16.
    row_shape = config.row_shape
    _check_tensor("y", y, dtypes=(torch.bfloat16,), shape=(*row_shape, config.hidden), device=device, aligned=True)

    # out: [m, H] bf16, m the rows of the dispatched x.
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] != num_rows:
        raise ValueError(f"out must have shape {[num_rows, config.hidden]}, {num_rows} rows as the dispatched x had, "
                         f"got {list(out.shape)}")
    _check_tensor("out", out, dtypes=(torch.bfloat16,), shape=(num_rows, config.hidden), device=device, aligned=True)

    # The custom op's routing, for the stale-combine check: the dispatch's [m, K] ids.
    if topk_idx is not None:
        _check_tensor("topk_idx", topk_idx, dtypes=(torch.int32, torch.int64), shape=(num_rows, config.top_k),
                      device=device)
    return CombineArgs(y, out, num_rows, weighted, topk_idx, dispatched)
