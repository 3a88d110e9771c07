"""Spawn helper for multi-rank tests: one process per rank, a free port, clean teardown.

Workers are module-level functions ``worker(rank, world_size, *args)``. A failure
in any rank fails the test with that rank's traceback.

GPU tests place their ranks here, in one place: one process per GPU by default
(over NCCL); with ``HYBRID_EP_INFER_TEST_SHARE_GPU=1`` the ranks share the visible GPUs
round-robin (``placement.gpu_for_rank``; start CUDA MPS first) over gloo, since NCCL
refuses two ranks on one GPU. ``HYBRID_EP_INFER_TEST_WORLD_SIZES=2,4,8`` sets the rank
counts every multi-rank GPU test runs at (``benchmarks/gpu_run.sh --one-gpu`` sets both).
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybrid_ep_infer.bench import free_port
from hybrid_ep_infer.placement import gpu_for_rank

SHARE_GPU_ENV = "HYBRID_EP_INFER_TEST_SHARE_GPU"
WORLD_SIZES_ENV = "HYBRID_EP_INFER_TEST_WORLD_SIZES"
# Ranks of one test (every rank's blocks must fit the GPU's SMs: EPBuffer checks).
MAX_SHARED_RANKS = 8


class CheckFailed(AssertionError):
    """A named check of a worker failed; the message names the check, the case and the rank,
    and the original exception is chained below it."""


@contextlib.contextmanager
def check(name: str, case: object = None):
    """Run one check of a worker: a failure inside says ``"<name> failed for <case> on rank r: ..."``.

    A worker runs several checks in one spawned process, where a bare assertion or a CUDA
    error would not say which of them broke. Wrap whole checks only, never code that a
    surrounding ``pytest.raises`` expects to raise (this changes the exception's type).
    """
    try:
        yield
    except Exception as e:
        where = f" for {case}" if case is not None else ""
        rank = f" on rank {dist.get_rank()}" if dist.is_initialized() else ""
        raise CheckFailed(f"{name} failed{where}{rank}: {type(e).__name__}: {e}") from e


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ranks_share_gpus() -> bool:
    return os.environ.get(SHARE_GPU_ENV, "") == "1"


def gpu_world_sizes(default: tuple[int, ...]) -> list[int]:
    """The rank counts of a multi-rank GPU test: the environment's, else ``default``."""
    text = os.environ.get(WORLD_SIZES_ENV, "").strip()
    if not text:
        return list(default)
    sizes = [int(w) for w in text.replace(" ", "").split(",") if w]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"{WORLD_SIZES_ENV}={text!r}: expected positive rank counts, e.g. 2,4,8")
    return sizes


def placement_problem(world_size: int) -> str | None:
    """Why ``world_size`` ranks cannot run on the GPUs here, or None."""
    gpus = gpu_count()
    if gpus == 0:
        return "needs a CUDA GPU; none is visible here"
    if ranks_share_gpus():
        if world_size > MAX_SHARED_RANKS * gpus:
            return f"{world_size} ranks on {gpus} shared GPU(s): at most {MAX_SHARED_RANKS} per GPU"
        return None
    if world_size > gpus:
        return (f"needs {world_size} CUDA GPUs; {gpus} visible (or set {SHARE_GPU_ENV}=1 and start CUDA MPS to "
                f"run the ranks on shared GPUs)")
    return None


def ranks_per_gpu(world_size: int) -> int:
    """The most ranks of a ``world_size``-rank GPU test on one GPU."""
    return -(-world_size // gpu_count()) if ranks_share_gpus() else 1


def tokens_that_fit(world_size: int, tokens: int) -> int:
    """Tokens per rank of a large-shape GPU case: ``tokens``, cut where more than two ranks
    share a GPU so that all of their buffers fit its memory (8 ranks at 4096 tokens of
    H = 7168 need more than an H100's 80 GB)."""
    return min(tokens, 2 * tokens // ranks_per_gpu(world_size))


def rank_device(rank: int) -> torch.device:
    """The GPU of ``rank`` in a GPU test (the one rank -> GPU map)."""
    return torch.device("cuda", gpu_for_rank(rank, gpu_count()))


def gpu_backend() -> str:
    """The process group of GPU tests: NCCL with one rank per GPU, gloo where ranks share one."""
    return "gloo" if ranks_share_gpus() else "nccl"


def _entry(rank: int, world_size: int, port: int, backend: str, worker, args) -> None:
    torch.set_num_threads(1)  # the CI machine has 2 cores for up to 4 ranks
    if backend == "nccl" or (gpu_count() and ranks_share_gpus()):
        torch.cuda.set_device(rank_device(rank))
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


def spawn_gpu(world_size: int, worker, *args) -> None:
    """:func:`spawn` for GPU tests: each rank's device set from :func:`rank_device`, the
    process group from :func:`gpu_backend`. Workers use ``torch.cuda.current_device()``."""
    spawn(world_size, worker, *args, backend=gpu_backend())


def single_rank_group() -> None:
    """Initialise a 1-rank gloo group in this process if none exists (for in-process tests)."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def _raw_entry(rank: int, world_size: int, port: int, backend: str, worker, args) -> None:
    import traceback

    try:
        if gpu_count() and (ranks_share_gpus() or rank < gpu_count()):
            torch.cuda.set_device(rank_device(rank))  # also under gloo: the CUDA backend needs the device
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
    procs = [ctx.Process(target=_raw_entry, args=(r, world_size, port, backend, worker, args))
             for r in range(world_size)]
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
