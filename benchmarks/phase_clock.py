"""Where the time of one low-latency dispatch and one combine goes, phase by phase, on the
GPU's own clock. For performance work; needs a profiling build of the library:

    cmake -S . -B build-clock -G Ninja -DHEP_PHASE_CLOCK=ON -DHEP_MULTINODE=OFF && cmake --build build-clock
    HYBRID_EP_INFER_LIBRARY=$PWD/build-clock/libhybrid_ep_infer.so \\
        python benchmarks/phase_clock.py --ranks 4 [--tokens 1 128] [--fp8] [--replays 200] [--json F]

(or ``bash benchmarks/gpu_run.sh --one-gpu phase-clock``). One process per rank, round-robin
over the GPUs (ranks that share a GPU need CUDA MPS); the decode shape of the benchmark
(H = 7168, 8 experts per rank, top-8, uniform routing). One CUDA graph holds dispatch (the
low-latency path, forced) and combine; each replay starts as a benchmark sample does
(hybrid_ep_infer/bench/timing.py: L2 flush, device barrier, GPU sleep), then every rank
reads its kernels' marks (csrc/common/phase_clock.cuh; the marks are listed in
csrc/kernels/ll_dispatch.cuh and combine.cuh).

Printed per n: for each mark, the earliest and the latest moment any rank's block or warp
passed it, in microseconds since the first block of any rank entered the dispatch (the
median over replays), and the same for combine. Also the replay's CUDA-event time on the
slowest rank, so what the kernels do not account for (launch, the gap between the
kernels) shows. The marks' atomics cost a little: time with the normal build, explain
with this one. %globaltimer is one clock for every SM of a GPU, so ranks that share a GPU
are on one clock; on several GPUs compare a rank's marks with its own only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MARKS = 8  # csrc/common/phase_clock.cuh, kMarks
DISPATCH_MARKS = ("entered", "routing published", "rows staged", "routing arrived", "plan built", "rows cleared",
                  "rows placed", "exited")
COMBINE_MARKS = ("entered", "partials free", "reduced", "gathered", "exited")
DISPATCH_KERNEL, COMBINE_KERNEL = 0, 1  # hep_phase_clock_read's kernel argument


def read_marks(lib: ctypes.CDLL, kernel: int) -> list[int]:
    """[earliest per mark] + [latest per mark], ns of %globaltimer (0: not passed); clears them."""
    out = (ctypes.c_ulonglong * (2 * MARKS))()
    if lib.hep_phase_clock_read(kernel, out) != 0:
        raise RuntimeError(f"hep_phase_clock_read({kernel}) failed")
    return list(out)


def profiling_library() -> ctypes.CDLL:
    from hybrid_ep_infer._native import load_library

    path = load_library().path  # the library the package uses (dlopen hands back the same one)
    lib = ctypes.CDLL(str(path))
    if not hasattr(lib, "hep_phase_clock_read"):
        raise SystemExit(f"{path} is not a profiling build: configure it with -DHEP_PHASE_CLOCK=ON")
    lib.hep_phase_clock_read.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong)]
    return lib


def profile_one_n(args, n: int, device, lib, timer) -> list[dict] | None:
    """Every replay's marks and event time on this rank; rank 0 returns all ranks'."""
    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer import tuning as tuning_of
    from hybrid_ep_infer.bench.configs import CONFIGS
    from hybrid_ep_infer.bench.run import case_inputs

    cfg = CONFIGS["decode"]
    W = dist.get_world_size()
    dtype = torch.float8_e4m3fn if args.fp8 else torch.bfloat16
    _, x, scales, idx, weights = case_inputs(cfg, "fp8" if args.fp8 else "bf16", "uniform", n, device)
    kw = dict(hidden=cfg.hidden, max_tokens=cfg.max_tokens, num_experts=cfg.local_experts * W, top_k=cfg.top_k,
              dtype=dtype, pad_multiple=16)
    records = []
    with EPBuffer(backend="cuda", low_latency=True, **kw) as buf:
        backend = buf._backend
        best = tuning_of.fastest_per_path(backend, backend.desc.num_sms).get(1, {"dispatch_path": 1})
        backend.context.set_tuning(**(dict(backend.tuning) | best))
        result = buf.dispatch(x, idx, weights, scales=scales)
        y = torch.randn(result.hidden.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
        out = torch.empty(n, cfg.hidden, dtype=torch.bfloat16, device=device)

        def step():
            r = buf.dispatch(x, idx, weights, scales=scales)
            buf.combine(y, r.handle, out=out)

        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for i in range(args.warmup + args.replays):
            timer.start_sample()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            timer._finish(end)
            marks = {"dispatch": read_marks(lib, DISPATCH_KERNEL), "combine": read_marks(lib, COMBINE_KERNEL),
                     "event_us": start.elapsed_time(end) * 1e3}
            if i >= args.warmup:
                records.append(marks)
        buf.check_errors()
        del graph
    gathered = [None] * W if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    return gathered


def phase_table(per_rank: list[list[dict]], kernel: str, names: tuple[str, ...]) -> list[dict]:
    """Per mark: the medians over replays of the earliest and the latest pass of any rank,
    in us since the kernel's first entry on any rank; and the latest pass per rank."""
    replays = len(per_rank[0])
    rows = []
    for m, name in enumerate(names):
        first, last, per_rank_last = [], [], [[] for _ in per_rank]
        for i in range(replays):
            marks = [rank[i][kernel] for rank in per_rank]
            origin = min(mk[0] for mk in marks if mk[0])
            passed = [(mk[m], mk[MARKS + m]) for mk in marks if mk[MARKS + m]]
            if not passed:
                continue
            first.append((min(f for f, _ in passed) - origin) / 1e3)
            last.append((max(lt for _, lt in passed) - origin) / 1e3)
            for r, mk in enumerate(marks):
                if mk[MARKS + m]:
                    per_rank_last[r].append((mk[MARKS + m] - origin) / 1e3)
        if first:
            rows.append(dict(mark=name, first_us=statistics.median(first), last_us=statistics.median(last),
                             last_per_rank_us=[statistics.median(v) if v else None for v in per_rank_last]))
    return rows


def summarize(per_rank: list[list[dict]], n: int, args) -> dict:
    replays = len(per_rank[0])
    gap = []  # the dispatch's latest mark to the combine's first entry
    span = []  # the dispatch's first entry to the combine's latest mark
    for i in range(replays):
        d = [rank[i]["dispatch"] for rank in per_rank]
        c = [rank[i]["combine"] for rank in per_rank]
        d_end = max(max(mk[MARKS:]) for mk in d)
        c_enter = min(mk[0] for mk in c if mk[0])
        gap.append((c_enter - d_end) / 1e3)
        span.append((max(max(mk[MARKS:]) for mk in c) - min(mk[0] for mk in d if mk[0])) / 1e3)
    return dict(ranks=len(per_rank), tokens=n, dtype="fp8" if args.fp8 else "bf16", replays=replays,
                event_us=statistics.median(max(rank[i]["event_us"] for rank in per_rank) for i in range(replays)),
                kernels_span_us=statistics.median(span), dispatch_to_combine_gap_us=statistics.median(gap),
                dispatch=phase_table(per_rank, "dispatch", DISPATCH_MARKS),
                combine=phase_table(per_rank, "combine", COMBINE_MARKS))


def print_summary(s: dict) -> None:
    print(f"\n== W={s['ranks']} n={s['tokens']} {s['dtype']}: median of {s['replays']} replays; "
          f"replay (events, slowest rank) {s['event_us']:.1f} us, dispatch's first entry to combine's last mark "
          f"{s['kernels_span_us']:.1f} us, dispatch's last mark to combine's first entry "
          f"{s['dispatch_to_combine_gap_us']:.1f} us")
    for kernel in ("dispatch", "combine"):
        print(f"{kernel:9s}{'mark':>20s} {'first':>8s} {'last':>8s}   "
              "last per rank (us since the kernel's first entry)")
        for row in s[kernel]:
            ranks = " ".join(f"{v:6.1f}" if v is not None else "     -" for v in row["last_per_rank_us"])
            print(f"{'':9s}{row['mark']:>20s} {row['first_us']:8.1f} {row['last_us']:8.1f}   {ranks}")


def worker(rank: int, args) -> None:
    from hybrid_ep_infer.bench.timing import Timer
    from hybrid_ep_infer.placement import gpu_for_rank

    device = torch.device("cuda", gpu_for_rank(rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.ranks)
    lib = profiling_library()  # (the warm-up replays' reads clear what construction's tuning marked)
    timer = Timer(device, samples=1, flush_l2=args.flush_l2)
    summaries = []
    for n in args.tokens:
        gathered = profile_one_n(args, n, device, lib, timer)
        if rank == 0:
            summaries.append(summarize(gathered, n, args))
            print_summary(summaries[-1])
            sys.stdout.flush()
    timer.close()
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(device), torch=torch.__version__, runs=summaries), f,
                      indent=1)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as the benchmark: skip a teardown that sometimes aborts under gloo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--fp8", action="store_true", help="FP8 rows with per-128-column scales")
    parser.add_argument("--replays", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", help="also write the summaries here")
    parser.add_argument("--no-l2-flush", dest="flush_l2", action="store_false",
                        help="start replays without flushing the L2 (the default flushes it, as the benchmark does)")
    args = parser.parse_args()
    from hybrid_ep_infer.bench import free_port

    args.port = free_port()
    mp.spawn(worker, args=(args,), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
