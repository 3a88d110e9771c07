"""The benchmark's table (stdout) and plot (PNG)."""

from __future__ import annotations


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(records: list[dict], meta: dict) -> None:
    links = [r for r in records if r["config"] == "nvlink"]
    print(f"\n{meta['card']} x{meta['ranks']}, torch {meta['torch']}, driver {meta['driver']}, commit {meta['commit']}")
    for link in links:
        print(f"NVLink pair copy, both directions at once, {link['impl']}: {link['gbps_per_direction']:.0f} GB/s each way")
    if links:
        print("(the floor uses the faster)")
    print("times: median (us) of the slowest rank per sample; p99 of graph replays; x floor / x best baseline "
          "for graph replays (eager where an impl has no graph)")
    header = (f"{'config':13s} {'dtype':5s} {'routing':7s} {'n':>5s} {'op':10s} {'impl':28s} {'eager':>9s} "
              f"{'graph':>9s} {'p99':>9s} {'floor':>8s} {'x floor':>7s} {'x best':>7s} {'GB/s':>6s} {'log.GB/s':>8s}")
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
              f"{_fmt(modes.get('eager', {}).get('time_us'), '9.1f')} {_fmt(modes.get('graph', {}).get('time_us'), '9.1f')} "
              f"{_fmt(best.get('p99_us'), '9.1f')} {_fmt(best.get('floor_us'), '8.1f')} "
              f"{_fmt(best.get('ratio_to_floor'), '7.2f')} {_fmt(best.get('ratio_to_best_baseline'), '7.2f')} "
              f"{_fmt(best.get('gbps_real'), '6.0f')} {_fmt(best.get('gbps_logical'), '8.0f')}")


def write_plot(records: list[dict], meta: dict, path: str) -> None:
    """Throughput (off-GPU GB/s of the busiest rank) vs tokens per rank, dispatch and combine."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    ceiling = max((r["gbps_per_direction"] for r in records if r["config"] == "nvlink"), default=None)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, op in zip(axes, ("dispatch", "combine")):
        series: dict[tuple, list] = {}
        for r in records:
            if r.get("op") != op or r["config"] == "nvlink" or r["dtype"] != "bf16" or r["routing"] != "uniform":
                continue
            series.setdefault((r["impl"], r["mode"]), []).append((r["tokens"], r["gbps_real"]))
        for (impl, mode), points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{impl} ({mode})")
        if ceiling:
            ax.axhline(ceiling, color="k", linestyle="--", label="NVLink ceiling (per direction)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("off-GPU GB/s (busiest rank)")
        ax.set_title(f"{op}, bf16, uniform routing")
        ax.legend(fontsize=7)
    fig.suptitle(f"{meta['card']} x{meta['ranks']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
