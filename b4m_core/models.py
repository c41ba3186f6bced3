"""Loading a base model once, and what the training loop needs from it.

One code path serves SD 1.x/2.x and SDXL: both are ordinary diffusers pipelines;
SDXL is recognised by its second text encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DiffusionPipeline

from .config import ARCH_DEFAULTS, ConfigError, PLPConfig, TrainConfig

if TYPE_CHECKING:
    from .data import Concept

# Short names for bases that ship with the project (the micro model registers here).
BASE_REGISTRY: dict[str, Callable[[], str]] = {}


def register_base(name: str, resolver: Callable[[], str]) -> None:
    BASE_REGISTRY[name] = resolver


register_base("micro", lambda: _micro())


def _micro() -> str:
    from .micro.model import resolve_micro

    return resolve_micro()


def resolve_base(base: str) -> str:
    if base in BASE_REGISTRY:
        return BASE_REGISTRY[base]()
    return base


# b4m_defaults.json keys that fill a PLPConfig where a caller gives none
PLP_DEFAULT_KEYS = ("rank", "rho", "basis_mode", "basis_scale", "content_half", "targets")
# TrainConfig field -> b4m_defaults.json keys, per stage: the first one present fills it
TRAIN_DEFAULT_KEYS = {
    "break": {
        "steps": ("break_steps",),
        "learning_rate": ("learning_rate",),
        "batch_size": ("batch_size",),
        "train_token_embedding": ("train_token_embedding",),
        "token_learning_rate": ("token_learning_rate",),
        "prior_preservation": ("prior_preservation",),
        "prior_images": ("prior_images",),
        "prior_loss_weight": ("prior_loss_weight",),
    },
    "make": {
        "steps": ("make_steps",),
        "learning_rate": ("make_learning_rate", "learning_rate"),
        "batch_size": ("make_batch_size",),
    },
}
for _keys in TRAIN_DEFAULT_KEYS.values():  # settings the same for both stages: memory, speed, noise levels
    _keys |= {
        name: (name,)
        for name in ("mixed_precision", "gradient_checkpointing", "timestep_bias_strategy", "timestep_bias_multiplier")
    }


@dataclass
class BaseModel:
    """A loaded pipeline plus the facts about it adapters are checked against."""

    pipe: DiffusionPipeline
    model_id: str
    model_hash: str
    is_sdxl: bool
    device: torch.device
    dtype: torch.dtype
    # training defaults measured for this model (`b4m_defaults.json` in its folder):
    # break_steps, make_steps, learning_rate, rho; callers fall back to generic ones without it
    recommended: dict = field(default_factory=dict)
    # captions reference images that came without them (kind, images) -> captions; None: the
    # model has none and uncaptioned images train on its prompt templates
    arch: str = "sd1"  # sd1 | sd2 | sdxl | micro
    captioner: Callable[[str, list], list[str]] | None = None
    # MCP auxiliary sets that ship with the model: (kind of the concept, k, seed, token_bound)
    # -> k sets of the opposite kind; None: the model has none
    aux_bank: Callable[..., list] | None = None

    def auxiliary_sets(self, kind: str, k: int | None = None, seed: int = 0) -> list[Concept]:
        """k auxiliary sets for a `kind` concept from the model's bank (k: the model's measured
        default, `aux_sets`); [] when the model ships no bank or k is 0."""
        k = self.default("aux_sets", 0) if k is None else k
        if not k or self.aux_bank is None:
            return []
        return self.aux_bank(kind, k, seed=seed, token_bound=bool(self.recommended.get("aux_token_bound", False)))

    def known_images(self, kind: str, seed: int = 0) -> list:
        """Images of concepts the model knows, of the kind opposite to `kind` (every set of its
        MCP bank): what recombined copies of a `kind` reference take their other factor from;
        [] when the model ships no bank."""
        if self.aux_bank is None:
            return []
        sets = self.aux_bank(kind, self.default("bank_sets", 12), seed=seed)
        return [image for s in sets for image in s.images]

    def describe(self, concept: Concept, use_captioner: bool = True) -> Concept:
        """The concept as this model trains on it: images that came without a caption get one
        from the model's captioner, or else the model's own prompt template for the kind
        (`templates` in `b4m_defaults.json`: the phrasing its text encoder knows). A model
        whose defaults say `"phrase_with_word": false` names the concept by its identifier alone."""
        if self.recommended.get("phrase_with_word") is False:
            concept = replace(concept, with_word=False)
        missing = [i for i, c in enumerate(concept.captions) if not c]
        if not missing:
            return concept
        from .data import DEFAULT_TEMPLATES

        template = concept.template
        if template == DEFAULT_TEMPLATES[concept.kind]:  # not the caller's own
            template = self.recommended.get("templates", {}).get(concept.kind) or template
        captions = list(concept.captions)
        if self.captioner is not None and use_captioner:
            for i, text in zip(missing, self.captioner(concept.kind, [concept.images[i] for i in missing])):
                captions[i] = text
        return replace(concept, captions=captions, template=template)

    def prior_words(self, concept: Concept) -> list[str]:
        """Words this model draws well in the place of a new concept of that kind, for prior
        preservation: `prior_words` in `b4m_defaults.json` (the micro model's known shapes and
        styles), else the concept's own class word (DreamBooth's class prompt)."""
        return list(self.recommended.get("prior_words", {}).get(concept.kind) or [concept.word])

    def default(self, key: str, fallback):
        value = self.recommended.get(key)
        return fallback if value is None else type(fallback)(value)

    def plp_config(self, **given) -> PLPConfig:
        """A PLP shape: what the caller gave, else this model's measured defaults
        (`b4m_defaults.json`: rank, rho, basis_mode, ...), else PLPConfig's. alpha follows the
        rank unless given (scale 1)."""
        given = {k: v for k, v in given.items() if v is not None}
        for key in PLP_DEFAULT_KEYS:
            if key in self.recommended and key not in given:
                given[key] = self.recommended[key]
        if "rank" in given and "alpha" not in given:
            given["alpha"] = float(given["rank"])
        return PLPConfig(**given)

    def train_config(self, stage: str, **given) -> TrainConfig:
        """One training run's settings, the single place callers (CLI, worker, demo, bench) get
        them from: what the caller gave (None: not given), else this model's measured defaults
        for the stage (`break_steps` / `make_steps`, `learning_rate`, `batch_size`, and for the
        break stage the identifier embedding's), else TrainConfig's."""
        if stage not in TRAIN_DEFAULT_KEYS:
            raise ValueError(f"stage must be one of {tuple(TRAIN_DEFAULT_KEYS)}, got {stage!r}")
        given = {k: v for k, v in given.items() if v is not None}
        for field_name, keys in TRAIN_DEFAULT_KEYS[stage].items():
            found = [self.recommended[k] for k in keys if self.recommended.get(k) is not None]
            if field_name not in given and found:
                given[field_name] = found[0]
        return TrainConfig(**given)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text conditioning exactly as the pipeline computes it at inference."""
        return self.encode_prompts_differentiable(prompts)

    def encode_prompts_differentiable(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`encode_prompts` keeping the graph (the encoders stay frozen; a learnt identifier
        embedding hooked into them receives gradients)."""
        if self.is_sdxl:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompts, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return embeds, pooled
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return embeds, None


def _file_fingerprint(folder: Path) -> str | None:
    """Hash of the UNet's files as stored: config, safetensors headers (names, dtypes,
    shapes) and the first and last 64 KiB of each weight file. It does not depend on
    the dtype the model is loaded in, so an adapter trained in fp32 on a CPU matches the
    same model loaded in bf16 on a GPU. None where the files are not safetensors."""
    unet_dir = folder / "unet"
    files = sorted(unet_dir.glob("*.safetensors")) if unet_dir.is_dir() else []
    if not files or not (unet_dir / "config.json").is_file():
        return None
    h = hashlib.sha256()
    config = json.loads((unet_dir / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}  # drop versions and paths
    h.update(json.dumps(config, sort_keys=True).encode())
    for f in files:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            h.update(json.dumps(header, sort_keys=True).encode())
            h.update(fh.read(65536))
            fh.seek(max(8 + n, f.stat().st_size - 65536))
            h.update(fh.read())
    return h.hexdigest()[:16]


def _local_folder(path: str) -> Path | None:
    if Path(path).is_dir():
        return Path(path)
    try:  # a hub id already in the local cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True, allow_patterns=["unet/*", "model_index.json"]))
    except Exception:
        return None


def model_hash(pipe: DiffusionPipeline, path: str | None = None) -> str:
    """A fingerprint of the base model's UNet, to check adapters against.

    From the stored files where they can be found; otherwise from the architecture and
    a sample of attention weights rounded to bfloat16.
    """
    folder = _local_folder(path) if path else None
    if folder is not None:
        fp = _file_fingerprint(folder)
        if fp:
            return fp
    h = hashlib.sha256()
    config = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in sorted(pipe.unet.named_parameters()):
        if "attn" in name and name.endswith("weight"):
            h.update(name.encode())
            h.update(p.detach().flatten()[:64].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _sd_version(pipe) -> str:
    """SD 2.x reads 1024-wide text features (OpenCLIP), SD 1.x 768."""
    return "sd2" if int(pipe.unet.config.cross_attention_dim) == 1024 else "sd1"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_base(base: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> BaseModel:
    """Load a base model from a local diffusers folder or a hub id (or a registered name)."""
    model_id = base
    path = resolve_base(base)
    if os.path.sep in path or path.startswith("."):
        if not Path(path).is_dir():
            raise ConfigError(f"base model folder not found: {path}")
        if not (Path(path) / "model_index.json").is_file():
            raise ConfigError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.float32
    extra = {}
    from .micro.model import is_micro_folder, micro_components

    captioner = aux_bank = None
    if is_micro_folder(path):  # its text encoder comes from a PyPI package, not the folder
        extra = micro_components(path, dtype=dtype)
        from .micro.bank import aux_bank
        from .micro.captioner import caption_images as captioner
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load base model {base!r}: {exc}") from exc
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    defaults_file = Path(path) / "b4m_defaults.json"
    recommended = json.loads(defaults_file.read_text()) if defaults_file.is_file() else {}
    arch = "sdxl" if is_sdxl else "micro" if captioner else _sd_version(pipe)
    recommended = ARCH_DEFAULTS.get(arch, {}) | recommended
    return BaseModel(
        pipe=pipe,
        model_id=model_id,
        model_hash=model_hash(pipe, path),
        is_sdxl=is_sdxl,
        device=device,
        dtype=dtype,
        recommended=recommended,
        arch=arch,
        captioner=captioner,
        aux_bank=aux_bank,
    )
