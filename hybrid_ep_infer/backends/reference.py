"""The reference backend: docs/SPEC.md sections 2-4 in plain torch, eager, on any device.

This module *defines* the semantics every kernel is checked against, bit for bit,
so it is written for clarity: each step is one vectorised torch expression, and
the only Python loops run over experts, top-k slots or ranks, never over tokens.
It may allocate, synchronize and use torch.distributed (gloo or NCCL).

Dispatch on rank r, from every rank s's routing:
  1. sanitize: ids outside [-1, E) and repeats within a row become -1 (counted);
  2. exchange: all-gather every rank's first n rows (routing, weights, x, scales);
  3. select the rows (s, t, k) whose expert lives on r, order them by
     (local expert, s, t, k), place them under the capacity, write payload,
     weights, scales, row_expert, counts, offsets and zero padding.
Combine reverses it with the exact recipe of docs/SPEC.md section 4: per destination rank,
an fp32 sum over ascending k of separately rounded products, rounded once to bf16;
per source token, an fp32 sum of those bf16 partials in ascending rank order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..calls import CombineArgs, DispatchArgs, DispatchOutputs
from ..config import CONTIGUOUS, BufferConfig, align_up
from ..errors import ERROR_BLOCK_WORDS, ErrorKind, ErrorSnapshot
from .base import Backend


def sanitize_routing(topk_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, int, int]:
    """Drop invalid and repeated expert ids (docs/SPEC.md section 6).

    Args:
        topk_idx: ``[n, K]`` int32/int64, only the rows to be dispatched.
        num_experts: E; valid ids are ``[0, E)``, and -1 means "no expert".

    Returns:
        ``(ids, num_invalid, num_repeated)``: ``ids`` is ``[n, K]`` int64 with -1 for
        every slot that is "no expert", outside ``[-1, E)``, or repeats an id that
        appears earlier in its row (the first occurrence is kept).
    """
    ids = topk_idx.to(torch.int64)
    in_range = (ids >= -1) & (ids < num_experts)
    ids = torch.where(in_range, ids, -1)
    top_k = ids.shape[1]
    same = ids.unsqueeze(2) == ids.unsqueeze(1)  # [n, k, j]: slot k equals slot j
    earlier = torch.ones(top_k, top_k, dtype=torch.bool, device=ids.device).tril(-1)  # j < k
    repeated = (same & earlier).any(dim=2) & (ids >= 0)
    ids = torch.where(repeated, -1, ids)
    return ids, int((~in_range).sum()), int(repeated.sum())


@dataclass
class ReferenceRows:
    """Where each written row came from, kept by dispatch for the matching combine.

    All are 1-D int64 of the same length R (written rows on this rank), in the
    order rows were selected: ``dest`` is the flat row slot, ``src_rank``,
    ``src_token`` and ``slot`` are (s, t, k). ``ids`` is this rank's own sanitized
    routing ``[n, K]``, for the stale-combine check.
    """

    dest: torch.Tensor
    src_rank: torch.Tensor
    src_token: torch.Tensor
    slot: torch.Tensor
    num_tokens: int  # n of this rank, after the device-side range check
    ids: torch.Tensor


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, config: BufferConfig, group, device: torch.device):
        self.config = config
        self.group = group
        self.device = device
        # Collectives move CPU tensors over gloo (which also serves ranks that share a GPU,
        # where NCCL refuses to run) and device tensors over NCCL.
        self._wire_device = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
        c = config
        rows = c.row_shape
        # Outputs live here for the buffer's lifetime, like the CUDA backend's, so
        # results are views with the same lifetime rules on both backends.
        self.outputs = DispatchOutputs(
            hidden=torch.zeros(*rows, c.hidden, dtype=c.dtype, device=device),
            scales=torch.zeros(*rows, c.num_scale_blocks, dtype=torch.float32, device=device) if c.is_fp8 else None,
            weights=torch.zeros(rows, dtype=torch.float32, device=device),
            row_expert=torch.full(rows, -1, dtype=torch.int32, device=device),
            tokens_per_expert=torch.zeros(c.num_local_experts, dtype=torch.int32, device=device),
            offsets=(torch.zeros(c.num_local_experts + 1, dtype=torch.int32, device=device)
                     if c.layout == CONTIGUOUS else None))
        self.combine_out = torch.zeros(c.max_tokens, c.hidden, dtype=torch.bfloat16, device=device)
        self._errors = [0] * ERROR_BLOCK_WORDS

    @property
    def nbytes(self) -> int:
        tensors = (*self.outputs, self.combine_out)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def take_errors(self) -> ErrorSnapshot:
        snapshot = ErrorSnapshot.from_words(self._errors)
        self._errors = [0] * ERROR_BLOCK_WORDS
        return snapshot

    def timed_out(self) -> ErrorSnapshot | None:
        return None  # collectives of torch.distributed wait without a bound of ours

    def close(self) -> None:
        self.outputs = self.combine_out = None

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, args: DispatchArgs, *, into: DispatchOutputs | None = None) -> ReferenceRows:
        """Writes this rank's dispatch output into ``into`` if given (the custom op's
        tensors), else into :attr:`outputs`."""
        out = into if into is not None else self.outputs
        c = self.config
        W, T, K, H = c.world_size, c.max_tokens, c.top_k, c.hidden

        # 1. This rank's n and sanitized routing. Rows >= n are never read.
        n = args.num_tokens
        if isinstance(n, torch.Tensor):  # checked on the device by the CUDA backend; here on the host
            n = int(n.item())
            if not 0 <= n <= args.num_rows:
                self._errors[ErrorKind.BAD_NUM_TOKENS] += 1
                n = 0
        ids, num_invalid, num_repeated = sanitize_routing(args.topk_idx[:n], c.num_experts)
        self._errors[ErrorKind.INVALID_EXPERT_ID] += num_invalid
        self._errors[ErrorKind.REPEATED_EXPERT_ID] += num_repeated

        # 2. Exchange every rank's first n rows, padded to T (padding routes nowhere).
        ids_all = self._all_gather(_pad_rows(ids, T, fill=-1))  # [W, T, K] int64
        weights_all = self._all_gather(_pad_rows(args.topk_weights[:n], T))  # [W, T, K]
        x_all = self._all_gather(_pad_rows(_as_bytes(args.x[:n]), T))  # [W, T, H * itemsize] bytes
        scales_all = self._all_gather(_pad_rows(args.scales[:n], T)) if c.is_fp8 else None

        # 3. Rows for this rank, ordered by (local expert, s, t, k). Flat position
        #    p = (s*T + t)*K + k is already in (s, t, k) order; a stable sort by
        #    expert keeps that order inside each expert.
        first, last = c.expert_range
        flat_ids = ids_all.reshape(-1)
        pos = ((flat_ids >= first) & (flat_ids < last)).nonzero().squeeze(1)
        expert = flat_ids[pos] - first
        order = torch.sort(expert, stable=True).indices
        pos, expert = pos[order], expert[order]
        rows_per_expert = torch.bincount(expert, minlength=c.num_local_experts)
        rank_in_expert = torch.arange(pos.numel(), device=pos.device) - (
            torch.cumsum(rows_per_expert, 0) - rows_per_expert)[expert]

        # 4. Placement under the capacity; rows that do not fit are counted, not written.
        written, offsets = self._place(rows_per_expert.tolist())
        keep = rank_in_expert < torch.tensor(written, device=pos.device)[expert]
        self._errors[ErrorKind.CAPACITY_OVERFLOW] += int((~keep).sum())
        pos, expert, rank_in_expert = pos[keep], expert[keep], rank_in_expert[keep]
        if c.layout == CONTIGUOUS:
            dest = torch.tensor(offsets[:-1], device=pos.device)[expert] + rank_in_expert
        else:
            dest = expert * c.capacity + rank_in_expert
        src_rank, src_token, slot = pos // (T * K), (pos // K) % T, pos % K

        # 5. Write the outputs. Payloads move as bytes: carried verbatim, any dtype.
        hidden = _as_bytes(out.hidden.view(-1, H))
        hidden[dest] = x_all.view(W * T, -1)[src_rank * T + src_token]
        out.weights.view(-1)[dest] = weights_all[src_rank, src_token, slot]
        out.row_expert.fill_(-1)
        out.row_expert.view(-1)[dest] = expert.to(torch.int32)
        if c.is_fp8:
            out.scales.view(-1, c.num_scale_blocks)[dest] = scales_all[src_rank, src_token]
        if c.layout == CONTIGUOUS:  # zero padding rows, weight 0
            for e in range(c.num_local_experts):
                lo, hi = offsets[e] + written[e], offsets[e + 1]
                hidden[lo:hi] = 0
                out.weights[lo:hi] = 0
                if c.is_fp8:
                    out.scales[lo:hi] = 0
            out.offsets.copy_(torch.tensor(offsets, dtype=torch.int32))
        out.tokens_per_expert.copy_(torch.tensor(written, dtype=torch.int32))
        return ReferenceRows(dest, src_rank, src_token, slot, n, ids)

    # ------------------------------------------------------------------ split halves
    #
    # The send half keeps a copy of its inputs (the caller may overwrite them before the
    # receive) and the receive half runs the one-call op on that copy: every collective
    # happens in the receive, so ranks pair them by the order of their receives, which
    # the collective contract (every rank makes the same calls in the same order) fixes.

    @property
    def supports_split(self) -> bool:
        return True

    def dispatch_send(self, args: DispatchArgs) -> DispatchArgs:
        n = args.num_tokens.clone() if isinstance(args.num_tokens, torch.Tensor) else args.num_tokens
        scales = args.scales.clone() if args.scales is not None else None
        return DispatchArgs(args.x.clone(), args.topk_idx.clone(), args.topk_weights.clone(), scales, n)

    def dispatch_recv(self, sent: DispatchArgs, *, into: DispatchOutputs | None = None) -> ReferenceRows:
        return self.dispatch(sent, into=into)

    def combine_send(self, args: CombineArgs, rows: ReferenceRows) -> tuple[CombineArgs, ReferenceRows]:
        # Copies of every input tensor the receive reads: under torch.compile the custom op's
        # routing and weights may be temporaries whose memory is reused before the receive.
        topk_idx = args.topk_idx.clone() if args.topk_idx is not None else None
        dispatched = args.dispatched
        if dispatched is not None:
            dispatched = dispatched._replace(weights=dispatched.weights.clone())
        return replace(args, y=args.y.clone(), topk_idx=topk_idx, dispatched=dispatched), rows

    def combine_recv(self, sent: tuple[CombineArgs, ReferenceRows]) -> torch.Tensor:
        return self.combine(*sent)

    def _place(self, rows_per_expert: list[int]) -> tuple[list[int], list[int]]:
        """Rows written per expert and the contiguous offsets ([] of L+1; batched: unused)."""
        c = self.config
        if c.layout != CONTIGUOUS:
            return [min(r, c.capacity) for r in rows_per_expert], []
        written, offsets = [], [0]
        for rows in rows_per_expert:
            fit = min(rows, max(c.capacity - offsets[-1], 0))
            written.append(fit)
            offsets.append(offsets[-1] + align_up(fit, c.pad_multiple))
        return written, offsets

    # ------------------------------------------------------------------ combine

    def combine(self, args: CombineArgs, rows: ReferenceRows) -> torch.Tensor:
        """Weights come from ``args.dispatched`` if given (the custom op's, maybe a functional
        copy), else from :attr:`outputs`.

        ``args.topk_idx`` (the custom op's): if its rows ``t < n``, sanitized, differ from the
        latest dispatch's, the combine is stale: it takes part in the exchange as usual,
        but this rank's output is +0.0 and the combine is counted (``STALE_COMBINE``).
        """
        c = self.config
        W, T, K, H = c.world_size, c.max_tokens, c.top_k, c.hidden
        y, topk_idx = args.y, args.topk_idx
        weights = (args.dispatched if args.dispatched is not None else self.outputs).weights

        # On this rank (as destination): one fp32 sum per (source rank, token) over
        # ascending k of fp32(w * y), separate multiply and add, then one bf16 rounding.
        term = y.reshape(-1, H)[rows.dest].float()
        if args.weighted:
            term = term * weights.reshape(-1)[rows.dest].unsqueeze(1)
        acc = torch.zeros(W, T, H, dtype=torch.float32, device=y.device)
        for k in range(K):
            sel = (rows.slot == k).nonzero().squeeze(1)
            s, t = rows.src_rank[sel], rows.src_token[sel]
            acc[s, t] = acc[s, t] + term[sel]  # (s, t) unique within one k
        partials = acc.to(torch.bfloat16)  # [W (source), T, H]

        # Send each source its partials; receive ours from every destination.
        received = self._all_to_all(partials)  # [W (destination), T, H]

        # On this rank (as source): fp32 sum in ascending destination rank, from +0.0.
        total = torch.zeros(T, H, dtype=torch.float32, device=y.device)
        for r in range(W):
            total = total + received[r].float()
        # Rows t >= n got no partials anywhere, so they are +0.0 already.
        result = total[: args.num_rows].to(torch.bfloat16)
        if topk_idx is not None:
            ids, _, _ = sanitize_routing(topk_idx[: rows.num_tokens], c.num_experts)
            if not torch.equal(ids, rows.ids):
                self._errors[ErrorKind.STALE_COMBINE] += 1
                result = torch.zeros_like(result)
        args.out.copy_(result)
        return args.out

    # ------------------------------------------------------------------ collectives

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[W, *t.shape]`` of every rank's ``t``, moved as bytes (gloo lacks some dtypes)."""
        t = t.contiguous()
        flat = t.view(-1).view(torch.uint8).to(self._wire_device)
        gathered = [torch.empty_like(flat) for _ in range(self.config.world_size)]
        dist.all_gather(gathered, flat, group=self.group)
        return torch.stack(gathered).to(t.device).view(t.dtype).view(self.config.world_size, *t.shape)

    def _all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """Exchange ``t[r]`` with rank r (dim 0 is the peer); returns what each peer sent us."""
        W = self.config.world_size
        send = t.contiguous().view(W, -1).view(torch.uint8).to(self._wire_device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.to(t.device).view(t.dtype).view(t.shape)


def _pad_rows(t: torch.Tensor, rows: int, fill=0) -> torch.Tensor:
    """``t`` ([n, ...], n <= rows) extended to ``[rows, ...]`` with ``fill``."""
    padded = torch.full((rows, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    return padded


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """View a row-contiguous ``[rows, H]`` payload as ``[rows, H * itemsize]`` uint8."""
    return t.view(torch.uint8)
