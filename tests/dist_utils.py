"""Spawn helper for multi-rank tests: one process per rank, a free port, clean teardown.

Workers are module-level functions ``worker(rank, world_size, *args)``. A failure
in any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, backend: str, worker, args) -> None:
    torch.set_num_threads(1)  # the CI machine has 2 cores for up to 4 ranks
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
        dist.barrier()  # every rank leaves together
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: with torch 2.13 + gloo, a spawned rank that ran many
    # collectives sometimes aborts in a static destructor at exit ("terminate called
    # without an active exception") after all its work succeeded. Only reached when
    # the worker passed; failures still propagate through the exception above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(world_size: int, worker, *args, backend: str = "gloo") -> None:
    """Run ``worker(rank, world_size, *args)`` on ``world_size`` fresh processes."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_entry, args=(world_size, free_port(), backend, worker, args), nprocs=world_size, join=True)


def single_rank_group() -> None:
    """Initialise a 1-rank gloo group in this process if none exists (for in-process tests)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def _raw_entry(rank: int, world_size: int, port: int, backend: str, worker, args) -> None:
    import traceback

    try:
        if torch.cuda.is_available() and rank < torch.cuda.device_count():
            torch.cuda.set_device(rank)  # also under gloo: the CUDA backend needs the device
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        worker(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - reported through the exit code
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no group teardown: a peer may be dead on purpose


def launch(world_size: int, worker, *args, backend: str = "gloo", deadline_s: float = 120.0) -> list[int | None]:
    """Like :func:`spawn`, for tests where a rank dies or exits early on purpose: returns
    every rank's exit code (negative: killed by that signal; None: still running at the
    deadline, then killed). The caller asserts on them."""
    import time

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_raw_entry, args=(r, world_size, port, backend, worker, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    codes = []
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
        codes.append(p.exitcode)
    for p in procs:  # stragglers: kill and reap, so no test leaves a zombie behind
        if p.is_alive():
            p.kill()
            p.join()
    return codes
