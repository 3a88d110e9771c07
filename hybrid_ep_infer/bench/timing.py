"""One sample = one call (or graph replay) timed on every rank after an L2 flush (unless
``flush_l2`` is off) and a device barrier; the sample's time is the slowest rank's. We
report the median and the p99.

The barrier runs on the GPUs, so every GPU starts the timed call at nearly the same
moment; a short GPU sleep after it keeps each GPU busy while the host enqueues the call.
(A host barrier would leave the ranks' launch skew inside every sample.) Over NCCL it is a
one-element all-reduce enqueued with no host wait. Over gloo (ranks sharing a GPU, where
NCCL refuses to run) it is :class:`StreamBarrier`: stream memory operations on peer-mapped
flags; where the driver lacks them, a host barrier, said so in a printed warning and in
:attr:`Timer.barrier`. On the CPU, samples start after a gloo barrier."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

# A CUDA sample over gloo that has not finished after this long raises (a rank missing from
# the stream barrier would otherwise hang the host); above the buffer's own 100 s bound on
# every wait for a peer, so the library reports its timeouts first.
SAMPLE_TIMEOUT_S = 150.0


class StreamBarrier:
    """A device barrier for a group without NCCL, where ranks may share a GPU.

    Every rank owns ``world_size`` 32-bit flags in a :class:`PeerWorkspace` (zeroed, mapped
    by every rank). Barrier number ``e`` (1, 2, ...) on rank s enqueues, on the current
    stream, a write of ``e`` to flag s of every rank's workspace (its own included;
    ``cuStreamWriteValue32``, ordered after the stream's earlier work), then a wait until each
    of its own flags is >= e (``cuStreamWaitValue32``, cyclic compare). Work enqueued after it
    starts once every rank's stream has reached barrier e; the host does not wait. Every rank
    must call it the same number of times. Construction is a collective over ``group``.
    """

    def __init__(self, device: torch.device, group=None):
        from cuda.bindings import driver

        from ..peer_memory import PeerWorkspace

        self._driver = driver
        self.device = device
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        # 2 MiB, not 4 x world_size bytes: an allocation of its own pages, as the library's
        # workspaces are (the driver may pack small allocations together, and an IPC
        # mapping then need not start at the flags).
        self.workspace = PeerWorkspace(device, max(4 * self.world_size, 2 * 2**20), group, self.rank,
                                       self.world_size)
        self.epoch = 0

    def _check(self, result, what: str) -> None:
        (err,) = result
        if err != self._driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"rank {self.rank}: {what} failed: {err}")

    def _write(self, stream: int, address: int, value: int) -> None:
        flags = int(self._driver.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT)
        self._check(self._driver.cuStreamWriteValue32(stream, address, value, flags), "cuStreamWriteValue32")

    def _wait(self, stream: int, address: int, value: int) -> None:
        flags = int(self._driver.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ)
        self._check(self._driver.cuStreamWaitValue32(stream, address, value, flags), "cuStreamWaitValue32")

    def probe(self) -> None:
        """Local: enqueue a write of 0 to this rank's own flag and a wait for >= 0 (both
        no-ops), then synchronize; raises where the driver lacks stream memory operations."""
        stream = torch.cuda.current_stream(self.device).cuda_stream
        own = self.workspace.pointers[self.rank] + 4 * self.rank
        self._write(stream, own, 0)
        self._wait(stream, own, 0)
        torch.cuda.synchronize(self.device)

    def __call__(self) -> None:
        self.epoch += 1
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for base in self.workspace.pointers:  # my flag (index rank) in every rank's workspace
            self._write(stream, base + 4 * self.rank, self.epoch)
        local = self.workspace.pointers[self.rank]
        for peer in range(self.world_size):  # every rank's flag in mine
            self._wait(stream, local + 4 * peer, self.epoch)

    def close(self) -> None:
        """Collective: no rank frees its flags while a peer may still write them."""
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        self.workspace.close()


def _stream_barrier_or_none(device: torch.device, group) -> StreamBarrier | None:
    """A :class:`StreamBarrier` if every rank can use one, else None (every rank agrees;
    each failing rank prints why)."""
    rank = dist.get_rank(group)

    def agree(ok: bool) -> bool:
        flag = torch.tensor([int(ok)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    try:
        import cuda.bindings.driver  # noqa: F401
        importable = True
    except ImportError as e:
        print(f"rank {rank}: no stream barrier: {e}", flush=True)
        importable = False
    if not agree(importable):
        return None
    barrier = StreamBarrier(device, group)  # a collective: it raises loudly, on every rank, if it fails
    try:
        barrier.probe()
        ok = True
    except RuntimeError as e:
        print(f"rank {rank}: no stream barrier: {e}", flush=True)
        ok = False
    if agree(ok):
        return barrier
    barrier.close()
    return None


class Timer:
    """``samples`` timed calls after ``warmup`` untimed ones (default: 5 on GPUs, 1 on the
    CPU), on ``device``, over ``group``'s ranks (default: the world group). Construction is
    a collective over ``group`` when it is a gloo group on GPUs (the stream barrier);
    :meth:`close` then is too."""

    def __init__(self, device: torch.device, samples: int, warmup: int | None = None, group=None,
                 flush_l2: bool = True):
        self.device = device
        self.samples = samples
        self.cuda = device.type == "cuda"
        self.warmup = warmup if warmup is not None else (5 if self.cuda else 1)
        self.group = group
        # NCCL reduces CUDA tensors; gloo (the CPU, and ranks sharing a GPU) CPU tensors.
        self.nccl = dist.get_backend(group) == "nccl"
        # Larger than any L2 (50-60 MB on H100/H200), rewritten before every sample. Without it
        # (flush_l2=False) a sample finds the kernels' code and data as the previous one left them.
        self._flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if self.cuda and flush_l2 else None
        self._barrier = torch.zeros(1, dtype=torch.float32, device=device) if self.cuda and self.nccl else None
        self._stream_barrier = None
        if not self.cuda:
            self.barrier = "gloo barrier on the host"
        elif self.nccl:
            self.barrier = "device barrier (NCCL all-reduce)"
        else:
            self._stream_barrier = _stream_barrier_or_none(device, group)
            if self._stream_barrier is not None:
                self.barrier = "device barrier (stream memory operations)"
            else:
                self.barrier = "gloo barrier on the host: launch skew between ranks is inside every sample"
                if dist.get_rank(group) == 0:
                    print("WARNING: stream memory operations are unavailable, so CUDA samples start after a "
                          "host barrier: the ranks' launch skew lands inside every sample", flush=True)

    def close(self) -> None:
        """Collective where construction was; idempotent."""
        if self._stream_barrier is not None:
            self._stream_barrier.close()
            self._stream_barrier = None

    def start_sample(self) -> None:
        """What comes before each timed CUDA sample: a host sync, the L2 flush (unless
        ``flush_l2`` is off), the device barrier and a GPU sleep (benchmarks/breakdown.py
        --bench-method profiles after it)."""
        torch.cuda.synchronize(self.device)  # nothing of the previous sample in flight
        if self._flush is not None:
            self._flush.zero_()
        if self._barrier is not None:
            dist.all_reduce(self._barrier, group=self.group)  # device barrier: the stream waits, the host does not
        elif self._stream_barrier is not None:
            self._stream_barrier()  # likewise, without NCCL
        else:
            torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group)
        # ~100 us of GPU sleep after the barrier, so the host has enqueued the call
        # before the clock starts (otherwise a late host lands in the sample).
        torch.cuda._sleep(200_000)

    def _finish(self, event) -> None:
        """Waits for ``event``; bounded where a stream barrier could leave it pending forever."""
        if self._stream_barrier is None:
            event.synchronize()
            return
        deadline = time.monotonic() + SAMPLE_TIMEOUT_S
        while not event.query():
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {dist.get_rank(self.group)}: a timed sample did not finish in "
                                   f"{SAMPLE_TIMEOUT_S:.0f} s (a rank missing from the stream barrier?)")
            time.sleep(1e-4)

    def _one(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start_sample()
            start.record()
            fn()
            end.record()
            self._finish(end)
            return start.elapsed_time(end) * 1e3
        dist.barrier(group=self.group)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6

    def measure(self, fn) -> tuple[float, float]:
        """(median, p99) in microseconds of the per-sample maximum over ranks."""
        for _ in range(self.warmup):
            fn()
        local = torch.tensor([self._one(fn) for _ in range(self.samples)], dtype=torch.float64)
        slowest = local.to(self.device) if self.nccl and self.cuda else local
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=self.group)
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
    if dist.get_backend() != "nccl":
        raise RuntimeError("the NVLink pair rates need an NCCL group of one rank per GPU; ranks that share a "
                           "GPU (gloo) have no NVLink between them to measure")
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
