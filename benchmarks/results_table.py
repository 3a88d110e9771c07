"""Merge the --json files of one benchmark run (one per configuration) and print the
Markdown summary table of RESULTS.md.

    python benchmarks/results_table.py --merge-into results-4gpu.json bench-*.json > table.md

Ours and the all-gather baseline are graph-replayed; the all-to-all baseline cannot be
captured (host-side split sizes), so its eager time is what it offers.
"""

from __future__ import annotations

import argparse
import json


def load(paths: list[str]) -> dict:
    runs = [json.load(open(p)) for p in paths]
    meta = dict(runs[0]["meta"])
    meta["configs"] = [c for run in runs for c in run["meta"]["configs"]]
    meta["commands"] = [run["meta"]["command"] for run in runs]
    meta.pop("command", None)
    records = []
    for run in runs:
        for r in run["records"]:
            records.append(r)
    return {"meta": meta, "records": records}


def fmt(value, spec: str, unit: str = "") -> str:
    return "–" if value is None else format(value, spec) + unit


def table(data: dict) -> str:
    recs = [r for r in data["records"] if r["config"] != "nvlink"]

    def find(key, impl, mode):
        return next((r for r in recs if (r["config"], r["dtype"], r["routing"], r["tokens"], r["op"]) == key
                     and r["impl"] == impl and r["mode"] == mode), None)

    lines = ["| config | dtype | routing | n | op | ours graph (p99) | ours eager | x floor | AG+RS graph | "
             "all-to-all eager | ours / best baseline | GB/s real (logical) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    seen = []
    for r in recs:
        key = (r["config"], r["dtype"], r["routing"], r["tokens"], r["op"])
        if key in seen or not r["impl"].startswith("hybrid_ep_infer"):
            continue
        seen.append(key)
        eager = find(key, r["impl"], "eager")
        graph = find(key, r["impl"], "graph") or eager  # the CPU run has no graphs
        ag = find(key, "nccl_allgather_reducescatter", "graph")
        a2a = find(key, "nccl_all_to_all", "eager")
        gbps = fmt(graph["gbps_real"], ".0f")
        if graph.get("gbps_logical") is not None:
            gbps += f" ({graph['gbps_logical']:.0f})"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {fmt(graph['time_us'], '.0f')} µs "
            f"({fmt(graph['p99_us'], '.0f')}) | {fmt(eager and eager['time_us'], '.0f')} µs | "
            f"{fmt(graph['ratio_to_floor'], '.2f')} | {fmt(ag and ag['time_us'], '.0f', ' µs')} | "
            f"{fmt(a2a and a2a['time_us'], '.0f', ' µs')} | {fmt(graph.get('ratio_to_best_baseline'), '.2f')} | {gbps} |")
    return "\n".join(lines)


def link_rates(data: dict) -> str:
    rates = {}
    for r in data["records"]:
        if r["config"] == "nvlink":
            rates.setdefault(r["impl"], []).append(r["gbps_per_direction"])
    return "; ".join(f"{impl} {min(v):.0f}–{max(v):.0f} GB/s each way" for impl, v in rates.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--merge-into", default=None, help="write the merged JSON here")
    args = p.parse_args()
    data = load(args.files)
    if args.merge_into:
        with open(args.merge_into, "w") as f:
            json.dump(data, f, indent=1)
    meta = data["meta"]
    print(f"{meta['card']} x{meta['ranks']}, driver {meta['driver']}, torch {meta['torch']}, commit {meta['commit']}")
    print(f"pair copy rates: {link_rates(data)}\n")
    print(table(data))


if __name__ == "__main__":
    main()
