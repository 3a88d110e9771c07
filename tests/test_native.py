"""The compiled library: it loads, its C layout matches Python's, and its kernel
(routing validation) agrees bit for bit with the reference backend."""

import ctypes
import os

import pytest
import torch

from hybrid_ep_infer import _native
from hybrid_ep_infer.errors import ERROR_BLOCK_WORDS, ErrorKind
from hybrid_ep_infer.reference import sanitize_routing


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


def random_routing(g, m, K, E, dtype):
    idx = torch.randint(-1, E, (m, K), generator=g)
    bad = torch.rand(m, K, generator=g) < 0.1
    idx[bad] = torch.randint(E, 3 * E, (int(bad.sum()),), generator=g)  # too large
    neg = torch.rand(m, K, generator=g) < 0.05
    idx[neg] = -torch.randint(2, 1000, (int(neg.sum()),), generator=g)  # below -1
    dup = torch.rand(m, K, generator=g) < 0.2
    dup[:, 0] = False
    idx[dup] = idx[:, :1].expand(m, K)[dup]
    if dtype == torch.int64 and m:
        idx[0, 0] = 2**40  # must not wrap to a valid int32 id
    return idx.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_validate_routing_kernel_matches_reference(dtype):
    library_or_skip()
    device = torch.device("cuda", torch.cuda.current_device())
    ctx = _native.NativeContext(device)
    try:
        g = torch.Generator().manual_seed(1234 + (dtype == torch.int64))
        for m, K, E in [(0, 2, 8), (1, 1, 4), (37, 8, 32), (4096, 8, 256), (300, 2, 8)]:
            for n_form in ("default", "host", "device", "device_bad"):
                idx = random_routing(g, m, K, E, dtype)
                n = int(torch.randint(0, m + 1, (1,), generator=g)) if n_form != "default" else m
                out = torch.full((m, K), 12345, dtype=torch.int32, device=device)  # poison
                gpu_idx = idx.to(device)
                if n_form == "host":
                    ctx.validate_routing(gpu_idx, E, out, num_tokens=n)
                elif n_form.startswith("device"):
                    dev_n = n if n_form == "device" else m + 1 + n
                    ctx.validate_routing(gpu_idx, E, out,
                                         num_tokens_device=torch.tensor([dev_n], dtype=torch.int32, device=device))
                    if n_form == "device_bad":
                        n = 0
                else:
                    ctx.validate_routing(gpu_idx, E, out)
                torch.cuda.synchronize()
                want, invalid, repeated = sanitize_routing(idx[:n], E)
                expected = torch.full((m, K), -1, dtype=torch.int32)
                expected[:n] = want.to(torch.int32)
                assert torch.equal(out.cpu(), expected), (m, K, E, n_form)
                errors = ctx.take_errors()
                assert errors.count(ErrorKind.INVALID_EXPERT_ID) == invalid
                assert errors.count(ErrorKind.REPEATED_EXPERT_ID) == repeated
                assert errors.count(ErrorKind.BAD_NUM_TOKENS) == (n_form == "device_bad")
                assert not ctx.take_errors()  # taking clears
    finally:
        ctx.close()


@pytest.mark.gpu
def test_validate_routing_kernel_replays_in_a_cuda_graph():
    library_or_skip()
    device = torch.device("cuda", torch.cuda.current_device())
    ctx = _native.NativeContext(device)
    try:
        m, K, E = 256, 8, 32
        idx = torch.zeros(m, K, dtype=torch.int64, device=device)
        n = torch.zeros(1, dtype=torch.int32, device=device)
        out = torch.empty(m, K, dtype=torch.int32, device=device)
        ctx.validate_routing(idx, E, out, num_tokens_device=n)  # warm-up
        torch.cuda.synchronize()
        ctx.take_errors()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ctx.validate_routing(idx, E, out, num_tokens_device=n)
        g = torch.Generator().manual_seed(7)
        for _ in range(20):
            new_idx = random_routing(g, m, K, E, torch.int64)
            new_n = int(torch.randint(0, m + 1, (1,), generator=g))
            idx.copy_(new_idx)
            n.fill_(new_n)
            graph.replay()
            torch.cuda.synchronize()
            want, invalid, repeated = sanitize_routing(new_idx[:new_n], E)
            expected = torch.full((m, K), -1, dtype=torch.int32)
            expected[:new_n] = want.to(torch.int32)
            assert torch.equal(out.cpu(), expected)
            errors = ctx.take_errors()
            assert (errors.count(ErrorKind.INVALID_EXPERT_ID), errors.count(ErrorKind.REPEATED_EXPERT_ID)) == (
                invalid, repeated)
    finally:
        ctx.close()


def test_workspace_layout_matches_the_readme_formula():
    """The CUDA workspace (sized by the C library) against the README's formula."""
    import ctypes

    library_or_skip()
    W, H, T, E, K = 4, 7168, 4096, 32, 8
    L, R = E // W, 4 * 4096 * 8
    desc = _native.BufferDesc(ctypes.sizeof(_native.BufferDesc), _native.API_VERSION, 1, W, H, T, E, K, 2, 0, 0, 1,
                              R, 24, 10**9)
    layout = _native.workspace_layout(desc)
    outputs = R * H * 2 + R * 8 + L * 4 + (L + 1) * 4 + T * H * 2
    exchange = 2 * W * T * H * 2 + 2 * W * (16 + 8 * T * K) + 8 * W * T * K + 8 * W * T + 16 * W * T + 4 * W * E
    regions = 24
    assert outputs + exchange <= layout.total_bytes <= outputs + exchange + 2 * W * 8 + regions * 128 + 4 * W
    for offset in (layout.hidden, layout.weights, layout.row_expert, layout.offsets, layout.combine_out):
        assert offset % 128 == 0 and offset < layout.total_bytes
    # A bad description is refused with a reason.
    desc.top_k = 0
    with pytest.raises(_native.NativeError, match="top_k"):
        _native.workspace_layout(desc)
    desc.top_k, desc.num_experts = K, 2 * 8192  # the planning kernels' shared-memory tables
    with pytest.raises(_native.NativeError, match="num_experts 16384 above 8192"):
        _native.workspace_layout(desc)
