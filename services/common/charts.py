"""A loss curve as a small PNG, drawn with Pillow (no plotting library in the service image)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

W, H, PAD = 480, 240, 36


def loss_curve_png(steps: list[int], losses: list[float], title: str = "training loss") -> bytes:
    """Raw losses in light grey, a moving average in blue; axes labelled with first/last step and
    the loss range."""
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((PAD, 6), title, fill="black")
    x0, y0, x1, y1 = PAD, PAD - 12, W - 10, H - PAD + 4
    d.rectangle((x0, y0, x1, y1), outline=(160, 160, 160))
    if len(losses) >= 2:
        xs, ys = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
        lo, hi = float(np.min(ys)), float(np.max(ys))
        hi = hi if hi > lo else lo + 1e-6
        px = lambda s: x0 + (s - xs[0]) / max(xs[-1] - xs[0], 1) * (x1 - x0)
        py = lambda v: y1 - (v - lo) / (hi - lo) * (y1 - y0)
        d.line([(px(s), py(v)) for s, v in zip(xs, ys)], fill=(200, 200, 200), width=1)
        k = max(1, len(ys) // 20)
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        d.line([(px(s), py(v)) for s, v in zip(xs[k - 1 :], smooth)], fill=(31, 119, 180), width=2)
        d.text((x0, y1 + 6), f"step {int(xs[0])}", fill="black")
        d.text((x1 - 70, y1 + 6), f"step {int(xs[-1])}", fill="black")
        d.text((x1 - 120, 6), f"loss {lo:.3f} - {hi:.3f}", fill="black")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
