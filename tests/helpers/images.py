"""Random test images, as PIL images, files or PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def random_images(seed: int, n: int, size=(40, 48)):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_images(folder, seed: int, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(random_images(seed, n)):
        im.save(folder / f"{i:02d}.png")
    return folder


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    random_images(seed, 1)[0].save(buf, format="PNG")
    return buf.getvalue()
