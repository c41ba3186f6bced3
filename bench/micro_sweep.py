"""A short sweep of break-stage steps and learning rate on the micro model (2 CPU cores).

    python bench/micro_sweep.py [--pairs hexagon:zigzag,flower:marble] [--out docs/bench/micro_sweep.json]

For each setting: B4M (content up, k = 3 MCP sets) trains the content and the style of
each pair, composes them, fine-tunes (make stage), draws the quality benchmark's prompts
and is scored by the probes. Prints seconds per concept and per pair beside the scores,
so the defaults can meet the 60 s / 15 s budgets.
"""

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from b4m_core.micro.quality import QualityBench, Settings, methods
from b4m_core.models import load_base

GRID = [
    dict(break_steps=150, learning_rate=1e-2),
    dict(break_steps=150, learning_rate=5e-3),
    dict(break_steps=250, learning_rate=5e-3),
    dict(break_steps=150, learning_rate=5e-3, batch_size=4),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="hexagon:zigzag,flower:marble")
    ap.add_argument("--make-steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", type=int, nargs="*", help="indices of GRID to run")
    args = ap.parse_args()
    torch.set_num_threads(2)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    contents, styles = sorted({c for c, _ in pairs}), sorted({s for _, s in pairs})
    bench = QualityBench(load_base("micro"), contents, styles, Settings())
    b4m = methods(16)[0]
    rows = []
    for g in [GRID[i] for i in args.only] if args.only else GRID:
        bench.s = replace(Settings(), make_steps=args.make_steps, **g).resolved(bench.base)
        bench.timings = {}
        fused = bench.adapters(b4m, {})
        scores = [bench.score(*bench.draw(fused[p]), *p)["probe"] for p in pairs]
        row = {
            **g,
            "make_steps": args.make_steps,
            **{k: float(np.mean([s[k] for s in scores])) for k in scores[0]},
            "break_s_per_concept": float(np.mean(bench.timings["b4m break (per concept)"])),
            "make_s_per_pair": float(np.mean(bench.timings["b4m make (per pair)"])),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"pairs": pairs, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
