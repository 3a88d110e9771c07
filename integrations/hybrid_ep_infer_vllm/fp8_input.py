"""FP8 block-scaled expert inputs: which vLLM quant configs ask for them, and the quantization.

vLLM's block-FP8 MoE layers (DeepSeek-style, ``FusedMoEQuantConfig.block_shape == [128, 128]``
or any ``[*, 128]``) quantize each token's activations in groups of 128 consecutive
elements: one fp32 scale per group (``[m, H / 128]``, row-major) and ``float8_e4m3fn``
values. That is exactly an FP8 :class:`~hybrid_ep_infer.EPBuffer`'s payload, whose scales
travel verbatim, and the quantization of a row depends on that row only, so quantizing
before dispatch gives the experts the same bits as quantizing after.

:func:`quantize` uses vLLM's own ``moe_kernel_quantize_input`` (what vLLM's other
prepare/finalize classes call) wherever it runs, so the experts see exactly what they
would see without expert parallelism, including DeepGEMM's power-of-two (UE8M0) scales
where vLLM picks them. vLLM's CPU build has no kernel for it, so on CPU a torch version
with the arithmetic of vLLM's torch reference (``QuantFP8`` group quantization,
``forward_native``) is used; the tests check the two agree bit for bit.
"""

from __future__ import annotations

import torch

GROUP = 128  # elements per scale: the SPEC's FP8 block, and vLLM's activation group
FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max
_MIN_SCALE = 1.0 / (_FP8_MAX * 512.0)  # vLLM's floor for a scale (all-zero groups)

try:  # absent where vLLM is replaced by a stand-in (the GPU adapter test)
    from vllm.model_executor.layers.fused_moe.utils import moe_kernel_quantize_input
except ImportError:
    moe_kernel_quantize_input = None


def wants_block_fp8(quant_config) -> bool:
    """Whether ``quant_config`` asks for dynamic FP8 inputs with 1x128 group scales."""
    block = getattr(quant_config, "block_shape", None)
    return (getattr(quant_config, "quant_dtype", None) == FP8 and block is not None and block[1] == GROUP
            and quant_config.a1_scale is None)


def describe(quant_config) -> str:
    """The input quantization of ``quant_config``, for error messages."""
    return (f"quant_dtype={quant_config.quant_dtype}, block_shape={quant_config.block_shape}, "
            f"per_act_token_quant={quant_config.per_act_token_quant}, "
            f"static a1_scale={quant_config.a1_scale is not None}")


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[*, H]`` (bf16/fp32, H a multiple of 128) -> FP8 ``[*, H]`` and fp32 scales ``[*, H/128]``."""
    if x.device.type != "cpu" and moe_kernel_quantize_input is not None:
        rows = x.reshape(-1, x.shape[-1])
        q, scales = moe_kernel_quantize_input(rows, None, FP8, False, [GROUP, GROUP])
        return q.view(x.shape), scales.view(*x.shape[:-1], -1)
    return quantize_torch(x)


def quantize_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` in plain torch: ``scale = max(amax(|group|) / 448, 1/(448*512))``,
    ``q = fp8(clamp(x / scale, -448, 448))``, all in fp32."""
    groups = x.float().unflatten(-1, (-1, GROUP))
    scales = (groups.abs().amax(dim=-1, keepdim=True) / _FP8_MAX).clamp(min=_MIN_SCALE)
    q = (groups / scales).clamp(-_FP8_MAX, _FP8_MAX).to(FP8)
    return q.flatten(-2), scales.squeeze(-1)


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 ``q * scale`` per 128-element group (tests and reference computations)."""
    return (q.float().unflatten(-1, (-1, GROUP)) * scales.unsqueeze(-1)).flatten(-2)
