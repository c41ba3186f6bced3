"""What a base model is, read from its files without loading it. No torch here: the API
lists the configured base models (`GET /base-models`) with the defaults a run on each gets."""

from __future__ import annotations

import json
from pathlib import Path

from .config import ARCH_DEFAULTS

MICRO_FOLDER = Path(__file__).resolve().parent / "micro" / "model"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_facts(source: str) -> dict:
    """`arch` (sd1 | sd2 | sdxl | micro, None when the files are not here to read: a hub id
    a worker fetches from its own cache) and the training `defaults` a run on it gets where a
    request names none: its architecture's, under the folder's own `b4m_defaults.json`."""
    folder = MICRO_FOLDER if source == "micro" else Path(source).expanduser()
    index = _json(folder / "model_index.json")
    if not index:
        return {"arch": None, "defaults": {}}
    if (folder / "text_encoder" / "b4m_source.json").is_file():
        arch = "micro"
    elif index.get("_class_name", "").startswith("StableDiffusionXL"):
        arch = "sdxl"
    else:
        cross = _json(folder / "unet" / "config.json").get("cross_attention_dim")
        arch = "sd2" if cross == 1024 else "sd1"
    own = _json(folder / "b4m_defaults.json")
    defaults = ARCH_DEFAULTS.get(arch, {}) | {k: v for k, v in own.items() if not k.startswith("_")}
    return {"arch": arch, "defaults": defaults}
