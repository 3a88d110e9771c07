"""Every bad argument raises ValueError/TypeError naming it, before anything runs."""

import pytest
import torch

from hybrid_ep_infer import BufferClosedError, EPBuffer, memory, ops

H, T, E, K = 128, 4, 4, 2


@pytest.fixture
def buf(one_rank_group):
    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="reference") as b:
        yield b


@pytest.fixture
def fp8_buf(one_rank_group):
    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, dtype=torch.float8_e4m3fn,
                  backend="reference") as b:
        yield b


def good(m=T):
    return torch.zeros(m, H, dtype=torch.bfloat16), torch.zeros(m, K, dtype=torch.int64), torch.ones(m, K)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hidden=0), ValueError, "hidden"),
    (dict(hidden=12), ValueError, "16 bytes"),
    (dict(hidden=64, dtype=torch.float8_e4m3fn), ValueError, "hidden % 128"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(max_tokens=4.0), TypeError, "max_tokens"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(top_k=5), ValueError, "top_k"),
    (dict(dtype=torch.float16), TypeError, "dtype"),
    (dict(layout="ragged"), ValueError, "layout"),
    (dict(pad_multiple=0), ValueError, "pad_multiple"),
    (dict(layout="batched", pad_multiple=4), ValueError, "pad_multiple"),
    (dict(pad_multiple=4, capacity=10), ValueError, "multiple of pad_multiple"),
    (dict(capacity=0), ValueError, "capacity"),
    (dict(num_sms=0), ValueError, "num_sms"),
    (dict(timeout_s=0), ValueError, "timeout_s"),
    (dict(backend="nccl"), ValueError, "backend"),
    (dict(ranks_per_node=0), ValueError, "ranks_per_node must be >= 1 and divide the group size \\(1\\), got 0"),
    (dict(ranks_per_node=2), ValueError, "divide the group size \\(1\\), got 2"),
    (dict(ranks_per_node=1.0), TypeError, "ranks_per_node must be an int or None, got float"),
    (dict(ranks_per_node=True), TypeError, "ranks_per_node must be an int or None, got bool"),
])
def test_constructor_arguments(one_rank_group, kwargs, error, match):
    args = dict(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="reference")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        EPBuffer(**args)


def test_cuda_backend_unavailable_is_a_clear_error(one_rank_group):
    if torch.cuda.is_available():
        pytest.skip("this checks the message on a machine without a usable CUDA backend")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available: no CUDA device"):
        EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="cuda")
    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K) as auto:
        assert auto.backend == "reference"


def test_default_capacity(one_rank_group):
    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, pad_multiple=8, backend="reference") as b:
        assert b.capacity == 1 * T * 2 + 4 * 7 + 4  # W*T*min(K, L) + L*(pad-1), rounded up to 8
    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, layout="batched", backend="reference") as b:
        assert b.capacity == T


@pytest.mark.parametrize("kw", [dict(pad_multiple=8), dict(layout="batched"),
                                dict(dtype=torch.float8_e4m3fn, capacity=40)])
def test_reference_nbytes_is_the_memory_formula(one_rank_group, kw):
    """The reference backend holds exactly the outputs of memory.output_bytes (the README cites it)."""
    kw = dict(dict(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="reference"), **kw)
    with EPBuffer(**kw) as b:
        assert b.nbytes == memory.output_bytes(b.config)


@pytest.mark.parametrize("which, bad, error, match", [
    ("x", "list", TypeError, "x must be a torch.Tensor"),
    ("x", torch.zeros(T, H), TypeError, "x must have dtype"),
    ("x", torch.zeros(T, H + 8, dtype=torch.bfloat16), ValueError, "x must have shape"),
    ("x", torch.zeros(T + 1, H, dtype=torch.bfloat16), ValueError, "max_tokens"),
    ("x", torch.zeros(H, T, dtype=torch.bfloat16).t(), ValueError, "x must be contiguous"),
    ("x", torch.zeros(T, 2 * H, dtype=torch.bfloat16)[:, ::2], ValueError, "x must be contiguous"),
    ("x", torch.zeros(T, H, 1, dtype=torch.bfloat16), ValueError, "2-D"),
    ("x", torch.zeros(T * H + 1, dtype=torch.bfloat16)[1:].view(T, H), ValueError, "16-byte aligned"),
    ("topk_idx", torch.zeros(T, K, dtype=torch.int16), TypeError, "topk_idx must have dtype"),
    ("topk_idx", torch.zeros(T, K + 1, dtype=torch.int64), ValueError, "topk_idx must have shape"),
    ("topk_idx", torch.zeros(K, T, dtype=torch.int64).t(), ValueError, "topk_idx must be contiguous"),
    ("topk_idx", torch.zeros(T - 1, K, dtype=torch.int64), ValueError, "topk_idx must have shape"),
    ("topk_weights", torch.ones(T, K, dtype=torch.float64), TypeError, "topk_weights must have dtype"),
    ("topk_weights", torch.ones(T, K + 1), ValueError, "topk_weights must have shape"),
    ("topk_weights", torch.ones(T, K, device="meta"), ValueError, "topk_weights must be on cpu"),
    ("scales", torch.ones(T, 1), ValueError, "scales are only accepted for FP8"),
    ("num_tokens", T + 1, ValueError, r"num_tokens must be in \[0, 4\]"),
    ("num_tokens", -1, ValueError, "num_tokens must be in"),
    ("num_tokens", 2.0, TypeError, "num_tokens must be None, an int"),
    ("num_tokens", True, TypeError, "num_tokens must be None, an int"),
    ("num_tokens", torch.tensor([2]), TypeError, "one int32 element"),
    ("num_tokens", torch.tensor([2, 3], dtype=torch.int32), TypeError, "one int32 element"),
    ("num_tokens", torch.tensor([2], dtype=torch.int32, device="meta"), ValueError, "num_tokens must be on cpu"),
])
def test_dispatch_arguments(buf, which, bad, error, match):
    x, idx, w = good()
    args = dict(x=x, topk_idx=idx, topk_weights=w)
    args[which] = bad
    x, idx, w = args.pop("x"), args.pop("topk_idx"), args.pop("topk_weights")
    with pytest.raises(error, match=match):
        buf.dispatch(x, idx, w, **args)


@pytest.mark.parametrize("bad, error, match", [
    (None, ValueError, "scales .* are required"),
    (torch.ones(T, 2), ValueError, "scales must have shape"),
    (torch.ones(T, 1, dtype=torch.bfloat16), TypeError, "scales must have dtype"),
    (torch.ones(1, T).t(), None, None),  # [T, 1] transposed from [1, T] is still contiguous
])
def test_fp8_scales(fp8_buf, bad, error, match):
    x = torch.zeros(T, H, dtype=torch.float8_e4m3fn)
    idx, w = torch.zeros(T, K, dtype=torch.int64), torch.ones(T, K)
    if error is None:
        fp8_buf.dispatch(x, idx, w, scales=bad)
    else:
        with pytest.raises(error, match=match):
            fp8_buf.dispatch(x, idx, w, scales=bad)


def test_combine_arguments(buf):
    x, idx, w = good()
    r = buf.dispatch(x, idx, w)
    y = torch.zeros_like(r.hidden, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="handle"):
        buf.combine(y, "not a handle")
    with pytest.raises(TypeError, match="y must have dtype"):
        buf.combine(y.float(), r.handle)
    with pytest.raises(ValueError, match="y must have shape"):
        buf.combine(y[:-1], r.handle)
    with pytest.raises(TypeError, match="out must have dtype"):
        buf.combine(y, r.handle, out=torch.zeros(T, H))
    with pytest.raises(ValueError, match="16-byte aligned"):
        buf.combine(y, r.handle, out=torch.zeros(T * H + 1, dtype=torch.bfloat16)[1:].view(T, H))
    with pytest.raises(ValueError, match="out must have shape"):
        buf.combine(y, r.handle, out=torch.zeros(T - 1, H, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="weighted"):
        buf.combine(y, r.handle, weighted=1)
    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="reference") as other:
        with pytest.raises(ValueError, match="this buffer"):
            other.combine(y, r.handle)
    buf.combine(y, r.handle)  # still fine after all those refusals


def test_closed_buffer_refuses_calls(one_rank_group):
    b = EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="reference")
    b.close()
    b.close()  # idempotent
    assert b.closed
    x, idx, w = good()
    with pytest.raises(BufferClosedError):
        b.dispatch(x, idx, w)
    with pytest.raises(BufferClosedError):
        b.check_errors()
    with pytest.raises(BufferClosedError):  # the custom ops too, before they reach the op
        ops.dispatch(b, x, idx, w)
    with pytest.raises(BufferClosedError):
        ops.combine(b, torch.zeros(b.capacity, H, dtype=torch.bfloat16), None, idx)
