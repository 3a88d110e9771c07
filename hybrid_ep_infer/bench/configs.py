"""Benchmark configurations (sizes per rank; E = local experts x ranks)."""

from __future__ import annotations

from dataclasses import dataclass, replace


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

# What a run can time (--ops), each eager and graph-replayed.
# dispatch_split / combine_split (CUDA, low-latency buffers): send, 50 us of other work on the
# stream, receive, graph-replayed; recorded with "other", the work alone.
OPS = ("dispatch", "combine", "round_trip", "layer", "dispatch_split", "combine_split")

GPU_DEFAULT = ("prefill-7168", "qwen-2048", "mixtral-4096", "decode")
CPU_DEFAULT = ("tiny",)

# The largest sizes a CPU run uses: the reference backend over gloo on 2 cores runs every
# configuration, dtype and routing at these in about 20 s, and one at the GPU sizes
# (H = 7168, 4096 tokens) in tens of minutes. Experts and top-k stay: they shape the routing.
CPU_LIMITS = dict(hidden=256, max_tokens=256, intermediate=128)


def for_cpu(cfg: BenchConfig) -> BenchConfig:
    """``cfg`` itself if it fits :data:`CPU_LIMITS`, else a copy named ``<name>-cpu`` with
    H, T_max and the experts' intermediate size cut to the limits and each n clipped to
    the new T_max (a CPU run says nothing about speed, at any size)."""
    hidden = min(cfg.hidden, CPU_LIMITS["hidden"])
    max_tokens = min(cfg.max_tokens, CPU_LIMITS["max_tokens"])
    inter = min(cfg.intermediate, CPU_LIMITS["intermediate"])
    if (hidden, max_tokens, inter) == (cfg.hidden, cfg.max_tokens, cfg.intermediate):
        return cfg
    tokens = tuple(sorted({min(n, max_tokens) for n in cfg.tokens}))
    changes = [f"{what} {old}->{new}" for what, old, new in (
        ("H", cfg.hidden, hidden), ("T_max", cfg.max_tokens, max_tokens), ("intermediate", cfg.intermediate, inter),
        ("n", ",".join(map(str, cfg.tokens)), ",".join(map(str, tokens)))) if old != new]
    note = f"{cfg.name} shrunk for the CPU: {', '.join(changes)}; L={cfg.local_experts}, K={cfg.top_k} kept"
    return replace(cfg, name=f"{cfg.name}-cpu", hidden=hidden, max_tokens=max_tokens, intermediate=inter,
                   tokens=tokens, note=note)
