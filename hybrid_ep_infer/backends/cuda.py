"""The CUDA backend: kernels of the compiled library over NVLink peer memory.

Everything is allocated and mapped here, in the constructor; a call only launches
kernels on the current stream (no host sync, no allocation, no NCCL), so calls can
be captured in CUDA graphs. Outputs are views of the local workspace.
"""

from __future__ import annotations

import ctypes
import json

import torch

from .. import _native, placement, tuning
from ..calls import CombineArgs, DispatchArgs, DispatchOutputs
from ..config import CONTIGUOUS, BufferConfig
from ..errors import ErrorSnapshot
from ..peer_memory import PeerWorkspace
from .base import Backend

# The low-latency dispatch is built by default up to this max_tokens (its staging slots
# cost about what the combine partials do) and where its receive's plan tables fit in
# a block's shared memory with room to spare (the C library checks the device's limit).
LOW_LATENCY_MAX_TOKENS = 1024
LOW_LATENCY_SHARED_BUDGET = 160 * 1024


def low_latency_plan_table_bytes(config: BufferConfig) -> int:
    """Shared memory of the low-latency receive's plan tables (csrc/kernels/ll_dispatch_recv.cuh)."""
    W, E, L = config.world_size, config.num_experts, config.num_local_experts
    words = -(-config.max_tokens // 32)
    return 4 * (W * E + W * L + W * (L + 1) + W * L + E + W + (W * L + E) * words)


def low_latency_by_default(config: BufferConfig) -> bool:
    return (config.max_tokens <= LOW_LATENCY_MAX_TOKENS
            and low_latency_plan_table_bytes(config) <= LOW_LATENCY_SHARED_BUDGET)


# What every rank of a buffer must agree on: the workspace layout follows from these (a rank
# that differs would write into its peers at wrong offsets), and tuning is a collective.
_SHARED_FIELDS = ("world_size", "hidden", "max_tokens", "num_experts", "top_k", "payload_bytes", "has_scales",
                  "layout", "pad_multiple", "capacity", "low_latency", "ranks_per_node")


def _check_same_on_every_rank(desc: _native.BufferDesc, tune: bool, group) -> None:
    """Raises ValueError on every rank if any rank's buffer differs in a shared field (a collective)."""
    mine = {name: getattr(desc, name) for name in _SHARED_FIELDS} | {"tune": bool(tune)}
    gathered = [json.loads(b) for b in placement.all_gather_bytes(json.dumps(mine).encode(), group)]
    for rank, other in enumerate(gathered):
        differ = [f"{k}: rank 0 {gathered[0][k]}, rank {rank} {other[k]}" for k in mine if other[k] != gathered[0][k]]
        if differ:
            raise ValueError("the buffer must be built alike on every rank; " + ", ".join(differ))


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self, config: BufferConfig, group, device: torch.device, num_sms: int | None, timeout_s: float,
                 tune: bool = True, low_latency: bool | None = None, ranks_per_node: int = 0):
        if device.type != "cuda":
            raise ValueError(f"the CUDA backend needs a CUDA device, got {device}")
        if low_latency is None:
            low_latency = low_latency_by_default(config)
        self.config = config
        self.device = device
        c = config
        # The copy kernels' blocks wait on each other and on peers, so all of them, of every
        # rank on this GPU, must be resident at once: one SM each (placement.fit_num_sms).
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        uuids = placement.device_uuids(group, device)
        self.ranks_on_device = [r for r, uuid in enumerate(uuids) if uuid == uuids[config.rank]]
        num_sms = placement.fit_num_sms(num_sms, sm_count, placement.busiest_gpu_ranks(uuids), device)
        self.desc = _native.BufferDesc(
            size=ctypes.sizeof(_native.BufferDesc), version=_native.API_VERSION, rank=c.rank,
            world_size=c.world_size, hidden=c.hidden, max_tokens=c.max_tokens, num_experts=c.num_experts,
            top_k=c.top_k, payload_bytes=c.itemsize, has_scales=int(c.is_fp8),
            layout=0 if c.layout == CONTIGUOUS else 1, pad_multiple=c.pad_multiple, capacity=c.capacity,
            num_sms=num_sms, timeout_ns=int(timeout_s * 1e9), low_latency=int(low_latency),
            ranks_per_node=ranks_per_node)
        _check_same_on_every_rank(self.desc, tune, group)
        lib = self._native_library()
        self.layout = _native.workspace_layout(self.desc, lib)
        self.output_copies = 0  # dispatches that had to copy into a compiler's functional outputs
        self.context = _native.NativeContext(device, lib)
        self.workspace = None
        try:
            self.workspace = self._allocate_workspace(group)
            self.context.attach(self.desc, self.workspace.pointers)
            self._make_views()
            self.tuning = tuning.tune(self, group, self.desc.num_sms) if tune else self.context.get_tuning()
        except BaseException:
            self.close()
            raise

    def _native_library(self) -> _native.NativeLibrary:
        """The compiled library whose kernels this backend runs."""
        return _native.load_library()

    def _allocate_workspace(self, group) -> PeerWorkspace:
        """Every rank's workspace as mapped here (``pointers``, ``tensor()``, ``close()``)."""
        c = self.config
        return PeerWorkspace(self.device, self.layout.total_bytes, group, c.rank, c.world_size)

    def _make_views(self) -> None:
        c = self.config
        rows, L, H = c.row_shape, c.num_local_experts, c.hidden
        self.outputs = DispatchOutputs(
            hidden=self._view(self.layout.hidden, c.dtype, (*rows, H)),
            scales=self._view(self.layout.scales, torch.float32, (*rows, c.num_scale_blocks)) if c.is_fp8 else None,
            weights=self._view(self.layout.weights, torch.float32, rows),
            row_expert=self._view(self.layout.row_expert, torch.int32, rows),
            tokens_per_expert=self._view(self.layout.tokens_per_expert, torch.int32, (L,)),
            offsets=self._view(self.layout.offsets, torch.int32, (L + 1,)) if c.layout == CONTIGUOUS else None)
        self.combine_out = self._view(self.layout.combine_out, torch.bfloat16, (c.max_tokens, H))

    def _view(self, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
        count = 1
        for d in shape:
            count *= d
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        return self.workspace.tensor(offset, nbytes).view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return self.layout.total_bytes

    def dispatch(self, args: DispatchArgs, *, into: DispatchOutputs | None = None) -> None:
        """Kernels write the workspace (peers write into it directly). Where ``into`` is
        another set of tensors (a compiler's functional copies), the results are copied
        there too. The plan of the dispatch stays in the workspace: no state to return."""
        self.context.dispatch(args)
        self._copy_outputs_into(into)
        return None

    def _copy_outputs_into(self, into: DispatchOutputs | None) -> None:
        if into is not None:
            for target, source in zip(into, self.outputs):
                if target is not None and target.data_ptr() != source.data_ptr():
                    target.copy_(source)
                    self.output_copies += 1

    def combine(self, args: CombineArgs, state: None) -> torch.Tensor:
        """Reads the plan and weights of the latest dispatch from the workspace, never
        ``args.dispatched``: where those are functional copies, dispatch copied the same
        values into them. With ``args.topk_idx``, the kernel also runs the stale-combine
        check (ops.py)."""
        self.context.combine(args)
        return args.out

    @property
    def supports_split(self) -> bool:
        return bool(self.desc.low_latency)

    def dispatch_send(self, args: DispatchArgs) -> None:
        """The low-latency send kernel: routing and rows into the peers' staging slots."""
        self.context.dispatch(args, half="send")
        return None

    def dispatch_recv(self, sent: None, *, into: DispatchOutputs | None = None) -> None:
        """The low-latency receive kernel: waits for the peers' routing and rows, places them
        (then copied into ``into`` where that is a compiler's functional copies, as in :meth:`dispatch`)."""
        self.context.dispatch_recv()
        self._copy_outputs_into(into)
        return None

    def combine_send(self, args: CombineArgs, state: None) -> torch.Tensor:
        """The reducers' kernel: partial sums into their sources' workspaces."""
        self.context.combine(args, half="send")
        return args.out

    def combine_recv(self, out: torch.Tensor) -> torch.Tensor:
        """The gatherers' kernel: waits for the partials of every token, sums them into ``out``."""
        self.context.combine_recv()
        return out

    def take_errors(self) -> ErrorSnapshot:
        return self.context.take_errors()

    def timed_out(self) -> ErrorSnapshot | None:
        """The error block if a peer wait has timed out (no sync, no clearing)."""
        return self.context.peek_timeout()

    def close(self) -> None:
        if self.workspace is not None or self.context is not None:
            torch.cuda.synchronize(self.device)  # nothing of ours may still run on this memory
        self.outputs = self.combine_out = None  # views of the memory freed below
        if self.workspace is not None:
            self.workspace.close()
            self.workspace = None
        if self.context is not None:
            self.context.close()
            self.context = None
