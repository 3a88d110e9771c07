"""Hand-made single-rank cases with every expected tensor written out."""

import pytest
import torch

from hybrid_ep_infer import EPBuffer, ErrorKind, RoutingDataError

NAN = float("nan")


def make_buffer(**kw):
    args = dict(hidden=8, max_tokens=4, num_experts=4, top_k=2, backend="reference")
    args.update(kw)
    return EPBuffer(**args)


# Token t's row is all (t + 1). Token 2 repeats expert 3; token 3 names expert 7 (E = 4).
X = (torch.arange(4, dtype=torch.float32)[:, None] + 1).expand(4, 8).to(torch.bfloat16).contiguous()
IDX = torch.tensor([[1, 0], [1, -1], [3, 3], [2, 7]])
W = torch.tensor([[0.5, 0.25], [1.0, 0.0], [0.75, 0.5], [0.125, 1.0]])


def test_contiguous_with_padding(one_rank_group):
    with make_buffer(pad_multiple=2) as buf:
        assert buf.capacity == 12  # 1 * 4 * min(2, 4) + 4 * (2 - 1) = 12
        r = buf.dispatch(X, IDX, W)
        # Rows by expert, then (rank, token, slot); each expert padded to 2 rows.
        assert r.tokens_per_expert.tolist() == [1, 2, 1, 1]
        assert r.offsets.tolist() == [0, 2, 4, 6, 8]
        assert r.row_expert.tolist() == [0, -1, 1, 1, 2, -1, 3, -1, -1, -1, -1, -1]
        assert r.hidden[:8, 0].tolist() == [1, 0, 1, 2, 4, 0, 3, 0]
        assert torch.equal(r.hidden[:8], r.hidden[:8, :1].expand(8, 8))
        assert r.weights[:8].tolist() == [0.25, 0, 0.5, 1.0, 0.125, 0, 0.75, 0]
        assert r.scales is None

        y = (r.hidden.float() * 2).to(torch.bfloat16)
        out = buf.combine(y, r.handle)
        # t0: 0.5*2 + 0.25*2 (slots 0, 1); t1: 1.0*4; t2: 0.75*6 (repeat dropped); t3: 0.125*8.
        assert out[:, 0].tolist() == [1.5, 4.0, 4.5, 1.0]
        out = buf.combine(y, r.handle, weighted=False)
        assert out[:, 0].tolist() == [4.0, 4.0, 6.0, 8.0]

        with pytest.raises(RoutingDataError) as info:
            buf.check_errors()
        assert info.value.counts == {ErrorKind.INVALID_EXPERT_ID: 1, ErrorKind.REPEATED_EXPERT_ID: 1}
        assert "rank 0" in str(info.value) and "[-1, 4)" in str(info.value)
        buf.check_errors()  # cleared by the previous check


def test_batched(one_rank_group):
    with make_buffer(layout="batched") as buf:
        assert buf.capacity == 4
        r = buf.dispatch(X, IDX, W)
        assert r.hidden.shape == (4, 4, 8) and r.offsets is None
        assert r.tokens_per_expert.tolist() == [1, 2, 1, 1]
        assert r.row_expert.tolist() == [[0, -1, -1, -1], [1, 1, -1, -1], [2, -1, -1, -1], [3, -1, -1, -1]]
        assert r.hidden[:, :2, 0].tolist() == [[1, r.hidden[0, 1, 0].item()], [1, 2], [4, r.hidden[2, 1, 0].item()],
                                               [3, r.hidden[3, 1, 0].item()]]
        assert r.weights[1, :2].tolist() == [0.5, 1.0]
        out = buf.combine(r.hidden.clone(), r.handle)
        assert out[:, 0].tolist() == [0.75, 2.0, 2.25, 0.5]


def test_reduced_capacity_overflow(one_rank_group):
    with make_buffer(pad_multiple=2, capacity=4) as buf:
        r = buf.dispatch(X, IDX, W)
        # e0 takes rows [0, 2), e1 [2, 4); e2 and e3 do not fit.
        assert r.tokens_per_expert.tolist() == [1, 2, 0, 0]
        assert r.offsets.tolist() == [0, 2, 4, 4, 4]
        assert r.row_expert.tolist() == [0, -1, 1, 1]
        out = buf.combine(r.hidden.clone(), r.handle, weighted=False)
        assert out[:, 0].tolist() == [2.0, 2.0, 0.0, 0.0]  # dropped rows are absent
        with pytest.raises(RoutingDataError) as info:
            buf.check_errors()
        assert info.value.counts[ErrorKind.CAPACITY_OVERFLOW] == 2
        assert "capacity" in str(info.value)


def test_num_tokens_forms(one_rank_group):
    with make_buffer() as buf:
        x = X.clone()
        for num_tokens in (2, torch.tensor([2], dtype=torch.int32)):
            x[2:] = float("nan")  # rows >= n are never read
            idx = IDX.clone()
            idx[2:] = 99  # ... nor validated
            r = buf.dispatch(x, idx, W, num_tokens=num_tokens)
            assert r.tokens_per_expert.tolist() == [1, 2, 0, 0]
            out = buf.combine(r.hidden.clone(), r.handle)
            assert out[:, 0].tolist() == [0.75, 2.0, 0.0, 0.0]
            buf.check_errors()
        # A device n outside [0, m]: counted, and this rank sends nothing.
        r = buf.dispatch(X, IDX, W, num_tokens=torch.tensor([5], dtype=torch.int32))
        assert r.tokens_per_expert.tolist() == [0, 0, 0, 0]
        assert buf.combine(r.hidden.clone(), r.handle).abs().sum().item() == 0
        with pytest.raises(RoutingDataError, match="num_tokens") as info:
            buf.check_errors()
        assert info.value.counts == {ErrorKind.BAD_NUM_TOKENS: 1}


def test_fp8_carries_bytes_and_scales(one_rank_group):
    with make_buffer(hidden=128, dtype=torch.float8_e4m3fn, pad_multiple=2) as buf:
        x = torch.randn(4, 128).to(torch.float8_e4m3fn)
        scales = torch.rand(4, 1) + 1
        r = buf.dispatch(x, IDX, W, scales=scales)
        assert r.hidden.dtype == torch.float8_e4m3fn and r.scales.shape == (12, 1)
        assert torch.equal(r.hidden[2].view(torch.uint8), x[0].view(torch.uint8))
        assert r.scales[:8, 0].tolist() == [scales[0, 0].item(), 0, scales[0, 0].item(), scales[1, 0].item(),
                                            scales[3, 0].item(), 0, scales[2, 0].item(), 0]
        assert not r.hidden[1].view(torch.uint8).any()  # padding is zero


def test_outputs_are_views_of_buffer_memory(one_rank_group):
    with make_buffer() as buf:
        first = buf.dispatch(X, IDX, W)
        second = buf.dispatch(X.flip(0).contiguous(), IDX, W)
        assert first.hidden.data_ptr() == second.hidden.data_ptr()
        with pytest.raises(ValueError, match="stale"):
            buf.combine(first.hidden.clone(), first.handle)
        out = torch.full((4, 8), NAN, dtype=torch.bfloat16)
        assert buf.combine(second.hidden.clone(), second.handle, out=out) is out
        assert not out.isnan().any()


def test_debug_checks_after_every_call(one_rank_group):
    with make_buffer(debug=True) as buf:
        with pytest.raises(RoutingDataError):
            buf.dispatch(X, IDX, W)
        buf.dispatch(X, torch.tensor([[1, 0], [1, -1], [3, 2], [2, 0]]), W)  # valid again: no raise


def test_independent_of_the_default_dtype(one_rank_group):
    """Engines (vLLM) set torch's default dtype to the model's; nothing may follow it."""
    with make_buffer(pad_multiple=2) as buf:
        r = buf.dispatch(X, IDX, W)
        want = buf.combine((r.hidden.float() * 1.5).to(torch.bfloat16), r.handle,
                           out=torch.empty(4, 8, dtype=torch.bfloat16))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with make_buffer(pad_multiple=2) as buf:
            assert buf.dispatch_outputs.weights.dtype == torch.float32
            r = buf.dispatch(X, IDX, W)
            got = buf.combine((r.hidden.float() * 1.5).to(torch.bfloat16), r.handle,
                              out=torch.empty(4, 8, dtype=torch.bfloat16))
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    finally:
        torch.set_default_dtype(previous)
