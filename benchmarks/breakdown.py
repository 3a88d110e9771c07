"""Per-kernel time of one dispatch and one combine (CUDA backend), for performance work.

    python benchmarks/breakdown.py [--ranks N] [--hidden 7168] [--tokens 4096] [--top-k 8]
                                   [--local-experts 8] [--num-sms 24 48 ...]
                                   [--no-tune] [--tuning 4,1,0,0,13,1] [--fp8]
                                   [--graph [--graph-calls N] [--graph-sleep-us U] [--graph-flush-mb M]]
                                   [--bench-method] [--host-ahead-ms MS] [--all-ranks]

Spawns one process per GPU, runs uniform routing, profiles 10 calls with
torch.profiler and prints, for rank 0, the mean device time of each kernel and the
rate of the dispatch transfer kernel (send and expand overlapped) over the rows this
rank sends off-GPU; then the calls' kernels in order, each with the mean gap between the
end of the kernel before it and its start (the same GPU's clock). --graph captures one
dispatch + combine in a CUDA graph and profiles its replays instead of eager calls, so
the gaps are the device's own, without host launch time; --graph-calls N captures N of
them back to back (the first of a replay starts on each rank when that rank's host
launched it; the others start when the call before ended), --graph-sleep-us U with a
GPU sleep before each (the GPU busy, NVLink idle, the ranks still in step), and
--graph-flush-mb M after rewriting M MB (the benchmark flushes L2 so). --bench-method
starts each profiled step as hybrid_ep_infer/bench/timing.py starts a sample (host sync,
L2 flush, device barrier, GPU sleep); --host-ahead-ms MS lets the host enqueue every
step during a GPU sleep first, so the GPU never waits for the host. --all-ranks
adds every rank's kernels on one clock (the profilers' host clock): per kernel and rank,
the mean start and end since the step's first kernel started on any rank, which shows
where each rank waits.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TUNING_FIELDS = ("dispatch_send_warps", "dispatch_chunk_tokens", "dispatch_send_tma", "dispatch_expand_tma",
                 "combine_reduce_warps", "combine_chunk_tokens")


def worker(rank: int, args) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.ranks)
    from hybrid_ep_infer import EPBuffer

    W, H, T, K = args.ranks, args.hidden, args.tokens, args.top_k
    E = args.local_experts * W
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    scales = None
    if args.fp8:  # FP8 rows with one float32 scale per 128 columns (the benchmark's quantizer)
        from hybrid_ep_infer.bench.workloads import quantize

        x, scales = quantize(x)
        scales = scales.cuda()
    x = x.cuda()
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].cuda()
    weights = torch.rand(T, K, generator=gen).cuda()
    dest = idx // args.local_experts
    off_gpu_rows = sum(int((dest == r).any(dim=1).sum()) for r in range(W) if r != rank)
    row_bytes = H + H // 128 * 4 if args.fp8 else H * 2
    off_gpu_bytes = off_gpu_rows * row_bytes

    for num_sms in args.num_sms:
        with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="cuda", num_sms=num_sms,
                      dtype=x.dtype, tune=not args.no_tune, timeout_s=args.timeout) as buf:
            if args.tuning:
                buf._backend.context.set_tuning(**dict(zip(TUNING_FIELDS, map(int, args.tuning.split(",")))))
            if rank == 0:
                from hybrid_ep_infer import tuning

                for op, candidate, us in (list(tuning.reports.values()) or [[]])[-1]:
                    print(f"  tuner {op:8s} {str(candidate):14s} {us:9.1f} us (slowest rank)")
                print(f"  tuning in use: {buf._backend.context.get_tuning()}")
            result = buf.dispatch(x, idx, weights, scales=scales)
            y = result.hidden.to(torch.bfloat16)  # combine takes bf16 rows (a copy)
            buf.combine(y, result.handle)
            torch.cuda.synchronize()
            dist.barrier()
            iters = 10
            graph = None
            calls = args.graph_calls if args.graph else 1  # dispatch + combine pairs per profiled step
            cycles_per_us = sleep_cycles_per_us() if args.graph_sleep_us or args.host_ahead_ms else 0.0
            if args.graph:
                flush = torch.empty(args.graph_flush_mb << 20, dtype=torch.uint8, device="cuda") \
                    if args.graph_flush_mb else None
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(calls):
                        if flush is not None:  # as the benchmark's timer does before each sample
                            flush.zero_()
                        if args.graph_sleep_us:  # the GPU busy, NVLink idle, ranks still in step
                            torch.cuda._sleep(int(args.graph_sleep_us * cycles_per_us))
                        captured = buf.dispatch(x, idx, weights, scales=scales)
                        buf.combine(y, captured.handle)
                graph.replay()
                torch.cuda.synchronize()
                dist.barrier()
            if args.bench_method:
                from hybrid_ep_infer.bench.timing import Timer

                bench_timer = Timer(torch.device("cuda", rank), samples=iters)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                # Starting the profiler takes a different time on each rank: line the ranks
                # up again, or the first routing exchange absorbs the difference.
                dist.barrier()
                torch.cuda.synchronize()
                if args.host_ahead_ms:  # the host enqueues every step while the GPU sleeps
                    torch.cuda._sleep(int(args.host_ahead_ms * 1e3 * cycles_per_us))
                for _ in range(iters):
                    if args.bench_method:  # each step as one sample of the benchmark's timer
                        bench_timer.start_sample()
                    if graph is not None:
                        graph.replay()
                    else:
                        result = buf.dispatch(x, idx, weights, scales=scales)
                        buf.combine(y, result.handle)
                torch.cuda.synchronize()
            dist.barrier()
            totals = defaultdict(float)
            for avg in prof.key_averages():
                device_us = getattr(avg, "self_device_time_total", None)
                if device_us is None:
                    device_us = avg.self_cuda_time_total
                if "hep::" in avg.key and device_us > 0:
                    totals[kernel_name(avg.key)] += device_us / (iters * calls)
            if rank == 0:
                dtype = "fp8" if args.fp8 else "bf16"
                print(f"\n== {torch.cuda.get_device_name(0)}, W={W} H={H} T={T} E={E} K={K} {dtype} uniform, "
                      f"num_sms={num_sms}; rank 0 sends {off_gpu_bytes / 1e6:.1f} MB off-GPU per dispatch")
                for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
                    extra = ""
                    if name.startswith("transfer_kernel"):
                        extra = f"   ({off_gpu_bytes / us / 1e3:.0f} GB/s off-GPU)"
                    print(f"  {name:28s} {us:9.1f} us{extra}")
                print(f"  {'total':28s} {sum(totals.values()):9.1f} us")
                print_timeline(prof, iters, f"graph replays of {calls} call(s)" if graph is not None else "eager calls")
            if args.all_ranks:
                # Kernel times are relative to each profiler's start; the start is on the host
                # clock that every process of this machine shares.
                start_us = prof.profiler.kineto_results.trace_start_ns() / 1e3
                mine = [(start + start_us, end + start_us, name) for start, end, name in library_kernels(prof)]
                every = [None] * W
                dist.all_gather_object(every, mine)
                if rank == 0:
                    print_ranks_timeline(every, iters)
    dist.destroy_process_group()


def sleep_cycles_per_us() -> float:
    """torch.cuda._sleep's cycles per microsecond on this GPU, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    torch.cuda.synchronize()
    return 1_000_000 / (start.elapsed_time(end) * 1e3)


def kernel_name(key: str) -> str:
    """A profiler key such as "void hep::scan_kernel(hep::DispatchParams)" -> "scan_kernel"."""
    return key.rsplit("(", 1)[0].split("::")[-1]


def library_kernels(prof) -> list[tuple[float, float, str]]:
    """The library's kernels of a profile as (start, end, name), in start order (µs)."""
    return sorted(((e.time_range.start, e.time_range.end, kernel_name(e.key)) for e in prof.events()
                   if "hep::" in e.key and getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA")), key=lambda k: k[0])


def print_timeline(prof, iters: int, how: str) -> None:
    """The library's kernels of the profiled calls in start order: per position in a call,
    the mean duration and the mean gap since the previous kernel of the same call ended."""
    kernels = library_kernels(prof)
    if not kernels or len(kernels) % iters:
        print(f"  (timeline: {len(kernels)} kernels for {iters} calls, not shown)")
        return
    per_call = len(kernels) // iters
    print(f"  timeline of one call ({how}, mean of {iters}; gap = since the previous kernel's end):")
    for i in range(per_call):
        runs = [kernels[c * per_call + i] for c in range(iters)]
        duration = sum(end - start for start, end, _ in runs) / iters
        line = f"    {runs[0][2]:28s} {duration:9.1f} us"
        if i:
            gaps = [kernels[c * per_call + i][0] - kernels[c * per_call + i - 1][1] for c in range(iters)]
            line += f"   gap {sum(gaps) / iters:6.1f} us"
        print(line)


def print_ranks_timeline(every: list[list[tuple[float, float, str]]], iters: int) -> None:
    """`every[r]`: rank r's kernels (start, end, name) on a common clock, `iters` steps (an
    eager call or a graph replay) of them. Per position in a step and per rank, the mean
    start and end since the step's first kernel started on any rank; then the mean time
    between the steps' first starts."""
    if any(len(kernels) != len(every[0]) or len(kernels) % iters for kernels in every) or not every[0]:
        print(f"  (ranks timeline: {[len(k) for k in every]} kernels for {iters} steps, not shown)")
        return
    per_step = len(every[0]) // iters
    origins = [min(kernels[c * per_step][0] for kernels in every) for c in range(iters)]
    print(f"  every rank, one clock (mean of {iters} steps; start-end in us since the step's first start on any rank):")
    print("    " + " " * 28 + "".join(f"{'rank ' + str(r):>16s}" for r in range(len(every))))
    for i in range(per_step):
        line = f"    {every[0][i][2]:28s}"
        for kernels in every:
            runs = [kernels[c * per_step + i] for c in range(iters)]
            start = sum(run[0] - origin for run, origin in zip(runs, origins)) / iters
            end = sum(run[1] - origin for run, origin in zip(runs, origins)) / iters
            line += f"{start:8.1f}-{end:<7.1f}"
        print(line)
    if iters > 1:
        print(f"    step to step: {(origins[-1] - origins[0]) / (iters - 1):.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count())
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--local-experts", type=int, default=8)
    parser.add_argument("--fp8", action="store_true", help="FP8 rows with scales instead of bf16")
    parser.add_argument("--graph", action="store_true", help="profile CUDA-graph replays of one dispatch + combine")
    parser.add_argument("--graph-calls", type=int, default=1,
                        help="with --graph: dispatch + combine pairs captured in the graph (back to back "
                        "on the device, without the host between them); the timelines show all of them")
    parser.add_argument("--graph-sleep-us", type=float, default=0.0,
                        help="with --graph: a GPU sleep of about this long before each captured call")
    parser.add_argument("--graph-flush-mb", type=int, default=0,
                        help="with --graph: rewrite a buffer of this many MB before each captured call "
                        "(the benchmark's L2 flush uses 256)")
    parser.add_argument("--bench-method", action="store_true",
                        help="start each profiled step as the benchmark starts a sample: host sync, "
                        "L2 flush, device barrier (NCCL all-reduce), GPU sleep")
    parser.add_argument("--host-ahead-ms", type=float, default=0.0,
                        help="a GPU sleep this long before the profiled steps, so that the host has "
                        "enqueued them all and the GPU never waits for it between steps")
    parser.add_argument("--all-ranks", action="store_true",
                        help="also every rank's kernels on one clock (where each rank waits)")
    parser.add_argument("--num-sms", type=int, nargs="+", default=[24])
    parser.add_argument("--timeout", type=float, default=100.0, help="EPBuffer timeout_s")
    parser.add_argument("--rank", type=int, help="run only this rank (the others are started separately, "
                        "e.g. to put one rank under ncu: benchmarks/ncu_rank0.sh)")
    parser.add_argument("--port", type=int, help="rendezvous port (with --rank)")
    parser.add_argument("--no-tune", action="store_true", help="skip the construction-time tuner (built-in defaults)")
    parser.add_argument("--tuning", help="force a tuning: send_warps,chunk,send_tma,expand_tma,reduce_warps,chunk")
    args = parser.parse_args()
    if not args.graph and (args.graph_calls != 1 or args.graph_sleep_us or args.graph_flush_mb):
        parser.error("--graph-calls, --graph-sleep-us and --graph-flush-mb need --graph")
    if args.graph_calls < 1:
        parser.error("--graph-calls must be at least 1")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.rank is not None:
        worker(args.rank, args)
        return
    from hybrid_ep_infer.bench import free_port

    args.port = free_port()
    mp.spawn(worker, args=(args,), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
