"""The benchmark command runs on a CPU (tiny config, reference backend over gloo) and
writes JSON records with the fields the project promises."""

import json
import subprocess
import sys
from pathlib import Path

import hybrid_ep_infer

REQUIRED = {"config", "op", "dtype", "tokens", "ranks", "mode", "time_us", "floor_us", "ratio_to_floor", "impl"}


def test_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    root = str(Path(hybrid_ep_infer.__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-m", "hybrid_ep_infer.bench", "--cpu", "--ranks", "2", "--samples", "3",
                           "--dtype", "bf16", "fp8", "--routing", "uniform", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "say nothing about speed" in done.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["ranks"] == 2 and data["meta"]["torch"]
    records = [r for r in data["records"] if r["config"] != "nvlink"]
    ops = {(r["impl"], r["op"], r["dtype"]) for r in records}
    for impl in ("hybrid_ep_infer(reference)", "nccl_allgather_reducescatter", "nccl_all_to_all"):
        for op in ("dispatch", "combine", "round_trip", "layer"):
            assert (impl, op, "fp8") in ops
    for r in records:
        assert REQUIRED <= set(r), r
        assert r["time_us"] > 0


def test_nvlink_ceiling_tool_compiles(tmp_path):
    """benchmarks/nvlink_ceiling.cu (run by `gpu_run.sh ceiling` on GPU machines) still builds
    against csrc/common: compiled here with nvcc, as gpu_run.sh compiles it there."""
    import shutil

    import pytest

    root = Path(__file__).resolve().parent.parent
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    done = subprocess.run([nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Icsrc",
                           "-Icsrc/include", "benchmarks/nvlink_ceiling.cu", "-o", str(tmp_path / "nvlink_ceiling")],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "nvlink_ceiling").stat().st_size > 0


def _load_breakdown():
    """benchmarks/breakdown.py as a module (it is a script, not part of the package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "breakdown.py"
    spec = importlib.util.spec_from_file_location("breakdown", path)
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    return breakdown


def test_breakdown_timeline_durations_and_gaps(capsys):
    """benchmarks/breakdown.py's timeline: kernels of each call in start order, the mean
    duration per position and the mean gap since the previous kernel of the call ended
    (fed stand-in profiler events: the script itself runs only on GPU machines)."""
    import types

    breakdown = _load_breakdown()

    def kernel(name, start, end):
        return types.SimpleNamespace(key=f"void hep::{name}(hep::DispatchParams)", device_type="DeviceType.CUDA",
                                     time_range=types.SimpleNamespace(start=start, end=end))

    # Two calls of two kernels, listed out of order, plus an event that is not a kernel.
    events = [kernel("scan_kernel", 112.0, 120.0), kernel("publish_routing_kernel<long>", 100.0, 110.0),
              kernel("publish_routing_kernel<long>", 200.0, 206.0), kernel("scan_kernel", 210.0, 230.0),
              types.SimpleNamespace(key="cudaLaunchKernel", device_type="DeviceType.CPU",
                                    time_range=types.SimpleNamespace(start=0.0, end=1.0))]
    breakdown.print_timeline(types.SimpleNamespace(events=lambda: events), 2, "graph replays")
    lines = capsys.readouterr().out.splitlines()
    assert "graph replays, mean of 2" in lines[0]
    assert lines[1].split() == ["publish_routing_kernel<long>", "8.0", "us"]
    assert lines[2].split() == ["scan_kernel", "14.0", "us", "gap", "3.0", "us"]  # gaps 2 and 4

    breakdown.print_timeline(types.SimpleNamespace(events=lambda: events[:3]), 2, "eager calls")
    assert "not shown" in capsys.readouterr().out  # 3 kernels do not split into 2 calls


def test_breakdown_ranks_timeline(capsys):
    """benchmarks/breakdown.py --all-ranks: per kernel and rank, the mean start and end since
    the step's first start on any rank (stand-in kernel lists: GPU machines only run it)."""
    breakdown = _load_breakdown()

    # Two steps of (publish, scan) on two ranks; rank 1 starts 4 us after rank 0 in step 1
    # and 2 us before it in step 2 (origins 1000 and 1098).
    rank0 = [(1000.0, 1010.0, "publish"), (1011.0, 1020.0, "scan"), (1100.0, 1108.0, "publish"), (1109.0, 1112.0, "scan")]
    rank1 = [(1004.0, 1012.0, "publish"), (1013.0, 1021.0, "scan"), (1098.0, 1104.0, "publish"), (1105.0, 1113.0, "scan")]
    breakdown.print_ranks_timeline([rank0, rank1], 2)
    lines = capsys.readouterr().out.splitlines()
    assert "mean of 2 steps" in lines[0]
    # rank 0: publish (0-10, 2-10) -> 1.0-10.0, scan (11-20, 11-14) -> 11.0-17.0
    # rank 1: publish (4-12, 0-6) -> 2.0-9.0, scan (13-21, 7-15) -> 10.0-18.0
    assert lines[2].split() == ["publish", "1.0-10.0", "2.0-9.0"]
    assert lines[3].split() == ["scan", "11.0-17.0", "10.0-18.0"]
    assert lines[4].split() == ["step", "to", "step:", "98.0", "us"]

    breakdown.print_ranks_timeline([rank0, rank1[:3]], 2)
    assert "not shown" in capsys.readouterr().out  # rank 1 lost a kernel
