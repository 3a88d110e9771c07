"""vLLM plugin: expert-parallel MoE layers dispatch and combine through hybrid_ep_infer.

Registered as a ``vllm.general_plugins`` entry point (pyproject.toml), so vLLM calls
:func:`register` in each of its processes. ``HYBRID_EP_INFER_VLLM`` turns it on:

* unset or ``0``: it does nothing;
* ``1``: on; outside the supported vLLM versions (0.32, 0.33) it leaves vLLM untouched,
  with a warning;
* ``strict``: on, and an unsupported vLLM version is an error (start-up fails) instead.

Its messages go through vLLM's logging (the ``vllm.hybrid_ep_infer`` logger), so they
appear in vLLM's log like vLLM's own: one line per process when it is installed.

vLLM has no registry of all-to-all backends: ``maybe_make_prepare_finalize`` (in
``fused_moe/all2all_utils.py``) is imported by name in about a dozen modules. The plugin
replaces that function there and in every loaded module that holds it. The replacement
takes over only where vLLM would run its default all-gather/reduce-scatter path with
expert parallelism (``--all2all-backend allgather_reducescatter``, which also keeps vLLM's
CUDA graphs), for unquantized bf16 layers, float32 ones (exact, for testing: see
``exact_fp32``) and block-FP8 ones (dynamic 1x128 activation scales, bf16 activations:
FP8 rows and scales travel; see ``fp8_input``); everything else goes to vLLM's own
function. Unquantized layers served with ``--moe-backend batched_triton`` get the
batched activation format (a batched buffer), since that is what vLLM then builds
experts for; all others get the Standard format.
One buffer serves every layer of the same sizes; each step ends with ``check_errors()``
on those buffers (outside graph capture). docs/DESIGN.md, "The vLLM adapter", says why.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import torch

ENV_FLAG = "HYBRID_EP_INFER_VLLM"
ON, STRICT = "1", "strict"  # the values of ENV_FLAG that turn the plugin on
SUPPORTED_VERSIONS = ((0, 32), (0, 33))
_MARK = "__hybrid_ep_infer__"

# A child of vLLM's "vllm" logger, which vLLM gives a handler and level INFO: a logger
# outside it has no handler in vLLM's processes, and its INFO lines are lost.
logger = logging.getLogger("vllm.hybrid_ep_infer")
_buffers: dict[tuple, object] = {}  # (hidden, payload dtype, layout, max_tokens, experts, top_k) -> EPBuffer


def register() -> None:
    """The entry point vLLM calls; re-entrant."""
    mode = os.environ.get(ENV_FLAG, "0")
    if mode not in (ON, STRICT):
        if mode not in ("", "0"):
            logger.warning("%s=%r is not one of 0, %s, %s: hybrid_ep_infer_vllm stays off", ENV_FLAG, mode, ON,
                           STRICT)
        return
    import vllm

    version = _version_tuple(vllm.__version__)
    if version[:2] not in SUPPORTED_VERSIONS:
        message = f"hybrid_ep_infer_vllm supports vLLM 0.32-0.33, found {vllm.__version__}"
        if mode == STRICT:
            raise RuntimeError(f"{message} ({ENV_FLAG}={STRICT})")
        logger.warning("%s: leaving vLLM untouched (%s=%s makes this an error)", message, ENV_FLAG, STRICT)
        return
    from vllm.model_executor.layers.fused_moe import all2all_utils

    original = all2all_utils.maybe_make_prepare_finalize
    if getattr(original, _MARK, False):
        return
    _rebind(original, _wrap(original))
    logger.info("hybrid_ep_infer_vllm: expert-parallel MoE layers on the all-gather/reduce-scatter path use "
                "hybrid_ep_infer (vLLM %s)", vllm.__version__)


def takes_over(moe, quant_config, routing_tables=None, allow_new_interface=False, use_monolithic=False) -> bool:
    """Whether the plugin builds this layer's prepare/finalize (else vLLM's own does)."""
    return bool(getattr(moe, "use_ag_rs_all2all_kernels", False) and allow_new_interface and not use_monolithic
                and routing_tables is None and _rows_dtype(moe, quant_config) is not None
                and moe.num_experts % moe.moe_parallel_config.ep_size == 0)


def _rows_dtype(moe, quant_config) -> torch.dtype | None:
    """What the layer's dispatched rows are: its activations' dtype, FP8, or None (not ours)."""
    from .fp8_input import FP8, GROUP, wants_block_fp8

    if quant_config is None or getattr(quant_config, "quant_dtype", None) is None:  # unquantized inputs
        return moe.in_dtype if moe.in_dtype in (torch.bfloat16, torch.float32) else None
    if wants_block_fp8(quant_config) and moe.in_dtype == torch.bfloat16 and moe.hidden_dim % GROUP == 0:
        return FP8
    return None


def _layout(moe, quant_config) -> str:
    """The buffer layout, i.e. the activation format vLLM builds this layer's experts for.

    vLLM 0.32's unquantized oracle picks batched experts (BatchedTritonExperts) on this
    path only for ``--moe-backend batched_triton`` (``oracle/unquantized.py``); the other
    oracles pick batched experts only for DeepEP low-latency and NIXL, never here.
    """
    unquantized = quant_config is None or (getattr(quant_config, "quant_dtype", None) is None
                                           and getattr(quant_config, "weight_quant_dtype", None) is None)
    return "batched" if unquantized and getattr(moe, "moe_backend", "auto") == "batched_triton" else "contiguous"


def _wrap(original):
    @functools.wraps(original)
    def maybe_make_prepare_finalize(moe, quant_config, routing_tables=None, allow_new_interface=False,
                                    use_monolithic=False, all2all_manager=None, input_dtype=None):
        if takes_over(moe, quant_config, routing_tables, allow_new_interface, use_monolithic):
            from .prepare_finalize import HybridEPPrepareAndFinalize

            rows, layout = _rows_dtype(moe, quant_config), _layout(moe, quant_config)
            # FP8 layers whose experts quantize their own inputs (learnt later, in
            # post_init_setup) dispatch bf16: that buffer is built only then.
            unquantized = None if rows == moe.in_dtype else functools.partial(_buffer_for, moe, moe.in_dtype, layout)
            return HybridEPPrepareAndFinalize(_buffer_for(moe, rows, layout), activation_dtype=moe.in_dtype,
                                              unquantized_buffer=unquantized)
        return original(moe, quant_config, routing_tables, allow_new_interface, use_monolithic, all2all_manager,
                        input_dtype)

    setattr(maybe_make_prepare_finalize, _MARK, True)
    return maybe_make_prepare_finalize


def _rebind(original, replacement) -> None:
    """Replace ``original`` wherever a loaded module holds it; later imports copy the new one."""
    for name, module in list(sys.modules.items()):
        # Only vLLM's modules, and only their own namespace: getattr on a lazy module
        # (transformers has them) would import things.
        if not name.startswith("vllm.") or module is None:
            continue
        if vars(module).get("maybe_make_prepare_finalize") is original:
            module.maybe_make_prepare_finalize = replacement


def _buffer_for(moe, rows: torch.dtype, layout: str):
    """The buffer for this layer's sizes and rows (bf16, float32 or FP8), built (collectively,
    over the EP group) on first use."""
    from vllm.distributed.parallel_state import get_ep_group

    from hybrid_ep_infer import EPBuffer

    from .exact_fp32 import buffer_format
    from .fp8_input import FP8

    # float32 rows: a bf16 buffer of 2x hidden (exact_fp32); FP8: rows plus 1x128 scales.
    hidden, dtype = (moe.hidden_dim, FP8) if rows == FP8 else buffer_format(moe.hidden_dim, rows)
    key = (hidden, dtype, layout, moe.max_num_tokens, moe.num_experts, moe.experts_per_token)
    if key not in _buffers:
        _buffers[key] = EPBuffer(group=get_ep_group().cpu_group, hidden=hidden, max_tokens=moe.max_num_tokens,
                                 num_experts=moe.num_experts, top_k=moe.experts_per_token, dtype=dtype,
                                 layout=layout)
        _check_errors_every_step()
    return _buffers[key]


def _check_errors_every_step() -> None:
    """After each model step, raise for data errors counted on any of our buffers."""
    from vllm.v1.worker import gpu_worker  # CPUWorker inherits execute_model from it

    original = gpu_worker.Worker.execute_model
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def execute_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            for buffer in _buffers.values():
                buffer.check_errors()
        return result

    setattr(execute_model, _MARK, True)
    gpu_worker.Worker.execute_model = execute_model


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
