"""vLLM modular-MoE prepare/finalize on an :class:`hybrid_ep_infer.EPBuffer`.

``prepare`` dispatches, ``finalize`` combines with the routing weights, applied with the
SPEC's fixed-order arithmetic (``output_is_reduced`` is True). Both go through the custom
ops (``hybrid_ep_infer.ops``), so the layer can be traced and compiled: where vLLM
compiles the MoE forward itself (on CPUs it calls it directly, so Dynamo traces
prepare/finalize), the ops' bodies, with their checks and the reference backend's host
reads, stay out of the graph, and nothing here reads a tensor on the host. No host sync
on the CUDA backend, so vLLM can capture the layer in its CUDA graphs; every replay
dispatches fresh routing. The buffer's layout gives the activation format:

* **Standard** (contiguous buffer): the expert-major rows ``[R, H]`` (one row per valid
  (token, expert) pair, plus padding), one expert id per row and all-ones weights, so
  any stock Standard-format experts kernel computes each row with its one expert.
* **BatchedExperts** (batched buffer): ``[L, cap_e, H]`` rows and the rows per expert on
  the device (``ExpertTokensMetadata.expert_num_tokens``), as vLLM's DeepEP low-latency
  prepare returns them; ids and weights are left to the caller's (vLLM's batched experts
  read only their shape). ``cap_e = max_num_tokens_per_rank() * num_dispatchers()``,
  the token dimension vLLM's batched experts size their output with.

Expert ids (Standard): experts kernels that map ids through ``expert_map`` (Triton and
most GPU kernels) get *global* ids, and rows that are not written (padding, unused
capacity) get the id of an expert on another rank, which they skip (-1 would index
``expert_map[-1]``; with a single rank they get -1). vLLM's CPU experts ignore
``expert_map`` and index their weights with the id as given, so they get *local* ids in
``[0, L)`` and rows that are not written get 0: computed, never read (combine reads
written rows only). :meth:`post_init_setup` tells the two apart.

Activations are bf16, or float32 (``activation_dtype``; a bf16 buffer of twice the
hidden size, exact but several times the combine cost: see
:mod:`hybrid_ep_infer_vllm.exact_fp32`). Inputs are quantized when the experts' quant
config asks for dynamic FP8 with 1x128 group scales (block FP8, :mod:`.fp8_input`):
on an FP8 buffer before dispatch (rows and ``[*, H/128]`` scales travel), on a bf16
buffer after it (same bits, twice the bytes). Experts that quantize their inputs
themselves (``defer_input_quant``) get bf16 rows, which needs a bf16 buffer.

**Async**: where the buffer has split halves (``EPBuffer.supports_split``), ``supports_async()``
is True and vLLM calls ``prepare_async``/``finalize_async``: the send half of dispatch or
combine, then a hook that receives, so vLLM can run other work (the shared experts, in
finalize) while the exchange is in flight. ``prepare``/``finalize`` run the same code
with the one-call ops. The float32 path's combines run whole in ``finalize_async``.

Checked against vLLM 0.32.0 (docs/DESIGN.md, "The vLLM adapter"). Not yet: dual-batch
overlap (DBO, which needs a buffer per micro-batch; refused), other input quantizations
(per-token, per-tensor, int8, FP4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from vllm.model_executor.layers.fused_moe import modular_kernel as mk

try:
    from vllm.v1.worker.ubatching import dbo_enabled
except ImportError:  # where vLLM is replaced by a stand-in (the GPU adapter test): no micro-batches
    def dbo_enabled() -> bool:
        return False

from hybrid_ep_infer import EPBuffer, ops
from hybrid_ep_infer.buffer import DispatchResult

from . import exact_fp32, fp8_input

# vLLM modules whose experts index weights with the ids as given (no expert_map):
# cpu_moe (CPUUnquantizedExperts and its x86/Arm/Power kinds), cpu_int4_moe.
_LOCAL_ID_MODULES = "vllm.model_executor.layers.fused_moe.experts.cpu_"

# Where prepare quantizes the inputs to block FP8 (see _quantize_where).
BEFORE_DISPATCH, AFTER_DISPATCH = "before dispatch", "after dispatch"


class _Pending(NamedTuple):
    """What finalize needs from the matching prepare."""

    dispatched: DispatchResult  # from ops.dispatch: the buffer's outputs
    topk_ids: torch.Tensor  # the routing dispatched, which the combine op is given too
    weights_on_input: bool
    top_k: int
    weights: torch.Tensor | None = None  # float32 path: [m, K] routing weights, applied in finalize
    slots: torch.Tensor | None = None  # float32 path: [*R] slot of each row (exact_fp32.row_slots)


class HybridEPPrepareAndFinalize(mk.FusedMoEPrepareAndFinalizeModular):
    """Prepare = :func:`hybrid_ep_infer.ops.dispatch`; finalize = :func:`hybrid_ep_infer.ops.combine`.

    One buffer may serve every MoE layer of a model with the same (hidden, dtype, layout,
    max tokens): layers run one after another, and each finalize consumes the dispatch of
    its own prepare.

    Args:
        buffer: a bf16 EPBuffer, or an FP8 (``float8_e4m3fn``) one for block-FP8 layers
            (bf16 activations). Contiguous layout for vLLM's Standard format, batched for
            BatchedExperts (its capacity a multiple of the group size). For float32
            activations a bf16 buffer of twice the model's hidden size
            (:func:`exact_fp32.buffer_format`).
        activation_dtype: the layer's activations, ``torch.bfloat16`` or ``torch.float32``.
        local_ids: hand the experts local (True) or global (False) ids; ``None``: decided
            by :meth:`post_init_setup` (global if it is never called).
        unquantized_buffer: for an FP8 ``buffer``: a callable returning a bf16 buffer of the
            same sizes and layout, used instead if the experts quantize their inputs
            themselves (``expects_unquantized_inputs``), which :meth:`post_init_setup`
            learns. It lets the plugin choose the buffer before vLLM builds the experts.
    """

    def __init__(self, buffer: EPBuffer, *, activation_dtype: torch.dtype = torch.bfloat16,
                 local_ids: bool | None = None, unquantized_buffer: Callable[[], EPBuffer] | None = None):
        super().__init__()
        self.activation_dtype = activation_dtype
        self._use_buffer(buffer)
        self.local_ids = bool(local_ids)
        self._ids_decided = local_ids is not None
        self._unquantized_buffer = unquantized_buffer
        self._pending = None  # what finalize needs from the matching prepare

    def _use_buffer(self, buffer: EPBuffer) -> None:
        c = buffer.config
        if c.dtype == fp8_input.FP8:
            if self.activation_dtype != torch.bfloat16:
                raise ValueError(f"an FP8 buffer takes bfloat16 activations, not {self.activation_dtype}")
            factor = 1
        elif c.dtype == torch.bfloat16:
            factor = exact_fp32.buffer_format(1, self.activation_dtype)[0]  # buffer hidden per model hidden
        else:
            raise ValueError(f"the adapter needs a bfloat16 or float8_e4m3fn buffer, got {c.dtype}")
        if c.hidden % factor:
            raise ValueError(f"a {self.activation_dtype} layer needs a buffer of {factor}x its hidden size, "
                             f"got {c.hidden}")
        if c.layout == "batched" and c.capacity % buffer.world_size:
            raise ValueError(f"a batched buffer's capacity ({c.capacity} rows per expert) must be a multiple of "
                             f"the group size ({buffer.world_size}): vLLM sizes batched experts by tokens per rank")
        if getattr(self, "buffer", None) is not None and c.layout != self.buffer.config.layout:
            raise ValueError("the unquantized buffer must have the FP8 buffer's layout")
        self.buffer = buffer
        self.hidden = c.hidden // factor
        # Id given to rows that are not written with global ids: an expert of another rank (see module doc).
        world, local = buffer.world_size, buffer.num_local_experts
        self._unused_row_id = ((buffer.rank + 1) % world) * local if world > 1 else -1

    @property
    def fp8_payload(self) -> bool:
        """Whether prepare dispatches FP8 rows with their scales."""
        return self.buffer.config.dtype == fp8_input.FP8

    @property
    def batched(self) -> bool:
        return self.buffer.config.layout == "batched"

    def post_init_setup(self, fused_experts) -> None:
        """Called once by vLLM's ``FusedMoEKernel`` with its experts: pick global or local ids,
        and a bf16 buffer if FP8 was planned but the experts quantize their inputs themselves."""
        if not self._ids_decided:
            self.local_ids = not experts_use_expert_map(fused_experts)
        if self.fp8_payload and getattr(fused_experts, "expects_unquantized_inputs", False):
            if self._unquantized_buffer is None:
                raise ValueError(f"{type(fused_experts).__name__} quantizes its own inputs "
                                 "(expects_unquantized_inputs): give the adapter a bf16 buffer, or unquantized_buffer")
            self._use_buffer(self._unquantized_buffer())

    @property
    def activation_format(self) -> mk.FusedMoEActivationFormat:
        if self.batched:
            return mk.FusedMoEActivationFormat.BatchedExperts
        return mk.FusedMoEActivationFormat.Standard

    def topk_indices_dtype(self) -> torch.dtype | None:
        return None  # int32 and int64 both work

    def max_num_tokens_per_rank(self) -> int | None:
        c = self.buffer.config
        # Batched experts size their token dimension as this times num_dispatchers(): the buffer's cap_e.
        return c.capacity // self.buffer.world_size if self.batched else c.max_tokens

    def num_dispatchers(self) -> int:
        return self.buffer.world_size

    def output_is_reduced(self) -> bool:
        return True

    def supports_async(self) -> bool:
        """Whether vLLM may call :meth:`prepare_async`/:meth:`finalize_async` (and overlap work,
        such as the shared experts, with the exchange): where the buffer has split halves
        (the reference backend; the CUDA backend built with ``low_latency``)."""
        return self.buffer.supports_split

    def prepare_async(self, a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                      quant_config, defer_input_quant):
        """The dispatch's send half (:func:`hybrid_ep_infer.ops.dispatch_send`); returns
        ``(hook, receiver)``: the hook receives (:func:`~hybrid_ep_infer.ops.dispatch_recv`),
        the receiver returns what :meth:`prepare` returns. vLLM may run other work between
        this call and the hook."""
        return self._prepare(a1, topk_weights, topk_ids, num_experts, apply_router_weight_on_input, quant_config,
                             defer_input_quant, split=True)

    def prepare(self, a1, topk_weights, topk_ids, num_experts, expert_map, apply_router_weight_on_input,
                quant_config, defer_input_quant):
        # One code path with prepare_async; here the exchange is the one-call op (what vLLM
        # calls where supports_async() is False), so the hook has nothing left to do.
        hook, receiver = self._prepare(a1, topk_weights, topk_ids, num_experts, apply_router_weight_on_input,
                                       quant_config, defer_input_quant, split=False)
        hook()
        return receiver()

    def _prepare(self, a1, topk_weights, topk_ids, num_experts, apply_router_weight_on_input, quant_config,
                 defer_input_quant, *, split: bool):
        """Checks, quantization before dispatch and the dispatch's send (``split``) or the whole
        dispatch; returns ``(hook, receiver)`` as :meth:`prepare_async` does."""
        if dbo_enabled():
            raise NotImplementedError("hybrid_ep_infer's vLLM adapter does not support dual-batch overlap (DBO) "
                                      "yet: it needs one buffer per micro-batch")
        if num_experts != self.buffer.config.num_experts:
            raise ValueError(f"layer has {num_experts} experts; the buffer was built for "
                             f"{self.buffer.config.num_experts}")
        if a1.dtype != self.activation_dtype:
            raise TypeError(f"activations are {a1.dtype}; this prepare/finalize was built for {self.activation_dtype}")
        quantize = self._quantize_where(quant_config, defer_input_quant)
        if apply_router_weight_on_input:
            if topk_ids.shape[1] != 1:
                raise ValueError("apply_router_weight_on_input needs top_k == 1")
            a1 = a1 * topk_weights.to(a1.dtype)
        a1, topk_ids = a1.contiguous(), topk_ids.contiguous()
        top_k = topk_ids.shape[1]
        fp32 = self.activation_dtype == torch.float32
        if fp32:
            # Raw fp32 bytes as bf16 pairs; the dispatched "weights" are slot numbers (exact_fp32).
            x, x_scales = a1.view(torch.bfloat16), None
            dispatch_weights = exact_fp32.slot_numbers(a1.shape[0], top_k, a1.device)
        else:
            x, x_scales = fp8_input.quantize(a1) if quantize == BEFORE_DISPATCH else (a1, None)
            dispatch_weights = topk_weights.float().contiguous()

        received: list[DispatchResult] = []  # filled once, by the one-call op or the hook
        if split:
            ops.dispatch_send(self.buffer, x, topk_ids, dispatch_weights, scales=x_scales)
        else:
            received.append(ops.dispatch(self.buffer, x, topk_ids, dispatch_weights, scales=x_scales))

        def hook() -> None:
            if not received:
                received.append(ops.dispatch_recv(self.buffer))

        def receiver():
            hook()  # a no-op where vLLM already called it
            result = received[0]
            if fp32:
                hidden, scales = result.hidden.view(torch.float32), None
                weights = None if apply_router_weight_on_input else topk_weights.float()
                slots = exact_fp32.row_slots(result.row_expert, result.weights, top_k)
                self._pending = _Pending(result, topk_ids, apply_router_weight_on_input, top_k, weights, slots)
            else:
                hidden, scales = result.hidden, result.scales
                self._pending = _Pending(result, topk_ids, apply_router_weight_on_input, top_k)
            if quantize == AFTER_DISPATCH:  # per-row groups: the same bits as quantizing before
                hidden, scales = fp8_input.quantize(hidden)
            meta = mk.ExpertTokensMetadata(expert_num_tokens=result.tokens_per_expert, expert_num_tokens_cpu=None)
            if self.batched:
                return hidden, scales, meta, None, None  # batched experts keep the caller's ids and weights
            ones = torch.ones_like(result.weights, dtype=torch.float32).unsqueeze(1)  # weights: applied in finalize
            return hidden, scales, meta, self._row_ids(result.row_expert), ones

        return hook, receiver

    def _quantize_where(self, quant_config, defer_input_quant: bool) -> str | None:
        """Where prepare quantizes the inputs to block FP8, or None for no quantization."""
        quantized = quant_config is not None and quant_config.quant_dtype is not None
        block_fp8 = quantized and not defer_input_quant and fp8_input.wants_block_fp8(quant_config)
        if self.fp8_payload:
            if not block_fp8:
                unquantized = not quantized or defer_input_quant
                wanted = "unquantized inputs" if unquantized else fp8_input.describe(quant_config)
                raise ValueError(f"an FP8 buffer carries block-FP8 inputs (1x{fp8_input.GROUP} scales); "
                                 f"these experts want {wanted}: use a bf16 buffer")
            return BEFORE_DISPATCH
        if block_fp8:
            return AFTER_DISPATCH
        if quantized and not defer_input_quant:
            raise NotImplementedError(f"hybrid_ep_infer's vLLM adapter does not quantize inputs as "
                                      f"{fp8_input.describe(quant_config)}; it supports FP8 with "
                                      f"1x{fp8_input.GROUP} group scales")
        return None  # unquantized, or the experts quantize (defer_input_quant)

    def _row_ids(self, row_expert: torch.Tensor) -> torch.Tensor:
        """``[R, 1]`` int32 expert id per row, local or global (module doc)."""
        if self.local_ids:
            return torch.where(row_expert >= 0, row_expert, 0).unsqueeze(1)
        offset = self.buffer.rank * self.buffer.num_local_experts
        return torch.where(row_expert >= 0, row_expert + offset, self._unused_row_id).unsqueeze(1)

    def finalize_async(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                       weight_and_reduce_impl):
        """The combine's send half (:func:`hybrid_ep_infer.ops.combine_send`); returns
        ``(hook, receiver)``: the hook receives into ``output``
        (:func:`~hybrid_ep_infer.ops.combine_recv`), the receiver only makes sure it ran.
        vLLM runs the shared experts between this call and the hook."""
        return self._finalize(output, fused_expert_output, split=True)

    def finalize(self, output, fused_expert_output, topk_weights, topk_ids, apply_router_weight_on_input,
                 weight_and_reduce_impl) -> None:
        # One code path with finalize_async; the one-call combine here (see prepare).
        hook, receiver = self._finalize(output, fused_expert_output, split=False)
        hook()
        receiver()

    def _finalize(self, output, fused_expert_output, *, split: bool):
        if self._pending is None:
            raise RuntimeError("finalize without a matching prepare")
        pending, self._pending = self._pending, None
        # Each row holds one expert's output, unweighted (Standard: we returned weights of 1;
        # batched experts leave weighting to finalize), so the weighting and the per-token
        # sum are ours, whatever weight_and_reduce_impl is.
        y = fused_expert_output.reshape(*self.buffer.config.row_shape, self.hidden)
        if self.activation_dtype == torch.float32:
            # The exact path's several combines run here, whole (one-call ops): nothing
            # overlaps them, and the hook and receiver have nothing left to do.
            rows = exact_fp32.gather_slots(self.buffer, pending.dispatched, pending.topk_ids, y.float(),
                                           pending.slots, pending.top_k)
            output.copy_(exact_fp32.weighted_sum(rows, pending.weights))
            return _nothing, _nothing
        if y.dtype != torch.bfloat16 or not y.is_contiguous():
            y = y.to(torch.bfloat16).contiguous()
        weighted = not pending.weights_on_input
        if not split:
            ops.combine(self.buffer, y, pending.dispatched, pending.topk_ids, out=output, weighted=weighted)
            return _nothing, _nothing
        ops.combine_send(self.buffer, y, pending.dispatched, pending.topk_ids, out=output, weighted=weighted)
        received = []

        def hook() -> None:
            if not received:  # once, whoever calls first (vLLM, or the receiver)
                received.append(ops.combine_recv(self.buffer, output))

        return hook, hook  # the receiver only makes sure the hook ran


def _nothing() -> None:
    return None


def experts_use_expert_map(fused_experts) -> bool:
    """Whether an experts object maps (global) ids through ``expert_map``."""
    supports = getattr(fused_experts, "supports_expert_map", None)  # defined by some vLLM experts
    if callable(supports):
        return bool(supports())
    return not any(cls.__module__.startswith(_LOCAL_ID_MODULES) for cls in type(fused_experts).__mro__)
