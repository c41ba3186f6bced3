"""Pool the per-pair probe cells of bench rows run one seed at a time, with 95% intervals.

    python bench/pool_seeds.py '{"shipped": [["a/results.json", "B4M"], ["b/results.json", "B4M"]],
                                 "principal": [["c/results.json", "B4M ..."], ...]}'

Each name lists (results.json, row) pairs whose seeds differ (`b4m bench quality --set seed=N`,
e.g. two seeds side by side as two processes). Prints every row's fused probe means with
bootstrap intervals over pairs and seeds (as `b4m bench quality --seeds N` would), the mean of
its single adapters, and each later row's paired difference from the first one. Rows pooled
from runs in different machine states are a direction, not a table.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from b4m_core.micro.quality import bootstrap, paired_difference, read_summary

METRICS = ("content", "style", "prompt", "average")


def cells(files_rows: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """(pairs x seeds) arrays of one row's probe reads."""
    reads = {}
    for path, row in files_rows:
        for key, v in json.load(open(path))["methods"][row]["pairs"].items():
            content, style, seed = key.split("|")
            reads[(content, style, int(seed))] = v["probe"]
    pairs = sorted({(c, s) for c, s, _ in reads})
    seeds = sorted({sd for _, _, sd in reads})
    return {k: np.array([[reads[(c, s, sd)][k] for sd in seeds] for c, s in pairs]) for k in METRICS}


def singles(files_rows: list[tuple[str, str]]) -> dict[str, float | None]:
    vals: dict[str, list[float]] = {"content": [], "style": []}
    for path, row in files_rows:
        single = json.load(open(path))["methods"][row].get("single", {})
        for kind in vals:
            if kind in single:
                vals[kind].append(single[kind]["mean"])
    return {k: round(float(np.mean(v)), 3) if v else None for k, v in vals.items()}


def chance_from_reads(files_rows: list[tuple[str, str]]) -> float | None:
    """The style score the probe's reads give whatever was asked, over every seed (None
    when a file predates kept reads)."""
    pairs = {}
    for path, row in files_rows:
        pairs |= json.load(open(path))["methods"][row]["pairs"]
    summary = read_summary(pairs)
    return None if summary is None else round(summary["style"]["chance_from_reads"], 3)


def main() -> None:
    spec = {name: [tuple(x) for x in rows] for name, rows in json.loads(sys.argv[1]).items()}
    arrays = {}
    for name, rows in spec.items():
        arrays[name] = a = cells(rows)
        parts = []
        for k in METRICS:
            lo, hi = bootstrap(a[k])
            parts.append(f"{k} {a[k].mean():.3f} [{lo:.2f}, {hi:.2f}]")
        chance = chance_from_reads(rows)
        print(
            f"{name} ({a['average'].shape[1]} seeds): "
            + "; ".join(parts)
            + f" | single {singles(rows)}"
            + ("" if chance is None else f" | style chance_from_reads {chance}")
        )
    first, *rest = list(arrays)
    for name in rest:
        for k in METRICS:
            if arrays[name][k].shape == arrays[first][k].shape:
                d = paired_difference(arrays[name][k], arrays[first][k])
                print(f"  {name} - {first}, {k}: {d['mean']:+.3f} [{d['lo']:.2f}, {d['hi']:.2f}]")


if __name__ == "__main__":
    main()
