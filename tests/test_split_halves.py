"""EPBuffer's split halves on the reference backend (CPU, gloo): send + receive equals the
one-call op, bit for bit, and every misuse is refused before anything runs.

- Over 2 and 4 ranks, every case of ``moe_cases.multirank_cases`` (both layouts, FP8 and
  raw bytes, padding, capacity overflow, -1/invalid/repeated ids, ragged and zero n) with
  each num_tokens form (device tensor included): ``dispatch_send`` + ``dispatch_recv`` and
  ``combine_send`` + ``combine_recv`` give the same outputs, handle and error counts as
  ``dispatch``/``combine`` on another buffer, with the inputs overwritten and a collective
  on the same group between the halves.
- Two buffers interleaved (send A, send B, receive A, receive B; combines received in the
  other order) give each buffer's one-call results.
- One rank: each misuse (a second send, a one-call op or combine_send while a half is
  pending, a receive with another buffer's or a consumed pending, a stale handle, the
  ops' receives with nothing pending) raises, naming what is pending, and the pending
  half then completes with the right result; ``close()`` with a pending half.
"""

import pytest
import torch
import torch.distributed as dist

from hybrid_ep_infer import EPBuffer, RoutingDataError, ops
from hybrid_ep_infer.errors import BufferClosedError

from dist_utils import check, spawn
from moe_cases import Case, bits_equal, experts_on_dispatch_output, make_inputs, multirank_cases

FORMS = ("int", "tensor", "default")


def make_buffer(case: Case) -> EPBuffer:
    return EPBuffer(hidden=case.hidden, max_tokens=case.max_tokens, num_experts=case.num_experts,
                    top_k=case.top_k, dtype=case.dtype, layout=case.layout, pad_multiple=case.pad_multiple,
                    capacity=case.capacity, backend="reference")


def num_tokens_arg(inp, form: str):
    n = inp.num_tokens
    return {"int": n, "tensor": torch.tensor([n], dtype=torch.int32),
            "default": None if n == inp.x.shape[0] else n}[form]


def error_counts(buf: EPBuffer) -> dict:
    """The counts check_errors() raises (and clears), {} if none."""
    try:
        buf.check_errors()
    except RoutingDataError as e:
        return dict(e.counts)
    return {}


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_same_dispatch(got, want) -> None:
    """Every output tensor bit-identical; the handles equal in all but the buffer they name."""
    for name in ("hidden", "scales", "weights", "row_expert", "tokens_per_expert", "offsets"):
        assert same_bits(getattr(got, name), getattr(want, name)), f"dispatch output {name} differs"
    assert (got.handle.generation, got.handle.num_rows) == (want.handle.generation, want.handle.num_rows)
    for name in ("dest", "src_rank", "src_token", "slot", "ids"):  # the reference backend's plan
        assert torch.equal(getattr(got.handle.state, name), getattr(want.handle.state, name)), name
    assert got.handle.state.num_tokens == want.handle.state.num_tokens


def scramble(*tensors) -> None:
    """Overwrite inputs between a send and its receive: the send must not read them later."""
    for t in tensors:
        if t is not None:
            t.view(torch.uint8).fill_(0x5A)


def copies(inp):
    """Copies of one rank's inputs that the test may overwrite."""
    return (inp.x.clone(), inp.topk_idx.clone(), inp.topk_weights.clone(),
            inp.scales.clone() if inp.scales is not None else None)


def one_call(buf: EPBuffer, inp, form: str):
    """The one-call results: dispatch outputs (copies), error counts, and combines (weighted, unweighted)."""
    result = buf.dispatch(inp.x, inp.topk_idx, inp.topk_weights, scales=inp.scales,
                          num_tokens=num_tokens_arg(inp, form))
    dispatched = result._replace(**{name: t.clone() for name, t in result._asdict().items()
                                    if isinstance(t, torch.Tensor)})
    errors = error_counts(buf)
    y = experts_on_dispatch_output(result, buf.rank, buf.num_local_experts)
    combined = [buf.combine(y, result.handle, weighted=w).clone() for w in (True, False)]
    return dispatched, errors, y, combined


def run_split_case(rank: int, case: Case, form: str) -> None:
    mine = make_inputs(case)[rank]
    with make_buffer(case) as whole, make_buffer(case) as split:
        want, want_errors, y, want_combined = one_call(whole, mine, form)

        x, idx, weights, scales = copies(mine)
        pending = split.dispatch_send(x, idx, weights, scales=scales, num_tokens=num_tokens_arg(mine, form))
        scramble(x, idx, weights, scales)
        dist.all_reduce(torch.ones(3), group=split.group)  # anything may run between the halves
        got = split.dispatch_recv(pending)
        assert_same_dispatch(got, want)
        assert error_counts(split) == want_errors

        for weighted, expected in zip((True, False), want_combined):
            y_copy = y.clone()
            out = torch.full_like(expected, float("nan")) if weighted else None  # given, or buffer memory
            pending = split.combine_send(y_copy, got.handle, out=out, weighted=weighted)
            scramble(y_copy)
            combined = split.combine_recv(pending)
            assert bits_equal(combined, expected), f"combine (weighted={weighted}) differs"
            if out is not None:
                assert combined is out
        assert error_counts(split) == error_counts(whole) == {}


def run_interleaved(rank: int, world_size: int) -> None:
    """Two buffers: send A, send B, receive A, receive B; combines received B then A."""
    case_a = Case(world_size=world_size, hidden=128, max_tokens=10, num_experts=2 * world_size, top_k=2,
                  routing="masked", seed=31)
    case_b = Case(world_size=world_size, hidden=256, max_tokens=6, num_experts=4 * world_size, top_k=3,
                  layout="batched", routing="ragged", seed=32)
    cases, mine = (case_a, case_b), [make_inputs(c)[rank] for c in (case_a, case_b)]
    buffers = [make_buffer(c) for c in cases] + [make_buffer(c) for c in cases]  # split A, B; one-call A, B
    try:
        wants = [one_call(buffers[2 + i], mine[i], "int") for i in range(2)]
        sends = []
        for buf, inp in zip(buffers[:2], mine):
            x, idx, weights, scales = copies(inp)
            sends.append(buf.dispatch_send(x, idx, weights, scales=scales, num_tokens=inp.num_tokens))
            scramble(x, idx, weights, scales)
        results = [buf.dispatch_recv(p) for buf, p in zip(buffers[:2], sends)]
        for got, (want, errors, _, _), buf in zip(results, wants, buffers):
            assert_same_dispatch(got, want)
            assert error_counts(buf) == errors
        sends = [buf.combine_send(want[2], got.handle) for buf, got, want in zip(buffers[:2], results, wants)]
        for i in (1, 0):
            assert bits_equal(buffers[i].combine_recv(sends[i]), wants[i][3][0]), f"buffer {'AB'[i]}"
    finally:
        for buf in buffers:
            buf.close()


def worker(rank: int, world_size: int) -> None:
    for i, case in enumerate(multirank_cases(world_size)):
        form = FORMS[i % len(FORMS)]
        with check("send + receive equals the one-call op", f"{case}, num_tokens {form}"):
            run_split_case(rank, case, form)
    with check("two buffers interleaved"):
        run_interleaved(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_split_halves_equal_one_call(world_size):
    spawn(world_size, worker)


# ---------------------------------------------------------------------- misuse, one rank

SMALL = Case(world_size=1, hidden=128, max_tokens=8, num_experts=4, top_k=2, routing="masked", seed=3)


def test_misuse_is_refused_before_anything_runs(one_rank_group):
    inp = make_inputs(SMALL)[0]
    args = (inp.x, inp.topk_idx, inp.topk_weights)
    with make_buffer(SMALL) as buf, make_buffer(SMALL) as other, make_buffer(SMALL) as whole:
        want, _, y, want_combined = one_call(whole, inp, "int")

        pending = buf.dispatch_send(*args)
        for call in (lambda: buf.dispatch_send(*args), lambda: buf.dispatch(*args),
                     lambda: ops.dispatch(buf, *args), lambda: ops.dispatch_send(buf, *args)):
            with pytest.raises(RuntimeError, match="while a dispatch_send is pending.*call dispatch_recv first"):
                call()
        with pytest.raises(RuntimeError, match="combine_send while a dispatch_send is pending"):
            buf.combine_send(y, want.handle)  # (another buffer's handle, but the pending half is checked first)
        with pytest.raises(RuntimeError, match="combine_recv without a pending combine_send.*dispatch_send is "
                                               "pending"):
            ops.combine_recv(buf, torch.empty(SMALL.max_tokens, SMALL.hidden, dtype=torch.bfloat16))
        other_pending = other.dispatch_send(*args)
        with pytest.raises(ValueError, match="dispatch_recv needs the PendingDispatch that this buffer's "
                                             "dispatch_send returned"):
            buf.dispatch_recv(other_pending)
        with pytest.raises(ValueError, match="needs the PendingDispatch"):
            buf.dispatch_recv(None)  # not a pending at all
        got = buf.dispatch_recv(pending)  # the pending half still completes, unharmed
        assert_same_dispatch(got, want)
        with pytest.raises(ValueError, match="already received.*nothing is pending"):
            buf.dispatch_recv(pending)
        with pytest.raises(RuntimeError, match="dispatch_recv without a pending dispatch_send.*nothing is pending"):
            ops.dispatch_recv(buf)
        other.dispatch_recv(other_pending)

        pending = buf.combine_send(y, got.handle)
        for call in (lambda: buf.combine(y, got.handle), lambda: buf.combine_send(y, got.handle),
                     lambda: buf.dispatch_send(*args), lambda: ops.combine(buf, y, got, inp.topk_idx)):
            with pytest.raises(RuntimeError, match="while a combine_send is pending.*call combine_recv first"):
                call()
        with pytest.raises(ValueError, match="dispatch_recv needs the PendingDispatch.*combine_send is pending"):
            buf.dispatch_recv(pending)
        with pytest.raises(ValueError, match="combine_recv needs the PendingCombine"):
            other.combine_recv(pending)
        assert bits_equal(buf.combine_recv(pending), want_combined[0])
        with pytest.raises(ValueError, match="already received"):
            buf.combine_recv(pending)

        stale = got.handle
        buf.dispatch_recv(buf.dispatch_send(*args))
        with pytest.raises(ValueError, match="stale"):
            buf.combine_send(y, stale)
        with pytest.raises(ValueError, match="handle must be"):
            buf.combine_send(y, other.dispatch(*args).handle)
        assert error_counts(buf) == error_counts(whole)  # nothing refused was counted


def test_close_with_a_pending_half(one_rank_group):
    inp = make_inputs(SMALL)[0]
    for half in ("dispatch", "combine"):
        buf = make_buffer(SMALL)
        pending = buf.dispatch_send(inp.x, inp.topk_idx, inp.topk_weights)
        if half == "combine":
            result = buf.dispatch_recv(pending)
            pending = buf.combine_send(result.hidden.clone(), result.handle)
        buf.close()
        buf.close()  # idempotent
        with pytest.raises(BufferClosedError):
            (buf.dispatch_recv if half == "dispatch" else buf.combine_recv)(pending)
        with pytest.raises(BufferClosedError):
            buf.dispatch_send(inp.x, inp.topk_idx, inp.topk_weights)
