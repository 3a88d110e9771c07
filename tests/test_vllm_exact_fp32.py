"""The float32 path of the vLLM adapter (``hybrid_ep_infer_vllm.exact_fp32``), without vLLM:

- the 3-way bf16 split reconstructs every finite fp32 value exactly;
- fp32 rows dispatched as raw bytes on a bf16 buffer of twice the hidden size arrive
  bit-identical, and the slot-number "weights" name each row's top-k slot;
- ``gather_slots`` returns every (token, slot)'s fp32 expert output bit-exactly through
  unweighted combines (reference backend, 2 gloo ranks, invalid and -1 ids included).
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import spawn

if importlib.util.find_spec("hybrid_ep_infer_vllm") is None:  # a source checkout, not installed
    sys.path.append(str(Path(__file__).resolve().parent.parent / "integrations"))

from hybrid_ep_infer_vllm import exact_fp32  # noqa: E402

H, T, K = 32, 6, 3


def test_split3_is_exact():
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (4096,), generator=g) * 2 - 1
    y = sign * (0.5 + torch.rand(4096, generator=g)) * torch.logspace(-32, 38, 4096)  # many binades
    edges = torch.tensor([2.0**-110, -(2.0**-110) * 1.75, 3.38e38, -3.38e38, 0.0, -0.0])
    y = torch.cat([y, edges, torch.nextafter(torch.ones(8), torch.full((8,), 2.0))])
    hi, mid, lo = exact_fp32.split3(y)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    assert torch.equal((hi.float() + mid.float()) + lo.float(), y)
    # Below 2**-110 the last piece may fall under bf16's smallest subnormal (2**-133).
    tiny = torch.tensor([1e-38, -1.4e-45, 3e-39, 1e-35])
    hi, mid, lo = exact_fp32.split3(tiny)
    assert ((hi.float() + mid.float()) + lo.float() - tiny).abs().max() <= 2.0**-133


def test_split3_is_exact_compiled():
    """Under inductor too (vLLM compiles the adapter): it keeps ``y.to(bf16).float()`` in
    fp32 unless it emulates precision casts, so a split that relies on rounding is not exact."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4096, generator=g) * torch.logspace(-20, 20, 4096)
    hi, mid, lo = torch.compile(exact_fp32.split3, backend="inductor")(y)
    assert torch.equal((hi.float() + mid.float()) + lo.float(), y)


def worker(rank: int, world_size: int) -> None:
    from hybrid_ep_infer import EPBuffer, ops
    from hybrid_ep_infer.errors import RoutingDataError

    E = 4 * world_size
    hidden, dtype = exact_fp32.buffer_format(H, torch.float32)
    assert (hidden, dtype) == (2 * H, torch.bfloat16)
    g = torch.Generator().manual_seed(7)  # every rank builds every rank's inputs
    xs = [torch.randn(T, H, generator=g) * 100 for _ in range(world_size)]
    ids_all = [torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].contiguous() for _ in range(world_size)]
    for ids in ids_all:
        ids[0, 1] = -1  # no expert in one slot
        ids[1, 2] = E + 3  # an invalid id: dropped (and counted)
        ids[2] = -1  # a token with no expert at all
    x, ids = xs[rank], ids_all[rank]

    with EPBuffer(hidden=hidden, max_tokens=T, num_experts=E, top_k=K, dtype=dtype, backend="reference") as buf:
        d = ops.dispatch(buf, x.view(torch.bfloat16), ids, exact_fp32.slot_numbers(T, K, x.device))
        rows = d.hidden.view(torch.float32)
        slots = exact_fp32.row_slots(d.row_expert, d.weights, K)
        written = d.row_expert >= 0
        assert bool((slots[written] < K).all()) and bool((slots[~written] == K).all())

        # Expert "outputs" that depend on the row, its expert and its slot, with full fp32 mantissas.
        expert = (d.row_expert.long() + rank * buf.num_local_experts).clamp(min=0)
        y = torch.where(written.unsqueeze(1), rows * (1.0 + expert.unsqueeze(1) / 3.0) + slots.unsqueeze(1) / 7.0,
                        float("nan"))  # rows that are not written must never be read
        out = exact_fp32.gather_slots(buf, d, ids, y, slots, K)
        with pytest.raises(RoutingDataError, match="outside"):
            buf.check_errors()  # the invalid id was counted, and dropped

    expected = torch.zeros(T, K, H)
    for t in range(T):
        for k in range(K):
            e = int(ids[t, k])
            if 0 <= e < E:
                # The same fp32 expressions as above, on the source row: bit-identical if
                # dispatch carried the bytes and the gather was exact.
                expected[t, k] = x[t] * (1.0 + torch.tensor(float(e)) / 3.0) + torch.tensor(float(k)) / 7.0
    assert out.shape == (T, K, H) and out.dtype == torch.float32
    assert torch.equal(out, expected), f"rank {rank}: max diff {(out - expected).abs().max()}"

    w = torch.rand(T, K, generator=torch.Generator().manual_seed(rank))
    total = exact_fp32.weighted_sum(out, w)
    assert torch.equal(total, (expected[:, 0] * w[:, :1] + expected[:, 1] * w[:, 1:2]) + expected[:, 2] * w[:, 2:])


def test_fp32_rows_dispatch_as_bytes_and_gather_exactly():
    spawn(2, worker)
