"""Benchmark configurations (sizes per rank; E = local experts x ranks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchConfig:
    name: str
    hidden: int
    max_tokens: int  # T_max per rank
    local_experts: int
    top_k: int
    intermediate: int  # SwiGLU experts of the whole-layer measurement (0: none)
    tokens: tuple[int, ...]  # n values measured (each rank sends n tokens)
    note: str = ""


CONFIGS = {
    c.name: c
    for c in (
        BenchConfig("prefill-7168", 7168, 4096, 8, 8, 2048, (4096,), "DeepSeek-V3-like prefill"),
        BenchConfig("qwen-2048", 2048, 4096, 32, 8, 768, (4096,), "Qwen3-MoE-like prefill"),
        BenchConfig("mixtral-4096", 4096, 4096, 2, 2, 14336, (4096,), "Mixtral-like prefill"),
        BenchConfig("decode", 7168, 256, 8, 8, 2048, (1, 8, 32, 128, 256), "decode batches"),
        BenchConfig("tiny", 256, 64, 2, 2, 128, (16, 64), "CPU smoke test; says nothing about speed"),
    )
}

GPU_DEFAULT = ("prefill-7168", "qwen-2048", "mixtral-4096", "decode")
CPU_DEFAULT = ("tiny",)
