"""The ceiling of issue 12's fused pairs: one plain LoRA trained on renders of the answer.

    python bench/micro_oracle.py [--split dev] [--steps 250] [--batch 1] [--lr 5e-3] [--rank 16]
        [--adapt attn|attn+conv|full] [--images 4] [--seed 1] [--pairs N]
        [--out docs/quality/dev/oracle.json] [--grid grid.png]
    python bench/micro_oracle.py --vae-ceiling [--out vae.json]

For every content x style pair of the split, the world renders the pair itself (the held-out
shape painted in the held-out pattern, large and centred on random backgrounds, as the
reference sets are), captioned in the bench's grammar with both identifiers ("a large fsv
shape in rbq pattern style in the center on a blue background"). A plain LoRA learns it,
then draws the bench's own evaluation prompts, read by the same probe. No method that only
ever sees the content and the style apart can be expected to beat this: if it is low, the
base model (or the budget) is the wall, not B4M. Development split by default: nothing here
is chosen on the test split.

`--adapt` says what learns the pair, to find where the ceiling sits: `attn` (a LoRA on the
attention projections, what every adapter here covers), `attn+conv` (that and a LoRA on every
ResNet convolution, LoCon-like), `full` (every UNet weight: what the base model can learn at
all from these renders). `--vae-ceiling` only round-trips the evaluation scenes through the
VAE and reads them: what no adapter can beat.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from b4m_core.config import PLPConfig, TrainConfig
from b4m_core.data import Concept, concept_phrase, preprocess
from b4m_core.generation import GenerationRequest
from b4m_core.micro.quality import EVAL_ATTRIBUTES, QualityBench, Settings, bootstrap, eval_prompt, save_rows
from b4m_core.micro.references import CONTENT_TOKEN, CONTENT_WORD, STYLE_TOKEN, STYLE_WORD
from b4m_core.micro.world import BACKGROUNDS, SPLITS, Scene, render
from b4m_core.models import load_base
from b4m_core.training import RowGroup, TrainingSession, _resolution, _samples, train_concept


def vae_ceiling(base, bench, contents, styles, seed: int) -> dict:
    """The evaluation scenes rendered, round-tripped through the VAE, read by the probe."""
    vae = base.pipe.vae
    cells = {}
    for c in contents:
        for s in styles:
            attrs = EVAL_ATTRIBUTES[: bench.s.images_per_pair]
            pics = [render(Scene(c, s, a[2], a[1], a[0]), seed=9000 + 17 * seed + i) for i, a in enumerate(attrs)]
            x = torch.stack([preprocess(p, p.width).pixels for p in pics])
            with torch.no_grad():
                y = vae.decode(vae.encode(x).latent_dist.mode()).sample
            recon = base.pipe.image_processor.postprocess(y, output_type="pil")
            cells[f"{c}|{s}"] = {
                "raw": bench.score(pics, attrs, c, s)["probe"],
                "vae": bench.score(recon, attrs, c, s)["probe"],
            }
    return cells


def train_full(base, bench, concept, prompts, args):
    """Every UNet weight trained on the pair's renders; draws the prompts, puts the model back."""
    unet = base.unet
    bench.gen.set_adapter(None)
    cfg = TrainConfig(steps=args.steps, learning_rate=args.lr, batch_size=args.batch, seed=args.seed)
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    params = list(unet.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        groups = [RowGroup(_samples(base, concept, _resolution(base, cfg), cfg), cfg.batch_size, 1.0)]
        TrainingSession(base, [{"params": params}], groups, cfg).run()
        unet.eval()
        images = []
        for i, prompt in enumerate(prompts):
            req = GenerationRequest(prompt, seed=args.seed + i, steps=bench.s.sample_steps, guidance=bench.s.guidance)
            images += bench.gen.generate(req)
    finally:
        unet.load_state_dict(saved)
        for p in params:
            p.requires_grad_(False)
    return images


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
    ap.add_argument("--adapt", default="attn", choices=("attn", "attn+conv", "full"))
    ap.add_argument("--vae-ceiling", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--grid", default=None, help="one row per pair: its drawings")
    ap.add_argument(
        "--base", default="micro", help="micro (shipped) or a micro-shaped folder (b4m bench quality --base)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    base = load_base(args.base, device="cpu")
    contents, styles = SPLITS[args.split]
    bench = QualityBench(base, list(contents), list(styles), Settings(seed=args.seed))
    if args.vae_ceiling:
        cells = vae_ceiling(base, bench, contents, styles, args.seed)
        for k, v in cells.items():
            print(k, v)
        summary = {
            src: {h: float(np.mean([v[src][h] for v in cells.values()])) for h in ("content", "style", "prompt")}
            for src in ("raw", "vae")
        }
        print(json.dumps(summary, indent=1))
        if args.out:
            Path(args.out).write_text(
                json.dumps(
                    {"what": "VAE round trip of the evaluation scenes", "summary": summary, "pairs": cells}, indent=1
                )
            )
        return summary
    cfg = TrainConfig(steps=args.steps, learning_rate=args.lr, batch_size=args.batch, seed=args.seed)
    cells, rows, seconds = {}, [], []
    pairs = [(c, s) for c in contents for s in styles][: args.pairs or None]
    for c, s in pairs:
        concept, cphrase, sphrase = pair_concept(c, s, args.images, args.seed)
        attrs = EVAL_ATTRIBUTES[: bench.s.images_per_pair]
        prompts = [eval_prompt(*a).format(content=cphrase, style=sphrase) for a in attrs]
        t = time.perf_counter()
        if args.adapt == "full":
            images = train_full(base, bench, concept, prompts, args)
            seconds.append(time.perf_counter() - t)
        else:
            plp = PLPConfig(rank=args.rank, targets=args.adapt)
            adapter = train_concept(base, concept, "lora", plp=plp, cfg=cfg)
            seconds.append(time.perf_counter() - t)
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
