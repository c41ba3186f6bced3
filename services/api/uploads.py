"""Reference image uploads: the type decided by content, sizes and decompression bombs refused."""

from __future__ import annotations

import io

from fastapi import HTTPException

from ..common.settings import Settings

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def check_image(filename: str | None, data: bytes, settings: Settings) -> tuple[str, int, int]:
    """(content type, width, height) of an acceptable image; 413 or 422 otherwise."""
    from PIL import Image  # loaded on the first upload: an API replica starts faster

    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"{filename}: larger than {settings.max_upload_bytes} bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            w, h = im.size
            if w * h > settings.max_image_pixels:
                raise HTTPException(413, f"{filename}: {w}x{h} pixels is over the limit")
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a truncated file fails here, not later in a worker
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # stored sideways: the worker trains it upright
                w, h = h, w
    except HTTPException:
        raise
    except Image.DecompressionBombError:  # Pillow's own guard, for sizes far past ours
        raise HTTPException(413, f"{filename}: too many pixels (decompression bomb)") from None
    except Exception:
        raise HTTPException(422, f"{filename}: not a readable image") from None
    if fmt not in ALLOWED_FORMATS:
        raise HTTPException(422, f"{filename}: {fmt} images are not accepted (PNG, JPEG or WebP)")
    return ALLOWED_FORMATS[fmt], w, h
