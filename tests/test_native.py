"""The compiled library: it loads, and its C layout matches Python's."""

import ctypes
import os
import subprocess
from pathlib import Path

import pytest
import torch

from hybrid_ep_infer import _native, memory
from hybrid_ep_infer.config import BufferConfig
from hybrid_ep_infer.errors import ERROR_BLOCK_WORDS, ErrorKind


def library_or_skip():
    lib, status = _native.library_status()
    if lib is None:
        if os.environ.get("HYBRID_EP_INFER_EXPECT_LIBRARY") == "1":
            pytest.fail(f"the compiled library was expected here: {status}")
        pytest.skip(status)
    return lib


def test_library_loads_and_matches_python_layout():
    lib = library_or_skip()
    assert lib.hep_api_version() == _native.API_VERSION
    assert lib.version
    assert ctypes.sizeof(_native.ErrorBlock) == 36 == 4 * ERROR_BLOCK_WORDS
    assert lib.hep_status_string(1).decode() == "invalid argument"


def test_error_block_header_matches_python():
    """errors.py mirrors error_block.h: the kinds, their numbers, the block's words
    (checked from the header's text, so it runs without the compiled library)."""
    import re
    from pathlib import Path

    header = (Path(__file__).resolve().parent.parent / "csrc" / "include" / "hybrid_ep_infer" /
              "error_block.h").read_text()
    kinds = {name: int(value) for name, value in re.findall(r"HEP_ERROR_([A-Z_]+) = (\d+)", header)}
    assert kinds.pop("NUM_KINDS") == len(ErrorKind)
    assert kinds == {kind.name: kind.value for kind in ErrorKind}
    words = re.search(r"static_assert\(sizeof\(hep_error_block_t\) == (\d+)", header).group(1)
    assert int(words) == 4 * ERROR_BLOCK_WORDS


def test_context_without_gpu_is_a_clear_error():
    library_or_skip()
    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU message")
    with pytest.raises(_native.NativeError, match="cudaGetDeviceCount"):
        _native.NativeContext(torch.device("cuda", 0))
    with pytest.raises(ValueError, match="CUDA device"):
        _native.NativeContext(torch.device("cpu"))


def test_workspace_layout_matches_the_memory_formula():
    """The CUDA workspace (sized by the C library) against memory.py, the formula the README cites."""
    library_or_skip()
    W, H, T, E, K = 4, 7168, 4096, 32, 8
    config = BufferConfig.create(rank=1, world_size=W, hidden=H, max_tokens=T, num_experts=E, top_k=K,
                                 dtype=torch.bfloat16, layout="contiguous", pad_multiple=1, capacity=None)
    assert config.capacity == 4 * 4096 * 8
    desc = _native.BufferDesc(ctypes.sizeof(_native.BufferDesc), _native.API_VERSION, config.rank, W, H, T, E, K,
                              config.itemsize, 0, 0, 1, config.capacity, 24, 10**9)
    regions, counters = 27, 2 * W * 8 + 4 * W  # each region is rounded up to 128 bytes
    for low_latency in (0, 1):
        desc.low_latency = low_latency
        layout = _native.workspace_layout(desc)
        formula = memory.output_bytes(config) + memory.cuda_exchange_bytes(config, low_latency=bool(low_latency))
        assert formula <= layout.total_bytes <= formula + regions * 128 + counters, low_latency
    for offset in (layout.hidden, layout.weights, layout.row_expert, layout.offsets, layout.combine_out):
        assert offset % 128 == 0 and offset < layout.total_bytes
    # A bad description is refused with a reason.
    desc.low_latency = 2
    with pytest.raises(_native.NativeError, match="low_latency must be 0 or 1"):
        _native.workspace_layout(desc)
    desc.low_latency, desc.top_k = 1, 0
    with pytest.raises(_native.NativeError, match="top_k"):
        _native.workspace_layout(desc)
    desc.top_k, desc.num_experts = K, 2 * 8192  # the planning kernels' shared-memory tables
    with pytest.raises(_native.NativeError, match="num_experts 16384 above 8192"):
        _native.workspace_layout(desc)
    desc.num_experts, desc.ranks_per_node = E, 3
    with pytest.raises(_native.NativeError, match="ranks_per_node 3 must be 0 or divide world_size 4"):
        _native.workspace_layout(desc)
    desc.ranks_per_node = 2  # other nodes are reached only by the multi-node library
    with pytest.raises(_native.NativeError, match="multi-node library"):
        _native.workspace_layout(desc)


# Prints the low-latency receive's shared memory (ll_receive_shared_bytes) for each
# (world_size, num_experts, max_tokens) triple of its arguments, from the kernels' own header.
PLAN_TABLE_PROBE = r"""
#include <cstdio>
#include <cstdlib>
#include "kernels/ll_dispatch_recv.cuh"
int main(int argc, char** argv) {
  for (int i = 1; i + 2 < argc; i += 3) {
    hep_buffer_desc_t d{};
    d.world_size = atoi(argv[i]);
    d.num_experts = atoi(argv[i + 1]);
    d.max_tokens = atoi(argv[i + 2]);
    d.top_k = 8;
    d.hidden = 128;
    d.payload_bytes = 2;
    d.low_latency = 1;
    printf("%lld\n", (long long)(sizeof(int32_t) * hep::ll::plan_table_words(hep::make_sizes(d))));
  }
}
"""


def test_low_latency_plan_tables_match_python(tmp_path, nvcc):
    """backends/cuda.py decides whether a buffer gets the low-latency path by default from its
    own copy of the receive's shared-memory size; the kernels' header computes it, compiled here."""
    from hybrid_ep_infer.backends.cuda import low_latency_plan_table_bytes

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "probe.cu").write_text(PLAN_TABLE_PROBE)
    built = subprocess.run([nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Icsrc", "-Icsrc/include",
                            str(tmp_path / "probe.cu"), "-o", str(tmp_path / "probe")],
                           capture_output=True, text=True, timeout=600, cwd=root)
    assert built.returncode == 0, built.stderr[-3000:]
    shapes = [(2, 16, 1), (2, 16, 128), (4, 32, 1000), (8, 256, 256), (64, 64, 1024), (3, 9, 33)]
    printed = subprocess.run([str(tmp_path / "probe"), *(str(v) for shape in shapes for v in shape)],
                             capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert len(printed) == len(shapes)
    for (W, E, T), c_bytes in zip(shapes, printed):
        config = BufferConfig.create(rank=0, world_size=W, hidden=128, max_tokens=T, num_experts=E, top_k=min(8, E),
                                     dtype=torch.bfloat16, layout="contiguous", pad_multiple=1, capacity=None)
        assert low_latency_plan_table_bytes(config) == int(c_bytes), (W, E, T)


def test_multinode_workspace_matches_the_memory_formula():
    """The multi-node library's workspace across nodes: the same formula with the partials
    summed for other nodes; the planned dispatch is refused there."""
    library_or_skip()
    from hybrid_ep_infer import multinode
    loaded, reason = multinode.library_status()
    if not loaded:
        pytest.skip(reason)
    W, H, T, E, K = 8, 2048, 256, 64, 8
    config = BufferConfig.create(rank=5, world_size=W, hidden=H, max_tokens=T, num_experts=E, top_k=K,
                                 dtype=torch.bfloat16, layout="batched", pad_multiple=1, capacity=None)
    desc = _native.BufferDesc(ctypes.sizeof(_native.BufferDesc), _native.API_VERSION, config.rank, W, H, T, E, K,
                              config.itemsize, 0, 1, 1, config.capacity, 24, 10**9, 1, 4)
    layout = _native.workspace_layout(desc, multinode.library())
    formula = memory.output_bytes(config) + memory.cuda_exchange_bytes(config, low_latency=True, across_nodes=True)
    assert formula <= layout.total_bytes <= formula + 28 * 128 + 2 * W * 8 + 4 * W
    desc.low_latency = 0
    with pytest.raises(multinode.MultinodeError, match="needs low_latency = 1"):
        _native.workspace_layout(desc, multinode.library())
