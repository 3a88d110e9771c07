"""The CUDA backend across simulated nodes (``EPBuffer(ranks_per_node=G)``,
``backends/multinode.py``, docs/MULTINODE.md section 9): W ranks on one GPU under CUDA MPS
split into nodes of G ranks. A rank writes its node's ranks with stores and every other
rank only through NVSHMEM puts with signals (on one GPU NVSHMEM carries them over its P2P
path): this checks the protocol and the bits, not a network.

Bit for bit against the reference backend, over test_cuda_low_latency's cases: the
low-latency dispatch in one launch and in halves, combine in one launch and in halves,
error counts; the halves captured in a CUDA graph and replayed with fresh routing; a rank
that dispatches alone times out naming the routing phase and a peer.

GPU tests skip without a GPU or without the multi-node library.
"""

import os

import pytest
import torch
import torch.distributed as dist
from test_cuda_low_latency import cases, check_paths, expect_timeout, run_dispatch, run_split_graph

from hybrid_ep_infer import multinode

from dist_utils import gpu_world_sizes, launch, rank_device
from gpu_helpers import make_buffer, to_device
from moe_cases import Case, make_inputs

SPLITS = {2: [1], 4: [2, 1], 8: [4, 2]}  # world size -> ranks per simulated node (W = N x G)
LL_PATHS = ("low_latency", "split")  # the planned dispatch does not cross nodes


def needs_backend() -> None:
    """Skips without a GPU or the library; else sets NVSHMEM up for one host (the spawned
    ranks inherit the environment)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible here")
    loaded, reason = multinode.library_status()
    if not loaded:
        pytest.skip(reason)
    # Every buffer's workspace is in the symmetric heap, W PEs on one GPU.
    os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(max(int(os.environ.get("NVSHMEM_SYMMETRIC_SIZE", "0")), 512 << 20))
    os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")
    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
    os.environ.setdefault("NVSHMEM_DISABLE_NCCL", "1")


def smoke_worker(rank: int, world_size: int) -> None:
    multinode.init()
    for G in SPLITS[world_size]:
        for i, case in enumerate(cases(world_size)):
            check_paths(rank, case, ("int", "device", "default")[i % 3], paths=LL_PATHS, ranks_per_node=G)
        run_split_graph(rank, world_size, replays=24, ranks_per_node=G)
        if rank == 0:
            print(f"[multinode backend] W={world_size} as {world_size // G} x {G}: {len(cases(world_size))} cases "
                  "and 24 graph replays bit-exact", flush=True)
    dist.barrier()
    multinode.shutdown()


def missing_peer_worker(rank: int, world_size: int) -> None:
    """Rank 0 dispatches alone: it times out naming the routing phase and a peer. Then no
    collective runs on any rank (NVSHMEM's would wait for rank 0): only rank 0 frees its
    buffer, locally, and the runtime refuses to end."""
    multinode.init()
    device = rank_device(rank)
    case = Case(world_size=world_size, hidden=1024, max_tokens=32, num_experts=2 * world_size, top_k=2, seed=9)
    inp = to_device(make_inputs(case)[rank], device)
    buf = make_buffer(case, "cuda", timeout_s=2.0, low_latency=True, ranks_per_node=world_size // 2)
    run_dispatch(buf, inp, "low_latency")  # every rank: a normal call first
    torch.cuda.synchronize()
    buf.check_errors()
    dist.barrier()
    if rank == 0:
        expect_timeout(buf, lambda: run_dispatch(buf, inp, "low_latency"), "routing", "missing peer across nodes")
        buf.close()
        with pytest.raises(multinode.MultinodeError, match="timed out"):
            multinode.shutdown()
    dist.barrier()


def run_launch(world_size: int, worker, deadline_s: float) -> None:
    codes = launch(world_size, worker, backend="gloo", deadline_s=deadline_s)
    assert codes == [0] * world_size, f"exit codes {codes} (None: still running at the deadline)"


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [w for w in gpu_world_sizes((4,)) if w in SPLITS])
def test_multinode_backend_smoke(world_size):
    needs_backend()
    run_launch(world_size, smoke_worker, deadline_s=300)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [w for w in gpu_world_sizes((4,)) if w in SPLITS])
def test_multinode_backend_missing_peer(world_size):
    needs_backend()
    run_launch(world_size, missing_peer_worker, deadline_s=120)
