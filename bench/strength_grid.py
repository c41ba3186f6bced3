"""A content-strength x style-strength grid of one fused B4M adapter.

    python bench/strength_grid.py --adapter FUSED.safetensors --out docs/strength_grid.png \
        [--prompt "a large {content} in {style} style on a blue background"] \
        [--scales 0,0.5,1,1.5,2] [--seeds 0,1] [--steps 20] [--json out.json]

Rows scale the adapter's content half (generation's `content_scale`), columns its style
half (`style_scale`); every cell is drawn with the same seeds, so cells differ by the scales
alone. On the micro model each cell is also read by the probe (is it the adapter's content?
its style?) when the adapter names micro concepts (`--content` / `--style` give the probe's
names when its words are not them), and the table of reads is printed and saved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

from b4m_core.adapter import Adapter
from b4m_core.generation import GenerationRequest, Generator
from b4m_core.models import load_base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="a fused B4M adapter file")
    ap.add_argument("--prompt", default="a large {content} in {style} style on a blue background")
    ap.add_argument("--scales", default="0,0.5,1,1.5,2", help="values for both axes, 0-2")
    ap.add_argument("--seeds", default="0", help="one image per seed in each cell")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--base", default=None, help="base model (default: the one the adapter names)")
    ap.add_argument("--content", default=None, help="probe name of the content (micro; default: its word)")
    ap.add_argument("--style", default=None, help="probe name of the style (micro; default: its word)")
    ap.add_argument("--out", required=True, help="PNG file of the grid")
    ap.add_argument("--json", default=None, help="also write the probe's reads here")
    args = ap.parse_args()

    adapter = Adapter.load(args.adapter)
    base = load_base(args.base or adapter.base_model)
    gen = Generator(base)
    scales = [float(v) for v in args.scales.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    cells: dict[tuple[float, float], list[Image.Image]] = {}
    for cs in scales:
        for ss in scales:
            gen.set_adapter(adapter, fuse=True, content_scale=cs, style_scale=ss)
            cells[(cs, ss)] = [
                gen.generate(GenerationRequest(args.prompt, seed=s, steps=args.steps, guidance=args.guidance))[0]
                for s in seeds
            ]
    gen.set_adapter(None)

    reads = _probe_reads(base, adapter, cells, args.content, args.style)
    _save_grid(cells, scales, seeds, Path(args.out), reads)
    if reads is not None:
        print("content read (rows: content_scale, columns: style_scale) | style read")
        print("      " + " ".join(f"{ss:>5}" for ss in scales) + "  |  " + " ".join(f"{ss:>5}" for ss in scales))
        for cs in scales:
            row_c = " ".join(f"{reads[(cs, ss)]['content']:5.2f}" for ss in scales)
            row_s = " ".join(f"{reads[(cs, ss)]['style']:5.2f}" for ss in scales)
            print(f"{cs:5} {row_c}  |  {row_s}")
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "adapter": str(args.adapter),
                        "prompt": args.prompt,
                        "seeds": seeds,
                        "cells": [{"content_scale": cs, "style_scale": ss, **r} for (cs, ss), r in reads.items()],
                    },
                    indent=1,
                )
            )
    print(f"grid: {args.out}")


def _probe_reads(base, adapter, cells, content, style) -> dict | None:
    """Per cell, the share of images the micro probe reads as the adapter's content / style."""
    if base.arch != "micro":
        return None
    from b4m_core.micro.probes import HEADS, load_probe, predict

    content = content or adapter.words.get("content", "")
    style = style or adapter.words.get("style", "")
    if content not in HEADS["content"] or style not in HEADS["style"]:
        print(f"no probe reads: {content!r} / {style!r} are not micro concepts (give --content / --style)")
        return None
    probe = load_probe()[0]
    out = {}
    for key, images in cells.items():
        r = predict(probe, images)
        out[key] = {
            "content": sum(x["content"] == content for x in r) / len(r),
            "style": sum(x["style"] == style for x in r) / len(r),
        }
    return out


def _save_grid(cells, scales, seeds, path: Path, reads) -> None:
    w, h = next(iter(cells.values()))[0].size
    cw, lab = w * len(seeds), 28
    grid = Image.new("RGB", (lab + cw * len(scales), lab + h * len(scales)), "white")
    d = ImageDraw.Draw(grid)
    d.text((2, 2), "c\\s", fill="black")
    for j, ss in enumerate(scales):
        d.text((lab + j * cw + 4, 8), f"style {ss:g}", fill="black")
    for i, cs in enumerate(scales):
        d.text((2, lab + i * h + h // 2 - 6), f"c{cs:g}", fill="black")
        for j, ss in enumerate(scales):
            for k, im in enumerate(cells[(cs, ss)]):
                grid.paste(im.convert("RGB"), (lab + j * cw + k * w, lab + i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


if __name__ == "__main__":
    main()
