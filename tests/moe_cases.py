"""Seeded inputs for every rank, and a slow, loop-by-loop oracle of docs/SPEC.md sections 2-4.

Every rank builds *all* ranks' inputs from one seed, so it can compute its own
expected outputs locally. The oracle below is deliberately naive (Python loops
over tokens and slots, straight from the SPEC's wording) and independent of the
vectorised reference backend it checks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

ROUTINGS = ("random", "skewed", "masked", "invalid", "repeated", "empty_rank", "ragged", "order")


@dataclass
class RankInputs:
    x: torch.Tensor  # [m, H] payload dtype
    topk_idx: torch.Tensor  # [m, K]
    topk_weights: torch.Tensor  # [m, K] fp32
    scales: torch.Tensor | None  # [m, H/128] fp32 for FP8
    num_tokens: int  # n


@dataclass(frozen=True)
class Case:
    world_size: int
    hidden: int
    max_tokens: int
    num_experts: int
    top_k: int
    dtype: torch.dtype = torch.bfloat16
    layout: str = "contiguous"
    pad_multiple: int = 1
    capacity: int | None = None
    routing: str = "random"
    idx_dtype: torch.dtype = torch.int64
    seed: int = 0
    num_tokens: tuple[int, ...] | None = None  # n of rank s: num_tokens[s % len] (else as the routing says)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.world_size


def multirank_cases(world_size: int) -> list[Case]:
    """The reference backend's multi-rank cases: every routing of :data:`ROUTINGS`, both
    layouts, BF16, FP8 and raw-byte payloads, padding, reduced capacity with overflow, and
    other (E, K)."""
    base = Case(world_size=world_size, hidden=256, max_tokens=12, num_experts=4 * world_size, top_k=3)
    cases = []
    for i, routing in enumerate(ROUTINGS):
        cases.append(replace(base, routing=routing, seed=i, idx_dtype=(torch.int32, torch.int64)[i % 2]))
    cases += [
        replace(base, layout="batched", routing="random", seed=10),
        replace(base, layout="batched", routing="skewed", seed=11, capacity=5),  # overflow
        replace(base, pad_multiple=4, routing="ragged", seed=12),
        replace(base, pad_multiple=4, routing="skewed", seed=13, capacity=16),  # overflow
        replace(base, dtype=torch.float8_e4m3fn, routing="masked", seed=14, pad_multiple=2),
        replace(base, dtype=torch.uint8, layout="batched", routing="repeated", seed=15),
        # (E, K) = (2W, 2): top-k larger than... and fewer experts per rank.
        replace(base, num_experts=2 * world_size, top_k=2, routing="random", seed=16),
        # A single expert per rank.
        replace(base, num_experts=world_size, top_k=1, routing="ragged", seed=17),
    ]
    return cases


def make_inputs(case: Case) -> list[RankInputs]:
    """Every rank's inputs for ``case`` (same on every process for the same seed)."""
    g = torch.Generator().manual_seed(case.seed)
    W, T, E, K, H = case.world_size, case.max_tokens, case.num_experts, case.top_k, case.hidden
    inputs = []
    for s in range(W):
        m = T if case.routing != "ragged" else int(torch.randint(0, T + 1, (1,), generator=g))
        n = m if case.routing != "ragged" else int(torch.randint(0, m + 1, (1,), generator=g))
        if case.routing == "empty_rank" and s == W - 1:
            n = 0
        if case.num_tokens is not None:
            n = min(case.num_tokens[s % len(case.num_tokens)], m)
        # K distinct experts per token, uniformly.
        idx = torch.rand(m, E, generator=g).argsort(dim=1)[:, :K]
        if case.routing == "skewed":  # every token picks experts 0..K-1: one rank gets it all
            idx = torch.arange(K).expand(m, K).clone()
        elif case.routing == "masked":
            idx[torch.rand(m, K, generator=g) < 0.3] = -1
        elif case.routing == "invalid":
            bad = torch.tensor([E, E + 7, -2, -100, 2**40 if case.idx_dtype == torch.int64 else 2**30])
            pick = torch.rand(m, K, generator=g) < 0.2
            idx[pick] = bad[torch.randint(0, len(bad), (int(pick.sum()),), generator=g)]
        elif case.routing == "repeated":
            dup = torch.rand(m, K, generator=g) < 0.3
            dup[:, 0] = False
            idx[dup] = idx[:, :1].expand(m, K)[dup]
        weights = torch.rand(m, K, generator=g)
        if case.routing == "order":
            idx, weights = _order_routing(case, m), torch.full((m, K), 0.5)
        x_float = torch.randn(m, H, generator=g)
        scales = None
        if case.dtype == torch.bfloat16:
            x = x_float.to(torch.bfloat16)
        else:
            x = x_float.to(torch.float8_e4m3fn)
            if case.dtype == torch.uint8:
                x = x.view(torch.uint8)
            scales = torch.rand(m, H // 128, generator=g) + 0.5
        inputs.append(RankInputs(x, idx.to(case.idx_dtype).contiguous(), weights, scales, n))
    return inputs


def _order_routing(case: Case, m: int) -> torch.Tensor:
    """Routing on which any summation order but the SPEC's gives other bits.

    With expert_fn's scales (A, -A, tiny, 1) by ``e % 4``, 4 experts per rank and K = 3:
    even tokens send slots (tiny, A, -A) to one rank: ascending k gives 0, expert
    order or descending k gives tiny. Odd tokens (W >= 3) put A on rank 0, -A on
    rank 1, tiny on rank 2, in slots (tiny, A, -A): ascending rank order gives
    tiny; slot order or descending rank order gives 0.
    """
    if case.num_local_experts != 4 or case.top_k != 3:
        raise ValueError("the 'order' routing needs 4 experts per rank and top_k = 3")
    idx = torch.empty(m, 3, dtype=torch.int64)
    for t in range(m):
        if t % 2 == 0 or case.world_size < 3:
            r = (t // 2) % case.world_size
            idx[t] = torch.tensor([4 * r + 2, 4 * r + 0, 4 * r + 1])
        else:
            idx[t] = torch.tensor([8 + 2, 0, 4 + 1])
    return idx


def payload_as_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        x = x.view(torch.float8_e4m3fn)
    return x.float()


# Expert e scales its input by (A, -A, tiny, 1)[e % 4]. Mixed signs and magnitudes make
# the fp32 sums cancel, so any other summation order than the SPEC's changes bits.
BIG, TINY = 2.0**20, 2.0**-20


def expert_fn(x_rows: torch.Tensor, global_expert: torch.Tensor) -> torch.Tensor:
    """A cheap, expert-dependent "expert": bf16(x * scale(e) + e / 16), row-wise, on any device
    (no host tensors, so it can run inside a CUDA graph capture)."""
    e = global_expert.to(torch.int64).unsqueeze(-1)
    r = e % 4
    scale = torch.where(r == 0, BIG, torch.where(r == 1, -BIG, torch.where(r == 2, TINY, 1.0)))
    return (payload_as_float(x_rows) * scale + e / 16).to(torch.bfloat16)


# ---------------------------------------------------------------------- oracle


@dataclass
class OracleRow:
    expert: int  # local expert on the destination
    src_rank: int
    token: int
    slot: int
    dest: int | None  # flat row slot, None when dropped for capacity


@dataclass
class OracleDispatch:
    rows: list[OracleRow]
    tokens_per_expert: list[int]
    offsets: list[int] | None
    overflow: int


def kept_ids(idx_row: list[int], num_experts: int) -> tuple[list[int], int, int]:
    """docs/SPEC.md section 6 for one token: ids kept per slot (-1 if dropped), invalid and repeated counts."""
    kept, seen, invalid, repeated = [], set(), 0, 0
    for e in idx_row:
        if e < -1 or e >= num_experts:
            kept.append(-1)
            invalid += 1
        elif e >= 0 and e in seen:
            kept.append(-1)
            repeated += 1
        else:
            kept.append(e)
            if e >= 0:
                seen.add(e)
    return kept, invalid, repeated


def source_errors(case: Case, inp: RankInputs) -> tuple[int, int]:
    """(invalid, repeated) counted by the rank that sends ``inp``."""
    invalid = repeated = 0
    for t in range(inp.num_tokens):
        _, i, r = kept_ids(inp.topk_idx[t].tolist(), case.num_experts)
        invalid, repeated = invalid + i, repeated + r
    return invalid, repeated


def oracle_dispatch(case: Case, inputs: list[RankInputs], rank: int) -> OracleDispatch:
    L, E = case.num_local_experts, case.num_experts
    per_expert: list[list[OracleRow]] = [[] for _ in range(L)]
    for s, inp in enumerate(inputs):  # (s, t, k) order
        for t in range(inp.num_tokens):
            kept, _, _ = kept_ids(inp.topk_idx[t].tolist(), E)
            for k, e in enumerate(kept):
                if e >= 0 and e // L == rank:
                    per_expert[e - rank * L].append(OracleRow(e - rank * L, s, t, k, None))
    rows, counts, overflow = [], [], 0
    if case.layout == "contiguous":
        capacity = case.capacity or _default_contiguous_capacity(case)
        offsets = [0]
        for e in range(L):
            written = 0
            for j, row in enumerate(per_expert[e]):
                if offsets[e] + j < capacity:
                    row.dest = offsets[e] + j
                    written += 1
                else:
                    overflow += 1
                rows.append(row)
            counts.append(written)
            pad = case.pad_multiple
            offsets.append(offsets[e] + (written + pad - 1) // pad * pad)
    else:
        capacity = case.capacity or case.world_size * case.max_tokens
        offsets = None
        for e in range(L):
            written = 0
            for j, row in enumerate(per_expert[e]):
                if j < capacity:
                    row.dest = e * capacity + j
                    written += 1
                else:
                    overflow += 1
                rows.append(row)
            counts.append(written)
    return OracleDispatch(rows, counts, offsets, overflow)


def _default_contiguous_capacity(case: Case) -> int:
    L, pad = case.num_local_experts, case.pad_multiple
    rows = case.world_size * case.max_tokens * min(case.top_k, L) + L * (pad - 1)
    return (rows + pad - 1) // pad * pad


def check_dispatch(case: Case, inputs: list[RankInputs], rank: int, result) -> OracleDispatch:
    """Compare a DispatchResult with the oracle: written rows, padding rows, all of row_expert."""
    want = oracle_dispatch(case, inputs, rank)
    H = case.hidden
    hidden = result.hidden.cpu().reshape(-1, H)
    hidden_bits = hidden.view(torch.uint8)
    weights = result.weights.cpu().reshape(-1)
    row_expert = result.row_expert.cpu().reshape(-1)
    scales = result.scales.cpu().reshape(hidden.shape[0], -1) if result.scales is not None else None

    assert result.tokens_per_expert.cpu().tolist() == want.tokens_per_expert
    if want.offsets is None:
        assert result.offsets is None
    else:
        assert result.offsets.cpu().tolist() == want.offsets

    expected_row_expert = torch.full_like(row_expert, -1)
    for row in want.rows:
        if row.dest is None:
            continue
        src = inputs[row.src_rank]
        expected_row_expert[row.dest] = row.expert
        assert torch.equal(hidden_bits[row.dest], src.x[row.token].reshape(-1).view(torch.uint8)), row
        assert weights[row.dest].item() == src.topk_weights[row.token, row.slot].item(), row
        if scales is not None:
            assert torch.equal(scales[row.dest], src.scales[row.token]), row
    assert torch.equal(row_expert, expected_row_expert)

    if want.offsets is not None:  # padding rows: zero payload, zero weight, zero scales
        for e in range(case.num_local_experts):
            lo, hi = want.offsets[e] + want.tokens_per_expert[e], want.offsets[e + 1]
            assert not hidden_bits[lo:hi].any(), f"padding of expert {e} not zero"
            assert not weights[lo:hi].any()
            if scales is not None:
                assert not scales[lo:hi].any()
    return want


def oracle_combine(case: Case, inputs: list[RankInputs], rank: int, weighted: bool) -> torch.Tensor:
    """Expected combine output ``[m, H]`` bf16 on ``rank`` when every expert is :func:`expert_fn`."""
    W, H, L = case.world_size, case.hidden, case.num_local_experts
    mine = inputs[rank]
    m = mine.x.shape[0]
    # Written rows of this rank's tokens on every destination: (dest rank, token, slot, global expert).
    contributions: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r in range(W):
        for row in oracle_dispatch(case, inputs, r).rows:
            if row.src_rank == rank and row.dest is not None:
                contributions.setdefault((r, row.token), []).append((row.slot, r * L + row.expert))
    out = torch.zeros(m, H, dtype=torch.bfloat16)
    for t in range(mine.num_tokens):
        total = torch.zeros(H)
        for r in range(W):
            acc = torch.zeros(H)
            for k, e in sorted(contributions.get((r, t), [])):
                y = expert_fn(mine.x[t : t + 1], torch.tensor([e]))[0].float()
                if weighted:
                    y = y * mine.topk_weights[t, k]
                acc = acc + y
            total = total + acc.to(torch.bfloat16).float()
        out[t] = total.to(torch.bfloat16)
    return out


def experts_on_dispatch_output(result, rank: int, num_local_experts: int) -> torch.Tensor:
    """Apply :func:`expert_fn` to every written row of a DispatchResult (bf16, same layout)."""
    hidden = result.hidden
    row_expert = result.row_expert.to(torch.int64)
    y = expert_fn(hidden.reshape(-1, hidden.shape[-1]), rank * num_local_experts + row_expert.reshape(-1))
    return y.reshape(*hidden.shape[:-1], hidden.shape[-1]).contiguous()


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.cpu().view(torch.int16), b.cpu().view(torch.int16))
