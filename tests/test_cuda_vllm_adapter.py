"""The vLLM adapter (HybridEPPrepareAndFinalize) on the CUDA backend, 2 GPUs: a whole MoE
layer (prepare -> torch experts on the returned rows and ids -> finalize; also through
prepare_async/finalize_async with other work between the halves) captured in one
CUDA graph and replayed with fresh routing, tokens and weights each time, interleaved
with eager calls. Every result equals, bit for bit, the same adapter on the reference
backend (over NCCL, same GPUs), and the layer computed without expert parallelism
(fp32: within 1e-6; bf16: within bf16 rounding). bf16 with global ids (GPU experts that
use ``expert_map``) and float32 (the exact path) with local ids (CPU-style experts); a
second test: the BatchedExperts format and block-FP8 inputs (the experts dequantize).

vLLM need not be installed: where it is absent, a thin stand-in for the few names the
adapter imports from ``vllm.model_executor.layers.fused_moe.modular_kernel`` is put in
``sys.modules`` of the worker processes (never of the pytest process).
"""

import dataclasses
import enum
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from dist_utils import check, gpu_world_sizes, rank_device, spawn_gpu

H, T, E_PER_RANK, K = 256, 64, 4, 2
REPLAYS = 20
MK = "vllm.model_executor.layers.fused_moe.modular_kernel"


def install_vllm_stand_in() -> None:
    """Fake ``modular_kernel`` (and its parent packages) unless real vLLM is importable."""
    if MK in sys.modules or importlib.util.find_spec("vllm") is not None:
        return  # real vLLM, or the stand-in from an earlier call of this process

    class FusedMoEActivationFormat(enum.Enum):
        Standard = "standard"
        BatchedExperts = "batched_experts"

    @dataclasses.dataclass
    class ExpertTokensMetadata:
        expert_num_tokens: torch.Tensor
        expert_num_tokens_cpu: torch.Tensor | None

    class FusedMoEPrepareAndFinalizeModular:
        def post_init_setup(self, fused_experts) -> None:
            return None

    parent = None
    for name in ("vllm", "vllm.model_executor", "vllm.model_executor.layers", "vllm.model_executor.layers.fused_moe"):
        module = types.ModuleType(name)
        module.__path__ = []  # a package
        sys.modules[name] = module
        if parent is not None:
            setattr(parent, name.rsplit(".", 1)[1], module)
        parent = module
    mk = types.ModuleType(MK)
    mk.FusedMoEActivationFormat = FusedMoEActivationFormat
    mk.ExpertTokensMetadata = ExpertTokensMetadata
    mk.FusedMoEPrepareAndFinalizeModular = FusedMoEPrepareAndFinalizeModular
    sys.modules[MK] = mk
    parent.modular_kernel = mk


def import_adapter():
    install_vllm_stand_in()
    integrations = Path(__file__).resolve().parent.parent / "integrations"
    if (integrations / "hybrid_ep_infer_vllm").is_dir():  # a source checkout: test this copy, not an installed one
        sys.path.insert(0, str(integrations))
    from hybrid_ep_infer_vllm import exact_fp32
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    return HybridEPPrepareAndFinalize, exact_fp32


def expert_fn(x: torch.Tensor, expert: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Expert ``e`` of a row: ``silu(x * A[e]) * (x * B[e])`` in fp32. Element-wise only, so
    eager and graph-replayed runs (and any row count) give the same bits."""
    xf = x.float()
    return torch.nn.functional.silu(xf * A[expert]) * (xf * B[expert])


def layer(pf, x, topk_weights, topk_ids, A, B, quant_config=None, split=False):
    """One vLLM-style MoE layer through the adapter, as FusedMoEKernel drives it (``split``:
    through prepare_async/finalize_async, with other work on the stream between each send
    and its hook, as vLLM's shared experts)."""
    from hybrid_ep_infer_vllm import fp8_input

    E = A.shape[0]
    if split:
        hook, receiver = pf.prepare_async(x, topk_weights, topk_ids, E, None, False, quant_config, False)
        other_work(x)
        hook()
        a1q, scales, meta, ids, ones = receiver()
    else:
        a1q, scales, meta, ids, ones = pf.prepare(x, topk_weights, topk_ids, E, None, False, quant_config, False)
    if scales is not None:  # block-FP8 rows: what FP8 experts compute on
        a1q = fp8_input.dequantize(a1q, scales)
    first = pf.buffer.rank * pf.buffer.num_local_experts
    if pf.batched:  # [L, cap_e, H]: row block e belongs to local expert e
        expert = torch.arange(first, first + a1q.shape[0], device=x.device).unsqueeze(1)
        ones = 1.0
    else:
        expert = ids[:, 0].long() + (first if pf.local_ids else 0)
    # Rows that are not written carry any id and garbage rows: computed, never read.
    y = (expert_fn(a1q, expert.clamp(0, E - 1), A, B) * ones).to(x.dtype)
    out = torch.empty_like(x)
    if split:
        hook, receiver = pf.finalize_async(out, y, topk_weights, topk_ids, False, None)
        other_work(x)
        hook()
        receiver()
    else:
        pf.finalize(out, y, topk_weights, topk_ids, False, None)
    return out


def other_work(x: torch.Tensor) -> torch.Tensor:
    """Work of the stream's between a send and its receive (reads x, writes a new tensor)."""
    xf = x.float()
    return xf @ xf.T


def no_expert_parallelism(x, topk_weights, topk_ids, A, B) -> torch.Tensor:
    """The same layer on this rank's tokens with every expert here, fp32, ascending k."""
    total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for k in range(topk_ids.shape[1]):
        ids = topk_ids[:, k]
        term = torch.where((ids >= 0).unsqueeze(1), expert_fn(x, ids.clamp(min=0), A, B), 0.0)
        total = total + term * topk_weights[:, k : k + 1]
    return total


def run(rank: int, world_size: int, dtype: torch.dtype, local_ids: bool, layout: str = "contiguous",
        fp8: bool = False, split: bool = False) -> None:
    from hybrid_ep_infer import EPBuffer

    HybridEPPrepareAndFinalize, exact_fp32 = import_adapter()
    from hybrid_ep_infer_vllm import fp8_input

    device = rank_device(rank)
    E = E_PER_RANK * world_size
    hidden, payload = (H, fp8_input.FP8) if fp8 else exact_fp32.buffer_format(H, dtype)
    # The two fields of vLLM's FusedMoEQuantConfig the adapter reads for block FP8.
    quant = types.SimpleNamespace(quant_dtype=fp8_input.FP8, block_shape=[128, 128], a1_scale=None) if fp8 else None
    kw = dict(hidden=hidden, max_tokens=T, num_experts=E, top_k=K, dtype=payload, layout=layout, timeout_s=20.0)
    cud = EPBuffer(backend="cuda", **kw)
    ref = EPBuffer(backend="reference", device=device, **kw)
    pf_cuda = HybridEPPrepareAndFinalize(cud, activation_dtype=dtype, local_ids=local_ids)
    assert not split or pf_cuda.supports_async(), "a low-latency CUDA buffer has split halves"
    pf_ref = HybridEPPrepareAndFinalize(ref, activation_dtype=dtype, local_ids=local_ids)

    g = torch.Generator().manual_seed(0)  # the same experts on every rank
    A = (torch.randn(E, H, generator=g) / 2).to(device)
    B = torch.randn(E, H, generator=g).to(device)
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.empty(T, H, dtype=dtype, device=device)
    topk_weights = torch.empty(T, K, dtype=torch.float32, device=device)
    topk_ids = torch.empty(T, K, dtype=torch.int64, device=device)

    def load() -> None:
        """Fresh contents in the captured input tensors: tokens, routing, padding rows."""
        x.copy_(torch.randn(T, H, generator=gen).to(dtype))
        weights, ids = torch.rand(T, E, generator=gen).softmax(dim=-1).topk(K)
        ids[torch.rand(T, K, generator=gen) < 0.1] = -1  # some slots route nowhere
        padding = int(torch.randint(0, T // 4, (1,), generator=gen))
        ids[T - padding :], weights[T - padding :] = -1, 0.0  # padding rows, as vLLM's routers make them
        topk_ids.copy_(ids)
        topk_weights.copy_(weights)

    def compare(got: torch.Tensor, what: str) -> None:
        want = layer(pf_ref, x, topk_weights, topk_ids, A, B, quant)
        x_in = fp8_input.dequantize(*fp8_input.quantize(x)) if fp8 else x  # what the experts see
        exact = no_expert_parallelism(x_in, topk_weights, topk_ids, A, B)
        torch.cuda.synchronize()
        assert torch.equal(got, want), f"rank {rank} {what}: CUDA != reference, {(got != want).sum().item()} differ"
        err = ((got.double() - exact.double()).norm() / exact.double().norm()).item()
        bound = 1e-6 if dtype == torch.float32 else 1e-2
        assert err <= bound, f"rank {rank} {what}: relative error {err} against no expert parallelism"

    load()
    compare(layer(pf_cuda, x, topk_weights, topk_ids, A, B, quant, split).clone(), "eager warm-up")
    cud.check_errors(synchronize=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = layer(pf_cuda, x, topk_weights, topk_ids, A, B, quant, split)
    for i in range(REPLAYS):
        load()
        graph.replay()
        compare(graph_out.clone(), f"replay {i}")
        if i % 5 == 4:  # an eager call between replays
            load()
            compare(layer(pf_cuda, x, topk_weights, topk_ids, A, B, quant, split).clone(), f"eager after replay {i}")
    cud.check_errors(synchronize=True)
    ref.check_errors()
    torch.cuda.synchronize()
    cud.close()
    ref.close()


def worker(rank: int, world_size: int) -> None:
    with check("adapter layer in a CUDA graph", f"W={world_size}, bf16, global ids"):
        run(rank, world_size, torch.bfloat16, local_ids=False)
    with check("adapter layer in a CUDA graph", f"W={world_size}, fp32, local ids"):
        run(rank, world_size, torch.float32, local_ids=True)
    with check("adapter layer through prepare_async/finalize_async in a CUDA graph", f"W={world_size}, bf16"):
        run(rank, world_size, torch.bfloat16, local_ids=False, split=True)
    with check("adapter layer through prepare_async/finalize_async in a CUDA graph", f"W={world_size}, fp32"):
        run(rank, world_size, torch.float32, local_ids=True, split=True)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", gpu_world_sizes((2,)))
def test_vllm_adapter_layer_in_a_cuda_graph(world_size):
    spawn_gpu(world_size, worker)


def formats_worker(rank: int, world_size: int) -> None:
    with check("adapter layer in a CUDA graph", f"W={world_size}, bf16, batched"):
        run(rank, world_size, torch.bfloat16, local_ids=False, layout="batched")
    with check("adapter layer in a CUDA graph", f"W={world_size}, block-FP8 input, contiguous"):
        run(rank, world_size, torch.bfloat16, local_ids=False, fp8=True)
    with check("adapter layer in a CUDA graph", f"W={world_size}, block-FP8 input, batched"):
        run(rank, world_size, torch.bfloat16, local_ids=False, layout="batched", fp8=True)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", gpu_world_sizes((2,)))
def test_vllm_adapter_batched_and_fp8_in_a_cuda_graph(world_size):
    """The same for the BatchedExperts format and block-FP8 inputs (quantized in plain torch
    here, where vLLM is absent; vLLM's own kernel where it is installed)."""
    spawn_gpu(world_size, formats_worker)
