"""An automatic captioner for the micro model: the probe reads what a reference shows.

A reference set uploaded with no captions would otherwise train on a template such as
"a photo of sks shape", a phrase the micro model never saw in pre-training. The probe
reads each image's size, position and background, and the *other* concept (the known
style a content is painted in, the known shape a style is painted on); the caption names
them in the micro grammar, the way the benchmark's hand-written captions do, so the
identifier token is left to carry only the new concept.
"""

from __future__ import annotations

from functools import cache

import torch
from PIL import Image

from .probes import HEADS, load_probe, to_tensor
from .world import PRETRAIN_CONTENTS, PRETRAIN_STYLES


@cache
def _probe():
    return load_probe()[0]


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"in the {position} corner"


@torch.no_grad()
def caption_images(kind: str, images: list[Image.Image], style_form: str = "in_style") -> list[str]:
    """One caption per image with `{content}` or `{style}` where the new concept goes
    (`kind="pair"`: both, for a picture of a new content in a new style).

    The other concept is read among the pre-training ones only: a reference set shows the
    new concept on things the model already knows. A style's caption names it "in {style}
    style" (`style_form="in_style"`) or as the pre-training captions name every style, an
    adjective before the shape (`"adjective"`: "a large {style} circle ...")."""
    if style_form not in ("in_style", "adjective"):
        raise ValueError(f"style_form must be in_style or adjective, got {style_form!r}")
    net = _probe()
    out = net(to_tensor(images))
    if kind == "pair":  # both concepts new: only the scene is read
        reads = [
            {k: HEADS[k][int(out[k][i].argmax())] for k in ("size", "position", "background")}
            for i in range(len(images))
        ]
        return [
            f"a {r['size']} {{content}} in {{style}} style {_where(r['position'])} on a {r['background']} background"
            for r in reads
        ]
    other, names = ("style", PRETRAIN_STYLES) if kind == "content" else ("content", PRETRAIN_CONTENTS)
    known = torch.tensor([HEADS[other].index(n) for n in names])
    picks = known[out[other][:, known].argmax(dim=1)]
    captions = []
    for i in range(len(images)):
        read = {k: HEADS[k][int(out[k][i].argmax())] for k in ("size", "position", "background")}
        thing = HEADS[other][int(picks[i])]
        tail = f"{_where(read['position'])} on a {read['background']} background"
        if kind == "content":
            captions.append(f"a {read['size']} {thing} {{content}} {tail}")
        elif style_form == "adjective":
            captions.append(f"a {read['size']} {{style}} {thing} {tail}")
        else:
            captions.append(f"a {read['size']} {thing} in {{style}} style {tail}")
    return captions
