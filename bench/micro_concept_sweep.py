"""Can one break-stage adapter learn its concept? A sweep of recipes on the development split.

    python bench/micro_concept_sweep.py --recipe base: --recipe lr1e-2:learning_rate=1e-2 \
        [--kinds content,style] [--images 6] [--out docs/quality/dev/concept_sweep.json] [--strips DIR]

Each recipe is `name:key=value,...` over the bench's `Settings` (break_steps, learning_rate,
rank, rho, aux_sets, batch_size, captions, basis_scale, routing, ...) plus `method=lora`
(a plain LoRA of the same rank, no PLP) or `method=lora_fa` (its down projection frozen). For every development content and style it trains
one adapter and draws it alone on the bench's prompts (a content in a known style, a style on
a known shape), read by the probe. This is the first wall of issue 12: the fused pairs cannot
be better than the adapters they are made from. Development concepts only: nothing here is
chosen on the test split.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from b4m_core import training
from b4m_core.layers import LoRALinear
from b4m_core.micro.bank import aux_bank
from b4m_core.micro.quality import QualityBench, Settings, bootstrap, save_rows, setting_changes
from b4m_core.micro.world import SPLITS
from b4m_core.models import load_base
from b4m_core.training import train_concept


class _FrozenDownLoRA(LoRALinear):
    """LoRA-FA: only `up` trains, `down` keeps its random init, as PLP's frozen C does for a
    content half. A diagnostic row (`method=lora_fa`): is it the frozen read that costs?"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.down.requires_grad_(False)


def parse_recipe(text: str) -> tuple[str, dict]:
    """`name:key=value,...` as the recipe's name and its typed changes (`method` kept apart)."""
    name, _, body = text.partition(":")
    items = [i for i in body.split(",") if i]
    method = [i.partition("=")[2] for i in items if i.startswith("method=")]
    out = setting_changes([i for i in items if not i.startswith("method=")])
    return name, out | ({"method": method[0]} if method else {})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", action="append", required=True)
    ap.add_argument("--kinds", default="content,style")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--strips", default=None, help="folder for one PNG per recipe: a row of drawings per concept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contents, styles = SPLITS[args.split]
    base = load_base("micro")
    bench = QualityBench(base, list(contents), list(styles), Settings(single_images=args.images), log=lambda m: None)
    results = {}
    for text in args.recipe:
        name, over = parse_recipe(text)
        method = over.pop("method", "b4m")
        frozen_down = method == "lora_fa"  # diagnostic: a LoRA whose down projection stays at its init
        if frozen_down:
            method = "lora"
        training.LoRALinear = _FrozenDownLoRA if frozen_down else LoRALinear
        s = replace(bench.s, **over).resolved(base)
        refs = bench.refs(s)
        row: dict = {"settings": {**over, "method": method}, "scores": {}, "seconds": []}
        drawn: list[list] = []
        for kind in args.kinds.split(","):
            for n in contents if kind == "content" else styles:
                t = time.perf_counter()
                adapter = train_concept(
                    base,
                    refs[(kind, n)],
                    method,
                    aux=aux_bank(kind, s.aux_sets, seed=s.seed, token_bound=s.token_bound_aux)
                    if method == "b4m"
                    else None,
                    plp=s.plp(),
                    cfg=bench._cfg(s, s.break_steps, routing=s.routing),
                )
                row["seconds"].append(time.perf_counter() - t)
                drawn.append([])
                asked: list[bool] = []
                row["scores"][f"{kind}|{n}"] = bench.score_single(kind, n, adapter, s.seed, keep=drawn[-1], asked=asked)
                # does the prompt's known other half still come through (a content in the asked style)?
                row.setdefault("asked", {})[f"{kind}|{n}"] = float(np.mean(asked))
                print(
                    f"  {name} {kind} {n}: {row['scores'][f'{kind}|{n}']:.2f}, asked other half "
                    f"{row['asked'][f'{kind}|{n}']:.2f} ({row['seconds'][-1]:.0f} s)",
                    flush=True,
                )
        for kind in args.kinds.split(","):
            cells = np.array([v for k, v in row["scores"].items() if k.startswith(kind)])
            lo, hi = bootstrap(cells)
            asked = np.array([v for k, v in row["asked"].items() if k.startswith(kind)])
            row[kind] = {"mean": float(cells.mean()), "ci": [lo, hi], "asked_other_half": float(asked.mean())}
        row["s_per_concept"] = float(np.mean(row["seconds"]))
        results[name] = row
        print(
            f"{name}: "
            + ", ".join(
                f"{k} {row[k]['mean']:.3f} [{row[k]['ci'][0]:.2f}, {row[k]['ci'][1]:.2f}]"
                f" (asked other half {row[k]['asked_other_half']:.2f})"
                for k in args.kinds.split(",")
            )
            + f"; {row['s_per_concept']:.1f} s/concept; "
            + " ".join(f"{k.split('|')[1]}={v:.2f}" for k, v in row["scores"].items()),
            flush=True,
        )
        if args.strips:
            save_rows(drawn, Path(args.strips) / f"{name}.png")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
