"""Where ranks run: the rank -> GPU map of launchers, and ranks that share one GPU.

Several ranks may share a GPU (processes under CUDA MPS): CUDA IPC between them works
and the CUDA backend runs unchanged. Its kernels' blocks wait for peers, so every
block of every rank on the GPU must be resident at once; the SM budget per rank is
therefore the GPU's SMs divided by the ranks that share it (:func:`fit_num_sms`).
Without MPS the processes time-slice the GPU: correct, but about 100 times slower.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Blocks of each copy kernel when the caller names none (one rank per GPU).
DEFAULT_NUM_SMS = 24


def gpu_for_rank(local_rank: int, num_gpus: int) -> int:
    """The GPU of a launcher's ``local_rank``: one per GPU, round-robin when ranks
    outnumber GPUs (then several share one; start CUDA MPS first)."""
    if num_gpus < 1:
        raise ValueError("no CUDA GPU to place ranks on")
    return local_rank % num_gpus


def collective_device(group=None) -> torch.device:
    """Where ``group``'s collectives take their tensors: the current CUDA device for NCCL,
    the CPU for gloo (also the group of ranks that share a GPU, where NCCL refuses to run)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_bytes(blob: bytes, group) -> list[bytes]:
    """Every rank's ``blob`` (any lengths), in rank order. A collective over ``group``.

    Plain tensor collectives (``all_gather_object`` needs numpy on some torch builds) on
    :func:`collective_device`.
    """
    world = dist.get_world_size(group)
    device = collective_device(group)
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    longest = max(int(s.item()) for s in sizes)
    mine = torch.zeros(max(longest, 1), dtype=torch.uint8)
    if blob:
        mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    mine = mine.to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    return [bytes(g[: int(s.item())].cpu().tolist()) for g, s in zip(gathered, sizes)]


def device_uuids(group, device: torch.device) -> list[bytes]:
    """Every rank's GPU (its UUID), in rank order. A collective over ``group``."""
    return all_gather_bytes(str(torch.cuda.get_device_properties(device).uuid).encode(), group)


def busiest_gpu_ranks(uuids: list[bytes]) -> int:
    """The most ranks that share one GPU: the same number on every rank of the group, so
    every rank sizes its kernels alike (and raises alike)."""
    return max(uuids.count(u) for u in uuids)


def fit_num_sms(requested: int | None, sm_count: int, sharing_ranks: int, device) -> int:
    """Blocks per copy kernel such that the blocks of ``sharing_ranks`` ranks on one GPU
    of ``sm_count`` SMs are resident at once.

    ``None``: :data:`DEFAULT_NUM_SMS`, lowered to ``sm_count // sharing_ranks``. An
    explicit value that does not fit raises ``ValueError`` naming the numbers (a kernel
    whose blocks cannot all be resident would wait for its peers until the timeout).
    """
    budget = sm_count // sharing_ranks
    if requested is None:
        if budget < 1:
            raise ValueError(f"{sharing_ranks} ranks share {device}, which has {sm_count} SMs: at least one SM per "
                             f"rank is needed")
        return min(DEFAULT_NUM_SMS, budget)
    if requested > sm_count:
        raise ValueError(f"num_sms={requested} exceeds the {sm_count} SMs of {device}")
    if requested * sharing_ranks > sm_count:
        raise ValueError(f"num_sms={requested} does not fit: {sharing_ranks} ranks share {device} "
                         f"({sm_count} SMs), and every rank's blocks must be resident at once "
                         f"({sharing_ranks} x {requested} = {requested * sharing_ranks} > {sm_count}); "
                         f"pass num_sms <= {budget} or None")
    return requested
