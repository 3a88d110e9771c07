"""The vLLM config objects the adapter tests build. vLLM is imported inside the functions:
test modules import this one even where vLLM is absent (their tests then skip)."""

from __future__ import annotations

import torch


def expert_parallel(rank: int, world_size: int):
    """DP = EP = world_size on the default all-gather/reduce-scatter path (what the plugin takes over)."""
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig

    return FusedMoEParallelConfig(tp_size=1, pcp_size=1, dp_size=world_size, ep_size=world_size, tp_rank=0,
                                  pcp_rank=0, dp_rank=rank, ep_rank=rank, sp_size=1, use_ep=True,
                                  all2all_backend="allgather_reducescatter", enable_eplb=False)


def no_parallel():
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig

    return FusedMoEParallelConfig.make_no_parallel()


def moe_config(parallel, *, num_experts: int, local_experts: int, top_k: int, hidden: int, intermediate: int,
               max_tokens: int, dtype: torch.dtype = torch.bfloat16, **extra):
    """A SiLU top-k MoE layer's FusedMoEConfig on the CPU; ``extra`` goes to FusedMoEConfig."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, RoutingMethodType

    return FusedMoEConfig(num_experts=num_experts, experts_per_token=top_k, hidden_dim=hidden,
                          intermediate_size=intermediate, num_local_experts=local_experts,
                          num_logical_experts=num_experts, activation=MoEActivation.SILU, device="cpu",
                          routing_method=RoutingMethodType.TopK, moe_parallel_config=parallel, in_dtype=dtype,
                          max_num_tokens=max_tokens, **extra)
