"""The multi-node engine's first step (hybrid_ep_infer.multinode, docs/MULTINODE.md):
NVSHMEM started from a torch.distributed group, and the network leg's exchange step
between rail peers of simulated nodes: W ranks split into N nodes of G (rank r is local
index r % G of node r // G; its rail peers share its local index). On one GPU every
rank is a PE under CUDA MPS and NVSHMEM carries the puts over its P2P path: this checks
the protocol and the bytes, not a network.

GPU tests skip without a GPU or without the multi-node library (built only where NVSHMEM
is found: the README's "Multi-node engine").
"""

import os
import time

import pytest
import torch
import torch.distributed as dist

from hybrid_ep_infer import PeerTimeoutError, multinode

from dist_utils import gpu_world_sizes, launch

SPLITS = {2: [1], 4: [2], 8: [4, 2]}  # world size -> ranks per simulated node (W = N x G)
NBYTES = 48 * 1024 + 16  # not a multiple of the blocks' shares: the last share is short


def rail_peers(rank: int, world_size: int, per_node: int) -> list[int]:
    return [r for r in range(world_size) if r % per_node == rank % per_node and r != rank]


def pattern(source: int, call: int, device) -> torch.Tensor:
    """What `source` sends in call `call`: bytes that differ per source, call and position."""
    i = torch.arange(NBYTES, device=device, dtype=torch.int64)
    return ((i * 7 + source * 31 + call * 13) % 251).to(torch.uint8)


def needs_engine() -> None:
    """Skips without a GPU or the library; else sets NVSHMEM up for one host (the spawned
    ranks inherit the environment)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none is visible here")
    loaded, reason = multinode.library_status()
    if not loaded:
        pytest.skip(reason)
    os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(64 << 20))  # W PEs share one GPU's memory
    os.environ.setdefault("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "lo")  # every rank on this host
    os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")  # simulated nodes: no NIC needed
    os.environ.setdefault("NVSHMEM_DISABLE_NCCL", "1")  # (NVSHMEM turns NCCL off under MPS anyway, with a warning)


def exchange_worker(rank: int, world_size: int, per_node: int, replays: int) -> None:
    multinode.init()
    peers = rail_peers(rank, world_size, per_node)
    device = torch.device("cuda", torch.cuda.current_device())
    with multinode.Exchange(NBYTES, peers, blocks_per_peer=3, timeout_s=20.0) as ex:
        def check(call: int, what: str) -> None:
            torch.cuda.synchronize()
            ex.check_errors()
            for r in range(world_size):
                want = pattern(r, call, device) if r in peers else torch.zeros(NBYTES, dtype=torch.uint8, device=device)
                assert torch.equal(ex.recv[r], want), f"{what}: rank {rank}'s row of rank {r} (peers {peers})"
            dist.barrier()  # nobody starts the next call while a peer still reads this one

        for call in range(3):  # eager
            ex.send.copy_(pattern(rank, call, device))
            ex.run()
            check(call, f"eager call {call}")

        source = torch.empty(NBYTES, dtype=torch.uint8, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ex.send.copy_(source)
            ex.run()
        for call in range(3, 3 + replays):
            source.copy_(pattern(rank, call, device))
            torch.cuda.synchronize()
            graph.replay()
            check(call, f"graph replay {call - 3}")
        del graph
    multinode.shutdown()
    if rank == 0:
        print(f"[multinode exchange] W={world_size} as {world_size // per_node} x {per_node}: 3 eager calls and "
              f"{replays} graph replays bit-exact", flush=True)


def missing_peer_worker(rank: int, world_size: int, per_node: int) -> None:
    """Rank 0 runs one exchange more than its peers: it raises a timeout naming the
    network leg and one of its rail peers within the bound. (No collective runs after
    that, on any rank: NVSHMEM's collectives would wait for rank 0.)"""
    multinode.init()
    peers = rail_peers(rank, world_size, per_node)
    ex = multinode.Exchange(NBYTES, peers, timeout_s=2.0)
    ex.run()
    ex.check_errors()
    dist.barrier()
    if rank == 0:
        start = time.monotonic()
        ex.run()
        with pytest.raises(PeerTimeoutError) as info:
            ex.check_errors()
        elapsed = time.monotonic() - start
        assert 1.5 <= elapsed <= 30, f"timed out after {elapsed:.1f} s"
        assert info.value.peer in peers and "network leg" in info.value.phase, str(info.value)
        ex.close()  # local only after a timeout
        with pytest.raises(multinode.MultinodeError, match="timed out"):
            multinode.shutdown()
    dist.barrier()


def run_launch(world_size: int, worker, *args, deadline_s: float) -> None:
    codes = launch(world_size, worker, *args, backend="gloo", deadline_s=deadline_s)
    assert codes == [0] * world_size, f"exit codes {codes} (None: still running at the deadline)"


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", gpu_world_sizes((2,)))
def test_exchange_between_rail_peers(world_size):
    needs_engine()
    for per_node in SPLITS.get(world_size, [1]):
        run_launch(world_size, exchange_worker, per_node, 50, deadline_s=180)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", gpu_world_sizes((2,)))
def test_exchange_missing_peer(world_size):
    needs_engine()
    run_launch(world_size, missing_peer_worker, SPLITS.get(world_size, [1])[0], deadline_s=120)


def test_without_the_library_the_reason_is_given(monkeypatch, tmp_path):
    """CPU: where the library is missing, the module imports, says why, and refuses to start."""
    monkeypatch.setenv("HYBRID_EP_INFER_MN_LIBRARY", str(tmp_path / "missing.so"))
    multinode._load.cache_clear()
    try:
        loaded, reason = multinode.library_status()
        if loaded:  # a build with NVSHMEM is installed: then only the search order is checked
            assert "loaded" in reason
            return
        assert "NVSHMEM" in reason
        with pytest.raises(multinode.MultinodeError, match="NVSHMEM"):
            multinode.Exchange(16, [1])
    finally:
        multinode._load.cache_clear()
