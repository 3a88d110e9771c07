"""The low-latency dispatch and the split send/receive halves on the GPU, bit for bit
against the reference backend: every path (planned, low-latency in one launch, and the
two halves) over layouts, dtypes, routings, capacity and n; paths mixed on one buffer;
the halves captured in a CUDA graph with other work between them; a missing peer in the
dispatch (one call or halves) and in the combine's halves.

Each check's failure names the check, the path and the case.
"""

import dataclasses
import time

import pytest
import torch
import torch.distributed as dist

from hybrid_ep_infer import ErrorKind, PeerTimeoutError, mapped_peer_buffers, ops
from hybrid_ep_infer._native import NativeError

from dist_utils import gpu_world_sizes, rank_device, spawn_gpu
from gpu_helpers import assert_dispatch_equal, assert_same_errors, dispatch, make_buffer, poison, to_device
from moe_cases import Case, bits_equal, experts_on_dispatch_output, make_inputs

PLANNED, LOW_LATENCY = 0, 1  # hep_dispatch_path_t
PATHS = ("planned", "low_latency", "split")


def use_path(buf, path: str) -> None:
    buf._backend.context.set_tuning(dispatch_path=PLANNED if path == "planned" else LOW_LATENCY)


def run_dispatch(buf, inp, path: str, num_tokens="int"):
    """Dispatch on `path` (the split halves through EPBuffer.dispatch_send/dispatch_recv)."""
    use_path(buf, path)
    if path != "split":
        return dispatch(buf, inp, num_tokens)
    n = inp.num_tokens if num_tokens != "device" else torch.tensor([inp.num_tokens], dtype=torch.int32,
                                                                     device=inp.x.device)
    pending = buf.dispatch_send(inp.x, inp.topk_idx, inp.topk_weights, scales=inp.scales, num_tokens=n)
    return buf.dispatch_recv(pending)


def run_combine(buf, y, handle, split: bool, weighted: bool = True) -> torch.Tensor:
    out = torch.full((handle.num_rows, buf.config.hidden), float("nan"), dtype=torch.bfloat16, device=buf.device)
    if split:
        return buf.combine_recv(buf.combine_send(y, handle, out=out, weighted=weighted))
    return buf.combine(y, handle, out=out, weighted=weighted)


def check_paths(rank: int, case: Case, num_tokens: str = "int", paths=PATHS, **buffer_kw) -> None:
    device = rank_device(rank)
    inp = to_device(make_inputs(case)[rank], device)
    with make_buffer(case, "cuda", low_latency=True, **buffer_kw) as cud, \
            make_buffer(case, "reference", device=device) as ref:
        want = dispatch(ref, inp, "int")
        y = experts_on_dispatch_output(want, rank, case.num_local_experts)
        # (clones: without out, combine returns a view of buffer memory the next call overwrites)
        want_out = {w: ref.combine(y, want.handle, weighted=w).clone() for w in (True, False)}
        torch.cuda.synchronize()
        for path in paths:
            for attempt in range(2):  # the second call checks that a call leaves nothing stale behind
                what = f"dispatch on path {path}, rank {rank}, call {attempt}, {case}"
                poison(cud)
                got = run_dispatch(cud, inp, path, num_tokens)
                torch.cuda.synchronize()
                assert_dispatch_equal(got, want, what)
                for weighted in (True, False):
                    out = run_combine(cud, y, got.handle, split=path == "split", weighted=weighted)
                    torch.cuda.synchronize()
                    assert bits_equal(out, want_out[weighted]), f"combine (weighted={weighted}) after {what}"
                # the reference made one dispatch and two combines: repeat its counts per call
                got_errors = cud._backend.take_errors()
                if attempt == 0 and path == paths[0]:
                    ref_errors = ref._backend.take_errors()
                assert got_errors.counts == ref_errors.counts, f"error counts after {what}: {got_errors.counts} " \
                                                               f"!= reference {ref_errors.counts}"


def check_mixed_paths(rank: int, world_size: int, steps: int) -> None:
    """One buffer, the paths in turn with fresh routing each step, each followed by a
    one-call or a split combine: every transition leaves nothing stale."""
    device = rank_device(rank)
    base = Case(world_size=world_size, hidden=1024, max_tokens=96, num_experts=4 * world_size, top_k=4,
                pad_multiple=8)
    with make_buffer(base, "cuda", low_latency=True) as cud, make_buffer(base, "reference", device=device) as ref:
        routings = ("random", "skewed", "masked", "ragged", "empty_rank", "invalid", "repeated")
        for step in range(steps):
            case = dataclasses.replace(base, routing=routings[step % len(routings)], seed=500 + step)
            inp = to_device(make_inputs(case)[rank], device)
            path = PATHS[(step * 7 + step // 3) % 3]  # every ordered pair of paths occurs
            what = f"mixed paths step {step} ({path}, {case.routing}), rank {rank}"
            poison(cud)
            got = run_dispatch(cud, inp, path, ("int", "device")[step % 2])
            want = dispatch(ref, inp, "int")
            torch.cuda.synchronize()
            assert_dispatch_equal(got, want, what)
            y = experts_on_dispatch_output(want, rank, case.num_local_experts)
            out = run_combine(cud, y, got.handle, split=step % 2 == 1)
            want_out = ref.combine(y, want.handle)
            torch.cuda.synchronize()
            assert bits_equal(out, want_out), f"combine after {what}"
            assert_same_errors(cud, ref, what)


def run_split_graph(rank: int, world_size: int, replays: int, **buffer_kw) -> None:
    """Send, other work, receive (dispatch and combine) captured in one CUDA graph;
    replays with fresh inputs and n equal the reference bit for bit."""
    device = rank_device(rank)
    case = Case(world_size=world_size, hidden=2048, max_tokens=64, num_experts=8 * world_size, top_k=8)
    T, H, K, L = case.max_tokens, case.hidden, case.top_k, case.num_local_experts
    x = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    idx = torch.empty(T, K, dtype=torch.int64, device=device)
    weights = torch.empty(T, K, device=device)
    n = torch.empty(1, dtype=torch.int32, device=device)
    out = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    a = torch.randn(512, 512, device=device)
    other = torch.empty(512, 512, device=device)

    def load(seed: int, routing: str) -> int:
        inp = make_inputs(dataclasses.replace(case, routing=routing, seed=seed))[rank]
        m = inp.x.shape[0]
        x.normal_()
        idx.fill_(-1)
        x[:m], idx[:m], weights[:m] = inp.x, inp.topk_idx, inp.topk_weights
        n.fill_(inp.num_tokens)
        return inp.num_tokens

    def layer(buf):
        pending = buf.dispatch_send(x, idx, weights, num_tokens=n)
        torch.mm(a, a, out=other)  # work between the halves
        result = buf.dispatch_recv(pending)
        y = experts_on_dispatch_output(result, rank, L)
        pending = buf.combine_send(y, result.handle, out=out)
        torch.mm(a, a, out=other)
        buf.combine_recv(pending)

    with make_buffer(case, "cuda", low_latency=True, **buffer_kw) as cud, \
            make_buffer(case, "reference", device=device) as ref:
        load(0, "random")
        layer(cud)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(cud)
        # ("order" needs another shape: cases() has it)
        routings = ("random", "masked", "invalid", "repeated", "empty_rank", "ragged", "skewed")
        for i in range(replays):
            count = load(9000 + i, routings[i % len(routings)])
            out.fill_(float("nan"))
            graph.replay()
            got = out.clone()
            want_d = ref.dispatch(x, idx, weights, num_tokens=count)
            want = ref.combine(experts_on_dispatch_output(want_d, rank, L), want_d.handle)
            torch.cuda.synchronize()
            assert bits_equal(got, want), f"split halves in a graph: replay {i} ({routings[i % len(routings)]}), " \
                                          f"rank {rank}"


def check_split_combine_inputs_reusable(rank: int, world_size: int) -> None:
    """The ops' split combine with topk_idx (the stale-combine check): y and topk_idx
    overwritten between the halves change nothing, and a stale routing is still caught."""
    device = rank_device(rank)
    case = Case(world_size=world_size, hidden=1024, max_tokens=48, num_experts=4 * world_size, top_k=4, seed=70)
    inp = to_device(make_inputs(case)[rank], device)
    with make_buffer(case, "cuda", low_latency=True) as cud, make_buffer(case, "reference", device=device) as ref:
        d = ops.dispatch(cud, inp.x, inp.topk_idx, inp.topk_weights, num_tokens=inp.num_tokens)
        want_d = ref.dispatch(inp.x, inp.topk_idx, inp.topk_weights, num_tokens=inp.num_tokens)
        y = experts_on_dispatch_output(want_d, rank, case.num_local_experts)
        want = ref.combine(y, want_d.handle).clone()
        torch.cuda.synchronize()
        cud._backend.take_errors()  # the dispatch's (none expected: the routing is valid)
        for stale in (False, True):
            what = f"split combine ops, inputs overwritten between the halves (stale routing: {stale}), rank {rank}"
            idx = inp.topk_idx.clone()
            if stale:  # row 0's first slot names another expert: the sanitized routing differs
                idx[0, 0] = (idx[0, 0] + 1) % case.num_experts
            y_in = y.clone()
            out = torch.full((inp.x.shape[0], case.hidden), float("nan"), dtype=torch.bfloat16, device=device)
            ops.combine_send(cud, y_in, d, idx, out=out)
            idx.fill_(-1)  # the send's inputs, overwritten in stream order before the receive
            y_in.zero_()
            got = ops.combine_recv(cud, out)
            torch.cuda.synchronize()
            errors = cud._backend.take_errors()
            if stale and inp.num_tokens > 0:
                assert errors.count(ErrorKind.STALE_COMBINE) == 1, f"{what}: not counted ({errors.counts})"
                assert torch.equal(got, torch.zeros_like(got)), f"{what}: output not zeroed"
            else:
                assert not errors, f"{what}: errors {errors.counts}"
                assert bits_equal(got, want), what


def check_mismatched_buffers_refused(rank: int, world_size: int) -> None:
    """Ranks that build a buffer differently (here low_latency) are all refused before
    any memory is shared: their workspace layouts would not match."""
    case = Case(world_size=world_size, hidden=256, max_tokens=16, num_experts=2 * world_size, top_k=2)
    with pytest.raises(ValueError, match="built alike on every rank; low_latency: rank 0 1, rank 1 0"):
        make_buffer(case, "cuda", low_latency=rank == 0)
    assert mapped_peer_buffers() == 0, "a refused buffer left peer mappings behind"


def check_pending_rules(rank: int, world_size: int) -> None:
    """Out-of-order halves are refused before anything is launched, by the buffer and by
    the C library beneath it (so this is safe to run on every rank's own schedule)."""
    case = Case(world_size=world_size, hidden=256, max_tokens=16, num_experts=2 * world_size, top_k=2)
    with make_buffer(case, "cuda", low_latency=True) as cud:
        context = cud._backend.context
        with pytest.raises(NativeError, match="no hep_dispatch_send is pending"):
            context.dispatch_recv()
        with pytest.raises(NativeError, match="no hep_combine_send is pending"):
            context.combine_recv()
    with make_buffer(case, "cuda", low_latency=False) as cud:
        assert not cud.supports_split
        with pytest.raises(NativeError, match="low_latency"):
            use_path(cud, "low_latency")


def run_missing_peer(rank: int, world_size: int, path: str) -> None:
    """Rank 0 dispatches alone on the low-latency path (or its halves): it raises a
    timeout naming the routing phase and a missing peer within the bound."""
    device = rank_device(rank)
    case = Case(world_size=world_size, hidden=1024, max_tokens=32, num_experts=2 * world_size, top_k=2, seed=9)
    inp = to_device(make_inputs(case)[rank], device)
    buf = make_buffer(case, "cuda", timeout_s=2.0, low_latency=True)
    run_dispatch(buf, inp, path)  # every rank: a normal call first
    torch.cuda.synchronize()
    buf.check_errors()
    dist.barrier()
    if rank == 0:  # the others never make this call
        expect_timeout(buf, lambda: run_dispatch(buf, inp, path), "routing", f"missing peer ({path})")
    dist.barrier()
    buf.close()


def run_missing_peer_in_combine(rank: int, world_size: int) -> None:
    """After a dispatch every rank made, rank 0 alone runs the combine's halves: its receive
    raises a timeout naming the combine's partials and a missing peer within the bound."""
    device = rank_device(rank)
    case = Case(world_size=world_size, hidden=1024, max_tokens=32, num_experts=2 * world_size, top_k=2, seed=9)
    inp = to_device(make_inputs(case)[rank], device)
    buf = make_buffer(case, "cuda", timeout_s=2.0, low_latency=True)
    for call in range(2):  # a normal call, then one the others leave without a combine
        got = run_dispatch(buf, inp, "split")
        y = experts_on_dispatch_output(got, rank, case.num_local_experts)
        if call == 0:
            run_combine(buf, y, got.handle, split=True)
        torch.cuda.synchronize()
        buf.check_errors()
        dist.barrier()
    if rank == 0:
        expect_timeout(buf, lambda: run_combine(buf, y, got.handle, split=True), "combine",
                       "missing peer (combine halves)")
    dist.barrier()
    buf.close()


def expect_timeout(buf, call, phase: str, what: str) -> None:
    """On rank 0: `call` waits for peers that never come; check_errors raises a timeout
    within the bound (2 s) naming a phase containing `phase` and another rank."""
    start = time.monotonic()
    call()
    with pytest.raises(PeerTimeoutError) as info:
        buf.check_errors(synchronize=True)
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed <= 30, f"{what}: timed out after {elapsed:.1f} s"
    assert info.value.peer != 0 and phase in info.value.phase, f"{what}: {info.value}"


def cases(world_size: int) -> list[Case]:
    base = Case(world_size=world_size, hidden=2048, max_tokens=128, num_experts=8 * world_size, top_k=8)
    return [
        dataclasses.replace(base, routing="random", pad_multiple=16, seed=1),
        dataclasses.replace(base, layout="batched", routing="masked", seed=2),
        dataclasses.replace(base, dtype=torch.float8_e4m3fn, routing="invalid", seed=3),
        dataclasses.replace(base, dtype=torch.uint8, layout="batched", routing="repeated", seed=4),
        dataclasses.replace(base, routing="ragged", idx_dtype=torch.int32, seed=5),
        dataclasses.replace(base, routing="empty_rank", max_tokens=40, seed=6),
        dataclasses.replace(base, routing="skewed", capacity=32 * world_size, pad_multiple=8, seed=7),  # overflow
        dataclasses.replace(base, layout="batched", capacity=20, routing="skewed", seed=8),
        dataclasses.replace(base, hidden=640, dtype=torch.float8_e4m3fn, num_experts=4 * world_size, top_k=3,
                            routing="order", seed=10),
        # Decode sizes: rows in column slices, the sources' slice counts differing (8, 4, 2, none).
        dataclasses.replace(base, num_tokens=(2,), seed=12),
        dataclasses.replace(base, num_tokens=(3, 12, 1, 0), routing="masked", seed=13),
        dataclasses.replace(base, num_tokens=(40, 5), dtype=torch.float8_e4m3fn, layout="batched", seed=14),
    ]


def smoke_worker(rank: int, world_size: int) -> None:
    for i, case in enumerate(cases(world_size)):
        check_paths(rank, case, ("int", "device", "default")[i % 3])
    one_block = dataclasses.replace(cases(world_size)[0], max_tokens=300, routing="skewed", seed=11)
    check_paths(rank, one_block, "device", num_sms=1)
    check_mixed_paths(rank, world_size, steps=21)
    run_split_graph(rank, world_size, replays=40)
    check_split_combine_inputs_reusable(rank, world_size)
    check_mismatched_buffers_refused(rank, world_size)
    check_pending_rules(rank, world_size)
    for path in ("low_latency", "split"):
        run_missing_peer(rank, world_size, path)
    run_missing_peer_in_combine(rank, world_size)
    assert mapped_peer_buffers() == 0, "closed buffers left peer mappings behind"


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", gpu_world_sizes((2,)))
def test_low_latency_smoke(world_size):
    spawn_gpu(world_size, smoke_worker)
