"""The benchmark command runs on a CPU (reference backend over gloo, small sizes, quick)
and writes JSON records with the fields the project promises; its setups (one rank per GPU,
ranks sharing a GPU, CPU) label every output with what they measured and what they left
out; the plot shows every measured series. GPU paths are checked here through their
argument handling, labels and stand-ins (no GPU on the CI machine)."""

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from hybrid_ep_infer.bench import cli, report

REQUIRED = {"config", "op", "dtype", "tokens", "ranks", "mode", "time_us", "floor_us", "ratio_to_floor", "impl",
            "setup"}
ROOT = Path(__file__).resolve().parent.parent  # the repository (benchmarks/, csrc/)
SHARED = "ranks share one GPU under MPS: launch and protocol cost, not NVLink bandwidth"


def _bench(*argv, timeout=300):
    return subprocess.run([sys.executable, "-m", "hybrid_ep_infer.bench", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))


def test_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    done = _bench("--cpu", "--ranks", "2", "--samples", "3", "--dtype", "bf16", "fp8", "--routing", "uniform",
                  "--json", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "say nothing about speed" in done.stdout
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["ranks"] == 2 and meta["torch"] and meta["setup"] == "cpu" and meta["process_group"] == "gloo"
    assert meta["l2_flush"] is True and "warm L2" not in done.stdout
    assert "say nothing about speed" in meta["label"] and not meta["shared_gpu"]
    records = [r for r in data["records"] if r["config"] != "nvlink"]
    ops = {(r["impl"], r["op"], r["dtype"]) for r in records}
    for impl in ("hybrid_ep_infer(reference)", "gloo_allgather_reducescatter", "gloo_all_to_all"):
        for op in ("dispatch", "combine", "round_trip", "layer"):
            assert (impl, op, "fp8") in ops
    for r in records:
        assert REQUIRED <= set(r), r
        assert r["time_us"] > 0
        assert "nccl" not in r["impl"]  # gloo ran: no NCCL label
        assert r["gbps_real"] is None and r["busiest_offgpu_bytes"] is None  # no GPU: no off-GPU bytes
    claims = [line for line in done.stdout.splitlines() if not line.startswith("left out:")]
    assert not [line for line in claims if "nccl" in line.lower() or "GB/s" in line]


def test_cpu_decode_is_shrunk_quick_and_shows_progress(tmp_path):
    """Issue 23 item 5: this command printed nothing for 20 minutes on a CPU. Now the
    configuration is shrunk (named decode-cpu), progress is printed, and it takes seconds."""
    out = tmp_path / "bench.json"
    began = time.monotonic()
    done = _bench("--config", "decode", "--dtype", "bf16", "--routing", "uniform", "--cpu", "--no-l2-flush",
                  "--json", str(out))
    elapsed = time.monotonic() - began
    assert done.returncode == 0, done.stderr[-3000:]
    assert elapsed < 90, f"the CPU decode run took {elapsed:.0f} s"
    lines = done.stdout.splitlines()
    assert any(line.startswith("CPU: decode shrunk for the CPU: H 7168->256") for line in lines), done.stdout
    assert any(line.startswith("[1/5] decode-cpu bf16 uniform n=1") for line in lines), done.stdout
    assert any(line.startswith("[5/5] decode-cpu bf16 uniform n=256") for line in lines), done.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["configs"] == ["decode-cpu"] and data["meta"]["samples"] == 5
    assert data["meta"]["l2_flush"] is False and "GPU samples start with a warm L2 (--no-l2-flush)" in done.stdout
    assert {r["tokens"] for r in data["records"]} == {1, 8, 32, 128, 256}


def test_cpu_shrink_keeps_routing_shape():
    from hybrid_ep_infer.bench.configs import CONFIGS, CPU_LIMITS, for_cpu

    assert for_cpu(CONFIGS["tiny"]) is CONFIGS["tiny"]
    for name in ("prefill-7168", "qwen-2048", "mixtral-4096", "decode"):
        cfg, small = CONFIGS[name], for_cpu(CONFIGS[name])
        assert small.name == f"{name}-cpu" and small.hidden <= CPU_LIMITS["hidden"] and small.hidden % 128 == 0
        assert max(small.tokens) <= small.max_tokens <= CPU_LIMITS["max_tokens"]
        assert (small.local_experts, small.top_k) == (cfg.local_experts, cfg.top_k)


def test_plot_without_matplotlib_fails_at_argument_time(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--cpu", "--plot", "out.png"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install 'hybrid-ep-infer[plot]'" in err


def test_tokens_option_replaces_each_configurations_list(monkeypatch, capsys):
    """--tokens measures only the given n (FP8 at n = 128, say); an n above a configuration's
    max_tokens is an argument error naming it."""
    monkeypatch.setattr(cli, "visible_gpus", lambda: 1)
    args = cli.parse_args(["--ranks", "4", "--config", "decode", "prefill-7168", "--tokens", "128"])
    assert [(c.name, c.tokens) for c in args.bench_configs] == [("decode", (128,)), ("prefill-7168", (128,))]
    assert cli.CONFIGS["decode"].tokens == (1, 8, 32, 128, 256)  # the table itself unchanged
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(["--ranks", "4", "--config", "decode", "--tokens", "1", "300"])
    assert exc.value.code == 2
    assert "--tokens [300]: decode takes 0 to 256 tokens per rank" in capsys.readouterr().err


def _records(setup, ranks=2, sms=None):
    """Stand-in records: ours and (except on shared GPUs) the baselines, 2 dtypes x 2
    routings x n in (8, 64), dispatch and combine."""
    ours = "hybrid_ep_infer" if setup != "cpu" else "hybrid_ep_infer(reference)"
    impls = [ours] if setup == "shared_gpu" else [ours, f"{'gloo' if setup == 'cpu' else 'nccl'}_all_to_all"]
    records = []
    for dtype in ("bf16", "fp8"):
        for routing in ("uniform", "zipf"):
            for n in (8, 64):
                for op in ("dispatch", "combine"):
                    for impl in impls:
                        for mode in (("eager",) if setup == "cpu" else ("eager", "graph")):
                            t = 10.0 * n + (5 if mode == "eager" else 0) + ranks
                            records.append(dict(
                                config="decode", op=op, impl=impl, dtype=dtype, routing=routing, tokens=n, ranks=ranks,
                                mode=mode, setup=setup, time_us=t, p99_us=t + 1, floor_us=None, ratio_to_floor=None,
                                gbps_real=n / t if setup == "gpus" else None, gbps_logical=None,
                                sms=sms if impl == ours else None, ratio_to_best_baseline=None))
    if setup == "gpus":
        records.append(dict(config="nvlink", op="pair_copy_both_directions", impl="nccl_send_recv", ranks=ranks,
                            mode="eager", setup=setup, gbps_per_direction=300.0))
    return records


def _meta(setup, ranks=2, gpus=1):
    args = types.SimpleNamespace(setup=setup, ranks=ranks, gpus=gpus, ranks_per_gpu=-(-ranks // max(gpus, 1)))
    return dict(card="NVIDIA H100" if setup != "cpu" else "x86_64", driver="1", torch="2", commit="abc", ranks=ranks,
                setup=setup, gpus=gpus, label=cli.setup_label(args), skipped=cli.skipped(args), configs=["decode"],
                command="python -m hybrid_ep_infer.bench")


@pytest.mark.parametrize("setup", ["cpu", "shared_gpu", "gpus"])
def test_plot_panels_show_every_series(setup):
    """FP8 and Zipf results are plotted too; the y axis is a time where no byte crosses NVLink."""
    ylabel, panels = report.plot_panels(_records(setup), _meta(setup))
    assert set(panels) == {("decode", d, r, op) for d in ("bf16", "fp8") for r in ("uniform", "zipf")
                           for op in ("dispatch", "combine")}
    series = panels[("decode", "fp8", "zipf", "combine")]
    expected = {"cpu": {"hybrid_ep_infer(reference) (eager)", "gloo_all_to_all (eager)"},
                "shared_gpu": {"hybrid_ep_infer (eager)", "hybrid_ep_infer (graph)"},
                "gpus": {"hybrid_ep_infer (eager)", "hybrid_ep_infer (graph)", "nccl_all_to_all (eager)",
                         "nccl_all_to_all (graph)"}}[setup]
    assert set(series) == expected
    assert all([n for n, _ in points] == [8, 64] for points in series.values())
    assert ylabel == ("off-GPU GB/s (busiest rank)" if setup == "gpus" else "median time (us), slowest rank")


@pytest.mark.parametrize("setup", ["cpu", "shared_gpu", "gpus"])
def test_write_plot_labels(setup, monkeypatch, tmp_path):
    """The plot, drawn on a stand-in matplotlib: a panel per (dtype, routing) row and op
    column, titled with the setup; NVLink ceiling and GB/s only with one rank per GPU."""
    from unittest import mock

    figure = mock.MagicMock()
    grid = {}

    def subplots(rows, cols, **kw):
        assert kw.get("squeeze") is False
        grid["axes"] = [[mock.MagicMock() for _ in range(cols)] for _ in range(rows)]
        return figure, grid["axes"]

    pyplot = types.SimpleNamespace(subplots=subplots, close=lambda fig: None)
    matplotlib = types.SimpleNamespace(use=lambda backend: None, pyplot=pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    meta = _meta(setup, ranks=8 if setup == "shared_gpu" else 2)
    report.write_plot(_records(setup, ranks=meta["ranks"]), meta, str(tmp_path / "p.png"))
    axes = grid["axes"]
    assert len(axes) == 4 and len(axes[0]) == 2  # (bf16, fp8) x (uniform, zipf) rows; dispatch, combine
    titles = [ax.set_title.call_args[0][0] for row in axes for ax in row]
    assert "decode, fp8, zipf: combine" in titles
    suptitle = figure.suptitle.call_args[0][0]
    ylabels = {ax.set_ylabel.call_args[0][0] for row in axes for ax in row}
    ceilings = sum(ax.axhline.call_count for row in axes for ax in row)
    if setup == "gpus":
        assert ylabels == {"off-GPU GB/s (busiest rank)"} and ceilings == 8
    else:
        assert ylabels == {"median time (us), slowest rank"} and ceilings == 0
        assert "NVLink ceiling" not in str(figure.mock_calls) + str([ax.mock_calls for row in axes for ax in row])
    if setup == "cpu":
        assert "say nothing about speed" in suptitle and "NCCL" not in suptitle
    if setup == "shared_gpu":
        assert f"8 {SHARED}" in suptitle
    figure.savefig.assert_called_once()


def test_shared_gpu_arguments(monkeypatch):
    """--ranks above the visible GPUs: ranks share GPUs (gloo, gpu_for_rank), baselines and
    floor left out with the reason, every label says what is measured."""
    monkeypatch.setattr(cli, "visible_gpus", lambda: 1)
    args = cli.parse_args(["--ranks", "8", "--config", "decode", "--dtype", "bf16", "--routing", "uniform",
                           "--ops", "dispatch", "combine"])
    assert args.cuda and args.setup == "shared_gpu" and args.gpus == 1 and args.ranks_per_gpu == 8
    assert args.samples == 50 and args.ops == ["dispatch", "combine"]
    assert [c.name for c in args.bench_configs] == ["decode"] and args.bench_configs[0].hidden == 7168  # not shrunk
    assert cli.setup_label(args) == f"8 {SHARED}"
    reasons = {item["what"]: item["reason"] for item in cli.skipped(args)}
    assert "NCCL refuses two ranks of one communicator on one GPU" in reasons[
        "NCCL baselines (all-gather + reduce-scatter, all-to-all)"]
    assert any("NVLink floor" in what for what in reasons)
    assert [cli.placement_of(r, args) for r in range(3)] == [(cli.torch.device("cuda", 0), "gloo")] * 3

    monkeypatch.setattr(cli, "visible_gpus", lambda: 2)
    args = cli.parse_args(["--ranks", "4"])
    assert args.setup == "shared_gpu" and args.ranks_per_gpu == 2
    assert "4 ranks share 2 GPUs (up to 2 per GPU) under MPS: launch and protocol cost" in cli.setup_label(args)
    assert [cli.placement_of(r, args)[0].index for r in range(4)] == [0, 1, 0, 1]
    assert cli.parse_args(["--ranks", "4", "--cpu"]).setup == "cpu"

    args = cli.parse_args(["--ranks", "2"])
    assert args.setup == "gpus" and cli.skipped(args) == [] and args.ranks_per_gpu == 1
    assert [cli.placement_of(r, args) for r in range(2)] == [(cli.torch.device("cuda", r), "nccl") for r in range(2)]


def test_shared_gpu_announce_and_metadata(monkeypatch, capsys):
    monkeypatch.setattr(cli, "visible_gpus", lambda: 1)
    args = cli.parse_args(["--ranks", "4", "--config", "decode", "--ops", "dispatch", "combine"])
    monkeypatch.setattr(cli, "mps_evidence", lambda: None)
    cli.announce(args)
    out = capsys.readouterr().out
    assert f"== 4 {SHARED} ==" in out
    assert "left out: NCCL baselines (all-gather + reduce-scatter, all-to-all): NCCL refuses" in out
    assert "WARNING: CUDA MPS does not seem to be running" in out and "nvidia-cuda-mps-control -d" in out

    monkeypatch.setattr(cli, "mps_evidence", lambda: "process 42 (nvidia-cuda-mps)")
    cli.announce(args)
    out = capsys.readouterr().out
    assert "WARNING" not in out and "CUDA MPS: process 42" in out

    monkeypatch.setattr(cli.torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    meta = cli.metadata(args)
    assert meta["shared_gpu"] is True and meta["ranks_per_gpu"] == 4 and meta["process_group"] == "gloo"
    assert meta["label"] == f"4 {SHARED}" and meta["mps"] == "process 42 (nvidia-cuda-mps)"
    assert meta["ops"] == ["dispatch", "combine"] and len(meta["skipped"]) == 2


def test_mps_evidence_from_pipe_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(cli.os, "listdir", lambda path: [])  # no process
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert cli.mps_evidence() is None
    (tmp_path / "control").touch()
    assert cli.mps_evidence() == f"control pipe in {tmp_path}"


def test_print_table_shared_gpu(capsys):
    meta = _meta("shared_gpu", ranks=8) | {"sample_barrier": "device barrier (stream memory operations)"}
    report.print_table(_records("shared_gpu", ranks=8, sms=16), meta)
    out = capsys.readouterr().out
    assert "NVIDIA H100: 8 ranks on 1 GPU" in out and f"== 8 {SHARED} ==" in out
    assert "left out: NCCL baselines" in out and "left out: NVLink floor" in out
    header = next(line for line in out.splitlines() if line.startswith("config"))
    assert header.split()[-4:] == ["eager", "graph", "p99", "SMs"]  # no floor, baseline or GB/s column
    assert "nccl" not in out.split("==")[-1].split("left out")[0]
    row = next(line for line in out.splitlines() if line.startswith("decode") and " combine " in line)
    assert row.split()[-1] == "16"


def _load_benchmark_script(name: str):
    """benchmarks/<name>.py as a module (a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_results_table_one_gpu(tmp_path, capsys):
    """W = 2, 4, 8 on one GPU merge into one table, labelled as such, one column pair per W."""
    results_table = _load_benchmark_script("results_table")
    files = []
    for w, sms in ((2, 24), (4, 24), (8, 16)):
        path = tmp_path / f"shared-w{w}.json"
        path.write_text(json.dumps({"meta": _meta("shared_gpu", ranks=w) | {"dtypes": ["bf16"]},
                                    "records": _records("shared_gpu", ranks=w, sms=sms)}))
        files.append(str(path))
    merged = tmp_path / "merged.json"
    results_table.main(["--merge-into", str(merged), *files])
    out = capsys.readouterr().out
    assert "one GPU shared by W = 2, 4, 8 ranks under MPS: launch and protocol cost, not NVLink bandwidth" in out
    assert "NCCL refuses two ranks on one GPU" in out and "W=2: 24; W=4: 24; W=8: 16" in out
    header = next(line for line in out.splitlines() if line.startswith("| config"))
    assert "W=2 graph (p99) | W=2 eager | W=4 graph (p99) | W=4 eager | W=8 graph (p99) | W=8 eager" in header
    assert "AG+RS" not in out and "floor" not in header
    row = next(line for line in out.splitlines() if line.startswith("| decode | fp8 | zipf | combine | 64 |"))
    assert row.split("|")[6:9] == [" 642.0 µs (643.0) ", " 647.0 µs ", " 644.0 µs (645.0) "]
    assert json.loads(merged.read_text())["meta"]["all_ranks"] == [2, 4, 8]

    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"meta": _meta("cpu"), "records": _records("cpu")}))
    with pytest.raises(SystemExit):  # setups do not merge
        results_table.main([files[0], str(cpu)])
    assert "different setups" in capsys.readouterr().err


def test_results_table_committed_runs_still_render(capsys):
    """Files written before setups were recorded (one rank per GPU) render as before."""
    results_table = _load_benchmark_script("results_table")
    results_table.main([str(ROOT / "benchmarks" / "results-2gpu.json")])
    out = capsys.readouterr().out
    assert out.startswith("NVIDIA H200 x2") and "pair copy rates: nccl_send_recv" in out
    assert "| decode | bf16 | uniform | 1 | dispatch |" in out


def test_stream_barrier_addresses(monkeypatch):
    """timing.StreamBarrier on stand-in driver calls, 3 ranks mapping each other's flags at
    different addresses: rank s writes its epoch to flag s of every rank, and waits on every
    flag of its own; a rank's waits hold until every rank has written (then all pass)."""
    from hybrid_ep_infer.bench import timing

    W = 3
    # rank s sees rank r's workspace at address 10_000 * s + 1_000 * r
    memory = {}  # (owner, byte offset) -> value

    def physical(viewer, address):
        owner, offset = divmod(address - 10_000 * viewer, 1_000)
        assert 0 <= owner < W and 0 <= offset < 4 * W and offset % 4 == 0, address
        return owner, offset

    ops = {s: [] for s in range(W)}
    current = {"rank": None}
    driver = types.SimpleNamespace(
        CUresult=types.SimpleNamespace(CUDA_SUCCESS=0),
        CUstreamWriteValue_flags=types.SimpleNamespace(CU_STREAM_WRITE_VALUE_DEFAULT=0),
        CUstreamWaitValue_flags=types.SimpleNamespace(CU_STREAM_WAIT_VALUE_GEQ=0),
        cuStreamWriteValue32=lambda stream, addr, value, flags: ops[current["rank"]].append(
            ("write", physical(current["rank"], addr), value)) or (0,),
        cuStreamWaitValue32=lambda stream, addr, value, flags: ops[current["rank"]].append(
            ("wait", physical(current["rank"], addr), value)) or (0,))
    monkeypatch.setattr(timing.torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=7))
    barriers = []
    for s in range(W):
        b = object.__new__(timing.StreamBarrier)
        b._driver, b.device, b.group, b.rank, b.world_size, b.epoch = driver, "cuda:0", None, s, W, 0
        b.workspace = types.SimpleNamespace(pointers=[10_000 * s + 1_000 * r for r in range(W)])
        barriers.append(b)
    for epoch in (1, 2):
        for s in range(W):
            ops[s].clear()
            current["rank"] = s
            barriers[s]()
        for s in range(W):
            writes = [op for op in ops[s] if op[0] == "write"]
            waits = [op for op in ops[s] if op[0] == "wait"]
            assert sorted(w[1] for w in writes) == [(r, 4 * s) for r in range(W)] and {w[2] for w in writes} == {epoch}
            assert sorted(w[1] for w in waits) == [(s, 4 * r) for r in range(W)] and {w[2] for w in waits} == {epoch}
        # ranks 0 and 1 have written: rank 0 still waits (for rank 2's flag)
        for s in (0, 1):
            for _, where, value in (op for op in ops[s] if op[0] == "write"):
                memory[where] = value
        assert not all(memory.get(where, 0) >= value for _, where, value in ops[0] if _ == "wait")
        for _, where, value in (op for op in ops[2] if op[0] == "write"):
            memory[where] = value
        for s in range(W):
            assert all(memory.get(where, 0) >= value for kind, where, value in ops[s] if kind == "wait")


def test_nvlink_ceiling_tool_compiles(tmp_path, nvcc):
    """benchmarks/nvlink_ceiling.cu (run by `gpu_run.sh ceiling` on GPU machines) still builds
    against csrc/common: compiled here with nvcc, as gpu_run.sh compiles it there."""
    done = subprocess.run([nvcc, "-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Icsrc",
                           "-Icsrc/include", "benchmarks/nvlink_ceiling.cu", "-o", str(tmp_path / "nvlink_ceiling")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "nvlink_ceiling").stat().st_size > 0


def test_breakdown_timeline_durations_and_gaps(capsys):
    """benchmarks/breakdown.py's timeline: kernels of each call in start order, the mean
    duration per position and the mean gap since the previous kernel of the call ended
    (fed stand-in profiler events: the script itself runs only on GPU machines)."""
    import types

    breakdown = _load_benchmark_script("breakdown")

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
    breakdown = _load_benchmark_script("breakdown")

    # Two steps of (publish, scan) on two ranks; rank 1 starts 4 us after rank 0 in step 1
    # and 2 us before it in step 2 (origins 1000 and 1098).
    rank0 = [(1000.0, 1010.0, "publish"), (1011.0, 1020.0, "scan"),
             (1100.0, 1108.0, "publish"), (1109.0, 1112.0, "scan")]
    rank1 = [(1004.0, 1012.0, "publish"), (1013.0, 1021.0, "scan"),
             (1098.0, 1104.0, "publish"), (1105.0, 1113.0, "scan")]
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


def test_phase_clock_build_compiles(tmp_path, nvcc):
    """The profiling build's sources (cmake -DHEP_PHASE_CLOCK=ON: the marks of
    csrc/common/phase_clock.cuh and hep_phase_clock_read) still compile; benchmarks/
    phase_clock.py runs it on GPU machines only."""
    flags = ["-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "--expt-relaxed-constexpr",
             "-DHEP_PHASE_CLOCK=1", "-Icsrc", "-Icsrc/include"]
    sources = ["csrc/kernels/ll_dispatch.cu", "csrc/kernels/combine.cu", "csrc/api.cpp"]
    jobs = [subprocess.Popen([nvcc, *flags, "-c", src, "-o", str(tmp_path / f"{i}.o")], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, src in enumerate(sources)]
    for src, job in zip(sources, jobs):
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, f"{src}: {err[-3000:]}"
    symbols = subprocess.run(["nm", str(tmp_path / "2.o")], capture_output=True, text=True).stdout
    assert "hep_phase_clock_read" in symbols


def test_phase_clock_tables():
    """benchmarks/phase_clock.py's summary of stand-in marks: per mark, the medians over
    replays of the earliest and latest pass of any rank since the kernel's first entry on
    any rank, the latest pass per rank, and the gap from dispatch to combine."""
    pc = _load_benchmark_script("phase_clock")
    M = pc.MARKS

    def marks(firsts, lasts):  # ns; marks beyond the lists were not passed
        out = [0] * (2 * M)
        for m, (f, last) in enumerate(zip(firsts, lasts)):
            out[m], out[M + m] = f, last
        return out

    def replay(shift, rank1_late):
        # Rank 0 enters the dispatch at `shift`, rank 1 `rank1_late` ns later; each passes its first 7 marks.
        d0 = marks([shift + 1000 * m for m in range(7)], [shift + 1000 * m + 500 for m in range(7)])
        d1 = marks([shift + rank1_late + 1000 * m for m in range(7)],
                   [shift + rank1_late + 1000 * m + 500 for m in range(7)])
        c = marks([shift + 10_000 + 100 * m for m in range(5)], [shift + 10_000 + 100 * m + 50 for m in range(5)])
        return [dict(dispatch=d0, combine=c, event_us=20.0), dict(dispatch=d1, combine=c, event_us=22.0)]

    replays = [replay(0, 2000), replay(10**6, 4000), replay(2 * 10**6, 6000)]
    per_rank = [[r[0] for r in replays], [r[1] for r in replays]]
    summary = pc.summarize(per_rank, 1, type("Args", (), {"fp8": False})())
    entered, published = summary["dispatch"][0], summary["dispatch"][1]
    assert entered["mark"] == "entered" and entered["first_us"] == 0.0
    assert entered["last_us"] == 4.5  # rank 1's latest entry: 4000 + 500 ns (the median replay)
    assert published["last_per_rank_us"] == [1.5, 5.5]
    assert summary["event_us"] == 22.0
    # The dispatch's last exit (rank 1: late + 6500) to the combine's first entry (10000).
    assert summary["dispatch_to_combine_gap_us"] == (10_000 - 4000 - 6500) / 1e3
    assert [row["mark"] for row in summary["combine"]] == list(pc.COMBINE_MARKS)
    assert summary["combine"][4]["last_us"] == 0.45
    assert summary["kernels_span_us"] == 10.45

    # A mark no block passed (a build without it) is left out, and the span ends at the
    # combine's latest mark that was passed.
    for rank in per_rank:
        for record in rank:
            record["combine"] = list(record["combine"])
            record["combine"][4] = record["combine"][M + 4] = 0
    summary = pc.summarize(per_rank, 1, type("Args", (), {"fp8": False})())
    assert [row["mark"] for row in summary["combine"]] == list(pc.COMBINE_MARKS[:4])
    assert summary["kernels_span_us"] == 10.35
