"""The reference backend over 2 and 4 gloo ranks, against the loop-by-loop oracle.

Each spawn runs many cases (process start-up dominates on a 2-core machine).
Covers: random, skewed, -1-masked, invalid, repeated, empty-rank and ragged
routings; both layouts; BF16, FP8 and raw-byte payloads; padding; reduced
capacity with overflow; every num_tokens form; weighted and unweighted combine;
the identity-expert round trip.
"""

import pytest
import torch

from hybrid_ep_infer import EPBuffer, ErrorKind, RoutingDataError

from dist_utils import spawn
from moe_cases import (
    Case,
    bits_equal,
    check_dispatch,
    experts_on_dispatch_output,
    make_inputs,
    multirank_cases,
    oracle_combine,
    source_errors,
)


def run_case(rank: int, case: Case, num_tokens_form: str) -> None:
    inputs = make_inputs(case)
    mine = inputs[rank]
    buf = EPBuffer(hidden=case.hidden, max_tokens=case.max_tokens, num_experts=case.num_experts,
                   top_k=case.top_k, dtype=case.dtype, layout=case.layout, pad_multiple=case.pad_multiple,
                   capacity=case.capacity, backend="reference")
    with buf:
        n = mine.num_tokens
        num_tokens = {"int": n, "tensor": torch.tensor([n], dtype=torch.int32),
                      "default": None if n == mine.x.shape[0] else n}[num_tokens_form]
        # Poison: a previous call's outputs must not leak into this one.
        buf.dispatch_outputs.hidden.view(torch.uint8).fill_(0x7F)
        buf.dispatch_outputs.weights.fill_(float("nan"))
        result = buf.dispatch(mine.x, mine.topk_idx, mine.topk_weights, scales=mine.scales, num_tokens=num_tokens)
        want = check_dispatch(case, inputs, rank, result)

        y = experts_on_dispatch_output(result, rank, case.num_local_experts)
        for weighted in (True, False):
            out = buf.combine(y, result.handle, weighted=weighted)
            expected = oracle_combine(case, inputs, rank, weighted)
            assert bits_equal(out, expected), f"{case} weighted={weighted}: combine differs from the oracle"

        # Errors: invalid/repeated counted by the sender, overflow by the receiver.
        invalid, repeated = source_errors(case, mine)
        expected_counts = {ErrorKind.INVALID_EXPERT_ID: invalid, ErrorKind.REPEATED_EXPERT_ID: repeated,
                           ErrorKind.CAPACITY_OVERFLOW: want.overflow}
        expected_counts = {k: v for k, v in expected_counts.items() if v}
        if expected_counts:
            with pytest.raises(RoutingDataError) as info:
                buf.check_errors()
            assert info.value.counts == expected_counts
            assert f"rank {rank}" in str(info.value)
        buf.check_errors()  # cleared


def run_round_trip(rank: int, world_size: int) -> None:
    """Identity experts: weighted combine gives sum_k w_k x, unweighted gives (#valid) x."""
    case = Case(world_size=world_size, hidden=128, max_tokens=16, num_experts=2 * world_size, top_k=2,
                routing="masked", seed=99)
    inputs = make_inputs(case)
    mine = inputs[rank]
    with EPBuffer(hidden=case.hidden, max_tokens=case.max_tokens, num_experts=case.num_experts,
                  top_k=case.top_k, backend="reference") as buf:
        result = buf.dispatch(mine.x, mine.topk_idx, mine.topk_weights)
        valid = (mine.topk_idx >= 0).double()
        x = mine.x.double()
        out = buf.combine(result.hidden, result.handle)
        ref = x * (mine.topk_weights.double() * valid).sum(1, keepdim=True)
        err = (out.double() - ref).norm() / ref.norm().clamp_min(1e-30)
        assert err <= 5e-3, err
        out = buf.combine(result.hidden, result.handle, weighted=False, out=torch.empty_like(mine.x))
        assert torch.equal(out.double(), (x * valid.sum(1, keepdim=True)).bfloat16().double())


def worker(rank: int, world_size: int) -> None:
    forms = ("int", "tensor", "default")
    for i, case in enumerate(multirank_cases(world_size)):
        run_case(rank, case, forms[i % len(forms)])
    # A device num_tokens outside [0, m]: counted, and that rank sends nothing.
    case = Case(world_size=world_size, hidden=128, max_tokens=8, num_experts=2 * world_size, top_k=2, seed=5)
    inputs = make_inputs(case)
    mine = inputs[rank]
    with EPBuffer(hidden=128, max_tokens=8, num_experts=2 * world_size, top_k=2, backend="reference") as buf:
        bad = rank == 0
        n = torch.tensor([mine.x.shape[0] + 3 if bad else mine.num_tokens], dtype=torch.int32)
        result = buf.dispatch(mine.x, mine.topk_idx, mine.topk_weights, num_tokens=n)
        inputs[0].num_tokens = 0
        check_dispatch(case, inputs, rank, result)
        if bad:
            with pytest.raises(RoutingDataError, match="num_tokens"):
                buf.check_errors()
        y = experts_on_dispatch_output(result, rank, case.num_local_experts)
        assert bits_equal(buf.combine(y, result.handle), oracle_combine(case, inputs, rank, True))
    run_round_trip(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4, 8])  # 8: nothing may assume W <= 4
def test_reference_backend_matches_oracle(world_size):
    spawn(world_size, worker)
