"""Reliability of the CUDA backend (docs/RELIABILITY.md has the table of results).

- fuzz: a few thousand random valid and invalid routings through dispatch and combine,
  every one bit-identical to the reference backend, with equal error counts;
- peers: a rank killed mid-run makes the other raise a timeout naming phase and peer, and
  both processes end; a slow but live peer does not trip the bound; a rank that exits
  without close() does not break the next run;
- long run: 100,000 graph replays of dispatch + combine (the one-call ops, then the split
  halves, on a low-latency buffer) with routing, weights, x and n drawn on the device by the
  graph itself, eager calls in between, checked against the reference;
- two buffers used alternately on two streams;
- leaks: 200 buffers created and closed leave free memory and peer mappings as they were.

smoke: the slow-peer and two-stream checks and a short fuzz; the rest is marked slow.
"""

import dataclasses
import os
import random
import signal
import time

import pytest
import torch
import torch.distributed as dist

from hybrid_ep_infer import BufferClosedError, PeerTimeoutError, RoutingDataError, mapped_peer_buffers

from dist_utils import check, gpu_world_sizes, launch, rank_device, ranks_per_gpu, spawn_gpu
from gpu_helpers import assert_dispatch_equal, assert_same_errors, make_buffer, poison
from moe_cases import Case

# ---------------------------------------------------------------------------- fuzz

def at_world_size(case: Case, world_size: int) -> Case:
    """``case`` (written for 2 ranks) on ``world_size`` ranks, with as many experts per rank."""
    return dataclasses.replace(case, world_size=world_size,
                               num_experts=case.num_experts // case.world_size * world_size)


FUZZ_CASES = (  # small shapes: the fuzz is about routings, not sizes (2 ranks; at_world_size scales them)
    Case(world_size=2, hidden=256, max_tokens=32, num_experts=8, top_k=4, pad_multiple=8),
    Case(world_size=2, hidden=256, max_tokens=32, num_experts=4, top_k=2, dtype=torch.float8_e4m3fn,
         layout="batched", capacity=24),
    Case(world_size=2, hidden=128, max_tokens=16, num_experts=6, top_k=3, capacity=20, pad_multiple=4),
)


def random_routing(rng: random.Random, gen: torch.Generator, case: Case, device):
    """One rank's inputs of one fuzz step: -1, invalid and repeated ids, skew, empty
    ranks, ragged m, and device n inside or (rarely) outside [0, m]."""
    T, E, K, H = case.max_tokens, case.num_experts, case.top_k, case.hidden
    m = rng.choice([0, T, rng.randint(0, T)])
    kind = rng.choice(["random", "valid", "skewed", "masked", "invalid"])
    if kind == "valid":
        idx = torch.rand(m, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    elif kind == "skewed":
        idx = torch.randint(0, min(2, E), (m, K), generator=gen)
    else:
        idx = torch.randint(-1, E, (m, K), generator=gen)
    if kind == "masked":
        idx[torch.rand(m, K, generator=gen) < 0.5] = -1
    if kind == "invalid":
        bad = torch.rand(m, K, generator=gen) < 0.2
        idx[bad] = torch.tensor([E, E + 7, -2, -100])[torch.randint(0, 4, (int(bad.sum()),), generator=gen)]
    n = rng.choice([m, m, rng.randint(0, m)])
    if rng.random() < 0.05:
        n = rng.choice([m + 1, -1])  # counted on the device; this rank then sends nothing
    x = torch.randn(m, H, generator=gen)
    scales = None
    if case.dtype == torch.bfloat16:
        x = x.to(torch.bfloat16)
    else:
        x = x.to(case.dtype)
        scales = torch.rand(m, H // 128, generator=gen).to(device)
    idx = idx.to(rng.choice([torch.int32, torch.int64])).contiguous()
    return (x.to(device), idx.to(device), torch.rand(m, K, generator=gen).to(device), scales,
            torch.tensor([n], dtype=torch.int32, device=device))


def fuzz_worker(rank: int, world_size: int, steps_per_case: int) -> None:
    device = rank_device(rank)
    for c, case in enumerate(FUZZ_CASES):
        case = at_world_size(case, world_size)
        rng = random.Random(1000 * c + rank)
        gen = torch.Generator().manual_seed(1000 * c + rank)
        with check(f"fuzz of dispatch and combine against the reference (case {c}, {steps_per_case} steps)", case), \
                make_buffer(case, "cuda") as cud, make_buffer(case, "reference", device=device) as ref:
            for step in range(steps_per_case):
                x, idx, w, scales, n = random_routing(rng, gen, case, device)
                poison(cud)
                got = cud.dispatch(x, idx, w, scales=scales, num_tokens=n)
                want = ref.dispatch(x, idx, w, scales=scales, num_tokens=n)
                what = f"rank {rank} case {c} step {step}"
                assert_dispatch_equal(got, want, what)
                # The expert output: the payload scaled per row, so rows differ (bf16 only).
                y = (want.hidden.float() if case.dtype == torch.bfloat16 else want.hidden.to(torch.float32))
                y = (y * (1 + (want.row_expert.unsqueeze(-1) % 5))).to(torch.bfloat16).contiguous()
                weighted = bool(step % 2)
                out_cud = cud.combine(y, got.handle, weighted=weighted)
                out_ref = ref.combine(y, want.handle, weighted=weighted)
                torch.cuda.synchronize()
                assert torch.equal(out_cud.view(torch.int16), out_ref.view(torch.int16)), f"{what}: combine"
                if step % 25 == 0:  # the user-facing check: same verdict and message, then cleared
                    verdicts = []
                    for buf in (cud, ref):
                        try:
                            buf.check_errors(synchronize=True)
                            verdicts.append(None)
                        except RoutingDataError as e:
                            assert f"rank {rank}" in str(e), str(e)
                            verdicts.append(str(e))
                    assert verdicts[0] == verdicts[1], f"{what}: {verdicts}"
                    cud.check_errors(synchronize=True)  # cleared: the next check passes
                else:
                    assert_same_errors(cud, ref, what)


# ---------------------------------------------------------------------------- peers

PEER_CASE = Case(world_size=2, hidden=1024, max_tokens=64, num_experts=4, top_k=2, seed=5)


def peer_case(world_size: int) -> Case:
    return at_world_size(PEER_CASE, world_size)


def inputs_for(rank: int, device, seed: int = 0, case: Case | None = None):
    case = case or peer_case(dist.get_world_size())
    gen = torch.Generator().manual_seed(100 * seed + rank)
    T, E, K, H = case.max_tokens, case.num_experts, case.top_k, case.hidden
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].contiguous()
    return (torch.randn(T, H, generator=gen).to(torch.bfloat16).to(device), idx.to(device),
            torch.rand(T, K, generator=gen).to(device))


def killed_peer_worker(rank: int, world_size: int, bound_s: float) -> None:
    """Rank 1 dies (SIGKILL) between a dispatch and its combine; every other rank must time
    out in combine naming rank 1, refuse further calls, close, and exit."""
    device = rank_device(rank)
    buf = make_buffer(peer_case(world_size), "cuda", timeout_s=bound_s)
    x, idx, w = inputs_for(rank, device)
    result = buf.dispatch(x, idx, w)
    buf.combine(result.hidden, result.handle)
    torch.cuda.synchronize()
    dist.barrier()
    result = buf.dispatch(x, idx, w)
    torch.cuda.synchronize()  # both dispatches complete: rank 1 dies before its combine
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.5)  # let it die first: the timeout must not depend on the race
    where = f"W={world_size}, bound {bound_s} s"
    with check("combine times out naming the killed peer", where):
        start = time.monotonic()
        buf.combine(result.hidden, result.handle)
        with pytest.raises(PeerTimeoutError) as info:
            buf.check_errors(synchronize=True)
        elapsed = time.monotonic() - start
        assert bound_s * 0.9 <= elapsed <= bound_s + 10, elapsed
        assert info.value.peer == 1 and "combine" in info.value.phase, str(info.value)
    with check("every call refused after the timeout", where):
        for call in (lambda: buf.dispatch(x, idx, w), lambda: buf.combine(result.hidden, result.handle),
                     lambda: buf.check_errors()):
            with pytest.raises(BufferClosedError):
                call()
    with check("close after the timeout leaves no peer mappings", where):
        buf.close()
        assert mapped_peer_buffers() == 0
    print(f"[killed peer] rank {rank} raised after {elapsed:.2f} s (bound {bound_s} s): {info.value}", flush=True)


def slow_peer_worker(rank: int, world_size: int) -> None:
    """A live peer that is late by half the bound: no timeout, correct results."""
    device = rank_device(rank)
    x, idx, w = inputs_for(rank, device, seed=1)
    with make_buffer(peer_case(world_size), "cuda", timeout_s=2.0) as cud, \
            make_buffer(peer_case(world_size), "reference", device=device) as ref:
        for step in range(3):
            with check(f"a peer late by 1 s of a 2 s bound, step {step}", peer_case(world_size)):
                dist.barrier()
                if rank == 1:
                    time.sleep(1.0)
                got = cud.dispatch(x, idx, w)
                out = cud.combine(got.hidden, got.handle)
                want = ref.dispatch(x, idx, w)
                expected = ref.combine(want.hidden, want.handle)
                torch.cuda.synchronize()
                cud.check_errors()
                assert_dispatch_equal(got, want, f"slow peer step {step}")
                assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


def exit_without_close_worker(rank: int, world_size: int) -> None:
    device = rank_device(rank)
    buf = make_buffer(peer_case(world_size), "cuda")
    x, idx, w = inputs_for(rank, device)
    result = buf.dispatch(x, idx, w)
    buf.combine(result.hidden, result.handle)
    torch.cuda.synchronize()
    dist.barrier()  # then the process ends with the buffer open (launch's os._exit)


def fresh_run_worker(rank: int, world_size: int) -> None:
    """After a killed or unclosed run: new buffers on the same GPUs work."""
    device = rank_device(rank)
    x, idx, w = inputs_for(rank, device, seed=2)
    case = peer_case(world_size)
    with check("fresh buffers after a killed or unclosed run", case), \
            make_buffer(case, "cuda") as cud, make_buffer(case, "reference", device=device) as ref:
        got, want = cud.dispatch(x, idx, w), ref.dispatch(x, idx, w)
        out, expected = cud.combine(got.hidden, got.handle), ref.combine(want.hidden, want.handle)
        torch.cuda.synchronize()
        assert_dispatch_equal(got, want, "fresh run")
        assert torch.equal(out.view(torch.int16), expected.view(torch.int16))


# ---------------------------------------------------------------------------- long run

def long_run_worker(rank: int, world_size: int, replays: int, check_every: int) -> None:
    """One graph draws routing, weights, x and n on the device, then dispatches and
    combines twice: with the one-call ops, then with the split halves (the buffer is a
    low-latency one); replayed `replays` times. Every `check_every` replays the replay's
    inputs go through the reference backend and every result must be bit-identical; an
    eager call with other inputs runs in between."""
    device = rank_device(rank)
    case = Case(world_size=world_size, hidden=1024, max_tokens=128, num_experts=8 * world_size, top_k=8)
    T, H, E, K = case.max_tokens, case.hidden, case.num_experts, case.top_k
    torch.manual_seed(rank)  # the graph's draws differ per rank and per replay
    x = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    idx = torch.empty(T, K, dtype=torch.int64, device=device)
    w = torch.empty(T, K, device=device)
    n = torch.empty(1, dtype=torch.int32, device=device)
    combined = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    combined_split = torch.empty(T, H, dtype=torch.bfloat16, device=device)

    def draw():
        x.copy_(torch.randn(T, H, device=device))
        idx.copy_(torch.rand(T, E, device=device).topk(K, dim=1).indices)
        w.copy_(torch.rand(T, K, device=device))
        n.copy_(torch.randint(0, T + 1, (1,), device=device, dtype=torch.int32))

    with make_buffer(case, "cuda", low_latency=True) as cud, \
            make_buffer(case, "reference", device=device) as ref:
        def step():
            draw()
            result = cud.dispatch(x, idx, w, num_tokens=n)
            cud.combine(result.hidden, result.handle, out=combined)
            result = cud.dispatch_recv(cud.dispatch_send(x, idx, w, num_tokens=n))
            cud.combine_recv(cud.combine_send(result.hidden, result.handle, out=combined_split))
            return result

        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        start = time.monotonic()
        checks = 0
        for i in range(1, replays + 1):
            graph.replay()
            if i % check_every == 0 or i == replays:
                with check(f"replay {i} of dispatch and combine against the reference", case):
                    want = ref.dispatch(x, idx, w, num_tokens=int(n.item()))
                    expected = ref.combine(want.hidden, want.handle)
                    torch.cuda.synchronize()
                    assert_dispatch_equal(captured, want, f"rank {rank} replay {i} (split halves)")
                    assert torch.equal(combined.view(torch.int16), expected.view(torch.int16)), f"replay {i}: combine"
                    assert torch.equal(combined_split.view(torch.int16), expected.view(torch.int16)), \
                        f"replay {i}: split combine"
                    cud.check_errors()  # no error counted, no timeout
                checks += 1
                # An eager call with other inputs between replays.
                with check(f"eager call after replay {i} against the reference", case):
                    ex, eidx, ew = inputs_for(rank, device, seed=i, case=case)
                    got = cud.dispatch(ex, eidx, ew, num_tokens=T // 2)
                    want = ref.dispatch(ex, eidx, ew, num_tokens=T // 2)
                    torch.cuda.synchronize()
                    assert_dispatch_equal(got, want, f"rank {rank} eager after replay {i}")
                    out = cud.combine(got.hidden, got.handle)
                    expected = ref.combine(want.hidden, want.handle)
                    torch.cuda.synchronize()
                    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
        elapsed = time.monotonic() - start
        if rank == 0:
            print(f"[long run] {replays} replays of dispatch+combine, one-call and split "
                  f"(T_max={T}, H={H}, E={E}, K={K}, W={world_size}),"
                  f" {checks} checks against the reference, {elapsed:.1f} s", flush=True)


# ---------------------------------------------------------------------------- two buffers, two streams

def two_streams_worker(rank: int, world_size: int, steps: int) -> None:
    """Micro-batches alternate between buffer A on stream 0 and buffer B on stream 1
    (each buffer's calls stay on its stream); every result equals the reference's. The two
    buffers' kernels run at once, so where ranks share a GPU they split its SMs (README)."""
    device = rank_device(rank)
    case = dataclasses.replace(peer_case(world_size), max_tokens=128, num_experts=8 * world_size, top_k=8)
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    num_sms = min(24, sm_count // (2 * ranks_per_gpu(world_size)))
    buffers = [make_buffer(case, "cuda", num_sms=num_sms), make_buffer(case, "cuda", num_sms=num_sms)]
    ref = make_buffer(case, "reference", device=device)
    try:
        for step in range(steps):
            with check(f"two buffers on two streams, step {step}, against the reference", case):
                inputs = [inputs_for(rank, device, seed=2 * step + b, case=case) for b in range(2)]
                torch.cuda.synchronize()
                outs = []
                for b in range(2):
                    with torch.cuda.stream(streams[b]):
                        result = buffers[b].dispatch(*inputs[b])
                        outs.append((result, buffers[b].combine(result.hidden, result.handle)))
                torch.cuda.synchronize()  # both streams
                for buf in buffers:  # a timed-out wait is reported as such, before any comparison
                    buf.check_errors()
                for b in range(2):
                    want = ref.dispatch(*inputs[b])
                    expected = ref.combine(want.hidden, want.handle)
                    torch.cuda.synchronize()
                    assert_dispatch_equal(outs[b][0], want, f"rank {rank} step {step} buffer {b}")
                    assert torch.equal(outs[b][1].view(torch.int16), expected.view(torch.int16)), \
                        f"step {step} buffer {b}"
    finally:
        for buf in buffers + [ref]:
            buf.close()


# ---------------------------------------------------------------------------- leaks

def leak_worker(rank: int, world_size: int, rounds: int) -> None:
    device = rank_device(rank)
    x, idx, w = inputs_for(rank, device)

    def one_round():
        with make_buffer(peer_case(world_size), "cuda") as buf:
            result = buf.dispatch(x, idx, w)
            buf.combine(result.hidden, result.handle)
            torch.cuda.synchronize()
            return buf.nbytes

    nbytes = one_round()  # lazily created state (streams, handles) is not a leak
    torch.cuda.synchronize()
    dist.barrier()  # ranks sharing this GPU hold no buffer either while it is read
    free_before, _ = torch.cuda.mem_get_info(device)
    mapped_before = mapped_peer_buffers()
    for _ in range(rounds):
        one_round()
    torch.cuda.synchronize()
    dist.barrier()
    free_after, _ = torch.cuda.mem_get_info(device)
    with check(f"{rounds} buffers created and closed leak nothing", peer_case(world_size)):
        assert mapped_peer_buffers() == mapped_before == 0
        # Less than one buffer's worth: a leak of anything per round would be 200x that.
        assert free_before - free_after < nbytes, (free_before, free_after, nbytes)
    if rank == 0:
        print(f"[leaks] {rounds} buffers of {nbytes / 2**20:.1f} MiB created and closed: free memory "
              f"{free_before / 2**20:.1f} -> {free_after / 2**20:.1f} MiB, peer mappings 0", flush=True)


# ---------------------------------------------------------------------------- tests

SMOKE_SIZES = gpu_world_sizes((2,))
FULL_SIZES = gpu_world_sizes((2,))


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", SMOKE_SIZES)
def test_slow_peer_two_streams_and_a_short_fuzz(world_size):
    spawn_gpu(world_size, slow_peer_worker)
    spawn_gpu(world_size, two_streams_worker, 20)
    spawn_gpu(world_size, fuzz_worker, 40)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("world_size", FULL_SIZES)
def test_fuzz_thousands_of_routings(world_size):
    spawn_gpu(world_size, fuzz_worker, 800)  # 3 cases x 800 steps


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("world_size", FULL_SIZES)
def test_killed_peer_times_out_and_processes_exit(world_size):
    bound_s = 2.0
    codes = launch(world_size, killed_peer_worker, bound_s, backend="gloo", deadline_s=120)
    expected = [0, -signal.SIGKILL] + [0] * (world_size - 2)
    assert codes == expected, f"exit codes {codes} (rank 1 was killed, every other rank must end cleanly)"
    spawn_gpu(world_size, fresh_run_worker)  # the GPUs are not stuck


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("world_size", FULL_SIZES)
def test_exit_without_close_does_not_break_the_next_run(world_size):
    assert launch(world_size, exit_without_close_worker, backend="gloo", deadline_s=120) == [0] * world_size
    spawn_gpu(world_size, fresh_run_worker)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("world_size", FULL_SIZES)
def test_hundred_thousand_replays(world_size):
    spawn_gpu(world_size, long_run_worker, 100_000, 5_000)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("world_size", FULL_SIZES)
def test_two_hundred_buffers_leak_nothing(world_size):
    spawn_gpu(world_size, leak_worker, 200)
