"""One table from `b4m bench quality` runs made side by side (one commit, one machine state).

    python bench/merge_quality.py --out docs/quality \\
        --row "B4M (uncaptioned)=/tmp/a/results.json::B4M uncaptioned (auto captions)" \\
        --row "Joint LoRA (uncaptioned)=/tmp/b/results.json::Joint LoRA (DB+LoRA)" ...

A two-core machine runs the table's rows fastest as two processes (`--methods` picks each
one's rows, `--set` their shared settings), which writes two results.json. This joins them:
every row must cover the same pairs and seeds (so each later row's difference from the first
is paired), the first row is the one the differences are taken from, and each row keeps the
settings of the run it came from. Writes results.json and table.md (the bench's own layout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from b4m_core.micro.quality import _differences, write_table


def parse_row(spec: str) -> tuple[str, Path, str]:
    """'LABEL=PATH::ROW' -> (label, path, row); a label may hold '=' ("k=1"), a path not."""
    rest, sep2, row = spec.partition("::")
    label, sep, path = rest.rpartition("=")
    if not (sep and sep2 and label and path and row):
        raise SystemExit(f"--row must be LABEL=PATH::ROW, got {spec!r}")
    return label, Path(path), row


def merge(rows: list[tuple[str, Path, str]]) -> dict:
    loaded: dict[Path, dict] = {}
    merged: dict = {"methods": {}, "runs": {}}
    for label, path, row in rows:
        run = loaded.setdefault(path, json.loads(path.read_text()))
        if row not in run["methods"]:
            raise SystemExit(f"{path} has no row {row!r}: {list(run['methods'])}")
        r = run["methods"][row]
        if "same_as" in r:  # a row that shares another's adapters: take the one it names
            r = run["methods"][r["same_as"]]
        for key in ("pairs", "seeds"):
            if merged.setdefault(key, run[key]) != run[key]:
                raise SystemExit(f"{path} covers other {key} than the first run: {run[key]} vs {merged[key]}")
        split = run["settings"].get("split")
        if merged.setdefault("split", split) != split:
            raise SystemExit(f"{path} is on the {split} split, the first run on {merged['split']}")
        merged["methods"][label] = r | {"run": str(path), "row": row}
        merged["runs"][str(path)] = {
            k: run[k]
            for k in ("settings", "timings_s", "time_to_new_pair", "total_s", "probe_test_accuracy")
            if k in run
        }
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
