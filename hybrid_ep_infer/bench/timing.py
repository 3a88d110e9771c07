"""One sample = one call (or graph replay) timed on every rank after an L2 flush and a
device barrier; the sample's time is the slowest rank's. We report the median and the p99.

The barrier runs on the GPUs (a one-element NCCL all-reduce enqueued with no host wait),
so every GPU starts the timed call at nearly the same moment; a short GPU sleep after it
keeps each GPU busy while the host enqueues the call. (A host barrier would leave the ranks'
launch skew inside every sample.)"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


class Timer:
    def __init__(self, device: torch.device, samples: int, warmup: int = 5):
        self.device = device
        self.samples = samples
        self.warmup = warmup
        self.cuda = device.type == "cuda"
        # Larger than any L2 (50-60 MB on H100/H200), rewritten before every sample.
        self._flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda else None
        self._barrier = torch.zeros(1, dtype=torch.float32, device=device) if self.cuda else None

    def start_sample(self) -> None:
        """What comes before each timed CUDA sample: a host sync, the L2 flush, the device
        barrier and a GPU sleep (benchmarks/breakdown.py --bench-method profiles after it)."""
        torch.cuda.synchronize(self.device)  # nothing of the previous sample in flight
        self._flush.zero_()
        dist.all_reduce(self._barrier)  # device barrier: the stream waits, the host does not
        # ~100 us of GPU sleep after the barrier, so the host has enqueued the call
        # before the clock starts (otherwise a late host lands in the sample).
        torch.cuda._sleep(200_000)

    def _one(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start_sample()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3
        dist.barrier()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6

    def measure(self, fn) -> tuple[float, float]:
        """(median, p99) in microseconds of the per-sample maximum over ranks."""
        for _ in range(self.warmup):
            fn()
        local = torch.tensor([self._one(fn) for _ in range(self.samples)], dtype=torch.float64)
        slowest = local.to(self.device) if self.cuda else local
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        values = sorted(slowest.cpu().tolist())
        p99 = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
        return statistics.median(values), p99

    def measure_graph(self, fn) -> tuple[float, float] | None:
        """Capture ``fn`` once (after eager warm-up) and time its replays; None on CPU."""
        if not self.cuda:
            return None
        for _ in range(2):
            fn()
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        result = self.measure(graph.replay)
        del graph
        return result


def _pair_rate(timer: Timer, nbytes: int, exchange) -> float:
    median, _ = timer.measure(exchange)
    return nbytes / (median * 1e-6)


def nvlink_rates_per_direction(device: torch.device, nbytes: int = 256 * 2**20, reps: int = 10) -> dict[str, float]:
    """Bytes/s each way between paired ranks (0<->1, 2<->3, ...) copying in both directions
    at once, the slowest pair's rate, by two methods: NCCL send/recv (``nccl_send_recv``) and
    a copy-engine write into the peer's memory mapped through CUDA IPC (``copy_engine``).
    The floor uses the faster. Empty without a pair of GPUs."""
    W, rank = dist.get_world_size(), dist.get_rank()
    if device.type != "cuda" or W < 2:
        return {}
    peer = rank ^ 1
    active = peer < W
    send = torch.ones(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    timer = Timer(device, samples=reps, warmup=2)

    def nccl_exchange():
        if active:
            ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    rates = {"nccl_send_recv": _pair_rate(timer, nbytes, nccl_exchange)}

    try:
        rates["copy_engine"] = _copy_engine_rate(timer, device, send, peer if active else None)
    except Exception as e:  # noqa: BLE001 - the NCCL rate still gives a floor
        print(f"rank {rank}: copy-engine pair rate not measured: {e}", flush=True)
    return rates


def _copy_engine_rate(timer: Timer, device: torch.device, send: torch.Tensor, peer: int | None) -> float:
    """The library's peer mapping (CUDA IPC, opened in this rank's context with peer access):
    the copy engine writes straight into the partner's workspace. (Copies into tensors
    shared with torch's own CUDA IPC measured 32 GB/s on H200s: not a direct peer copy.)"""
    from cuda.bindings import driver

    from ..peer_memory import PeerWorkspace

    nbytes = send.numel()
    workspace = PeerWorkspace(device, nbytes, None, dist.get_rank(), dist.get_world_size())
    try:
        def exchange():
            if peer is not None:
                stream = torch.cuda.current_stream(device).cuda_stream
                (err,) = driver.cuMemcpyDtoDAsync(workspace.pointers[peer], send.data_ptr(), nbytes, stream)
                if err != driver.CUresult.CUDA_SUCCESS:
                    raise RuntimeError(f"cuMemcpyDtoDAsync: {err}")

        return _pair_rate(timer, nbytes, exchange)
    finally:
        torch.cuda.synchronize(device)
        dist.barrier()  # the partner has finished writing before anyone frees its workspace
        workspace.close()
