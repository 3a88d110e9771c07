"""vLLM modular-MoE prepare/finalize on an :class:`hybrid_ep_infer.EPBuffer`.

Standard activation format: ``prepare`` returns the buffer's expert-major rows (one row
per valid (token, expert) pair, plus padding), one *global* expert id per row and
all-ones weights, so any stock Standard-format experts kernel computes each row with its
one expert. ``finalize`` hands the expert outputs to the buffer's combine, which applies
the routing weights with the SPEC's fixed-order arithmetic and returns the reduced
``[m, H]`` tokens (``output_is_reduced`` is True). No host sync on the CUDA backend, so
vLLM can capture the layer in its CUDA graphs; every replay dispatches fresh routing.

Rows that are not written (padding, unused capacity) get the id of an expert on another
rank where there is one, so experts kernels that map ids through ``expert_map`` skip them
(-1 would index ``expert_map[-1]``); with a single rank they get -1.

Checked against vLLM 0.32.0 (see docs/VLLM_NOTES.md). Not yet: FP8 block-scale inputs,
the BatchedExperts format, async prepare/finalize.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk

from hybrid_ep_infer import EPBuffer


class HybridEPPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """Prepare = :meth:`EPBuffer.dispatch`; finalize = :meth:`EPBuffer.combine`.

    One buffer may serve every MoE layer of a model with the same (hidden, dtype, max
    tokens): layers run one after another, and each finalize consumes the dispatch of
    its own prepare.
    """

    def __init__(self, buffer: EPBuffer):
        super().__init__()
        if buffer.config.layout != "contiguous":
            raise ValueError("the Standard activation format needs a contiguous-layout buffer")
        self.buffer = buffer
        self._handle = None
        # Id given to rows that are not written: an expert of another rank (see module doc).
        world, local = buffer.world_size, buffer.num_local_experts
        self._unused_row_id = ((buffer.rank + 1) % world) * local if world > 1 else -1

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
            raise NotImplementedError("hybrid_ep_infer's vLLM adapter does not quantize inputs yet (bf16 only)")
        if apply_router_weight_on_input:
            if topk_ids.shape[1] != 1:
                raise ValueError("apply_router_weight_on_input needs top_k == 1")
            a1 = (a1 * topk_weights.to(a1.dtype)).contiguous()
        result = self.buffer.dispatch(a1.contiguous(), topk_ids.contiguous(), topk_weights.float().contiguous())
        self._handle = (result.handle, apply_router_weight_on_input)
        L = self.buffer.num_local_experts
        row_ids = torch.where(result.row_expert >= 0, result.row_expert + self.buffer.rank * L,
                              self._unused_row_id).unsqueeze(1)
        ones = torch.ones_like(result.weights, dtype=torch.float32).unsqueeze(1)  # weights are applied by combine
        meta = mk.ExpertTokensMetadata(expert_num_tokens=result.tokens_per_expert, expert_num_tokens_cpu=None)
        return result.hidden, None, meta, row_ids, ones

    def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                 weight_and_reduce_impl) -> None:
        if self._handle is None:
            raise RuntimeError("finalize without a matching prepare")
        handle, weights_on_input = self._handle
        self._handle = None
        y = fused_expert_output.reshape(-1, self.buffer.config.hidden)
        if y.dtype != torch.bfloat16 or not y.is_contiguous():
            y = y.to(torch.bfloat16).contiguous()
        # Each row holds one expert's output times weight 1 (we returned ones), so the
        # weighting and the per-token sum are combine's, whatever weight_and_reduce_impl is.
        self.buffer.combine(y, handle, out=output, weighted=not weights_on_input)
