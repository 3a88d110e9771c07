"""vLLM modular-MoE prepare/finalize on an :class:`hybrid_ep_infer.EPBuffer`.

Standard activation format: ``prepare`` returns the buffer's expert-major rows (one row
per valid (token, expert) pair, plus padding), one expert id per row and all-ones
weights, so any stock Standard-format experts kernel computes each row with its one
expert. ``finalize`` hands the expert outputs to the buffer's combine, which applies
the routing weights with the SPEC's fixed-order arithmetic and returns the reduced
``[m, H]`` tokens (``output_is_reduced`` is True). No host sync on the CUDA backend, so
vLLM can capture the layer in its CUDA graphs; every replay dispatches fresh routing.

Expert ids: experts kernels that map ids through ``expert_map`` (Triton and most GPU
kernels) get *global* ids, and rows that are not written (padding, unused capacity) get
the id of an expert on another rank, which they skip (-1 would index ``expert_map[-1]``;
with a single rank they get -1). vLLM's CPU experts ignore ``expert_map`` and index
their weights with the id as given, so they get *local* ids in ``[0, L)`` and rows that
are not written get 0: computed, never read (combine reads written rows only).
:meth:`post_init_setup` tells the two apart.

Activations are bf16 (the buffer's payload) or float32 (``activation_dtype``; a bf16
buffer of twice the hidden size, exact but several times the combine cost: see
:mod:`hybrid_ep_infer_vllm.exact_fp32`).

Checked against vLLM 0.32.0 (see docs/VLLM_NOTES.md). Not yet: FP8 block-scale inputs,
the BatchedExperts format, async prepare/finalize.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk

from hybrid_ep_infer import EPBuffer

from . import exact_fp32

# vLLM modules whose experts index weights with the ids as given (no expert_map):
# cpu_moe (CPUUnquantizedExperts and its x86/Arm/Power kinds), cpu_int4_moe.
_LOCAL_ID_MODULES = "vllm.model_executor.layers.fused_moe.experts.cpu_"


class _Pending(NamedTuple):
    """What finalize needs from the matching prepare."""

    handle: object
    weights_on_input: bool
    top_k: int
    weights: torch.Tensor | None = None  # float32 path: [m, K] routing weights, applied in finalize
    slots: torch.Tensor | None = None  # float32 path: [R] slot of each row (exact_fp32.row_slots)


class HybridEPPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """Prepare = :meth:`EPBuffer.dispatch`; finalize = :meth:`EPBuffer.combine`.

    One buffer may serve every MoE layer of a model with the same (hidden, dtype, max
    tokens): layers run one after another, and each finalize consumes the dispatch of
    its own prepare.

    Args:
        buffer: a contiguous-layout bf16 EPBuffer; for float32 activations its hidden
            is twice the model's (:func:`exact_fp32.buffer_format`).
        activation_dtype: the layer's activations, ``torch.bfloat16`` or ``torch.float32``.
        local_ids: hand the experts local (True) or global (False) ids; ``None``: decided
            by :meth:`post_init_setup` (global if it is never called).
    """

    def __init__(self, buffer: EPBuffer, *, activation_dtype: torch.dtype = torch.bfloat16,
                 local_ids: bool | None = None):
        super().__init__()
        c = buffer.config
        if c.layout != "contiguous":
            raise ValueError("the Standard activation format needs a contiguous-layout buffer")
        if c.dtype != torch.bfloat16:
            raise ValueError(f"the adapter does not quantize: it needs a bfloat16 buffer, got {c.dtype}")
        factor = exact_fp32.buffer_format(1, activation_dtype)[0]  # buffer hidden per model hidden
        if c.hidden % factor:
            raise ValueError(f"a {activation_dtype} layer needs a buffer of {factor}x its hidden size, got {c.hidden}")
        self.buffer = buffer
        self.activation_dtype = activation_dtype
        self.hidden = c.hidden // factor
        self.local_ids = bool(local_ids)
        self._ids_decided = local_ids is not None
        self._pending = None  # what finalize needs from the matching prepare
        # Id given to rows that are not written with global ids: an expert of another rank (see module doc).
        world, local = buffer.world_size, buffer.num_local_experts
        self._unused_row_id = ((buffer.rank + 1) % world) * local if world > 1 else -1

    def post_init_setup(self, fused_experts) -> None:
        """Called once by vLLM's ``FusedMoEKernel`` with its experts: pick global or local ids."""
        if not self._ids_decided:
            self.local_ids = not experts_use_expert_map(fused_experts)

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    def topk_indices_dtype(self) -> torch.dtype | None:
        return None  # int32 and int64 both work

    def max_num_tokens_per_rank(self) -> int | None:
        return self.buffer.config.max_tokens

    def num_dispatchers(self) -> int:
        return self.buffer.world_size

    def output_is_reduced(self) -> bool:
        return True

    def prepare(self, a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                quant_config, defer_input_quant):
        if num_experts != self.buffer.config.num_experts:
            raise ValueError(f"layer has {num_experts} experts; the buffer was built for "
                             f"{self.buffer.config.num_experts}")
        if getattr(quant_config, "quant_dtype", None) is not None:
            raise NotImplementedError("hybrid_ep_infer's vLLM adapter does not quantize inputs yet")
        if a1.dtype != self.activation_dtype:
            raise TypeError(f"activations are {a1.dtype}; this prepare/finalize was built for {self.activation_dtype}")
        if apply_router_weight_on_input:
            if topk_ids.shape[1] != 1:
                raise ValueError("apply_router_weight_on_input needs top_k == 1")
            a1 = a1 * topk_weights.to(a1.dtype)
        a1, topk_ids = a1.contiguous(), topk_ids.contiguous()
        top_k = topk_ids.shape[1]
        if self.activation_dtype == torch.float32:
            # Raw fp32 bytes as bf16 pairs; the dispatched "weights" are slot numbers (exact_fp32).
            result = self.buffer.dispatch(a1.view(torch.bfloat16), topk_ids,
                                          exact_fp32.slot_numbers(a1.shape[0], top_k, a1.device))
            hidden = result.hidden.view(torch.float32)
            weights = None if apply_router_weight_on_input else topk_weights.float()
            slots = exact_fp32.row_slots(result.row_expert, result.weights, top_k)
            self._pending = _Pending(result.handle, apply_router_weight_on_input, top_k, weights, slots)
        else:
            result = self.buffer.dispatch(a1, topk_ids, topk_weights.float().contiguous())
            hidden = result.hidden
            self._pending = _Pending(result.handle, apply_router_weight_on_input, top_k)
        ones = torch.ones_like(result.weights, dtype=torch.float32).unsqueeze(1)  # weights are applied in finalize
        meta = mk.ExpertTokensMetadata(expert_num_tokens=result.tokens_per_expert, expert_num_tokens_cpu=None)
        return hidden, None, meta, self._row_ids(result.row_expert), ones

    def _row_ids(self, row_expert: torch.Tensor) -> torch.Tensor:
        """``[R, 1]`` int32 expert id per row, local or global (module doc)."""
        if self.local_ids:
            return torch.where(row_expert >= 0, row_expert, 0).unsqueeze(1)
        offset = self.buffer.rank * self.buffer.num_local_experts
        return torch.where(row_expert >= 0, row_expert + offset, self._unused_row_id).unsqueeze(1)

    def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                 weight_and_reduce_impl) -> None:
        if self._pending is None:
            raise RuntimeError("finalize without a matching prepare")
        pending, self._pending = self._pending, None
        # Each row holds one expert's output times weight 1 (we returned ones), so the
        # weighting and the per-token sum are ours, whatever weight_and_reduce_impl is.
        y = fused_expert_output.reshape(-1, self.hidden)
        if self.activation_dtype == torch.float32:
            rows = exact_fp32.gather_slots(self.buffer, pending.handle, y.float(), pending.slots, pending.top_k)
            output.copy_(exact_fp32.weighted_sum(rows, pending.weights))
            return
        if y.dtype != torch.bfloat16 or not y.is_contiguous():
            y = y.to(torch.bfloat16).contiguous()
        self.buffer.combine(y, pending.handle, out=output, weighted=not pending.weights_on_input)


def experts_use_expert_map(fused_experts) -> bool:
    """Whether an experts object maps (global) ids through ``expert_map``."""
    supports = getattr(fused_experts, "supports_expert_map", None)  # defined by some vLLM experts
    if callable(supports):
        return bool(supports())
    return not any(cls.__module__.startswith(_LOCAL_ID_MODULES) for cls in type(fused_experts).__mro__)
