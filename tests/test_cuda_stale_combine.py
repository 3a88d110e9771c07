"""The stale-combine check of the custom ops on the CUDA backend (2 GPUs), against the
reference backend on the same GPUs.

A combine whose ``topk_idx`` rows ``t < n`` (sanitized) differ from the latest dispatch's
is stale: every rank still takes part in the exchange, its output is +0.0, and one
``STALE_COMBINE`` is counted (raised by ``check_errors``). The CUDA backend decides on the
device, so the check also holds for a combine replayed from a CUDA graph after another
dispatch. Routing equal after sanitizing (another dtype, other invalid ids, other rows
``t >= n``) is not stale, and such a combine is bit-identical to the reference.
"""

import pytest
import torch

from hybrid_ep_infer import EPBuffer, ErrorKind, RoutingDataError, ops

from dist_utils import check, gpu_world_sizes, rank_device, spawn_gpu
from moe_cases import bits_equal

H, T, E_PER_RANK, K = 1024, 32, 4, 2


def expect_errors(buf: EPBuffer, counts: dict) -> None:
    if not counts:
        buf.check_errors(synchronize=True)
        return
    with pytest.raises(RoutingDataError) as error:
        buf.check_errors(synchronize=True)
    assert error.value.counts == counts, f"{buf.backend}: {error.value}"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16).cpu()


def eager_cases(buf: EPBuffer, x, routing_a, routing_b) -> list[torch.Tensor]:
    """The same calls on either backend; returns the combine outputs (copies)."""
    (w_a, idx_a), (w_b, idx_b) = routing_a, routing_b
    outputs = []

    d_a = ops.dispatch(buf, x, idx_a, w_a)
    y_a = d_a.hidden.clone()
    outputs.append(ops.combine(buf, y_a, d_a, idx_a).clone())  # valid
    expect_errors(buf, {})

    ops.dispatch(buf, x, idx_b, w_b)
    outputs.append(ops.combine(buf, y_a, d_a, idx_a).clone())  # stale: zeros
    expect_errors(buf, {ErrorKind.STALE_COMBINE: 1})

    # Equal after sanitizing: an invalid id for another, int32 for int64, a repeat kept.
    idx_c = idx_b.clone()
    idx_c[0, 0] = buf.config.num_experts
    idx_c[1, 1] = idx_c[1, 0]
    d_c = ops.dispatch(buf, x, idx_c, w_b)
    y_c = d_c.hidden.clone()
    same = idx_c.to(torch.int32)
    same[0, 0] = -7
    outputs.append(ops.combine(buf, y_c, d_c, same).clone())
    expect_errors(buf, {ErrorKind.INVALID_EXPERT_ID: 1, ErrorKind.REPEATED_EXPERT_ID: 1})

    # Rows t >= n are not compared; one changed slot below n is stale.
    n = T - 2
    d_d = ops.dispatch(buf, x, idx_a, w_a, num_tokens=n)
    y_d = d_d.hidden.clone()
    tail = idx_a.clone()
    tail[n:] = (tail[n:] + 1) % buf.config.num_experts
    outputs.append(ops.combine(buf, y_d, d_d, tail).clone())
    expect_errors(buf, {})
    one_slot = idx_a.clone()
    one_slot[n - 1, K - 1] = -1
    outputs.append(ops.combine(buf, y_d, d_d, one_slot).clone())
    expect_errors(buf, {ErrorKind.STALE_COMBINE: 1})
    return outputs


def worker(rank: int, world_size: int) -> None:
    device = rank_device(rank)
    E = E_PER_RANK * world_size
    kw = dict(hidden=H, max_tokens=T, num_experts=E, top_k=K, pad_multiple=8, timeout_s=20.0)
    cud = EPBuffer(backend="cuda", tune=False, **kw)
    ref = EPBuffer(backend="reference", device=device, **kw)
    gen = torch.Generator().manual_seed(rank)

    def routing():
        weights, idx = torch.randn(T, E, generator=gen).topk(K)
        return weights.to(device), idx.to(device)

    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(device)
    routing_a, routing_b = routing(), routing()

    case = f"W={world_size}, H={H}, T={T}, E={E}, K={K}"
    want = eager_cases(ref, x, routing_a, routing_b)
    with check("eager stale and valid combines against the reference", case):
        got = eager_cases(cud, x, routing_a, routing_b)
        for i, (g, w) in enumerate(zip(got, want)):
            assert bits_equal(g, w), f"eager case {i}: CUDA != reference"
        for i in (1, 4):
            assert not bits(got[i]).any(), f"eager case {i}: a stale combine must be +0.0"

    # A combine captured in a graph, replayed after eager dispatches: the check runs on the device.
    (w_a, idx_a), (w_b, idx_b) = routing_a, routing_b
    idx_s, y_s = idx_a.clone(), torch.empty_like(cud.dispatch_outputs.hidden)
    out_s = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    d = ops.dispatch(cud, x, idx_s, w_a)
    y_s.copy_(d.hidden)
    ops.combine(cud, y_s, d, idx_s, out=out_s)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.combine(cud, y_s, d, idx_s, out=out_s)
    cud.check_errors(synchronize=True)

    def reference_combine(weights, idx):
        r = ops.dispatch(ref, x, idx, weights)
        return ops.combine(ref, r.hidden.clone(), r, idx).clone()

    # The captured combine reads idx_s: valid after a dispatch with idx_s, stale after one
    # with other routing, valid again once idx_s holds that routing.
    steps = [(w_a, idx_s, False), (w_b, idx_b, True), (w_b, idx_s, False), (w_a, idx_a, True)]
    for step, (weights, idx, stale) in enumerate(steps):
        with check(f"replayed combine, step {step} ({'stale' if stale else 'valid'})", case):
            d = ops.dispatch(cud, x, idx, weights)
            y_s.copy_(d.hidden)
            out_s.fill_(1.0)
            graph.replay()
            torch.cuda.synchronize()
            if stale:
                assert not bits(out_s).any(), f"replay {step}: a stale combine must be +0.0"
                expect_errors(cud, {ErrorKind.STALE_COMBINE: 1})
            else:
                assert bits_equal(out_s, reference_combine(weights, idx)), f"replay {step}"
                expect_errors(cud, {})
        if step == 1:
            idx_s.copy_(idx_b)
    cud.close()
    ref.close()


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", gpu_world_sizes((2,)))
def test_stale_combine_cuda_matches_reference_and_replays(world_size):
    spawn_gpu(world_size, worker)
