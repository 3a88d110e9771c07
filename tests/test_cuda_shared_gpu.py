"""Ranks that share a GPU (processes under CUDA MPS, or several ranks per GPU): the buffer
fits its SM budget to them, and an explicit num_sms that cannot fit is an error on every
rank (never a hang). Also runs with one rank per GPU, where nothing is shared."""

import pytest
import torch
import torch.distributed as dist

from hybrid_ep_infer import mapped_peer_buffers, placement

from dist_utils import check, gpu_count, gpu_world_sizes, rank_device, spawn_gpu
from gpu_helpers import make_buffer
from moe_cases import Case


def worker(rank: int, world_size: int) -> None:
    device = rank_device(rank)
    gpus = gpu_count()
    on_my_gpu = [r for r in range(world_size) if placement.gpu_for_rank(r, gpus) == device.index]
    busiest = max(sum(1 for r in range(world_size) if placement.gpu_for_rank(r, gpus) == g) for g in range(gpus))
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    case = Case(world_size=world_size, hidden=512, max_tokens=32, num_experts=2 * world_size, top_k=2)

    where = f"W={world_size} on {gpus} GPU(s), {busiest} rank(s) on the busiest"
    with check("default num_sms fits the ranks on this GPU", where):
        with make_buffer(case, "cuda") as buf:
            assert buf._backend.ranks_on_device == on_my_gpu, (buf._backend.ranks_on_device, on_my_gpu)
            assert buf.num_sms == min(placement.DEFAULT_NUM_SMS, sm_count // busiest), (buf.num_sms, busiest)
            assert buf.num_sms * busiest <= sm_count

    too_many = sm_count // busiest + 1
    if too_many <= sm_count:  # some value can be too many for the sharing ranks without exceeding the GPU
        with check(f"num_sms={too_many} is refused", where):
            with pytest.raises(ValueError) as info:
                make_buffer(case, "cuda", num_sms=too_many)
            message = str(info.value)
            assert f"num_sms={too_many}" in message and f"{busiest} ranks share" in message, message
            assert f"{busiest} x {too_many} = {busiest * too_many} > {sm_count}" in message, message
    dist.barrier()  # every rank raised, and none waits in a collective of a half-built buffer
    with check("no peer mappings left", where):
        assert mapped_peer_buffers() == 0
    if rank == 0:
        print(f"\n[shared GPU] W={world_size} on {gpus} GPU(s): {busiest} rank(s) per GPU, num_sms "
              f"{min(placement.DEFAULT_NUM_SMS, sm_count // busiest)} of {sm_count} SMs", flush=True)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", gpu_world_sizes((2,)))
def test_num_sms_fits_the_ranks_that_share_a_gpu(world_size):
    spawn_gpu(world_size, worker)
