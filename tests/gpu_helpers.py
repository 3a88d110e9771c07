"""Helpers of the GPU tests: buffers of both backends side by side, bitwise comparisons."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hybrid_ep_infer import EPBuffer
from hybrid_ep_infer.placement import collective_device

from moe_cases import Case, RankInputs


def make_buffer(case: Case, backend: str, **kw) -> EPBuffer:
    kw.setdefault("timeout_s", 20.0)  # a bug that strands a wait fails in seconds, not minutes
    if backend == "cuda":
        kw.setdefault("tune", False)  # the built-in defaults; tests that tune say so
    return EPBuffer(hidden=case.hidden, max_tokens=case.max_tokens, num_experts=case.num_experts,
                    top_k=case.top_k, dtype=case.dtype, layout=case.layout, pad_multiple=case.pad_multiple,
                    capacity=case.capacity, backend=backend, **kw)


def to_device(inp: RankInputs, device) -> RankInputs:
    return RankInputs(inp.x.to(device), inp.topk_idx.to(device), inp.topk_weights.to(device),
                      inp.scales.to(device) if inp.scales is not None else None, inp.num_tokens)


def dispatch(buf: EPBuffer, inp: RankInputs, num_tokens="int"):
    if num_tokens == "device":
        n = torch.tensor([inp.num_tokens], dtype=torch.int32, device=inp.x.device)
    elif num_tokens == "default" and inp.num_tokens == inp.x.shape[0]:
        n = None
    else:
        n = inp.num_tokens
    return buf.dispatch(inp.x, inp.topk_idx, inp.topk_weights, scales=inp.scales, num_tokens=n)


def padding_mask(result, capacity: int) -> torch.Tensor | None:
    """Rows inside [offsets[e] + count[e], offsets[e + 1]) of a contiguous result."""
    if result.offsets is None:
        return None
    mask = torch.zeros(capacity, dtype=torch.bool)
    offsets, counts = result.offsets.cpu().tolist(), result.tokens_per_expert.cpu().tolist()
    for e, count in enumerate(counts):
        mask[offsets[e] + count: offsets[e + 1]] = True
    return mask


def assert_dispatch_equal(got, want, what: str = "") -> None:
    """Bitwise: counts, offsets, all of row_expert, and written and padding rows."""
    assert torch.equal(got.tokens_per_expert.cpu(), want.tokens_per_expert.cpu()), f"{what}: tokens_per_expert"
    if want.offsets is not None:
        assert torch.equal(got.offsets.cpu(), want.offsets.cpu()), f"{what}: offsets"
    assert torch.equal(got.row_expert.cpu(), want.row_expert.cpu()), f"{what}: row_expert"
    H = want.hidden.shape[-1]
    rows = (want.row_expert.reshape(-1) >= 0).cpu()
    pad = padding_mask(want, rows.numel())
    if pad is not None:
        rows |= pad
    got_hidden = got.hidden.reshape(-1, H).view(torch.uint8).cpu()[rows]
    want_hidden = want.hidden.reshape(-1, H).view(torch.uint8).cpu()[rows]
    assert torch.equal(got_hidden, want_hidden), f"{what}: hidden rows differ"
    got_w = got.weights.reshape(-1).cpu()[rows]
    want_w = want.weights.reshape(-1).cpu()[rows]
    assert torch.equal(got_w.view(torch.int32), want_w.view(torch.int32)), f"{what}: weights"
    if want.scales is not None:
        s = want.scales.shape[-1]
        got_s = got.scales.reshape(-1, s).cpu()[rows]
        assert torch.equal(got_s, want.scales.reshape(-1, s).cpu()[rows]), f"{what}: scales"


def poison(buf: EPBuffer) -> None:
    """Fill every output with garbage, so unwritten rows cannot pass as written."""
    b = buf.dispatch_outputs
    b.hidden.view(torch.uint8).fill_(0x7F)
    b.weights.fill_(float("nan"))
    b.row_expert.fill_(12345)
    b.tokens_per_expert.fill_(-7)
    if b.offsets is not None:
        b.offsets.fill_(-7)
    if b.scales is not None:
        b.scales.fill_(float("nan"))


def assert_same_errors(a: EPBuffer, b: EPBuffer, what: str = "") -> None:
    torch.cuda.synchronize()
    got, want = a._backend.take_errors(), b._backend.take_errors()
    assert got.counts == want.counts, f"{what}: error counts {got.counts} != reference {want.counts}"


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
