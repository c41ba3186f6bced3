"""Adapter files converted to the LoRA layouts other tools load, with numpy alone.

The service's API converts on download without importing torch; `Adapter.export` uses
the same functions, so there is one conversion. A b4m file holds per layer either the PLP
parts `<layer>.A/.B/.C/.D` (method b4m) or `<layer>.up/.down` (the LoRA baselines), and its
settings as JSON under the `b4m` metadata key. The low-rank update of a layer is
`scale * up @ down`, with `up = [A; B]`, `down = [C, D]` for PLP and `scale = alpha / rank`.
"""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

FORMATS = ("b4m", "diffusers", "kohya")


class FormatError(ValueError):
    """Not a b4m adapter file, or a format this version does not write."""


def read(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, b4m metadata) of an adapter file."""
    try:
        tensors = np_load(data)
        meta = read_metadata(data)
    except Exception as exc:  # safetensors raises several types on garbage
        raise FormatError(f"not a safetensors adapter file: {exc}") from exc
    if not meta:
        raise FormatError(
            "the file has no b4m metadata: it is not an adapter made by b4m "
            "(plain LoRA files can be used with diffusers directly)"
        )
    return tensors, meta


def read_metadata(data: bytes) -> dict | None:
    """The `b4m` metadata of a safetensors file's bytes (8-byte header length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    raw = (header.get("__metadata__") or {}).get("b4m")
    return json.loads(raw) if raw else None


def low_rank(tensors: dict[str, np.ndarray], meta: dict) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per layer (up, down, scale): the ordinary LoRA the adapter is."""
    plp = meta["method"] == "b4m"
    suffix = ".A" if plp else ".up"
    scale = float(meta["alpha"]) / int(meta["rank"])
    out = {}
    for name in sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix)):
        if plp:
            up = np.concatenate([tensors[f"{name}.A"], tensors[f"{name}.B"]], axis=0)
            down = np.concatenate([tensors[f"{name}.C"], tensors[f"{name}.D"]], axis=1)
        else:
            up, down = tensors[f"{name}.up"], tensors[f"{name}.down"]
        out[name] = (up.astype(np.float32), down.astype(np.float32), scale)
    return out


def to_diffusers(tensors: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """`unet.<layer>.lora.down.weight` / `.lora.up.weight`, the scale baked into `up`
    (`load_lora_weights` of the SD and SDXL pipelines)."""
    out = {}
    for name, (up, down, scale) in low_rank(tensors, meta).items():
        out[f"unet.{name}.lora.down.weight"] = np.ascontiguousarray(down)
        out[f"unet.{name}.lora.up.weight"] = np.ascontiguousarray(up * np.float32(scale))
    return out


def to_kohya(tensors: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """`lora_unet_<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha` (ComfyUI, A1111)."""
    out = {}
    for name, (up, down, scale) in low_rank(tensors, meta).items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = np.ascontiguousarray(down)
        out[f"{key}.lora_up.weight"] = np.ascontiguousarray(up)
        out[f"{key}.alpha"] = np.array(scale * down.shape[0], dtype=np.float32)
    return out


def convert(data: bytes, fmt: str) -> bytes:
    """A b4m adapter file's bytes in `fmt` (b4m: unchanged)."""
    if fmt not in FORMATS:
        raise FormatError(f"export format must be b4m, diffusers or kohya, got {fmt!r}")
    if fmt == "b4m":
        return data
    tensors, meta = read(data)
    info = {"b4m": json.dumps(meta, sort_keys=True)}
    if fmt == "diffusers":
        return np_save(to_diffusers(tensors, meta), metadata=info)
    info.update(
        {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(meta["rank"]),
            "ss_network_alpha": str(meta["alpha"]),
            "ss_base_model_version": meta.get("base_model", ""),
        }
    )
    return np_save(to_kohya(tensors, meta), metadata=info)
