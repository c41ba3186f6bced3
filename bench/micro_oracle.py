"""The ceiling of issue 12's fused pairs: one plain LoRA trained on renders of the answer.

    python bench/micro_oracle.py [--split dev] [--steps 250] [--batch 1] [--lr 5e-3] [--rank 16]
        [--images 4] [--seed 1] [--pairs N] [--out docs/quality/dev/oracle.json] [--grid grid.png]

For every content x style pair of the split, the world renders the pair itself (the held-out
shape painted in the held-out pattern, large and centred on random backgrounds, as the
reference sets are), captioned in the bench's grammar with both identifiers ("a large fsv
shape in rbq pattern style in the center on a blue background"). A plain LoRA learns it,
then draws the bench's own evaluation prompts, read by the same probe. No method that only
ever sees the content and the style apart can be expected to beat this: if it is low, the
base model (or the budget) is the wall, not B4M. Development split by default: nothing here
is chosen on the test split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from b4m_core.config import PLPConfig, TrainConfig
from b4m_core.data import Concept, concept_phrase
from b4m_core.micro.quality import EVAL_ATTRIBUTES, QualityBench, Settings, bootstrap, eval_prompt, save_rows
from b4m_core.micro.references import CONTENT_TOKEN, CONTENT_WORD, STYLE_TOKEN, STYLE_WORD
from b4m_core.micro.world import BACKGROUNDS, SPLITS, Scene, render
from b4m_core.models import load_base
from b4m_core.training import train_concept


def pair_concept(content: str, style: str, images: int, seed: int) -> tuple[Concept, str, str]:
    """Renders of the pair as one concept, and the two phrases the prompts name it by."""
    cphrase = concept_phrase(CONTENT_TOKEN[content], CONTENT_WORD[content])
    sphrase = concept_phrase(STYLE_TOKEN[style], STYLE_WORD[style])
    rng = np.random.default_rng([seed, 5])
    bgs = tuple(BACKGROUNDS)
    pics, caps = [], []
    for i in range(images):
        bg = bgs[rng.integers(len(bgs))]
        pics.append(render(Scene(content, style, bg, "center", "large"), seed=5000 + 31 * seed + i))
        caps.append(f"a large {{content}} in {sphrase} style in the center on a {bg} background")
    concept = Concept("content", pics, CONTENT_WORD[content], token=CONTENT_TOKEN[content], captions=caps)
    return concept, cphrase, sphrase


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="dev", choices=sorted(SPLITS))
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--images", type=int, default=4, help="renders of each pair")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=0, help="only the first N pairs (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--grid", default=None, help="one row per pair: its drawings")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = load_base("micro", device="cpu")
    contents, styles = SPLITS[args.split]
    bench = QualityBench(base, list(contents), list(styles), Settings(seed=args.seed))
    cfg = TrainConfig(steps=args.steps, learning_rate=args.lr, batch_size=args.batch, seed=args.seed)
    cells, rows, seconds = {}, [], []
    pairs = [(c, s) for c in contents for s in styles][: args.pairs or None]
    for c, s in pairs:
        concept, cphrase, sphrase = pair_concept(c, s, args.images, args.seed)
        t = time.perf_counter()
        adapter = train_concept(base, concept, "lora", plp=PLPConfig(rank=args.rank), cfg=cfg)
        seconds.append(time.perf_counter() - t)
        attrs = EVAL_ATTRIBUTES[: bench.s.images_per_pair]
        prompts = [eval_prompt(*a).format(content=cphrase, style=sphrase) for a in attrs]
        images = bench._draw(adapter, prompts, args.seed)
        cells[f"{c}|{s}"] = bench.score(images, attrs, c, s)["probe"]
        rows.append(images)
        print(c, s, {k: round(v, 3) for k, v in cells[f"{c}|{s}"].items()}, f"{seconds[-1]:.0f} s", flush=True)
    summary = {}
    for k in ("content", "style", "prompt", "average"):
        vals = np.array([v[k] for v in cells.values()])
        summary[k] = {"mean": float(vals.mean()), "ci95": list(bootstrap(vals[:, None]))}
    report = {
        "what": "one plain LoRA per pair trained on renders of the pair (the ceiling)",
        "args": vars(args),
        "summary": summary,
        "pairs": cells,
        "train_s_per_pair": float(np.mean(seconds)),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.grid:
        save_rows(rows, args.grid)
    return report


if __name__ == "__main__":
    main()
