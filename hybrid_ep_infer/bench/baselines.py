"""What a user would otherwise run, on the same GPUs: NCCL collectives plus torch permutes.
(On the CPU the same code runs over gloo, and the impl names say so.)

AllGatherReduceScatter (vLLM's default path): all-gather every rank's tokens and routing,
permute the rows of this rank's experts (static shapes: graph-capturable), and after the
experts unpermute with the weights and reduce-scatter the tokens back.

AllToAll: NCCL all_to_all_single of the deduplicated rows (one copy per token and
destination), expanded to experts on the receiver; combine sends one weighted partial per
(token, destination) back. Split sizes come from the routing on the host, so it cannot be
captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def impl_name(kind: str, group=None) -> str:
    """``<process group backend>_<kind>``: nccl_all_to_all on GPUs, gloo_all_to_all on the CPU."""
    return f"{dist.get_backend(group)}_{kind}"


class AllGatherReduceScatter:
    kind = "allgather_reducescatter"
    graphable = True

    def __init__(self, *, world_size, rank, max_tokens, hidden, local_experts, top_k, dtype, device, group=None):
        self.impl = impl_name(self.kind, group)
        W, T, K = world_size, max_tokens, top_k
        self.W, self.rank, self.T, self.K, self.L, self.group = W, rank, T, K, local_experts, group
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.dtype = dtype
        self.gathered_x = torch.empty(W * T, hidden * itemsize, dtype=torch.uint8, device=device)
        self.gathered_scales = (torch.empty(W * T, hidden // 128, dtype=torch.float32, device=device)
                                if dtype != torch.bfloat16 else None)
        self.gathered_idx = torch.empty(W * T, K, dtype=torch.int64, device=device)
        self.gathered_w = torch.empty(W * T, K, dtype=torch.float32, device=device)
        self.capacity = W * T * min(K, local_experts)
        self.out = torch.empty(T, hidden, dtype=torch.bfloat16, device=device)

    def dispatch(self, x, idx, weights, scales=None):
        """Returns (rows [cap, H], scales or None, group_ends [L] int32)."""
        T = self.T
        x_pad = torch.zeros(T, x.shape[1], dtype=x.dtype, device=x.device)
        x_pad[: x.shape[0]] = x
        idx_pad = torch.full((T, self.K), -1, dtype=torch.int64, device=x.device)
        idx_pad[: idx.shape[0]] = idx
        w_pad = torch.zeros(T, self.K, dtype=torch.float32, device=x.device)
        w_pad[: weights.shape[0]] = weights
        dist.all_gather_into_tensor(self.gathered_x, _bytes(x_pad), group=self.group)
        dist.all_gather_into_tensor(self.gathered_idx, idx_pad, group=self.group)
        dist.all_gather_into_tensor(self.gathered_w, w_pad, group=self.group)
        if self.gathered_scales is not None:
            s_pad = torch.zeros(T, scales.shape[1], dtype=torch.float32, device=x.device)
            s_pad[: scales.shape[0]] = scales
            dist.all_gather_into_tensor(self.gathered_scales, s_pad, group=self.group)
        # Permute: this rank's (token, slot) pairs first, sorted by expert (static shapes).
        local = self.gathered_idx.view(-1) - self.rank * self.L
        key = torch.where((local >= 0) & (local < self.L), local, self.L)
        order = torch.sort(key, stable=True).indices[: self.capacity]
        self._token_of_row = order // self.K
        self._weight_of_row = torch.where(key[order] < self.L, self.gathered_w.view(-1)[order], 0.0)
        counts = torch.zeros(self.L + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))
        group_ends = counts[: self.L].cumsum(0).to(torch.int32)
        rows = self.gathered_x[self._token_of_row].view(self.dtype)
        row_scales = self.gathered_scales[self._token_of_row] if self.gathered_scales is not None else None
        return rows, row_scales, group_ends

    def combine(self, y):
        """Weighted unpermute of expert outputs [cap, H], then reduce-scatter to [T, H]."""
        full = torch.zeros(self.W * self.T, y.shape[1], dtype=torch.float32, device=y.device)
        full.index_add_(0, self._token_of_row, y.float() * self._weight_of_row.unsqueeze(1))
        dist.reduce_scatter_tensor(self.out, full.to(torch.bfloat16), group=self.group)
        return self.out


class AllToAll:
    kind = "all_to_all"
    graphable = False

    def __init__(self, *, world_size, rank, local_experts, top_k, dtype, group=None, **_):
        self.impl = impl_name(self.kind, group)
        self.W, self.rank, self.L, self.K, self.dtype, self.group = world_size, rank, local_experts, top_k, dtype, group

    def _exchange(self, send: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Rows of ``send`` (any dtype and row shape) to each rank, by split sizes."""
        row_bytes = send.element_size() * math.prod(send.shape[1:])
        send_bytes = send.contiguous().view(torch.uint8).reshape(send.shape[0], row_bytes)
        recv_bytes = torch.empty(sum(recv_splits), row_bytes, dtype=torch.uint8, device=send.device)
        dist.all_to_all_single(recv_bytes, send_bytes, recv_splits, send_splits, group=self.group)
        return recv_bytes.view(send.dtype).reshape(-1, *send.shape[1:])

    def dispatch(self, x, idx, weights, scales=None):
        W, L = self.W, self.L
        dest = torch.where(idx >= 0, idx // L, -1)
        per_dest = [(dest == r).any(dim=1).nonzero().squeeze(1) for r in range(W)]
        send_splits = [int(t.numel()) for t in per_dest]  # host sync: split sizes
        counts = torch.tensor(send_splits, dtype=torch.int64, device=x.device)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_splits = recv_counts.tolist()
        order = torch.cat(per_dest)
        self._send_order, self._send_splits, self._recv_splits = order, send_splits, recv_splits
        recv_x = self._exchange(x[order], send_splits, recv_splits)
        recv_idx = self._exchange(idx[order], send_splits, recv_splits)
        recv_w = self._exchange(weights[order], send_splits, recv_splits)
        recv_scales = self._exchange(scales[order], send_splits, recv_splits) if scales is not None else None
        # Expand to this rank's experts, grouped by expert.
        local = recv_idx.view(-1) - self.rank * L
        mine = ((local >= 0) & (local < L)).nonzero().squeeze(1)
        order = torch.sort(local[mine], stable=True).indices
        pairs = mine[order]
        self._token_of_row = pairs // self.K
        self._weight_of_row = recv_w.view(-1)[pairs]
        self._received = recv_x.shape[0]
        counts = torch.bincount(local[mine], minlength=L)
        rows = recv_x[self._token_of_row]
        row_scales = recv_scales[self._token_of_row] if recv_scales is not None else None
        self._num_tokens = x.shape[0]
        return rows, row_scales, counts.cumsum(0).to(torch.int32)

    def combine(self, y):
        partial = torch.zeros(self._received, y.shape[1], dtype=torch.float32, device=y.device)
        rows = y[: self._token_of_row.shape[0]].float() * self._weight_of_row.unsqueeze(1)
        partial.index_add_(0, self._token_of_row, rows)
        back = self._exchange(partial.to(torch.bfloat16), self._recv_splits, self._send_splits)
        out = torch.zeros(self._num_tokens, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, self._send_order, back.float())
        return out.to(torch.bfloat16)
