"""Merge the --json files of one benchmark run (one per configuration) and print the
Markdown summary table of RESULTS.md.

    python benchmarks/results_table.py --merge-into results-4gpu.json bench-*.json > table.md

Ours and the all-gather baseline are graph-replayed; the all-to-all baseline cannot be
captured (host-side split sizes), so its eager time is what it offers.

Runs where ranks share a GPU (``--ranks`` above the GPUs, under MPS; e.g. W = 2, 4, 8 on
one GPU) merge into a table of their own, one column pair per W: ours graph-replayed and
eager, the slowest rank's median. They measure launch and protocol cost, not NVLink
bandwidth, and have no baselines or floor (NCCL refuses two ranks on one GPU). Runs of
different setups (shared GPU, one rank per GPU, CPU) do not merge.
"""

from __future__ import annotations

import argparse
import json


def setup_of(meta: dict) -> str:
    """``gpus`` (one rank per GPU; also files written before setups were recorded),
    ``shared_gpu`` or ``cpu``."""
    return meta.get("setup", "gpus")


def load(paths: list[str]) -> dict:
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    setups = {setup_of(run["meta"]) for run in runs}
    if len(setups) > 1:
        raise ValueError(f"these files come from different setups ({', '.join(sorted(setups))}): "
                         f"merge each setup's files on their own")
    meta = dict(runs[0]["meta"])
    meta["configs"] = list(dict.fromkeys(c for run in runs for c in run["meta"]["configs"]))
    # (a merged file, --merge-into's output, merges again)
    meta["commands"] = [c for run in runs for c in run["meta"].get("commands", [run["meta"].get("command")])]
    meta["all_ranks"] = sorted({run["meta"]["ranks"] for run in runs})
    meta.pop("command", None)
    records = []
    for run in runs:
        for r in run["records"]:
            records.append(dict(r, ranks=r.get("ranks", run["meta"]["ranks"])))
    return {"meta": meta, "records": records}


def fmt(value, spec: str, unit: str = "") -> str:
    return "–" if value is None else format(value, spec) + unit


def _find(recs, key, impl_suffix, mode, ranks=None):
    """The record of ``key`` (config, dtype, routing, n, op) whose impl ends with
    ``impl_suffix`` (baselines are named after the process group: nccl_..., gloo_...)."""
    return next((r for r in recs if (r["config"], r["dtype"], r["routing"], r["tokens"], r["op"]) == key
                 and r["impl"].endswith(impl_suffix) and r["mode"] == mode
                 and (ranks is None or r["ranks"] == ranks)), None)


def table(data: dict) -> str:
    if setup_of(data["meta"]) == "shared_gpu":
        return shared_gpu_table(data)
    recs = [r for r in data["records"] if r["config"] != "nvlink"]

    lines = ["| config | dtype | routing | n | op | ours graph (p99) | ours eager | x floor | AG+RS graph | "
             "all-to-all eager | ours / best baseline | GB/s real (logical) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = []
    for r in recs:
        key = (r["config"], r["dtype"], r["routing"], r["tokens"], r["op"])
        if key in seen or not r["impl"].startswith("hybrid_ep_infer"):
            continue
        seen.append(key)
        eager = _find(recs, key, r["impl"], "eager")
        graph = _find(recs, key, r["impl"], "graph") or eager  # the CPU run has no graphs
        ag = _find(recs, key, "_allgather_reducescatter", "graph") or _find(recs, key, "_allgather_reducescatter",
                                                                             "eager")
        a2a = _find(recs, key, "_all_to_all", "eager")
        gbps = fmt(graph.get("gbps_real"), ".0f")
        if graph.get("gbps_logical") is not None:
            gbps += f" ({graph['gbps_logical']:.0f})"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {fmt(graph['time_us'], '.0f')} µs "
            f"({fmt(graph['p99_us'], '.0f')}) | {fmt(eager and eager['time_us'], '.0f')} µs | "
            f"{fmt(graph.get('ratio_to_floor'), '.2f')} | {fmt(ag and ag['time_us'], '.0f', ' µs')} | "
            f"{fmt(a2a and a2a['time_us'], '.0f', ' µs')} | "
            f"{fmt(graph.get('ratio_to_best_baseline'), '.2f')} | {gbps} |")
    return "\n".join(lines)


def shared_gpu_table(data: dict) -> str:
    """One row per (config, dtype, routing, op, n); per W, ours graph-replayed (p99) and eager."""
    recs = [r for r in data["records"] if r["config"] != "nvlink" and r["impl"].startswith("hybrid_ep_infer")]
    widths = sorted({r["ranks"] for r in recs})
    lines = ["| config | dtype | routing | op | n | " + " | ".join(f"W={w} graph (p99) | W={w} eager" for w in widths)
             + " |", "|---|---|---|---|---|" + "---|---|" * len(widths)]
    keys = list(dict.fromkeys((r["config"], r["dtype"], r["routing"], r["op"], r["tokens"]) for r in recs))
    for config, dtype, routing, op, n in keys:
        key = (config, dtype, routing, n, op)
        cells = []
        for w in widths:
            graph = _find(recs, key, "", "graph", w)
            eager = _find(recs, key, "", "eager", w)
            cells.append(f"{fmt(graph and graph['time_us'], '.1f', ' µs')} ({fmt(graph and graph['p99_us'], '.1f')})")
            cells.append(fmt(eager and eager["time_us"], ".1f", " µs"))
        lines.append(f"| {config} | {dtype} | {routing} | {op} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heading(data: dict) -> str:
    meta = data["meta"]
    setup = setup_of(meta)
    common = f"driver {meta['driver']}, torch {meta['torch']}, commit {meta['commit']}"
    if setup == "shared_gpu":
        widths = ", ".join(str(w) for w in meta["all_ranks"])
        gpus = meta.get("gpus", 1)
        where = "one GPU" if gpus == 1 else f"{gpus} GPUs"
        sms = {}
        for r in data["records"]:
            if r.get("sms") is not None:
                sms.setdefault(r["ranks"], set()).add(r["sms"])
        sms_line = "; ".join(f"W={w}: {', '.join(map(str, sorted(v)))}" for w, v in sorted(sms.items()))
        return (f"{meta['card']}, {where} shared by W = {widths} ranks under MPS: launch and protocol cost, not NVLink "
                f"bandwidth ({common})\n"
                f"slowest rank's median per sample; left out: NCCL baselines and the NVLink floor (NCCL refuses two "
                f"ranks on one GPU)\nblocks per copy kernel of each rank: {sms_line or '–'}\n")
    if setup == "cpu":
        return (f"{meta['card']} (CPU) x{meta['ranks']}: the reference backend over gloo; these numbers say nothing "
                f"about speed ({common})\n")
    return f"{meta['card']} x{meta['ranks']}, {common}\npair copy rates: {link_rates(data)}\n"


def link_rates(data: dict) -> str:
    rates = {}
    for r in data["records"]:
        if r["config"] == "nvlink":
            rates.setdefault(r["impl"], []).append(r["gbps_per_direction"])
    return "; ".join(f"{impl} {min(v):.0f}–{max(v):.0f} GB/s each way" for impl, v in rates.items()) or "–"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--merge-into", default=None, help="write the merged JSON here")
    args = p.parse_args(argv)
    try:
        data = load(args.files)
    except ValueError as e:
        p.error(str(e))
    if args.merge_into:
        with open(args.merge_into, "w") as f:
            json.dump(data, f, indent=1)
    print(heading(data))
    print(table(data))


if __name__ == "__main__":
    main()
