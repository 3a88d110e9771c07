"""Fuzz: a few hundred random small cases (sizes, layouts, dtypes, capacities, routings
mixing -1, invalid, repeated and skewed ids, ragged and empty ranks) on 2 gloo ranks;
the reference backend must equal the loop-by-loop oracle on every one."""

import random

import torch

from hybrid_ep_infer import EPBuffer, RoutingDataError

from dist_utils import spawn
from moe_cases import Case, RankInputs, bits_equal, check_dispatch, experts_on_dispatch_output, oracle_combine

CASES = 300


def random_case(rng: random.Random, world_size: int, seed: int) -> tuple[Case, list[RankInputs]]:
    local = rng.choice([1, 2, 3, 4])
    E = local * world_size
    K = rng.randint(1, min(4, E))
    T = rng.randint(1, 12)
    dtype = rng.choice([torch.bfloat16, torch.bfloat16, torch.float8_e4m3fn, torch.uint8])
    H = 128 if dtype != torch.bfloat16 else rng.choice([8, 16, 128])
    layout = rng.choice(["contiguous", "batched"])
    pad = rng.choice([1, 2, 4]) if layout == "contiguous" else 1
    capacity = None
    if rng.random() < 0.3:  # reduced capacity: overflow likely
        capacity = rng.randint(1, 6) * (pad if layout == "contiguous" else 1)
    case = Case(world_size=world_size, hidden=H, max_tokens=T, num_experts=E, top_k=K, dtype=dtype, layout=layout,
                pad_multiple=pad, capacity=capacity, idx_dtype=rng.choice([torch.int32, torch.int64]), seed=seed)
    g = torch.Generator().manual_seed(seed)
    inputs = []
    for _ in range(world_size):
        m = rng.randint(0, T)
        n = rng.choice([m, m, rng.randint(0, m)])
        idx = torch.randint(-1, E, (m, K), generator=g)
        if rng.random() < 0.3:  # skew: everything to a few experts
            idx = torch.randint(0, min(2, E), (m, K), generator=g)
        bad = torch.rand(m, K, generator=g) < 0.1
        idx[bad] = torch.tensor([E, E + 3, -2, -50])[torch.randint(0, 4, (int(bad.sum()),), generator=g)]
        x = torch.randn(m, H, generator=g)
        scales = None
        if dtype == torch.bfloat16:
            x = x.to(torch.bfloat16)
        else:
            x = x.to(torch.float8_e4m3fn)
            x = x.view(torch.uint8) if dtype == torch.uint8 else x
            scales = torch.rand(m, H // 128, generator=g)
        inputs.append(RankInputs(x, idx.to(case.idx_dtype).contiguous(), torch.rand(m, K, generator=g), scales, n))
    return case, inputs


def worker(rank: int, world_size: int) -> None:
    rng = random.Random(2026)
    for i in range(CASES):
        case, inputs = random_case(rng, world_size, seed=10_000 + i)
        mine = inputs[rank]
        with EPBuffer(hidden=case.hidden, max_tokens=case.max_tokens, num_experts=case.num_experts,
                      top_k=case.top_k, dtype=case.dtype, layout=case.layout, pad_multiple=case.pad_multiple,
                      capacity=case.capacity, backend="reference") as buf:
            result = buf.dispatch(mine.x, mine.topk_idx, mine.topk_weights, scales=mine.scales,
                                  num_tokens=mine.num_tokens)
            check_dispatch(case, inputs, rank, result)
            y = experts_on_dispatch_output(result, rank, case.num_local_experts)
            weighted = bool(i % 2)
            out = buf.combine(y, result.handle, weighted=weighted)
            assert bits_equal(out, oracle_combine(case, inputs, rank, weighted)), f"case {i}: {case}"
            try:
                buf.check_errors()
            except RoutingDataError:
                pass
            buf.check_errors()  # cleared: the next check passes


def test_reference_fuzz_two_ranks():
    spawn(2, worker)
