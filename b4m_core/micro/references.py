"""Reference sets of the held-out concepts (test and development), made the way the paper's datasets are.

A held-out content comes as 4 images, each painted in a different known style; a
held-out style as 2 images on different known contents. They ship as small PNGs in
`references/` (rebuild with `python -m b4m_core.micro.references`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import Concept, load_image_folder
from .world import BACKGROUNDS, PRETRAIN_CONTENTS, PRETRAIN_STYLES, SPLITS, Scene, render

REFERENCE_DIR = Path(__file__).resolve().parent / "references"
CONTENT_IMAGES, STYLE_IMAGES = 4, 2
# The class / style word a user would type for each held-out concept.
CLASS_WORD = {"content": "shape", "style": "pattern"}
CONTENT_WORD = dict.fromkeys(SPLITS["test"][0] + SPLITS["dev"][0], CLASS_WORD["content"])
STYLE_WORD = dict.fromkeys(SPLITS["test"][1] + SPLITS["dev"][1], CLASS_WORD["style"])
# Distinct identifier tokens, so any content and any style can share one prompt.
CONTENT_TOKEN = {"hexagon": "hkx", "hourglass": "hgv", "flower": "flq", "mushroom": "mrz"}
CONTENT_TOKEN |= {"fish": "fsv", "cloud": "cdq", "bell": "blz", "lightning": "lgx"}
STYLE_TOKEN = {"zigzag": "zgt", "marble": "mbv", "plaid": "pdk", "galaxy": "gxw"}
STYLE_TOKEN |= {"rainbow": "rbq", "camouflage": "cmv", "lava": "lvz", "leopard": "lpk"}


def reference_scenes(kind: str, name: str) -> list[Scene]:
    rng = np.random.default_rng(abs(hash_name(kind + name)))
    bgs = tuple(BACKGROUNDS)
    if kind == "content":
        styles = rng.choice(PRETRAIN_STYLES, size=CONTENT_IMAGES, replace=False)
        return [Scene(name, str(s), bgs[rng.integers(len(bgs))], "center", "large") for s in styles]
    contents = rng.choice(PRETRAIN_CONTENTS, size=STYLE_IMAGES, replace=False)
    return [Scene(str(c), name, bgs[rng.integers(len(bgs))], "center", "large") for c in contents]


def hash_name(text: str) -> int:
    # stable across processes (unlike hash())
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") ^ len(text)


def build_references(folder: str | Path = REFERENCE_DIR) -> Path:
    folder = Path(folder)
    for contents, styles in SPLITS.values():
        for kind, name in [("content", c) for c in contents] + [("style", s) for s in styles]:
            d = folder / kind / name
            d.mkdir(parents=True, exist_ok=True)
            for i, scene in enumerate(reference_scenes(kind, name)):
                render(scene, seed=1000 + i).save(d / f"{i:02d}.png", optimize=True)
                (d / f"{i:02d}.txt").write_text(_caption(kind, scene))
    return folder


def _caption(kind: str, scene: Scene) -> str:
    # The other concept of each reference is named, so the model need not learn it.
    if kind == "content":
        return f"a {scene.style} {{content}} on a {scene.background} background"
    return f"a {scene.content} in {{style}} style on a {scene.background} background"


def reference_folder(kind: str, name: str) -> Path:
    return REFERENCE_DIR / kind / name


def reference_concept(kind: str, name: str, token: str | None = None) -> Concept:
    images, captions = load_image_folder(reference_folder(kind, name))
    word = (CONTENT_WORD if kind == "content" else STYLE_WORD)[name]
    tok = token or (CONTENT_TOKEN if kind == "content" else STYLE_TOKEN)[name]
    return Concept(kind=kind, images=images, captions=captions, word=word, token=tok)


if __name__ == "__main__":
    print(build_references())
