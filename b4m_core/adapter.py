"""Adapter files: our safetensors format, and exports to diffusers and kohya LoRAs.

Our file keeps the PLP parts (`<layer>.A/.B/.C/.D`) or, for the LoRA baselines,
`<layer>.up/.down`, plus every setting in the safetensors metadata under `b4m`
(JSON). Only safetensors is ever read: nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import formats
from .config import ConfigError, PLPConfig

# what an adapter file's tensors may be stored in (the torch-free API converts the files it
# serves with numpy, which has fp16 but no bf16; exports can still be bf16)
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

FORMAT_VERSION = "1"
METHODS = ("b4m", "lora", "joint", "merge", "ziplora")


@dataclass
class Adapter:
    """A trained adapter: its tensors and what it is.

    kind: `content`, `style` or `fused`; method: `b4m` (PLP) or a baseline.
    For `b4m`, `plp` holds the PLP settings; every method has `rank` and `alpha`
    (scale = alpha / rank).
    """

    kind: str
    method: str
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    plp: PLPConfig | None = None
    base_model: str = ""
    base_model_hash: str = ""
    base_arch: str = ""  # sd1 | sd2 | sdxl | micro: what tools reading the exports are told
    resolution: int = 0  # the training resolution, in pixels
    tokens: dict[str, str] = field(default_factory=dict)  # {"content": "sks", "style": "zwx"}
    words: dict[str, str] = field(default_factory=dict)  # {"content": "dog", "style": "watercolor"}
    steps: int = 0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("content", "style", "fused"):
            raise ConfigError(f"adapter kind must be content, style or fused, got {self.kind!r}")
        if self.method not in METHODS:
            raise ConfigError(f"adapter method must be one of {METHODS}, got {self.method!r}")
        if self.method == "b4m" and self.plp is None:
            raise ConfigError("a b4m adapter needs its PLP settings")

    # ------------------------------------------------------------------ views
    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def layer_names(self) -> list[str]:
        suffix = ".A" if self.method == "b4m" else ".up"
        return sorted(k[: -len(suffix)] for k in self.tensors if k.endswith(suffix))

    @property
    def targets(self) -> str:
        return self.plp.targets if self.plp else self.extra.get("targets", "attn")

    def low_rank(
        self, content_scale: float = 1.0, style_scale: float = 1.0
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Per layer (W_up, W_down, scale): the ordinary LoRA this adapter is.

        `content_scale` / `style_scale` scale the PLP's two trainable halves apart (the
        content block `B C` and the style block `A D` of the composed update, each linearly;
        no plain LoRA can offer this). A LoRA baseline has no halves: only 1 is accepted."""
        for label, v in (("content_scale", content_scale), ("style_scale", style_scale)):
            if not 0.0 <= v <= 2.0:
                raise ConfigError(f"{label} must be between 0 and 2, got {v}")
        halves = (content_scale, style_scale) != (1.0, 1.0)
        if halves and self.method != "b4m":
            raise ConfigError(
                f"content_scale and style_scale need a B4M (PLP) adapter; a {self.method!r} adapter "
                "has no separate halves (use strength)"
            )
        scale_of = {"up": 1.0, "down": 1.0}
        if halves:
            scale_of[self.plp.half_for("content")] = content_scale
            scale_of[self.plp.half_for("style")] = style_scale
        out = {}
        for name in self.layer_names:
            t = self.tensors
            if self.method == "b4m":
                b, d = t[f"{name}.B"], t[f"{name}.D"]
                if halves:
                    b, d = b * scale_of["up"], d * scale_of["down"]
                up = torch.cat([t[f"{name}.A"], b], dim=0)
                down = torch.cat([t[f"{name}.C"], d], dim=1)
            else:
                up, down = t[f"{name}.up"], t[f"{name}.down"]
            out[name] = (up, down, self.scale)
        return out

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "method": self.method,
            "rank": self.rank,
            "alpha": self.alpha,
            "plp": self.plp.to_dict() if self.plp else None,
            "targets": self.targets,
            "base_model": self.base_model,
            "base_model_hash": self.base_model_hash,
            "base_arch": self.base_arch,
            "resolution": self.resolution,
            "tokens": self.tokens,
            "words": self.words,
            "steps": self.steps,
            "seed": self.seed,
            "extra": self.extra,
        }

    # ------------------------------------------------------------------- files
    def to_bytes(self, dtype: str = "fp32") -> bytes:
        """The adapter file, its tensors stored in `dtype` (fp32, or fp16 / bf16: half the
        size). Loading always gives fp32 tensors back."""
        if dtype not in STORAGE_DTYPES:
            raise ConfigError(f"adapter dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
        want = STORAGE_DTYPES[dtype]
        tensors = {k: v.detach().to("cpu", want).contiguous() for k, v in self.tensors.items()}
        return st_save(tensors, metadata={"b4m": json.dumps(self.metadata(), sort_keys=True)})

    def save(self, path: str | Path, dtype: str = "fp32") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(self.to_bytes(dtype))
        tmp.replace(path)  # never leave a half-written adapter behind
        return path

    @classmethod
    def from_bytes(cls, data: bytes) -> Adapter:
        try:
            tensors = st_load(data)
            meta = formats.read_metadata(data)
        except Exception as exc:  # safetensors raises several types on garbage
            raise ConfigError(f"not a safetensors adapter file: {exc}") from exc
        return cls._from_parts(tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> Adapter:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"adapter file not found: {path}")
        return cls.from_bytes(path.read_bytes())

    @classmethod
    def _from_parts(cls, tensors: dict, meta: dict | None) -> Adapter:
        if not meta:
            raise ConfigError(
                "the file has no b4m metadata: it is not an adapter made by b4m "
                "(plain LoRA files can be used with diffusers directly)"
            )
        plp = PLPConfig.from_dict(meta["plp"]) if meta.get("plp") else None
        extra = dict(meta.get("extra") or {})
        extra.setdefault("targets", meta.get("targets", "attn"))
        return cls(
            kind=meta["kind"],
            method=meta["method"],
            tensors={k: v.float() for k, v in tensors.items()},  # a half-precision file trains and draws in fp32
            rank=int(meta["rank"]),
            alpha=float(meta["alpha"]),
            plp=plp,
            base_model=meta.get("base_model", ""),
            base_model_hash=meta.get("base_model_hash", ""),
            base_arch=meta.get("base_arch", ""),
            resolution=int(meta.get("resolution") or 0),
            tokens=meta.get("tokens") or {},
            words=meta.get("words") or {},
            steps=int(meta.get("steps", 0)),
            seed=int(meta.get("seed", 0)),
            extra=extra,
        )

    # ----------------------------------------------------------------- exports
    def to_diffusers(self) -> dict[str, torch.Tensor]:
        """The diffusers LoRA state dict (see `formats.to_diffusers`)."""
        return st_load(self.export("diffusers"))

    def to_kohya(self) -> dict[str, torch.Tensor]:
        """The kohya LoRA state dict (see `formats.to_kohya`)."""
        return st_load(self.export("kohya"))

    def export(self, fmt: str, dtype: str = "fp32") -> bytes:
        """This adapter as a file in `fmt` (b4m: ours, diffusers or kohya), tensors in `dtype`
        (fp32, fp16 or bf16)."""
        if fmt == "native":
            fmt = "b4m"
        try:
            return formats.convert(self.to_bytes(), fmt, dtype)
        except formats.FormatError as exc:
            raise ConfigError(str(exc)) from exc
