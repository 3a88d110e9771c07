"""The benchmark's table (stdout) and plot (PNG). Both say what the run measured
(``meta["label"]``) and what it left out (``meta["skipped"]``): NVLink floors, NCCL
baselines and GB/s appear only where they were measured (one rank per GPU)."""

from __future__ import annotations

from .configs import OPS

PLOT_EXTRA = "pip install 'hybrid-ep-infer[plot]'"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def setup_line(meta: dict) -> str:
    """The card and how the ranks sit on it: ``H200 x4``, ``H100: 8 ranks on 1 GPU``, ``x86_64 (CPU), 2 ranks``."""
    setup = meta.get("setup", "gpus")
    if setup == "cpu":
        return f"{meta['card']} (CPU), {meta['ranks']} ranks"
    if setup == "shared_gpu":
        gpus = meta.get("gpus", 1)
        return f"{meta['card']}: {meta['ranks']} ranks on {gpus} GPU{'s' if gpus != 1 else ''}"
    return f"{meta['card']} x{meta['ranks']}"


# (title, format width, value of a row: (modes {mode: record}, best record) -> str)
_COLUMNS = {
    "eager": (9, lambda m, b: _fmt(m.get("eager", {}).get("time_us"), "9.1f")),
    "graph": (9, lambda m, b: _fmt(m.get("graph", {}).get("time_us"), "9.1f")),
    "p99": (9, lambda m, b: _fmt(b.get("p99_us"), "9.1f")),
    "floor": (8, lambda m, b: _fmt(b.get("floor_us"), "8.1f")),
    "x floor": (7, lambda m, b: _fmt(b.get("ratio_to_floor"), "7.2f")),
    "x best": (7, lambda m, b: _fmt(b.get("ratio_to_best_baseline"), "7.2f")),
    "GB/s": (6, lambda m, b: _fmt(b.get("gbps_real"), "6.0f")),
    "log.GB/s": (8, lambda m, b: _fmt(b.get("gbps_logical"), "8.0f")),
    "SMs": (4, lambda m, b: _fmt(b.get("sms"), "4d")),
}
_SETUP_COLUMNS = {
    "gpus": ("eager", "graph", "p99", "floor", "x floor", "x best", "GB/s", "log.GB/s"),
    "shared_gpu": ("eager", "graph", "p99", "SMs"),  # no floor, baseline or rate: none was measured
    "cpu": ("eager", "p99", "x best"),  # no graphs on the CPU
}


def print_table(records: list[dict], meta: dict) -> None:
    links = [r for r in records if r["config"] == "nvlink"]
    print(f"\n{setup_line(meta)}, torch {meta['torch']}, driver {meta['driver']}, commit {meta['commit']}")
    print(f"== {meta['label']} ==")
    for item in meta.get("skipped", ()):
        print(f"left out: {item['what']}: {item['reason']}")
    if meta.get("sample_barrier"):
        print(f"each sample starts after a {meta['sample_barrier']}")
    if meta.get("l2_flush") is False:
        print("GPU samples start with a warm L2 (--no-l2-flush)")
    for link in links:
        print(f"NVLink pair copy, both directions at once, {link['impl']}: "
              f"{link['gbps_per_direction']:.0f} GB/s each way")
    if links:
        print("(the floor uses the faster)")
    columns = _SETUP_COLUMNS[meta.get("setup", "gpus")]
    notes = {"gpus": "; x floor / x best baseline for graph replays (eager where an impl has no graph)",
             "shared_gpu": "; SMs: blocks per copy kernel of each rank", "cpu": ""}
    print(f"times: median (us) of the slowest rank per sample; p99 of graph replays (eager where there are none)"
          f"{notes[meta.get('setup', 'gpus')]}")
    header = f"{'config':13s} {'dtype':5s} {'routing':7s} {'n':>5s} {'op':10s} {'impl':28s} " + " ".join(
        f"{name:>{_COLUMNS[name][0]}s}" for name in columns)
    print(header)
    print("-" * len(header))
    rows: dict[tuple, dict] = {}
    for r in records:
        if r["config"] == "nvlink":
            continue
        key = (r["config"], r["dtype"], r["routing"], r["tokens"], r["op"], r["impl"])
        rows.setdefault(key, {})[r["mode"]] = r
    for key, modes in rows.items():
        best = modes.get("graph") or modes["eager"]
        print(f"{key[0]:13s} {key[1]:5s} {key[2]:7s} {key[3]:5d} {key[4]:10s} {key[5]:28s} "
              + " ".join(_COLUMNS[name][1](modes, best) for name in columns))


def plot_panels(records: list[dict], meta: dict) -> tuple[str, dict]:
    """What the plot shows: ``(y label, {(config, dtype, routing, op): {series: [(n, y), ...]}})``,
    every measured (impl, mode) of every configuration, dtype, routing and op.

    One rank per GPU: off-GPU GB/s of the busiest rank. Elsewhere no byte crosses NVLink
    (ranks share a GPU, or the CPU): the median time."""
    if meta.get("setup", "gpus") == "gpus":
        key, label = "gbps_real", "off-GPU GB/s (busiest rank)"
    else:
        key, label = "time_us", "median time (us), slowest rank"
    panels: dict[tuple, dict] = {}
    for r in records:
        if r["config"] == "nvlink" or r.get(key) is None:
            continue
        series = panels.setdefault((r["config"], r["dtype"], r["routing"], r["op"]), {})
        series.setdefault(f"{r['impl']} ({r['mode']})", []).append((r["tokens"], r[key]))
    for series in panels.values():
        for points in series.values():
            points.sort()
    return label, panels


def write_plot(records: list[dict], meta: dict, path: str) -> None:
    """One panel per (configuration, dtype, routing) row and op column: y against tokens
    per rank (see :func:`plot_panels`), with the NVLink ceiling where it was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(f"--plot needs matplotlib: {PLOT_EXTRA}") from e
    ylabel, panels = plot_panels(records, meta)
    if not panels:
        raise RuntimeError("nothing to plot: no measured series")
    rows = list(dict.fromkeys(k[:3] for k in panels))
    cols = [op for op in (*OPS, "other") if any(k[3] == op for k in panels)]
    ceiling = max((r["gbps_per_direction"] for r in records if r["config"] == "nvlink"), default=None)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.6 * len(cols), 3.4 * len(rows) + 0.6), squeeze=False)
    for i, (config, dtype, routing) in enumerate(rows):
        for j, op in enumerate(cols):
            ax = axes[i][j]
            series = panels.get((config, dtype, routing, op))
            if not series:
                ax.set_axis_off()
                continue
            for name, points in sorted(series.items()):
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            if ceiling and meta.get("setup", "gpus") == "gpus":
                ax.axhline(ceiling, color="k", linestyle="--", label="NVLink ceiling (per direction)")
            ax.set_xscale("log", base=2)
            if ylabel.startswith("median time"):
                ax.set_yscale("log")
            ax.set_xlabel("tokens per rank")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{config}, {dtype}, {routing}: {op}", fontsize=9)
            ax.legend(fontsize=6)
    fig.suptitle(f"{setup_line(meta)}\n{meta.get('label', '')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
