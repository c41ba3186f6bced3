"""One table from `b4m bench quality` runs made side by side (one commit, one machine state).

    python bench/merge_quality.py --out docs/quality \\
        --row "B4M (uncaptioned)=/tmp/a/results.json::B4M uncaptioned (auto captions)" \\
        --row "Joint LoRA (uncaptioned)=/tmp/b/results.json::Joint LoRA (DB+LoRA)" ...

A two-core machine runs the table's rows fastest as two processes (`--methods` picks each
one's rows, `--set` their shared settings), which writes two results.json. This joins them:
every row must cover the same pairs and seeds (so each later row's difference from the first
is paired), the first row is the one the differences are taken from, and each row keeps the
settings of the run it came from. A label given twice joins one row of two runs over
disjoint seeds (seeds 0-1 in one process, seed 2 in another) into one row. Writes results.json and table.md (the bench's own layout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from b4m_core.micro.quality import _aggregate, _differences, _mean_ci, write_table


def parse_row(spec: str) -> tuple[str, Path, str]:
    """'LABEL=PATH::ROW' -> (label, path, row); a label may hold '=' ("k=1"), a path not."""
    rest, sep2, row = spec.partition("::")
    label, sep, path = rest.rpartition("=")
    if not (sep and sep2 and label and path and row):
        raise SystemExit(f"--row must be LABEL=PATH::ROW, got {spec!r}")
    return label, Path(path), row


def _seeds(row: dict) -> list[int]:
    return sorted({int(k.rsplit("|", 1)[1]) for k in row["pairs"]})


def _pairs(row: dict) -> list[list[str]]:
    return sorted([list(t) for t in {tuple(k.split("|")[:2]) for k in row["pairs"]}])


def join_seeds(parts: list[dict]) -> dict:
    """One row from the same row of runs over disjoint seeds (e.g. seeds 0-1 in one process
    and seed 2 in another): its cells joined, its means and intervals taken again."""
    if len(parts) == 1:
        return parts[0]
    seen: set[int] = set()
    for r in parts:
        if seen & set(_seeds(r)):
            raise SystemExit(f"runs joined into one row repeat seeds {sorted(seen & set(_seeds(r)))}")
        seen |= set(_seeds(r))
    pairs = {k: v for r in parts for k, v in r["pairs"].items()}
    seeds = sorted(seen)
    row = {"aggregate": _aggregate(pairs, seeds), "pairs": pairs, "seconds": sum(r["seconds"] for r in parts)}
    if all("blocks" in r for r in parts):  # every part covers the same pairs, so the mean of means
        row["blocks"] = {
            stage: {b: sum(r["blocks"][stage][b] for r in parts) / len(parts) for b in v}
            for stage, v in parts[0]["blocks"].items()
        }
    if all("single" in r for r in parts):
        row["single"] = {}
        for kind in ("content", "style"):
            cells = {k: v for r in parts for k, v in r["single"][kind]["cells"].items()}
            row["single"][kind] = _mean_ci(cells, seeds) | {"cells": cells}
    return row


def merge(rows: list[tuple[str, Path, str]]) -> dict:
    """Rows in the order given; a label given more than once joins those runs' seeds."""
    loaded: dict[Path, dict] = {}
    parts: dict[str, list[dict]] = {}
    sources: dict[str, list[dict]] = {}
    merged: dict = {"methods": {}, "runs": {}}
    for label, path, row in rows:
        run = loaded.setdefault(path, json.loads(path.read_text()))
        if row not in run["methods"]:
            raise SystemExit(f"{path} has no row {row!r}: {list(run['methods'])}")
        r = run["methods"][row]
        if "same_as" in r:  # a row that shares another's adapters: take the one it names
            r = run["methods"][r["same_as"]]
        # a results.partial.json (a run stopped after its finished rows) has no settings yet
        split = run.get("settings", {}).get("split")
        if split is not None and merged.setdefault("split", split) != split:
            raise SystemExit(f"{path} is on the {split} split, the first run on {merged['split']}")
        parts.setdefault(label, []).append(r)
        sources.setdefault(label, []).append({"run": str(path), "row": row, "seeds": _seeds(r)})
        merged["runs"][str(path)] = {
            k: run[k]
            for k in ("settings", "timings_s", "time_to_new_pair", "total_s", "probe_test_accuracy")
            if k in run
        }
    for label, rs in parts.items():
        r = join_seeds(rs)
        for key, value in (("pairs", _pairs(r)), ("seeds", _seeds(r))):
            if merged.setdefault(key, value) != value:
                raise SystemExit(f"row {label!r} covers other {key} than the first row: {value} vs {merged[key]}")
        merged["methods"][label] = r | {"sources": sources[label]}
    merged["differences"] = _differences(merged)
    return merged


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=PATH::ROW", help="a row, in order")
    ap.add_argument("--out", required=True, help="folder for results.json and table.md")
    args = ap.parse_args(argv)
    merged = merge([parse_row(s) for s in args.row])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=2))
    sys.stdout.write(write_table(merged, out / "table.md"))


if __name__ == "__main__":
    main()
