"""The benchmark's per-rank work: for each configuration, check ours against the
reference once, then time ours and the baselines, eager and graph-replayed.

Where ranks share a GPU (``args.setup == "shared_gpu"``: a gloo group, processes under MPS)
the NCCL baselines and the NVLink floor are left out (cli.py prints why) and no rate is
reported: the times are launch and protocol cost, not NVLink bandwidth."""

from __future__ import annotations

import time
import zlib

import torch
import torch.distributed as dist

from .. import EPBuffer
from .. import tuning as tuning_of
from ..placement import collective_device
from .baselines import AllGatherReduceScatter, AllToAll
from .configs import BenchConfig
from .timing import Timer
from .workloads import SwiGLUExperts, dequantize, make_routing, quantize, traffic

OURS = "hybrid_ep_infer"
SPLIT_OPS = ("dispatch_split", "combine_split")
SPLIT_WORK_US = 50.0  # the other work between the halves
DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def all_ranks_ok(ok: bool) -> bool:
    """True where every rank passes True. A collective over the world group."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=collective_device())
    dist.all_reduce(flag)
    return flag.item() == 0


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def case_inputs(cfg: BenchConfig, dtype_name: str, routing: str, n: int, device):
    """Every rank's routing (for byte counts) and this rank's x, scales, idx, weights."""
    W, rank = dist.get_world_size(), dist.get_rank()
    E = cfg.local_experts * W
    routings = [make_routing(routing, n, E, cfg.top_k, seed_of(cfg.name, routing, n, s)) for s in range(W)]
    g = torch.Generator().manual_seed(seed_of(cfg.name, "x", n, rank))
    x = torch.randn(n, cfg.hidden, generator=g).to(torch.bfloat16)
    scales = None
    if DTYPES[dtype_name] != torch.bfloat16:
        x, scales = quantize(x)
        scales = scales.to(device)
    idx, weights = routings[rank]
    return [r[0] for r in routings], x.to(device), scales, idx.to(device), weights.to(device)


def check_against_reference(buf: EPBuffer, kw: dict, x, scales, idx, weights, device) -> None:
    """Ours equals the reference backend: counts, row_expert, rows, and combine bits."""
    with EPBuffer(backend="reference", device=device, **kw) as ref:
        got, want = buf.dispatch(x, idx, weights, scales=scales), ref.dispatch(x, idx, weights, scales=scales)
        ok = torch.equal(got.tokens_per_expert, want.tokens_per_expert) and torch.equal(got.row_expert, want.row_expert)
        written = want.row_expert.reshape(-1) >= 0
        H = want.hidden.shape[-1]
        ok = ok and torch.equal(got.hidden.reshape(-1, H).view(torch.uint8)[written],
                                want.hidden.reshape(-1, H).view(torch.uint8)[written])
        y = torch.randn(want.hidden.shape, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).to(device)
        out_got = buf.combine(y, got.handle).clone()
        out_want = ref.combine(y, want.handle)
        ok = ok and torch.equal(out_got.view(torch.int16), out_want.view(torch.int16))
    if not all_ranks_ok(ok):
        raise RuntimeError(f"correctness check failed against the reference backend (this rank: "
                           f"{'passed' if ok else 'failed'})")


def run_case(cfg: BenchConfig, dtype_name: str, routing: str, n: int, timer: Timer, rate, args, device,
             experts: SwiGLUExperts | None) -> list[dict]:
    """Records of ``args.ops``: ours (eager, and graph-replayed on GPUs), then, where NCCL
    runs (one rank per GPU) or on the CPU (gloo), the baselines. ``experts``: for "layer"."""
    W = dist.get_world_size()
    dtype = DTYPES[dtype_name]
    H, T, L, K = cfg.hidden, cfg.max_tokens, cfg.local_experts, cfg.top_k
    all_idx, x, scales, idx, weights = case_inputs(cfg, dtype_name, routing, n, device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    dispatch_bytes = traffic(all_idx, L, H * itemsize + (H // 128 * 4 if scales is not None else 0))
    combine_bytes = traffic(all_idx, L, H * 2)
    cuda = device.type == "cuda"
    backend = "cuda" if cuda else "reference"
    ours = OURS if cuda else f"{OURS}(reference)"
    kw = dict(hidden=H, max_tokens=T, num_experts=L * W, top_k=K, dtype=dtype, pad_multiple=16)
    # Bytes between ranks cross NVLink only with one rank per GPU: elsewhere no GB/s.
    off_gpu = args.setup == "gpus"
    records = []

    def record(op, impl, mode, timing, sms, tuning=None):
        if timing is None:
            return
        median, p99 = timing
        busiest = {"dispatch": dispatch_bytes.busiest_bytes, "combine": combine_bytes.busiest_bytes}
        busiest["round_trip"] = busiest["layer"] = busiest["dispatch"] + busiest["combine"]
        moved = busiest.get(op)  # the split halves' times include other work: no floor
        floor = moved / rate * 1e6 if rate and moved else None
        received = max(dispatch_bytes.recv_tokens) * H * (itemsize if op == "dispatch" else 2)
        records.append(dict(
            config=cfg.name, op=op, impl=impl, dtype=dtype_name, routing=routing, tokens=n, ranks=W, mode=mode,
            setup=args.setup, time_us=median, p99_us=p99, floor_us=floor,
            ratio_to_floor=median / floor if floor else None,
            busiest_rank_bytes=moved, busiest_offgpu_bytes=moved if off_gpu else None,
            gbps_real=moved / median / 1e3 if off_gpu and moved else None,
            gbps_logical=received / median / 1e3 if off_gpu and op in ("dispatch", "combine") else None, sms=sms,
            tuning=tuning))

    with EPBuffer(backend=backend, num_sms=args.num_sms, **kw) as buf:
        check_against_reference(buf, kw, x, scales, idx, weights, device)
        state = {"result": buf.dispatch(x, idx, weights, scales=scales)}
        y = torch.randn(state["result"].hidden.shape, generator=torch.Generator().manual_seed(1))
        y = y.to(torch.bfloat16).to(device)
        out = torch.empty(n, H, dtype=torch.bfloat16, device=device)

        def ours_dispatch():
            state["result"] = buf.dispatch(x, idx, weights, scales=scales)

        def ours_combine():
            buf.combine(y, state["result"].handle, out=out)

        def ours_round_trip():
            ours_dispatch()
            ours_combine()

        def ours_layer():
            r = buf.dispatch(x, idx, weights, scales=scales)
            rows = dequantize(r.hidden, r.scales)
            buf.combine(experts(rows, r.offsets[1:]), r.handle, out=out)

        sms = buf.num_sms if cuda else None
        chosen = dict(buf._backend.tuning) if cuda else None  # what the construction-time tuner chose
        # Each dispatch path at its own best candidate (the tuner's report), combine as chosen.
        best = tuning_of.fastest_per_path(buf._backend, buf._backend.desc.num_sms) if cuda else {}

        def use_path(path: int) -> dict:
            tuning = chosen | best.get(path, {"dispatch_path": path})
            buf._backend.context.set_tuning(**tuning)
            return tuning
        ours_ops = {"dispatch": ours_dispatch, "combine": ours_combine, "round_trip": ours_round_trip,
                    "layer": ours_layer}
        # CUDA: each dispatch path of the buffer (the planned one is main's algorithm).
        paths = dispatch_paths(buf) if cuda else {ours: None}
        for impl, path in paths.items():
            tuning = chosen
            if path is not None:
                tuning = use_path(path)
                ours_dispatch()
            for op in args.ops:
                if op in SPLIT_OPS:
                    continue
                record(op, impl, "eager", timer.measure(ours_ops[op]), sms, tuning)
                record(op, impl, "graph", timer.measure_graph(ours_ops[op]), sms, tuning)
                ours_dispatch()  # the next op's handle is the latest dispatch
        if cuda and buf._backend.desc.low_latency and any(op in SPLIT_OPS for op in args.ops):
            records += time_split_halves(buf, timer, x, idx, weights, scales, y, out, record, sms, use_path(1))

    baselines = () if args.setup == "shared_gpu" else (AllGatherReduceScatter, AllToAll)  # NCCL refuses shared GPUs
    for baseline_cls in baselines:
        base = baseline_cls(world_size=W, rank=dist.get_rank(), max_tokens=T, hidden=H, local_experts=L, top_k=K,
                            dtype=dtype, device=device)
        rows, row_scales, ends = base.dispatch(x, idx, weights, scales)
        yb = torch.randn(rows.shape[0], H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).to(device)

        def b_dispatch():
            base.dispatch(x, idx, weights, scales)

        def b_combine():
            base.combine(yb)

        def b_round_trip():
            base.dispatch(x, idx, weights, scales)
            base.combine(yb)

        def b_layer():
            r, s, e = base.dispatch(x, idx, weights, scales)
            base.combine(experts(dequantize(r, s), e))

        base_ops = {"dispatch": b_dispatch, "combine": b_combine, "round_trip": b_round_trip, "layer": b_layer}
        for op in args.ops:
            if op in SPLIT_OPS:  # the baselines have no halves
                continue
            record(op, base.impl, "eager", timer.measure(base_ops[op]), None)
            if base.graphable:
                record(op, base.impl, "graph", timer.measure_graph(base_ops[op]), None)
    if cuda:
        torch.cuda.empty_cache()

    # Ratio of each of ours to the best baseline of the same op (and mode, where it exists).
    for rec in records:
        if not rec["impl"].startswith(OURS):
            continue
        rivals = [r["time_us"] for r in records if not r["impl"].startswith(OURS) and r["op"] == rec["op"]
                  and (r["mode"] == rec["mode"] or rec["mode"] == "graph")]
        rec["ratio_to_best_baseline"] = rec["time_us"] / min(rivals) if rivals else None
    return records


def dispatch_paths(buf: EPBuffer) -> dict[str, int]:
    """impl name -> hep_dispatch_path_t of each dispatch path this CUDA buffer has."""
    paths = {f"{OURS} planned": 0}
    if buf._backend.desc.low_latency:
        paths[f"{OURS} low-latency"] = 1
    return paths


def calibrated_sleep(device: torch.device, us: float):
    """A function that keeps the current stream busy for about ``us`` microseconds
    (torch.cuda._sleep, calibrated here): the "other work" between split halves."""
    cycles = 200_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(7):
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    per_us = cycles / sorted(times)[len(times) // 2]
    return lambda: torch.cuda._sleep(int(per_us * us))


def time_split_halves(buf: EPBuffer, timer: Timer, x, idx, weights, scales, y, out, record, sms, tuning) -> list:
    """Graph-replayed: the other work alone (``other``), then send, the same work, receive
    for dispatch (``dispatch_split``) and combine (``combine_split``). A send half hides
    behind the work when dispatch_split - other is well below the one-call dispatch. The
    caller has set the low-latency path's ``tuning``."""
    other = calibrated_sleep(buf.device, SPLIT_WORK_US)
    state = {"result": buf.dispatch(x, idx, weights, scales=scales)}

    def dispatch_split():
        pending = buf.dispatch_send(x, idx, weights, scales=scales)
        other()
        state["result"] = buf.dispatch_recv(pending)

    def combine_split():
        pending = buf.combine_send(y, state["result"].handle, out=out)
        other()
        buf.combine_recv(pending)

    impl = f"{OURS} low-latency"
    record("other", impl, "graph", timer.measure_graph(other), sms, tuning)
    record("dispatch_split", impl, "graph", timer.measure_graph(dispatch_split), sms, tuning)
    record("combine_split", impl, "graph", timer.measure_graph(combine_split), sms, tuning)
    return []


def run_all(args, device) -> tuple[list[dict], dict]:
    """Every case of ``args.bench_configs`` x dtypes x routings x n on this rank: (records,
    notes for the run's metadata). Rank 0 prints a line as each case starts."""
    from .timing import nvlink_rates_per_direction

    rank, W = dist.get_rank(), dist.get_world_size()
    began = time.monotonic()
    timer = Timer(device, samples=args.samples, flush_l2=args.flush_l2)
    notes = {"sample_barrier": timer.barrier, "l2_flush": args.flush_l2}
    # Shared GPUs: no NVLink between ranks to measure, and NCCL would refuse the group.
    rates = {} if args.setup == "shared_gpu" else nvlink_rates_per_direction(device)
    rate = max(rates.values()) if rates else None  # the floor uses the faster method
    records = [dict(config="nvlink", op="pair_copy_both_directions", impl=impl, ranks=W, mode="eager",
                    setup=args.setup, gbps_per_direction=value / 1e9) for impl, value in rates.items()]
    cases = [(cfg, d, r, n)
             for cfg in args.bench_configs for d in args.dtypes for r in args.routings for n in cfg.tokens]
    experts: dict[str, SwiGLUExperts] = {}  # the current configuration's only
    for i, (cfg, dtype_name, routing, n) in enumerate(cases, 1):
        if rank == 0:
            print(f"[{i}/{len(cases)}] {cfg.name} {dtype_name} {routing} n={n} ({time.monotonic() - began:.0f} s)",
                  flush=True)
        if "layer" in args.ops and cfg.name not in experts:
            experts = {cfg.name: SwiGLUExperts(cfg.local_experts, cfg.hidden, cfg.intermediate, device,
                                               seed_of(cfg.name, "experts", rank))}
        records += run_case(cfg, dtype_name, routing, n, timer, rate, args, device, experts.get(cfg.name))
    timer.close()  # (a collective: not reached, and not needed, when a rank raised)
    if rank == 0:
        print(f"all {len(cases)} cases done in {time.monotonic() - began:.0f} s", flush=True)
    return records, notes
