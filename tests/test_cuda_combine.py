"""CUDA combine over NVLink, bit for bit against the reference backend; dispatch,
experts and combine captured in one CUDA graph; a whole MoE layer (grouped GEMMs)
replayed with fresh routing against an fp32 layer without expert parallelism.

smoke: 2 ranks. full (marked slow): 4 ranks and 2 ranks, plus the timing table.
"""

import dataclasses
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hybrid_ep_infer import placement
from hybrid_ep_infer._native import NativeError

from dist_utils import check, gpu_world_sizes, rank_device, ranks_share_gpus, spawn_gpu, tokens_that_fit
from gpu_helpers import assert_dispatch_equal, assert_same_errors, dispatch, make_buffer, max_over_ranks, to_device
from moe_cases import Case, bits_equal, experts_on_dispatch_output, make_inputs


def check_round_trip(rank: int, case: Case, num_tokens: str = "int", tuning: dict | None = None) -> None:
    device = rank_device(rank)
    inp = to_device(make_inputs(case)[rank], device)
    with make_buffer(case, "cuda") as cud, make_buffer(case, "reference", device=device) as ref:
        if tuning is not None:
            cud._backend.context.set_tuning(**tuning)
        for attempt in range(2):
            got = dispatch(cud, inp, num_tokens)
            want = dispatch(ref, inp, "int")
            torch.cuda.synchronize()
            assert_dispatch_equal(got, want, f"rank {rank} {case}")
            y = experts_on_dispatch_output(want, rank, case.num_local_experts)
            for weighted in (True, False):
                out = torch.full_like(inp.x, float("nan"), dtype=torch.bfloat16) if attempt else None
                got_out = cud.combine(y, got.handle, weighted=weighted, out=out)
                want_out = ref.combine(y, want.handle, weighted=weighted)
                torch.cuda.synchronize()
                assert bits_equal(got_out, want_out), f"rank {rank} {case} weighted={weighted} attempt {attempt}"
            assert_same_errors(cud, ref, f"rank {rank} {case}")


def check_combines_with_a_rank_running_ahead(rank: int, world_size: int) -> None:
    """Many combines after one dispatch while the last rank has no tokens (so its combines
    wait for nobody) and rank 0 starts each one late: the last rank's partials for later
    combines must not overwrite ones rank 0 has not read yet (partials alternate between
    two halves)."""
    case = Case(world_size=world_size, hidden=2048, max_tokens=128, num_experts=8 * world_size, top_k=8,
                routing="empty_rank", seed=7)
    device = rank_device(rank)
    inp = to_device(make_inputs(case)[rank], device)
    with make_buffer(case, "cuda") as cud, make_buffer(case, "reference", device=device) as ref:
        got = dispatch(cud, inp, "int")
        want = dispatch(ref, inp, "int")
        y0 = experts_on_dispatch_output(want, rank, case.num_local_experts)
        ys = [(y0.float() * (i + 1)).to(torch.bfloat16) for i in range(6)]
        torch.cuda.synchronize()
        got_outs = []
        for y in ys:  # no host wait and no other collective in between
            if rank == 0:
                torch.cuda._sleep(20_000_000)  # ~10 ms: the other ranks run ahead
            got_outs.append(cud.combine(y, got.handle, out=torch.empty_like(inp.x, dtype=torch.bfloat16)))
        torch.cuda.synchronize()
        for i, y in enumerate(ys):
            assert bits_equal(got_outs[i], ref.combine(y, want.handle)), f"rank {rank} combine {i}"
        assert_same_errors(cud, ref, f"rank {rank} running ahead")


# Splits and chunk sizes far from the defaults: chunks that do not divide n, a chunk as
# large as max_tokens, one warp in a role.
TUNINGS = (
    dict(dispatch_send_warps=2, dispatch_chunk_tokens=1, combine_reduce_warps=8, combine_chunk_tokens=1,
         dispatch_expand_tma=1, dispatch_send_tma=1),
    dict(dispatch_send_warps=12, dispatch_chunk_tokens=16, combine_reduce_warps=14, combine_chunk_tokens=7,
         dispatch_expand_tma=0, dispatch_send_tma=1),
    dict(dispatch_send_warps=1, dispatch_chunk_tokens=3, combine_reduce_warps=15, combine_chunk_tokens=5,
         dispatch_expand_tma=1, dispatch_send_tma=0),
    dict(dispatch_send_warps=15, dispatch_chunk_tokens=128, combine_reduce_warps=1, combine_chunk_tokens=128,
         dispatch_expand_tma=1, dispatch_send_tma=1),
    dict(dispatch_send_warps=4, dispatch_chunk_tokens=4, combine_reduce_warps=13, combine_chunk_tokens=4,
         dispatch_expand_tma=0, dispatch_send_tma=1),
)


def check_tunings(rank: int, world_size: int) -> None:
    """Results do not depend on the tuning (docs/SPEC.md section 1)."""
    base = Case(world_size=world_size, hidden=2048, max_tokens=128, num_experts=8 * world_size, top_k=8)
    # Rows of 14336, 4096, 640 (FP8, with scales), 8192 and 7168 (FP8) bytes: the copy-engine
    # paths move them in 2, 1, 1, 2 and 1 pieces.
    shapes = ((7168, torch.bfloat16), (2048, torch.bfloat16), (640, torch.float8_e4m3fn), (4096, torch.bfloat16),
              (7168, torch.float8_e4m3fn))
    for i, tuning in enumerate(TUNINGS):
        case = dataclasses.replace(base, routing=("ragged", "empty_rank", "skewed", "random", "ragged")[i], seed=60 + i,
                                   layout=("contiguous", "batched")[i % 2], hidden=shapes[i][0], dtype=shapes[i][1])
        with check(f"round trip under tuning {i} ({tuning})", case):
            check_round_trip(rank, case, ("int", "device")[i % 2], tuning=tuning)


def check_tuner(rank: int, world_size: int) -> None:
    """The construction-time tuner picks one of its candidates, the same on every rank."""
    from hybrid_ep_infer import tuning as tuner

    case = Case(world_size=world_size, hidden=1024, max_tokens=256, num_experts=4 * world_size, top_k=4, seed=70)
    with make_buffer(case, "cuda", tune=True) as cud:
        chosen = cud._backend.tuning
        with check("set_tuning refuses fields out of range and keeps the tuning", case):
            for bad in (dict(dispatch_send_warps=16), dict(combine_reduce_warps=0), dict(dispatch_chunk_tokens=257),
                        dict(combine_chunk_tokens=0), dict(dispatch_expand_tma=2), dict(dispatch_send_tma=-1)):
                with pytest.raises(NativeError, match=next(iter(bad))):
                    cud._backend.context.set_tuning(**bad)
            assert cud._backend.context.get_tuning() == chosen
    with check("the tuner chooses one of its candidates", case):
        assert tuple(chosen[name] for name in tuner.DISPATCH_FIELDS) in tuner.DISPATCH_CANDIDATES, chosen
        assert tuple(chosen[name] for name in tuner.COMBINE_FIELDS) in tuner.COMBINE_CANDIDATES, chosen
    with check("every rank chooses the same tuning", case):
        everyone = placement.all_gather_bytes(repr(sorted(chosen.items())).encode(), None)
        assert len(set(everyone)) == 1, everyone
    with check("round trip under the chosen tuning", case):
        check_round_trip(rank, case, tuning=chosen)


def combine_cases(world_size: int, full: bool) -> list[Case]:
    base = Case(world_size=world_size, hidden=2048, max_tokens=128, num_experts=8 * world_size, top_k=8)
    cases = [
        # Any summation order but the SPEC's gives other bits on this routing.
        dataclasses.replace(base, num_experts=4 * world_size, top_k=3, routing="order", seed=1),
        dataclasses.replace(base, routing="random", pad_multiple=16, seed=2),
        dataclasses.replace(base, layout="batched", routing="ragged", seed=3),
        dataclasses.replace(base, hidden=640, dtype=torch.float8_e4m3fn, routing="invalid", seed=4),
        dataclasses.replace(base, routing="skewed", capacity=32 * world_size, pad_multiple=8, seed=5),  # overflow
    ]
    if full:
        for i, routing in enumerate(("random", "masked", "repeated", "empty_rank", "ragged", "skewed")):
            hidden, tokens = ((7168, 4096), (2048, 4096), (7168, 128))[i % 3]
            cases.append(Case(world_size=world_size, hidden=hidden, max_tokens=tokens_that_fit(world_size, tokens),
                              num_experts=(8 * world_size, 2 * world_size)[i % 2], top_k=(8, 2)[i % 2],
                              layout=("contiguous", "batched")[(i // 2) % 2], routing=routing, seed=20 + i,
                              dtype=(torch.bfloat16, torch.uint8)[(i // 3) % 2]))
        cases.append(dataclasses.replace(base, layout="batched", capacity=20, routing="skewed", seed=40))
    return cases


def run_graph_round_trip(rank: int, world_size: int, replays: int) -> None:
    """Dispatch, experts and combine in one graph; replays with fresh inputs and n,
    interleaved with eager calls, equal the reference bit for bit."""
    device = rank_device(rank)
    case = Case(world_size=world_size, hidden=2048, max_tokens=128, num_experts=4 * world_size, top_k=3)
    T, H, K, L = case.max_tokens, case.hidden, case.top_k, case.num_local_experts
    x = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    idx = torch.empty(T, K, dtype=torch.int64, device=device)
    weights = torch.empty(T, K, device=device)
    n = torch.empty(1, dtype=torch.int32, device=device)
    out = torch.empty(T, H, dtype=torch.bfloat16, device=device)

    def load(seed: int, routing: str) -> int:
        inp = make_inputs(dataclasses.replace(case, routing=routing, seed=seed))[rank]
        m = inp.x.shape[0]
        x.normal_()
        idx.fill_(-1)
        x[:m], idx[:m], weights[:m] = inp.x, inp.topk_idx, inp.topk_weights
        n.fill_(inp.num_tokens)
        return inp.num_tokens

    def layer(buf):
        result = buf.dispatch(x, idx, weights, num_tokens=n)
        y = experts_on_dispatch_output(result, rank, L)
        return buf.combine(y, result.handle, out=out)

    with make_buffer(case, "cuda") as cud, make_buffer(case, "reference", device=device) as ref:
        load(0, "random")
        layer(cud)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(cud)
        routings = ("order", "random", "masked", "invalid", "repeated", "empty_rank", "ragged", "skewed")
        for i in range(replays):
            count = load(3000 + i, routings[i % len(routings)])
            out.fill_(float("nan"))
            graph.replay()
            got = out.clone()
            want_d = ref.dispatch(x, idx, weights, num_tokens=count)
            want = ref.combine(experts_on_dispatch_output(want_d, rank, L), want_d.handle)
            torch.cuda.synchronize()
            assert bits_equal(got, want), f"rank {rank} replay {i}"
            assert_same_errors(cud, ref, f"replay {i}")
            if i % 10 == 9:
                count = load(7000 + i, "random")
                got = layer(cud).clone()
                want_d = ref.dispatch(x, idx, weights, num_tokens=count)
                want = ref.combine(experts_on_dispatch_output(want_d, rank, L), want_d.handle)
                torch.cuda.synchronize()
                assert bits_equal(got, want), f"rank {rank} eager after replay {i}"
                assert_same_errors(cud, ref, f"eager {i}")


class SwiGLUExperts:
    """All E experts' weights (same on every rank, from one seed); this rank runs its L."""

    def __init__(self, rank: int, world_size: int, num_experts: int, hidden: int, inter: int, device,
                 with_reference: bool = True):
        g = torch.Generator(device="cpu").manual_seed(1234)
        scale_in, scale_out = hidden ** -0.5, inter ** -0.5
        gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=g) * scale_in).to(torch.bfloat16)
        down = (torch.randn(num_experts, hidden, inter, generator=g) * scale_out).to(torch.bfloat16)
        L = num_experts // world_size
        mine = slice(rank * L, (rank + 1) * L)
        self.gate_up = gate_up[mine].to(device)  # [L, 2I, H]: stored as (out, in)
        self.down = down[mine].to(device)  # [L, H, I]
        if with_reference:  # fp32 copies of every expert, for the layer without expert parallelism
            self.all_gate_up = gate_up.to(device).float()
            self.all_down = down.to(device).float()
        self.inter = inter

    def grouped(self, hidden: torch.Tensor, group_ends: torch.Tensor) -> torch.Tensor:
        """SwiGLU of every row of each expert's group (contiguous layout)."""
        gu = torch._grouped_mm(hidden, self.gate_up.transpose(-2, -1), offs=group_ends)
        act = F.silu(gu[:, : self.inter]) * gu[:, self.inter:]
        return torch._grouped_mm(act, self.down.transpose(-2, -1), offs=group_ends)

    def reference(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
        """fp32 layer without expert parallelism: sum_k w_k * expert_k(x)."""
        x = x[:n].float()
        out = torch.zeros_like(x)
        for e in range(self.all_gate_up.shape[0]):
            tokens, slots = (idx[:n] == e).nonzero(as_tuple=True)
            if tokens.numel() == 0:
                continue
            gu = x[tokens] @ self.all_gate_up[e].t()
            act = F.silu(gu[:, : self.inter]) * gu[:, self.inter:]
            out.index_add_(0, tokens, (act @ self.all_down[e].t()) * weights[tokens, slots].unsqueeze(1))
        return out


def run_moe_layer(rank: int, world_size: int, replays: int) -> None:
    """dispatch -> grouped GEMM (gate/up) -> SiLU*mul -> grouped GEMM (down) -> combine,
    captured once, replayed with fresh routing; rel. L2 <= 1e-2 vs fp32 without EP."""
    device = rank_device(rank)
    H, I, T, E, K = 2048, 2048, 256, 4 * world_size, 4
    experts = SwiGLUExperts(rank, world_size, E, H, I, device)
    x = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    idx = torch.empty(T, K, dtype=torch.int64, device=device)
    weights = torch.empty(T, K, device=device)
    n = torch.empty(1, dtype=torch.int32, device=device)
    out = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device="cpu")

    def load(seed: int) -> int:
        gen.manual_seed(seed * 97 + rank)
        count = int(torch.randint(T // 2, T + 1, (1,), generator=gen))
        x.copy_(torch.randn(T, H, generator=gen).to(torch.bfloat16))
        logits = torch.randn(T, E, generator=gen)
        top_w, top_i = logits.softmax(dim=1).topk(K)
        idx.copy_(top_i)
        weights.copy_(top_w)
        n.fill_(count)
        return count

    with EPLayer(make_layer_buffer(H, T, E, K), experts) as layer:
        load(0)
        layer(x, idx, weights, n, out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            layer(x, idx, weights, n, out)
        worst = 0.0
        for i in range(replays):
            count = load(i + 1)
            graph.replay()
            ref = experts.reference(x, idx, weights, count)
            got = out[:count].float()
            err = ((got - ref).norm() / ref.norm()).item()
            worst = max(worst, err)
            assert err <= 1e-2, f"rank {rank} replay {i}: relative L2 error {err}"
            assert not out[count:].any(), "rows >= n must be zero"
        layer.buffer.check_errors(synchronize=True)
    worst = max_over_ranks(worst)
    if rank == 0:
        print(f"\n[moe layer] W={world_size} H={H} I={I} E={E} K={K} T={T}: {replays} graph replays, "
              f"worst relative L2 error vs fp32 without EP: {worst:.2e}")


def make_layer_buffer(hidden, tokens, num_experts, top_k):
    case = Case(world_size=dist.get_world_size(), hidden=hidden, max_tokens=tokens, num_experts=num_experts,
                top_k=top_k, pad_multiple=16)
    return make_buffer(case, "cuda")


class EPLayer:
    """An MoE layer on one buffer: dispatch, grouped SwiGLU experts, combine."""

    def __init__(self, buffer, experts: SwiGLUExperts):
        self.buffer, self.experts = buffer, experts

    def __call__(self, x, idx, weights, n, out):
        result = self.buffer.dispatch(x, idx, weights, num_tokens=n)
        y = self.experts.grouped(result.hidden, result.offsets[1:])
        return self.buffer.combine(y, result.handle, out=out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.buffer.close()


def time_ops(rank: int, world_size: int) -> None:
    """Eager and graph-replayed dispatch, combine and whole layer at H=7168, T=4096,
    E=8W, K=8, uniform routing (printed by rank 0; max over ranks, median of 30)."""
    device = rank_device(rank)
    H, I, T, E, K = 7168, 2048, 4096, 8 * world_size, 8
    experts = SwiGLUExperts(rank, world_size, E, H, I, device, with_reference=False)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(device)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].to(device)
    weights = torch.rand(T, K, generator=gen).to(device)
    out = torch.empty(T, H, dtype=torch.bfloat16, device=device)
    with EPLayer(make_layer_buffer(H, T, E, K), experts) as layer:
        buf = layer.buffer
        state = {}

        def do_dispatch():
            state["r"] = buf.dispatch(x, idx, weights)

        def do_combine():
            buf.combine(state["y"], state["r"].handle, out=out)

        def do_layer():
            layer(x, idx, weights, T, out)

        do_dispatch()
        state["y"] = experts.grouped(state["r"].hidden, state["r"].offsets[1:])
        do_combine()

        def sample(fn) -> float:
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return max_over_ranks(start.elapsed_time(end) * 1e3)

        rows = []
        for name, fn in (("dispatch", do_dispatch), ("combine", do_combine), ("layer", do_layer)):
            for _ in range(3):
                fn()
            eager = statistics.median(sample(fn) for _ in range(30))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            replayed = statistics.median(sample(graph.replay) for _ in range(30))
            rows.append((name, eager, replayed))
            do_dispatch()  # keep the next op's handle current
        if rank == 0:
            print(f"\n[timing] {torch.cuda.get_device_name(0)} W={world_size} H={H} T={T} E={E} K={K} bf16 uniform, "
                  f"I={I}, {buf._backend.desc.num_sms} blocks per copy kernel; "
                  "median of 30, max over ranks (us):")
            for name, eager, replayed in rows:
                print(f"[timing]   {name:9s} eager {eager:9.1f}   graph {replayed:9.1f}")


def round_trips(rank: int, world_size: int, full: bool) -> None:
    for i, case in enumerate(combine_cases(world_size, full=full)):
        num_tokens = ("int", "device", "default")[i % 3]
        with check(f"round trip against the reference (num_tokens {num_tokens})", case):
            check_round_trip(rank, case, num_tokens)


def smoke_worker(rank: int, world_size: int) -> None:
    round_trips(rank, world_size, full=False)
    with check("combines with a rank running ahead", f"W={world_size}"):
        check_combines_with_a_rank_running_ahead(rank, world_size)
    with check("bit-equal results under far-off tunings", f"W={world_size}"):
        check_tunings(rank, world_size)
    with check("the construction-time tuner", f"W={world_size}"):
        check_tuner(rank, world_size)
    with check("graph replay of the round trip", f"W={world_size}, 100 replays"):
        run_graph_round_trip(rank, world_size, replays=100)
    with check("MoE layer in a CUDA graph", f"W={world_size}, 100 replays"):
        run_moe_layer(rank, world_size, replays=100)


def full_worker(rank: int, world_size: int) -> None:
    round_trips(rank, world_size, full=True)
    with check("graph replay of the round trip", f"W={world_size}, 120 replays"):
        run_graph_round_trip(rank, world_size, replays=120)
    with check("MoE layer in a CUDA graph", f"W={world_size}, 120 replays"):
        run_moe_layer(rank, world_size, replays=120)
    if world_size == 4 and not ranks_share_gpus():  # NVLink timings; shared GPUs: python -m hybrid_ep_infer.bench
        with check("combine timing", f"W={world_size}"):
            time_ops(rank, world_size)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", gpu_world_sizes((2,)))
def test_combine_smoke(world_size):
    spawn_gpu(world_size, smoke_worker)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("world_size", gpu_world_sizes((4, 2)))
def test_combine_full(world_size):
    spawn_gpu(world_size, full_worker)
