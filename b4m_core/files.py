"""Which files a command's image arguments name: image files as given, folders expanded to the
images inside (sorted by name). No torch here: the server commands use it to send uploads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .config import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def image_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files and folders of images (a same-stem `.txt` beside an image is its caption,
    not an image) as one ordered list of image files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise ConfigError(f"image file or folder not found: {path}")
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            found = [p for p in inside if p.suffix.lower() != ".txt"]
            if not found:
                raise ConfigError(f"no images in {path}")
        else:
            found = [path]
        for p in found:
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise ConfigError(f"not an image file: {p} (PNG, JPEG, WebP or BMP expected)")
        out += found
    return out
