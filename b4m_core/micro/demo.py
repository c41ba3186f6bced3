"""`b4m demo`: the whole method on the micro model with the shipped references.

Trains each held-out content and style (break stage, MCP with a bank of known
concepts), fuses every pair (make stage), draws each pair and writes a content x style
grid with the reference images along its edges.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..generation import GenerationRequest, Generator
from ..models import load_base
from ..training import fuse, train_concept
from .references import reference_concept
from .world import HELDOUT_CONTENTS, HELDOUT_STYLES

DEMO_PROMPT = "a large {content} in {style} style in the center on a white background"


def run_demo(
    out_dir: str | Path,
    contents=None,
    styles=None,
    break_steps: int | None = None,  # None: the model's measured defaults (b4m_defaults.json)
    make_steps: int | None = None,
    prompt: str = DEMO_PROMPT,
    seed: int = 0,
    base: str = "micro",
    log=print,
) -> Path:
    out = Path(out_dir)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    contents = list(contents or HELDOUT_CONTENTS)
    styles = list(styles or HELDOUT_STYLES)
    t0 = time.perf_counter()
    model = load_base(base)
    plp = model.plp_config()
    adapters, refs = {}, {}
    for kind, names in (("content", contents), ("style", styles)):
        for name in names:
            refs[(kind, name)] = reference_concept(kind, name)
            t = time.perf_counter()
            a = train_concept(
                model,
                refs[(kind, name)],
                aux=model.auxiliary_sets(kind, seed=seed),  # MCP from the model's bank
                plp=plp,
                cfg=model.train_config("break", steps=break_steps, seed=seed),
            )
            a.save(out / "adapters" / f"{kind}_{name}.safetensors")
            adapters[(kind, name)] = a
            log(f"break stage {kind} {name}: {time.perf_counter() - t:.1f}s")
    gen = Generator(model)
    cells = {}
    for c in contents:
        for s in styles:
            t = time.perf_counter()
            f = fuse(
                model,
                adapters[("content", c)],
                adapters[("style", s)],
                refs[("content", c)],
                refs[("style", s)],
                cfg=model.train_config("make", steps=make_steps, seed=seed),
            )
            f.save(out / "adapters" / f"fused_{c}_{s}.safetensors")
            gen.set_adapter(f, fuse=True)
            image = gen.generate(GenerationRequest(prompt, seed=seed, steps=20, guidance=5.0))[0]
            image.save(out / "images" / f"{c}_{s}.png")
            cells[(c, s)] = image
            log(f"make stage {c} x {s}: {time.perf_counter() - t:.1f}s (incl. drawing)")
    _grid(cells, refs, contents, styles, out / "grid.png")
    (out / "summary.json").write_text(
        json.dumps(
            {"contents": contents, "styles": styles, "prompt": prompt, "seconds": time.perf_counter() - t0}, indent=2
        )
    )
    log(f"wrote {out / 'grid.png'} in {time.perf_counter() - t0:.0f}s")
    return out / "grid.png"


def _grid(cells, refs, contents, styles, path: Path) -> None:
    """Top row: a style reference per column; left column: a content reference per row."""
    blank = np.full((64, 64, 3), 255, np.uint8)
    rows = [[blank] + [np.asarray(refs[("style", s)].images[0]) for s in styles]]
    for c in contents:
        rows.append([np.asarray(refs[("content", c)].images[0])] + [np.asarray(cells[(c, s)]) for s in styles])
    pad = lambda a: np.pad(a, ((2, 2), (2, 2), (0, 0)), constant_values=255)
    Image.fromarray(np.concatenate([np.concatenate([pad(x) for x in r], 1) for r in rows], 0)).save(path)
