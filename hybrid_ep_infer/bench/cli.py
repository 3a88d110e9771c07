"""python -m hybrid_ep_infer.bench: dispatch, combine, round trip and a whole MoE layer,
eager and CUDA-graph-replayed, against NCCL baselines and the NVLink floor.

Spawns one process per visible GPU (or --ranks N). Without a GPU it runs the `tiny`
configuration on the reference backend over gloo, so the command works anywhere; those
numbers say nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .configs import CONFIGS, CPU_DEFAULT, GPU_DEFAULT
from .report import print_table, write_plot


def parse_args(argv=None):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    p = argparse.ArgumentParser(prog="python -m hybrid_ep_infer.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=gpus or 2, help="processes (one per GPU); default: every GPU")
    p.add_argument("--config", dest="configs", nargs="+", choices=sorted(CONFIGS),
                   default=list(GPU_DEFAULT if gpus else CPU_DEFAULT))
    p.add_argument("--dtype", dest="dtypes", nargs="+", choices=("bf16", "fp8"), default=["bf16", "fp8"])
    p.add_argument("--routing", dest="routings", nargs="+", choices=("uniform", "zipf"), default=["uniform", "zipf"])
    p.add_argument("--samples", type=int, default=50, help="timed samples per measurement (>= 50 for the median/p99)")
    p.add_argument("--num-sms", type=int, default=None, help="blocks per copy kernel (default: the library's)")
    p.add_argument("--json", type=str, default=None, help="write every number here")
    p.add_argument("--plot", type=str, default=None, help="write a PNG: throughput vs tokens")
    p.add_argument("--commit", type=str, default=None, help="git commit to record (default: git rev-parse HEAD)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where GPUs exist")
    args = p.parse_args(argv)
    if args.samples < 50:
        print(f"note: --samples {args.samples} < 50: medians and p99 are rough", flush=True)
    args.cuda = bool(gpus) and not args.cpu
    if args.cuda and args.ranks > gpus:
        p.error(f"--ranks {args.ranks} needs {args.ranks} GPUs; {gpus} visible")
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
                commit=commit, ranks=args.ranks, configs=args.configs, dtypes=args.dtypes, routings=args.routings,
                samples=args.samples, command=" ".join(["python -m hybrid_ep_infer.bench", *sys.argv[1:]]))


def worker(rank: int, args, port: int) -> None:
    if args.cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks)
    try:
        from .run import run_all

        records = run_all(args, device)
        if rank == 0:
            meta = metadata(args)
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


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.cuda:
        print("== CPU run: the reference backend over gloo. These numbers say nothing about speed; "
              "run on GPUs for real measurements. ==", flush=True)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.ranks, join=True)
