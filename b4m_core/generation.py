"""Drawing images with a loaded base model and any adapter, switched in place.

The base model is loaded once; adapters are merged into the weights (zero overhead
per step) or applied unfused (fast switching), and swapped without reloading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image

from .adapter import Adapter
from .config import SCHEDULERS, ConfigError
from .data import concept_phrase
from .injection import MergedWeights, adapter_layers, inject, remove_adapters
from .layers import LoRALinear
from .models import BaseModel
from .tokens import IdentifierEmbeddings, adapter_vectors

_PLACEHOLDER = re.compile(r"\{(content|style)\}")


def expand_prompt(prompt: str, adapter: Adapter | None) -> str:
    """Replace `{content}` / `{style}` with the adapter's identifier token and word."""

    def sub(m: re.Match) -> str:
        kind = m.group(1)
        if adapter is None or kind not in adapter.tokens:
            have = ", ".join(sorted(adapter.tokens)) if adapter else "no adapter"
            raise ConfigError(f"the prompt uses {{{kind}}} but the adapter has no {kind} ({have})")
        return concept_phrase(adapter.tokens[kind], adapter.words.get(kind, ""))

    return _PLACEHOLDER.sub(sub, prompt)


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 20
    guidance: float = 7.5
    width: int | None = None
    height: int | None = None
    num_images: int = 1
    scheduler: str = "default"  # a name in SCHEDULERS
    # a B4M adapter's halves over the sampling steps, as fractions of them (like diffusers'
    # control_guidance_start / _end): the content half is applied until `content_end`, the
    # style half from `style_start`. Meant for models that settle shape in the early, noisy
    # steps and texture in the late ones; on micro the shape is still drawn late (Session M).
    content_end: float = 1.0
    style_start: float = 0.0

    @property
    def scheduled(self) -> bool:
        return (self.content_end, self.style_start) != (1.0, 0.0)

    def validate(self, base: BaseModel) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not 1 <= self.steps <= 500:
            raise ConfigError("steps must be between 1 and 500")
        if not 1 <= self.num_images <= 16:
            raise ConfigError("num_images must be between 1 and 16")
        if not 0.0 <= self.guidance <= 50.0:
            raise ConfigError("guidance must be between 0 and 50")
        for label, v in (("content_end", self.content_end), ("style_start", self.style_start)):
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{label} must be between 0 and 1, got {v}")
        step = int(base.pipe.vae_scale_factor)
        for label, v in (("width", self.width), ("height", self.height)):
            if v is not None and (v < step or v > 4096 or v % 8):
                raise ConfigError(f"{label} must be a multiple of 8 between {step} and 4096, got {v}")


class Generator:
    """A loaded base model that draws with one adapter at a time."""

    def __init__(self, base: BaseModel):
        self.base = base
        self.merged = MergedWeights(base.unet)
        self.adapter: Adapter | None = None
        self.fused = False
        self.halves = (1.0, 1.0, 1.0)  # strength, content_scale, style_scale of the current adapter
        self.token_hooks = IdentifierEmbeddings(base.pipe, {})
        self.default_scheduler = base.pipe.scheduler
        self.schedulers: dict[str, object] = {}

    def scheduler(self, name: str):
        """The diffusers scheduler named `name` (SCHEDULERS), built once from the model's own config."""
        if SCHEDULERS[name] is None:
            return self.default_scheduler
        if name not in self.schedulers:
            import diffusers

            cls_name, overrides = SCHEDULERS[name]
            config = dict(self.default_scheduler.config)
            # Only DDIM and DDPM read clip_sample (the others ignore it). Their own default, clip
            # x0 to [-1, 1], is for pixel models: with a latent model whose config is silent
            # (micro's DPM-Solver) they drew washed-out specks. Stable Diffusion's configs say false.
            config.setdefault("clip_sample", False)
            self.schedulers[name] = getattr(diffusers, cls_name).from_config(config, **overrides)
        return self.schedulers[name]

    def set_adapter(
        self,
        adapter: Adapter | None,
        fuse: bool = True,
        strength: float = 1.0,
        content_scale: float = 1.0,
        style_scale: float = 1.0,
    ) -> None:
        """Apply `adapter` (None: the bare base model), replacing the current one; `strength`
        scales its update (A1111's LoRA weight: 0 draws the base model, 1 the adapter as trained);
        `content_scale` / `style_scale` scale a PLP adapter's content and style halves apart."""
        if not 0.0 <= strength <= 2.0:
            raise ConfigError(f"strength must be between 0 and 2, got {strength}")
        if adapter is not None and adapter.base_model_hash and adapter.base_model_hash != self.base.model_hash:
            raise ConfigError(
                f"adapter was trained on {adapter.base_model!r} "
                f"(hash {adapter.base_model_hash}), not on {self.base.model_id!r}"
            )
        # everything that can refuse does so before the current adapter is taken off
        updates = _scaled_updates(adapter, strength, content_scale, style_scale) if adapter is not None else None
        if adapter is None and (content_scale, style_scale) != (1.0, 1.0):
            raise ConfigError("content_scale and style_scale need an adapter")
        unet = self.base.unet
        self.merged.unmerge()
        self.token_hooks.remove()
        if adapter is not None:  # identifiers with learnt embeddings (pivotal tuning)
            self.token_hooks = IdentifierEmbeddings(self.base.pipe, adapter_vectors(adapter.tensors, adapter.tokens))
        if adapter is None:
            remove_adapters(unet)
        else:
            missing = [n for n in updates if not _has_linear(unet, n)]
            if missing:
                raise ConfigError(f"adapter targets layers this model lacks: {missing[:3]}")
            if fuse:
                remove_adapters(unet)
                self.merged.merge(updates)
            else:
                self._apply_unfused(updates)
        self.adapter, self.fused = adapter, fuse and adapter is not None
        self.halves = (strength, content_scale, style_scale)

    def _set_halves(self, content_scale: float, style_scale: float) -> None:
        """Re-apply the current adapter with its halves scaled (a schedule's step)."""
        updates = _scaled_updates(self.adapter, self.halves[0], content_scale, style_scale)
        if self.fused:
            self.merged.merge(updates)
        else:
            self._apply_unfused(updates)

    def _half_schedule(self, req: GenerationRequest) -> list[tuple[float, float]]:
        """Per sampling step, the (content, style) scales a scheduled request draws with."""
        if self.adapter is None or self.adapter.method != "b4m":
            raise ConfigError("content_end and style_start need a B4M (PLP) adapter")
        _, content, style = self.halves
        c_end, s_start = round(req.content_end * req.steps), round(req.style_start * req.steps)
        return [(content if i < c_end else 0.0, style if i >= s_start else 0.0) for i in range(req.steps)]

    def _apply_unfused(self, updates: dict) -> None:
        unet = self.base.unet
        current = adapter_layers(unet)
        same_shape = set(current) == set(updates) and all(
            isinstance(current[n], LoRALinear) and current[n].up.shape == up.shape for n, (up, _, _) in updates.items()
        )
        if same_shape:  # swap tensors in place: no module surgery
            with torch.no_grad():
                for n, (up, down, scale) in updates.items():
                    layer = current[n]
                    layer.up.copy_(up)
                    layer.down.copy_(down)
                    layer.scale = scale
            return
        dtype = self.base.dtype

        def factory(name, lin):
            up, down, scale = updates[name]
            layer = LoRALinear(lin, up.shape[1], scale * up.shape[1], up=up, down=down, trainable=False)
            return layer.to(dtype)

        inject(unet, list(updates), factory)

    @torch.no_grad()
    def generate(self, req: GenerationRequest) -> list[Image.Image]:
        req.validate(self.base)
        prompt = expand_prompt(req.prompt, self.adapter)
        negative = expand_prompt(req.negative_prompt, self.adapter) if req.negative_prompt else None
        gen = torch.Generator(device="cpu").manual_seed(req.seed)
        res = self.base.resolution
        pipe = self.base.pipe
        sampler = self.scheduler(req.scheduler)
        if sampler.config.get("use_karras_sigmas"):
            # Karras sigmas on a cosine noise schedule (micro's) round to repeated timesteps,
            # which diffusers' multistep solvers step past the end of: refuse, don't crash
            sampler.set_timesteps(req.steps)
            if len(set(sampler.timesteps.tolist())) < len(sampler.timesteps):
                raise ConfigError(
                    f"scheduler {req.scheduler} gives repeated timesteps on this model's noise schedule at "
                    f"{req.steps} steps: use dpmpp_2m or another scheduler"
                )
        schedule = self._half_schedule(req) if req.scheduled else None
        extra = {}
        if schedule:
            current = [schedule[0]]
            self._set_halves(*current[0])

            def on_step_end(_pipe, i, _t, kwargs):
                nxt = schedule[min(i + 1, len(schedule) - 1)]
                if nxt != current[0]:
                    self._set_halves(*nxt)
                    current[0] = nxt
                return kwargs

            extra["callback_on_step_end"] = on_step_end
        pipe.scheduler = sampler
        try:
            out = pipe(
                prompt=prompt,
                negative_prompt=negative,
                num_inference_steps=req.steps,
                guidance_scale=req.guidance,
                width=req.width or res,
                height=req.height or res,
                num_images_per_prompt=req.num_images,
                generator=gen,
                **extra,
            )
        finally:  # training and the next request start from the model's own
            pipe.scheduler = self.default_scheduler
            if schedule:  # and the adapter as it was set
                self._set_halves(*self.halves[1:])
        return list(out.images)


def _scaled_updates(adapter: Adapter, strength: float, content_scale: float, style_scale: float) -> dict:
    """Per layer (up, down, scale) of `adapter` with its halves and whole update scaled."""
    parts = adapter.low_rank(content_scale, style_scale)
    return {n: (up, down, scale * strength) for n, (up, down, scale) in parts.items()}


def _has_linear(unet, name: str) -> bool:
    try:
        unet.get_submodule(name)
        return True
    except AttributeError:
        return False
