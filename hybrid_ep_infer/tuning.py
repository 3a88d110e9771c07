"""Construction-time tuning of the CUDA backend's two copy kernels.

How many warps of a block send or expand (dispatch) and reduce or gather (combine), how
many consecutive tokens share one arrival flag, and whether dispatch moves rows with warp
copies or through the bulk copy engine change speed but never results, and the best choice
differs per shape (docs/DESIGN.md, "A construction-time tuner"). The tuner times a few
candidates on synthetic uniform routing of the buffer's own shape and keeps the fastest.
It is a collective (docs/SPEC.md section 1): every rank runs the same calls in the same order,
the per-candidate times are gathered, and the choice — the candidate whose slowest rank
is fastest, computed from the same gathered numbers on every rank, i.e. rank 0's choice —
is cached in memory per shape, so a second buffer of the same shape skips the timing.
"""

from __future__ import annotations

import statistics

import torch
import torch.distributed as dist

from .calls import CombineArgs, DispatchArgs
from .config import CONTIGUOUS, BufferConfig
from .errors import PHASE_NAMES, raise_for_errors
from .placement import collective_device

# Dispatch: the path (hep_dispatch_path_t), then the planned path's sender warps per block,
# tokens per flag release, NVLink writes and expand through the copy engine (1) or with warp
# copies (0). The low-latency path has none of those knobs: one candidate (first, so it
# wins ties), timed only on buffers that have it.
PLANNED, LOW_LATENCY = 0, 1
DISPATCH_FIELDS = ("dispatch_path", "dispatch_send_warps", "dispatch_chunk_tokens", "dispatch_send_tma",
                   "dispatch_expand_tma")
DISPATCH_CANDIDATES = ((LOW_LATENCY, 4, 1, 0, 0),) + tuple(
    (PLANNED, warps, chunk, send_tma, expand_tma) for warps in (1, 2, 4, 8) for chunk in (1, 4, 16)
    for send_tma in (0, 1) for expand_tma in (0, 1))
# Combine: reducer warps per block, tokens per flag release.
COMBINE_FIELDS = ("combine_reduce_warps", "combine_chunk_tokens")
COMBINE_CANDIDATES = tuple((warps, chunk) for warps in (8, 11, 13, 14) for chunk in (1, 4, 16))
# A bf16 y for combine is allocated only for FP8 buffers, and only up to this size;
# above it combine keeps the default tuning.
MAX_SCRATCH_BYTES = 1 << 30
SAMPLES = 5

_cache: dict[tuple, dict[str, int]] = {}
# Per shape: every timed candidate with its slowest rank's median, in µs (for benchmarks/breakdown.py).
reports: dict[tuple, list[tuple[str, tuple, float]]] = {}


def cache_key(config: BufferConfig, num_sms: int, device: torch.device, low_latency: bool) -> tuple:
    return (config.world_size, config.rank, config.hidden, config.max_tokens, config.num_experts, config.top_k,
            config.dtype, config.layout, config.pad_multiple, config.capacity, num_sms,
            torch.cuda.get_device_name(device), low_latency)


def tune(backend, group, num_sms: int) -> dict[str, int]:
    """Chooses and sets ``backend.context``'s tuning; returns it. A collective over ``group``."""
    config, device, context = backend.config, backend.device, backend.context
    key = cache_key(config, num_sms, device, backend.supports_split)
    if key not in _cache:
        _cache[key], reports[key] = _measure(backend, group)
    context.set_tuning(**_cache[key])
    return dict(_cache[key])


def _measure(backend, group) -> tuple[dict[str, int], list[tuple[str, tuple, float]]]:
    config, device, context = backend.config, backend.device, backend.context
    x, scales, idx, weights = _synthetic_inputs(config, device)
    T = config.max_tokens
    dispatch_args = DispatchArgs(x, idx, weights, scales, num_tokens=T)

    def dispatch():
        context.dispatch(dispatch_args)

    y = _combine_input(backend)
    combine_args = CombineArgs(y, backend.combine_output(T), T, weighted=True) if y is not None else None

    def combine():
        context.combine(combine_args)

    candidates = dispatch_candidates(backend.supports_split)
    dispatch()  # warm-up, and the plan every timed combine uses
    times = [_time(lambda: context.set_tuning(**dict(zip(DISPATCH_FIELDS, candidate))), dispatch, device)
             for candidate in candidates]
    if y is not None:
        times += [_time(lambda: context.set_tuning(**dict(zip(COMBINE_FIELDS, candidate))), combine, device)
                  for candidate in COMBINE_CANDIDATES]
    torch.cuda.synchronize(device)
    # Synthetic routing is valid: anything here is a timeout (a peer that is not tuning too).
    raise_for_errors(context.take_errors(), rank=config.rank, num_experts=config.num_experts,
                     phase_names=PHASE_NAMES)

    chosen, report = choose(_all_gather_times(times, group), candidates)
    if y is None:  # the defaults (attach set them; nothing has changed the combine fields yet)
        defaults = context.get_tuning()
        chosen.update((name, defaults[name]) for name in COMBINE_FIELDS)
    return chosen, report


def fastest_per_path(backend, num_sms: int) -> dict[int, dict[str, int]]:
    """For a tuned buffer, each dispatch path's fastest candidate (its dispatch fields), from
    the tuner's report of the buffer's shape; {} where it was not tuned. What the benchmark
    runs to time each path at its best (the planned one is what a buffer without the
    low-latency path would choose)."""
    key = cache_key(backend.config, num_sms, backend.device, backend.supports_split)
    best: dict[int, tuple[float, tuple[int, ...]]] = {}
    for op, candidate, time_us in reports.get(key, []):
        if op == "dispatch" and (candidate[0] not in best or time_us < best[candidate[0]][0]):
            best[candidate[0]] = (time_us, candidate)
    return {path: dict(zip(DISPATCH_FIELDS, candidate)) for path, (_, candidate) in best.items()}


def dispatch_candidates(low_latency: bool) -> tuple[tuple[int, ...], ...]:
    """The dispatch candidates a buffer can run (the low-latency one only where built)."""
    return tuple(c for c in DISPATCH_CANDIDATES if low_latency or c[0] == PLANNED)


def choose(gathered: list[list[float]], candidates: tuple[tuple[int, ...], ...] = DISPATCH_CANDIDATES,
           ) -> tuple[dict[str, int], list[tuple[str, tuple, float]]]:
    """From every rank's times (µs) of the dispatch ``candidates``, then, if tuned, the
    combine candidates: per op the candidate whose slowest rank is fastest (the first of
    equals), and the report of every candidate's slowest time. Every rank passes the same
    gathered lists, so every rank chooses the same."""
    slowest = [max(rank_times[i] for rank_times in gathered) for i in range(len(gathered[0]))]
    dispatch_times, combine_times = slowest[:len(candidates)], slowest[len(candidates):]
    report = [("dispatch", c, t) for c, t in zip(candidates, dispatch_times)]
    report += [("combine", c, t) for c, t in zip(COMBINE_CANDIDATES, combine_times)]
    d = min(range(len(dispatch_times)), key=lambda i: dispatch_times[i])
    chosen = dict(zip(DISPATCH_FIELDS, candidates[d]))
    if combine_times:
        k = min(range(len(combine_times)), key=lambda i: combine_times[i])
        chosen.update(zip(COMBINE_FIELDS, COMBINE_CANDIDATES[k]))
    return chosen, report


def _all_gather_times(times: list[float], group) -> list[list[float]]:
    """Every rank's candidate times, in rank order (a tensor collective)."""
    mine = torch.tensor(times, dtype=torch.float64, device=collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return [g.cpu().tolist() for g in gathered]


def _time(configure, call, device) -> float:
    """Median device time of ``call`` over SAMPLES runs after one warm-up, in µs."""
    configure()
    call()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(SAMPLES)]
    for start, end in events:
        start.record()
        call()
        end.record()
    torch.cuda.synchronize(device)
    return statistics.median(start.elapsed_time(end) * 1e3 for start, end in events)


def _synthetic_inputs(config: BufferConfig, device: torch.device):
    """Every token to K distinct uniformly drawn experts, all T_max tokens."""
    T, H, E, K = config.max_tokens, config.hidden, config.num_experts, config.top_k
    gen = torch.Generator(device=device).manual_seed(1234 + config.rank)
    x = torch.randn(T, H, generator=gen, device=device).to(config.dtype)
    scales = torch.ones(T, H // 128, device=device) if config.is_fp8 else None
    idx = torch.rand(T, E, generator=gen, device=device).argsort(dim=1)[:, :K].to(torch.int32).contiguous()
    weights = torch.rand(T, K, generator=gen, device=device)
    return x, scales, idx, weights


def _combine_input(backend):
    """A bf16 y in the dispatch layout: the dispatch output itself for bf16 buffers,
    scratch memory for FP8 ones (None if that would exceed MAX_SCRATCH_BYTES)."""
    config = backend.config
    hidden = backend.outputs.hidden
    if config.dtype == torch.bfloat16:
        return hidden
    rows = hidden.numel() // config.hidden
    if rows * config.hidden * 2 > MAX_SCRATCH_BYTES:
        return None
    shape = hidden.shape if config.layout != CONTIGUOUS else (rows, config.hidden)
    return torch.zeros(shape, dtype=torch.bfloat16, device=backend.device)
