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
