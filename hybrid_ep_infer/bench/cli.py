"""python -m hybrid_ep_infer.bench: dispatch, combine, round trip and a whole MoE layer,
eager and CUDA-graph-replayed, against NCCL baselines and the NVLink floor.

One process per visible GPU (or --ranks N). Three setups:
  one rank per GPU   --ranks <= GPUs: NCCL group, NCCL baselines, NVLink floor.
  ranks share a GPU  --ranks > GPUs (e.g. CUDA_VISIBLE_DEVICES=0 ... --ranks 8), processes
                     under CUDA MPS (start `nvidia-cuda-mps-control -d` first): a gloo group;
                     the NCCL baselines and the NVLink floor are left out (NCCL refuses two
                     ranks on one GPU). The times are launch and protocol cost, not NVLink
                     bandwidth.
  CPU                no GPU, or --cpu: the reference backend over gloo at small sizes
                     (GPU-sized configurations are shrunk, named <name>-cpu); quick, and the
                     numbers say nothing about speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import free_port
from .configs import CONFIGS, CPU_DEFAULT, GPU_DEFAULT, OPS, for_cpu
from .report import PLOT_EXTRA, print_table, write_plot

SHARED_GPU_NOTE = "launch and protocol cost, not NVLink bandwidth"
CPU_NOTE = "the reference backend over gloo; these numbers say nothing about speed"


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_evidence() -> str | None:
    """Best effort: why CUDA MPS seems to run (a control or server process, or its pipe
    directory with a control pipe), or None."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith("nvidia-cuda-mps"):  # comm holds 15 characters: -control and -server look alike
            return f"process {pid} ({name})"
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/nvidia-mps"
    if os.path.exists(os.path.join(pipe_dir, "control")):
        return f"control pipe in {pipe_dir}"
    return None


def setup_label(args) -> str:
    """What the run measures, for the table, the JSON and the plot."""
    if args.setup == "cpu":
        return f"CPU, {args.ranks} ranks: {CPU_NOTE}"
    if args.setup == "shared_gpu":
        if args.gpus == 1:
            return f"{args.ranks} ranks share one GPU under MPS: {SHARED_GPU_NOTE}"
        return (f"{args.ranks} ranks share {args.gpus} GPUs (up to {args.ranks_per_gpu} per GPU) under MPS: "
                f"{SHARED_GPU_NOTE}")
    return f"{args.ranks} GPUs, one rank each (NCCL)"


def skipped(args) -> list[dict]:
    """What this setup leaves out, and why."""
    if args.setup == "shared_gpu":
        return [dict(what="NCCL baselines (all-gather + reduce-scatter, all-to-all)",
                     reason="NCCL refuses two ranks of one communicator on one GPU"),
                dict(what="NVLink floor, pair copy rates, x floor and GB/s",
                     reason="ranks that share a GPU move no bytes over NVLink")]
    if args.setup == "cpu":
        return [dict(what="NVLink floor, graph replays and GB/s", reason="no GPU")]
    return []


def parse_args(argv=None):
    gpus = visible_gpus()
    p = argparse.ArgumentParser(prog="python -m hybrid_ep_infer.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=gpus or 2,
                   help="processes; more than the GPUs: several per GPU, under MPS (default: one per GPU)")
    p.add_argument("--config", dest="configs", nargs="+", choices=sorted(CONFIGS),
                   default=list(GPU_DEFAULT if gpus else CPU_DEFAULT))
    p.add_argument("--dtype", dest="dtypes", nargs="+", choices=("bf16", "fp8"), default=["bf16", "fp8"])
    p.add_argument("--routing", dest="routings", nargs="+", choices=("uniform", "zipf"), default=["uniform", "zipf"])
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="tokens per rank to measure, each within a configuration's max_tokens "
                        "(default: each configuration's own list)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS),
                   help="what to time, each eager and graph-replayed (default: all)")
    p.add_argument("--samples", type=int, default=None,
                   help="timed samples per measurement (default 50 on GPUs, 5 on the CPU; >= 50 for the median/p99)")
    p.add_argument("--num-sms", type=int, default=None, help="blocks per copy kernel (default: the library's)")
    p.add_argument("--no-l2-flush", dest="flush_l2", action="store_false",
                   help="start GPU samples without flushing the L2 (the default flushes it before each sample)")
    p.add_argument("--json", type=str, default=None, help="write every number here")
    p.add_argument("--plot", type=str, default=None, help=f"write a PNG of every measured series (needs matplotlib: "
                                                          f"{PLOT_EXTRA})")
    p.add_argument("--commit", type=str, default=None, help="git commit to record (default: git rev-parse HEAD)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where GPUs exist")
    args = p.parse_args(argv)

    if args.ranks < 1:
        p.error(f"--ranks must be at least 1, got {args.ranks}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error(f"--plot needs matplotlib, which is not installed: {PLOT_EXTRA} (or pip install matplotlib)")
    args.ops = list(dict.fromkeys(args.ops))
    args.cuda = bool(gpus) and not args.cpu
    args.gpus = gpus if args.cuda else 0
    if not args.cuda:
        args.setup = "cpu"
    elif args.ranks > gpus:
        args.setup = "shared_gpu"
    else:
        args.setup = "gpus"
    args.ranks_per_gpu = math.ceil(args.ranks / gpus) if args.cuda else None  # the most on one GPU
    if args.samples is None:
        args.samples = 50 if args.cuda else 5
    elif args.samples < 1:
        p.error(f"--samples must be at least 1, got {args.samples}")
    elif args.samples < 50 and args.cuda:
        print(f"note: --samples {args.samples} < 50: medians and p99 are rough", flush=True)
    # The CPU runs the reference backend: at GPU sizes one configuration takes tens of minutes.
    args.bench_configs = [for_cpu(CONFIGS[c]) if args.setup == "cpu" else CONFIGS[c] for c in args.configs]
    if args.tokens is not None:
        for cfg in args.bench_configs:
            outside = [n for n in args.tokens if not 0 <= n <= cfg.max_tokens]
            if outside:
                p.error(f"--tokens {outside}: {cfg.name} takes 0 to {cfg.max_tokens} tokens per rank")
        args.bench_configs = [dataclasses.replace(cfg, tokens=tuple(args.tokens)) for cfg in args.bench_configs]
    return args


def metadata(args) -> dict:
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                    cwd=os.path.dirname(__file__)).stdout.strip() or None
        except OSError:
            commit = None
    driver = None
    if args.cuda:
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.split("\n")[0].strip()
        except OSError:
            pass
    return dict(card=torch.cuda.get_device_name(0) if args.cuda else platform.processor() or "cpu",
                driver=driver, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                commit=commit, ranks=args.ranks, setup=args.setup, label=setup_label(args), gpus=args.gpus,
                shared_gpu=args.setup == "shared_gpu", ranks_per_gpu=args.ranks_per_gpu,
                process_group="nccl" if args.setup == "gpus" else "gloo",
                mps=mps_evidence() if args.setup == "shared_gpu" else None, skipped=skipped(args),
                configs=[c.name for c in args.bench_configs], dtypes=args.dtypes, routings=args.routings, ops=args.ops,
                samples=args.samples, command=" ".join(["python -m hybrid_ep_infer.bench", *sys.argv[1:]]))


def placement_of(rank: int, args) -> tuple[torch.device, str]:
    """This rank's device and process-group backend. GPUs: ``gpu_for_rank`` (round-robin
    when ranks outnumber GPUs); NCCL with one rank per GPU, else gloo: NCCL refuses two
    ranks of one communicator on one GPU, and the CUDA backend uses its group only at
    construction (the timer's barrier then runs on the streams)."""
    if not args.cuda:
        return torch.device("cpu"), "gloo"
    from ..placement import gpu_for_rank

    return torch.device("cuda", gpu_for_rank(rank, args.gpus)), "nccl" if args.setup == "gpus" else "gloo"


def worker(rank: int, args, port: int) -> None:
    device, backend = placement_of(rank, args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    # torch 2.13 calls the *_into_tensor collectives of the baselines deprecated, once per rank and call site.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
    try:
        from .run import run_all

        records, notes = run_all(args, device)
        if rank == 0:
            meta = metadata(args) | notes
            print_table(records, meta)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"meta": meta, "records": records}, f, indent=1)
                print(f"wrote {args.json}")
            if args.plot:
                write_plot(records, meta, args.plot)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown once the work succeeded (as tests/dist_utils.py does): with
    # torch 2.13 + gloo a rank that ran many collectives sometimes aborts in a static
    # destructor at exit, which would fail the whole run. Failures still raise above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def announce(args) -> None:
    """What the run is, before it spawns anything (the first case can take a while)."""
    print(f"== {setup_label(args)} ==", flush=True)
    for item in skipped(args):
        print(f"left out: {item['what']}: {item['reason']}", flush=True)
    if args.setup == "shared_gpu":
        evidence = mps_evidence()
        if evidence is None:
            print("WARNING: CUDA MPS does not seem to be running (no nvidia-cuda-mps-control/-server process, no "
                  "control pipe in $CUDA_MPS_PIPE_DIRECTORY or /tmp/nvidia-mps). Without it the ranks sharing a GPU "
                  "time-slice: correct, but about 100 times slower. Start it with `nvidia-cuda-mps-control -d` "
                  "(stop: `echo quit | nvidia-cuda-mps-control`).", flush=True)
        else:
            print(f"CUDA MPS: {evidence}", flush=True)
    for cfg in args.bench_configs:
        if cfg.name.endswith("-cpu"):
            print(f"CPU: {cfg.note}", flush=True)
    cases = sum(len(cfg.tokens) for cfg in args.bench_configs) * len(args.dtypes) * len(args.routings)
    print(f"{args.ranks} processes; {cases} cases x ops {' '.join(args.ops)}, {args.samples} samples each", flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    announce(args)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.spawn(worker, args=(args, free_port()), nprocs=args.ranks, join=True)
