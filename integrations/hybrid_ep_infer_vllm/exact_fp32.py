"""float32 activations through a bfloat16 :class:`~hybrid_ep_infer.EPBuffer`, exactly.

The SPEC's payloads are bf16/FP8 and its combine rounds to bf16, so a float32 model
(what vLLM tests serve) cannot use a buffer as is. Without changing the SPEC:

* **Dispatch** carries the fp32 rows as raw bytes: ``x`` ``[m, H]`` fp32 is viewed as
  ``[m, 2H]`` bf16 on a bf16 buffer built with ``hidden = 2H``. Dispatch moves payload
  bytes verbatim (both backends copy bytes; nothing is computed on them), and the
  received rows are viewed back as ``[rows, H]`` fp32.
* **Combine** sums in fp32 but rounds every partial to bf16, so splitting ``y`` into bf16
  pieces and combining each piece is *not* enough: ``combine(hi)`` would already carry
  bf16 rounding error of the sum. Instead combine is used as an exact *gather*: the
  dispatched "weights" are the top-k slot numbers, so each row knows its slot k; the
  expert output y of a row is split exactly into three bf16 pieces (its significant
  bits 8 at a time, :func:`split3`; ``(hi + mid) + lo == y`` in fp32), and piece p of
  slot k goes to column block ``3k + p`` of an unweighted combine, zeros elsewhere.
  For every (token, column) at most one row in the whole group is non-zero, so every
  fp32 sum and bf16 rounding inside combine is exact. The source then has each slot's
  fp32 expert output and applies the routing weights and the top-k sum in fp32 itself
  (ascending k).

Cost: dispatch moves 2x the bytes of bf16; the 3K column blocks take ``ceil(3K/2)``
combines of width 2H, i.e. about 3K times the bytes of one bf16 combine (6x for top-2,
24x for top-8), plus the split on the destination. Meant for testing and accuracy
checks (fp32 end-to-end comparisons), not for speed. No host sync: CUDA-graph safe.
"""

from __future__ import annotations

import torch

from hybrid_ep_infer import ops

PIECES = 3  # bf16 pieces of one fp32 value


def buffer_format(hidden: int, dtype: torch.dtype) -> tuple[int, torch.dtype]:
    """``(hidden, payload dtype)`` of the EPBuffer that carries ``[*, hidden]`` rows of ``dtype``."""
    if dtype == torch.bfloat16:
        return hidden, torch.bfloat16
    if dtype == torch.float32:
        return 2 * hidden, torch.bfloat16  # each fp32 element as two bf16-sized halves (raw bytes)
    raise TypeError(f"activations must be bfloat16 or float32, got {dtype}")


def slot_numbers(num_rows: int, top_k: int, device: torch.device) -> torch.Tensor:
    """``[m, K]`` fp32 ``k``: dispatched in place of the weights, so each row carries its slot."""
    return torch.arange(top_k, dtype=torch.float32, device=device).expand(num_rows, top_k).contiguous()


def row_slots(row_expert: torch.Tensor, dispatched: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[*R]`` int64 slot of each written row; ``top_k`` (no slot) for every other row."""
    # Unwritten rows hold unspecified weights (maybe NaN): replace them before the cast.
    return torch.where(row_expert >= 0, dispatched, float(top_k)).long()


def split3(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three bf16 tensors whose fp32 sum ``(hi + mid) + lo`` is exactly ``y``.

    ``hi`` is ``y`` cut to its top 8 significant bits (the low 16 bits of the fp32
    cleared), ``mid`` the same of the rest, ``lo`` what is left. Every piece is a bf16
    value before it is converted, so no rounding is involved: a compiler that keeps
    ``y.to(bf16).float()`` in fp32 (inductor does unless it emulates precision casts)
    cannot change the pieces. Exact for ``|y| >= 2**-110`` (finite) and for 0; below,
    the last piece may fall under bf16's smallest subnormal (error at most ``2**-133``).
    """
    hi = _top_bits(y)
    rest = y - hi  # exact: the low 16 bits of y
    mid = _top_bits(rest)
    lo = rest - mid  # exact: at most 8 significant bits
    return hi.to(torch.bfloat16), mid.to(torch.bfloat16), lo.to(torch.bfloat16)


def _top_bits(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v`` with the low 16 bits of each value cleared: exactly a bf16 value."""
    return (v.float().view(torch.int32) & -65536).view(torch.float32)


def gather_slots(buffer, dispatched, topk_idx: torch.Tensor, y: torch.Tensor, slots: torch.Tensor,
                 top_k: int) -> torch.Tensor:
    """Every (token, slot)'s expert output, bit-exact, through unweighted combines (the
    custom op ``hybrid_ep_infer.ops.combine``, so this traces and compiles).

    Args:
        buffer: the bf16 EPBuffer (hidden 2H) of the matching dispatch; calls are
            collectives, and every rank makes the same ``ceil(3K/2)`` combines.
        dispatched: what ``hybrid_ep_infer.ops.dispatch`` returned for that dispatch.
        topk_idx: the ``[m, K]`` routing it was given.
        y: ``[*R, H]`` fp32 expert output per dispatched row (``[R]`` contiguous layout,
            ``[L, cap_e]`` batched).
        slots: ``[*R]`` int64 from :func:`row_slots`.

    Returns:
        ``[m, K, H]`` fp32; zero where a slot had no expert (id -1) or for rows ``>= n``.
    """
    H = y.shape[-1]
    width = buffer.config.hidden // H  # column blocks per combine
    pieces = split3(y)
    zero = pieces[0].new_zeros(())
    blocks = PIECES * top_k
    gathered = []
    for first in range(0, blocks, width):
        columns = []
        for block in range(first, first + width):
            k, piece = divmod(block, PIECES)
            if k < top_k:
                columns.append(torch.where((slots == k).unsqueeze(-1), pieces[piece], zero))
            else:  # filler after the last block
                columns.append(zero.expand_as(pieces[0]))
        # At most one non-zero row per (token, column) in the group: combine only adds zeros.
        out = ops.combine(buffer, torch.cat(columns, dim=-1), dispatched, topk_idx, weighted=False)
        gathered.append(out.float())  # a copy: ``out`` is buffer memory reused by the next combine
    parts = torch.cat(gathered, dim=1)[:, : blocks * H].view(-1, top_k, PIECES, H)
    return (parts[:, :, 0] + parts[:, :, 1]) + parts[:, :, 2]


def weighted_sum(rows: torch.Tensor, topk_weights: torch.Tensor | None) -> torch.Tensor:
    """``[m, H]`` fp32 ``sum_k w_k * rows[:, k]`` in ascending k (``None``: weights of 1)."""
    total = torch.zeros_like(rows[:, 0])
    for k in range(rows.shape[1]):
        term = rows[:, k] if topk_weights is None else rows[:, k] * topk_weights[:, k : k + 1]
        total = total + term
    return total
