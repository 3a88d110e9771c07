"""Inputs of one measurement: routing (uniform or Zipf), payloads, experts, byte counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def make_routing(kind: str, tokens: int, num_experts: int, top_k: int, seed: int):
    """``(topk_idx [n, K] int64, topk_weights [n, K] fp32)``: distinct experts per token.

    uniform: every expert equally likely. zipf: expert e drawn with weight 1/(e+1)^1.2,
    so the first ranks' experts are hot (skewed load).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        scores = torch.rand(tokens, num_experts, generator=g)
    elif kind == "zipf":
        popularity = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** 1.2
        # Gumbel top-k: sampling K distinct experts without replacement by popularity.
        gumbel = -torch.log(-torch.log(torch.rand(tokens, num_experts, generator=g, dtype=torch.float64)))
        scores = (popularity.log() + gumbel).float()
    else:
        raise ValueError(f"unknown routing {kind!r}")
    idx = scores.topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, generator=g).softmax(dim=1)
    return idx.contiguous(), weights.contiguous()


@dataclass
class Traffic:
    """Bytes of one dispatch (combine moves the same rows back, in bf16)."""

    send_bytes: list[int]  # off-GPU bytes each rank sends
    recv_bytes: list[int]  # off-GPU bytes each rank receives
    recv_tokens: list[int]  # token copies each rank receives, its own included (DeepEP's count)

    @property
    def busiest_bytes(self) -> int:
        return max(max(self.send_bytes), max(self.recv_bytes))


def traffic(all_idx: list[torch.Tensor], local_experts: int, row_bytes: int) -> Traffic:
    """One copy per (token, destination rank) that holds any of the token's experts."""
    W = len(all_idx)
    send, recv, recv_tokens = [0] * W, [0] * W, [0] * W
    for s, idx in enumerate(all_idx):
        dest = idx // local_experts
        for r in range(W):
            copies = int((dest == r).any(dim=1).sum())
            recv_tokens[r] += copies
            if r != s:
                send[s] += copies * row_bytes
                recv[r] += copies * row_bytes
    return Traffic(send, recv, recv_tokens)


class SwiGLUExperts:
    """This rank's L experts (bf16), SwiGLU with intermediate size I."""

    def __init__(self, num_local: int, hidden: int, inter: int, device, seed: int):
        g = torch.Generator(device=device).manual_seed(seed)  # generated where they live: fast on GPUs
        self.gate_up = (torch.randn(num_local, 2 * inter, hidden, generator=g, device=device) * hidden ** -0.5
                        ).to(torch.bfloat16)
        down = torch.randn(num_local, hidden, inter, generator=g, device=device) * inter ** -0.5
        self.down = down.to(torch.bfloat16)
        self.inter = inter

    def __call__(self, rows: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert (group e ends at group_ends[e]) -> expert outputs (bf16)."""
        if rows.is_cuda:
            gu = torch._grouped_mm(rows, self.gate_up.transpose(-2, -1), offs=group_ends)
            act = F.silu(gu[:, : self.inter]) * gu[:, self.inter:]
            return torch._grouped_mm(act, self.down.transpose(-2, -1), offs=group_ends)
        # CPU: a loop over experts (host-synchronizing; only for the tiny config).
        out = torch.zeros(rows.shape[0], self.down.shape[1], dtype=torch.bfloat16)
        start = 0
        for e, end in enumerate(group_ends.tolist()):
            if end > start:
                gu = rows[start:end].float() @ self.gate_up[e].float().t()
                act = F.silu(gu[:, : self.inter]) * gu[:, self.inter:]
                out[start:end] = (act @ self.down[e].float().t()).to(torch.bfloat16)
            start = end
        return out


def dequantize(x: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """FP8 payload [rows, H] with per-128 scales -> bf16 (bf16 passes through)."""
    if scales is None:
        return x
    if x.dtype == torch.uint8:
        x = x.view(torch.float8_e4m3fn)
    rows, hidden = x.shape
    return (x.float().view(rows, hidden // 128, 128) * scales.view(rows, -1, 1)).view(rows, hidden).to(torch.bfloat16)


def quantize(x: torch.Tensor):
    """bf16 [rows, H] -> (FP8 e4m3 payload, fp32 scales [rows, H/128])."""
    rows, hidden = x.shape
    blocks = x.float().view(rows, hidden // 128, 128)
    scales = blocks.abs().amax(dim=2).clamp_min(1e-6) / 448.0
    return (blocks / scales.unsqueeze(2)).view(rows, hidden).to(torch.float8_e4m3fn), scales.contiguous()
