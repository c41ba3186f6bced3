"""Training loops: the break stage (PLP + MCP), the make stage, and the LoRA baselines.

All stages share one loop (`TrainingSession`): cached VAE latents and text conditioning
(the encoders are frozen), one seeded CPU generator for every random draw (so a run is
repeatable and a resumed run continues the same stream), AdamW, optional autocast on
CUDA, progress and cancel hooks between steps, and checkpoints as safetensors bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .adapter import Adapter
from .config import ConfigError, PLPConfig, TrainConfig, covering_targets, plp_mismatch
from .data import Concept, augmented, loss_weights, preprocess, recombined, synthesized_pairs
from .injection import (
    adapter_layers,
    inject,
    inject_plp,
    load_plp_state_dict,
    plp_state_dict,
    remove_adapters,
    target_layer_names,
)
from .layers import LoRALinear, PLPLinear, ZipLoRALinear
from .models import BaseModel
from .tokens import PREFIX as TOKEN_PREFIX
from .tokens import IdentifierEmbeddings, adapter_vectors, initial_vectors
from .tokens import tensor_key as token_key


class TrainingCanceled(Exception):
    """The cancel check said stop; nothing is returned."""


class TrainingPaused(Exception):
    """The run stopped at `step` when `Hooks.should_pause` asked, after checkpointing there."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"paused at step {step}")


class IncompatibleAdapters(ConfigError):
    """Two adapters cannot be composed."""


@dataclass
class Hooks:
    """How a caller watches and steers a run (the worker maps these to its job row)."""

    progress: Callable[[int, int, float], None] | None = None  # (step, total, loss)
    should_cancel: Callable[[], bool] | None = None
    checkpoint: Callable[[int, bytes], None] | None = None  # (step, state) every N steps
    resume: bytes | None = None  # a state given to `checkpoint` earlier
    preview: Callable[[int, Image.Image], None] | None = None  # (step, image) every `preview_every` steps
    preview_every: int = 0
    # what previews draw ({content} / {style}: the concepts being trained); none: one picture of
    # the concept (or "<content> in <style> style" for a pair)
    preview_prompts: list[str] = field(default_factory=list)
    # asked between steps; when true the run checkpoints where it is and raises TrainingPaused
    # (a worker shutting down hands its job back without losing the steps since the last checkpoint)
    should_pause: Callable[[], bool] | None = None


# ---------------------------------------------------------------- sample cache
class SampleSet:
    """One concept's images as cached latent distributions and text conditioning."""

    def __init__(
        self,
        base: BaseModel,
        concept: Concept,
        resolution: int,
        center_crop: bool,
        flip: bool = False,
        mask_background: float | None = None,
    ):
        """`mask_background`: weigh each row's loss to its subject (data.loss_weights), the
        background at this weight; None: a plain mean over the latent."""
        self.concept, self.base, self.flip = concept, base, flip
        self.prompts = concept.prompts()
        # live: each draw encodes its prompts anew, with gradients (a learnt identifier embedding)
        self.live = False
        prepared = [preprocess(im, resolution, center_crop) for im in concept.images]
        pixels = torch.stack([p.pixels for p in prepared])
        if flip:  # rows n.. are the mirrored images, encoded by the VAE like the others
            pixels = torch.cat([pixels, pixels.flip(-1)])
        pixels = pixels.to(base.device, base.dtype)
        vae = base.pipe.vae
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        self.mean, self.std = dist.mean.float(), dist.std.float()
        self.loss_weights = None
        if mask_background is not None:
            size = tuple(self.mean.shape[-2:])
            weights = torch.stack([loss_weights(_pixels_image(p.pixels), size, mask_background) for p in prepared])
            if flip:
                weights = torch.cat([weights, weights.flip(-1)])
            self.loss_weights = weights.to(self.mean.device)
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.embeds, self.pooled = base.encode_prompts(self.prompts)
        self.time_ids = None
        if base.is_sdxl:
            self.time_ids = torch.tensor(
                [[*p.original_size, *p.crop_top_left, resolution, resolution] for p in prepared],
                dtype=torch.float32,
                device=base.device,
            )

    def __len__(self) -> int:
        return len(self.prompts)

    def draw(self, idx: torch.Tensor, gen: torch.Generator) -> dict:
        rows = idx
        if self.flip:
            rows = idx + len(self) * (torch.rand(idx.shape, generator=gen) < 0.5).long()
        eps = torch.randn(self.mean[rows].shape, generator=gen).to(self.mean.device)
        latents = (self.mean[rows] + self.std[rows] * eps - self.shift) * self.scaling
        embeds, pooled = self.embeds[idx], self.pooled[idx] if self.pooled is not None else None
        if self.live:
            embeds, pooled = self.base.encode_prompts_differentiable([self.prompts[i] for i in idx.tolist()])
        out = {"latents": latents, "embeds": embeds}
        if self.loss_weights is not None:
            out["loss_weights"] = self.loss_weights[rows]
        if pooled is not None:
            out["pooled"], out["time_ids"] = pooled, self.time_ids[idx]
        return out


def resolve_precision(mixed_precision: str, device: torch.device) -> str:
    """What a run's autocast really is: "no" off CUDA; "auto" is bf16 where the GPU supports
    it, else fp16 (with loss scaling)."""
    if device.type != "cuda" or mixed_precision == "no":
        return "no"
    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return mixed_precision


def training_facts(session: TrainingSession) -> dict:
    """How a run trained, as recorded on its adapter."""
    return {"precision": session.precision, "gradient_checkpointing": session.cfg.gradient_checkpointing}


def _pixels_image(pixels: torch.Tensor) -> Image.Image:
    """A preprocessed image (3 x H x W in [-1, 1]) back as a picture."""
    arr = ((pixels.permute(1, 2, 0).float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def _samples(base: BaseModel, concept: Concept, resolution: int, cfg: TrainConfig) -> SampleSet:
    masked = cfg.loss_mask != "none" and concept.kind in cfg.loss_mask.split("+")
    mask_background = cfg.loss_mask_background if masked else None
    return SampleSet(base, concept, resolution, cfg.center_crop, cfg.random_flip, mask_background)


def _cat(parts: list[dict]) -> dict:
    if any("loss_weights" in p for p in parts):  # rows of unmasked sets weigh every pixel alike
        for p in parts:
            if "loss_weights" not in p:
                p["loss_weights"] = torch.ones_like(p["latents"][:, :1])
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def timestep_weights(cfg: TrainConfig, num_timesteps: int) -> torch.Tensor | None:
    """Sampling weights over the training timesteps for `cfg`'s timestep bias; None: uniform."""
    strategy = cfg.timestep_bias_strategy
    if strategy == "none" or (strategy != "range" and cfg.timestep_bias_multiplier == 1.0):
        return None
    if strategy == "range":
        if cfg.timestep_bias_begin >= num_timesteps:
            raise ConfigError(f"timestep_bias_begin must be below the model's {num_timesteps} timesteps")
        weights = torch.zeros(num_timesteps)
        weights[cfg.timestep_bias_begin : cfg.timestep_bias_end] = 1.0  # a slice stops at the end
        return weights
    weights = torch.ones(num_timesteps)
    n = max(1, int(num_timesteps * cfg.timestep_bias_portion))
    part = slice(num_timesteps - n, None) if strategy == "later" else slice(0, n)
    weights[part] *= cfg.timestep_bias_multiplier
    return weights


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for timesteps `t` (diffusers' training scripts' form)."""
    snr = compute_snr(scheduler, t)
    denom = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    # a zero-SNR last timestep (zero terminal SNR schedules) keeps weight 1
    return torch.where(snr > 0, snr.clamp(max=gamma) / denom.clamp_min(1e-12), torch.ones_like(snr))


# ---------------------------------------------------------------- the loop
@dataclass
class RowGroup:
    """Rows drawn from one sample set in each step, and the weight of their mean loss."""

    samples: SampleSet
    count: int
    weight: float
    primary: bool = True  # for MCP routing: rows that train the primary half


class TrainingSession:
    """One optimisation run over row groups; stage classes configure it."""

    def __init__(
        self,
        base: BaseModel,
        params: list[dict],
        groups: list[RowGroup],
        cfg: TrainConfig,
        route_layers: list[PLPLinear] | None = None,
        target_fn: Callable[[dict, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        extra_loss: Callable[[], torch.Tensor] | None = None,
    ):
        self.base, self.cfg, self.groups = base, cfg, groups
        self.route_layers = route_layers or []
        self.target_fn, self.extra_loss = target_fn, extra_loss
        self.params = [p for g in params for p in g["params"]]
        # the fused kernel on CUDA (one launch for all parameters, not one per tensor)
        fused = base.device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in self.params)
        self.optimizer = torch.optim.AdamW(
            params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, **({"fused": True} if fused else {})
        )
        self.lr_schedule = self._lr_schedule(0)
        self.scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.t_weights = timestep_weights(cfg, self.scheduler.config.num_train_timesteps)
        self.step = 0
        # what a preview draws: the first concept, or "<content> in <style> style" for a pair
        phrases = [g.samples.concept.phrase for g in groups]
        self.preview_prompt = (
            f"a {phrases[0]} in {phrases[1]} style" if len(phrases) == 2 else groups[0].samples.concept.prompts()[0]
        )
        self.precision = resolve_precision(cfg.mixed_precision, base.device)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.use_autocast = self.autocast_dtype is not None
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def _lr_schedule(self, step: int):
        """The rate schedule placed at `step` (None: the constant rate, nothing to schedule); a
        pure function of the step, so a resumed run needs only its step count."""
        cfg = self.cfg
        if cfg.lr_scheduler == "constant" and not cfg.lr_warmup_steps:
            return None
        for group in self.optimizer.param_groups:  # what each group's schedule scales
            group.setdefault("initial_lr", group["lr"])
        return get_scheduler(
            cfg.lr_scheduler,
            self.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=cfg.steps,
            last_epoch=step - 1,
        )

    # one batch: rows of every group, drawn from the session's generator
    def draw(self) -> tuple[dict, torch.Tensor, torch.Tensor]:
        parts, weights, route = [], [], []
        for g in self.groups:
            idx = torch.randint(len(g.samples), (g.count,), generator=self.gen)
            parts.append(g.samples.draw(idx, self.gen))
            weights += [g.weight / g.count] * g.count
            route += [g.primary] * g.count
        dev = self.base.device
        return _cat(parts), torch.tensor(weights, device=dev), torch.tensor(route, device=dev)

    def row_losses(self, batch: dict, route: torch.Tensor) -> torch.Tensor:
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=self.gen).to(latents.device)
        if self.t_weights is None:
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), generator=self.gen)
        else:
            t = torch.multinomial(self.t_weights, latents.shape[0], replacement=True, generator=self.gen)
        t = t.to(latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.target_fn is not None:
            target = self.target_fn(batch, noisy, t, noise)
        elif self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        # the route stays set until after backward: gradient checkpointing recomputes
        # the forward pass inside backward and must route the same way
        for layer in self.route_layers:
            layer.route = route
        with torch.autocast(
            self.base.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.use_autocast
        ):
            pred = self.predict(batch, noisy, t)
        err = F.mse_loss(pred.float(), target.float(), reduction="none")
        if "loss_weights" not in batch:
            rows = err.mean(dim=(1, 2, 3))
        else:
            w = batch["loss_weights"].to(err.device)  # B x 1 x h x w: a weighted mean per row
            rows = (err * w).sum(dim=(1, 2, 3)) / (w.sum(dim=(1, 2, 3)) * err.shape[1]).clamp_min(1e-8)
        if self.cfg.snr_gamma is not None:
            rows = rows * min_snr_weights(self.scheduler, t, self.cfg.snr_gamma)
        return rows

    def predict(self, batch: dict, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dt = self.base.dtype
        kwargs = {}
        if "pooled" in batch:
            kwargs["added_cond_kwargs"] = {"text_embeds": batch["pooled"].to(dt), "time_ids": batch["time_ids"].to(dt)}
        return self.base.unet(noisy.to(dt), t, encoder_hidden_states=batch["embeds"].to(dt), **kwargs).sample

    def train_step(self) -> float:
        batch, weights, route = self.draw()
        loss = (self.row_losses(batch, route) * weights).sum()
        if self.extra_loss is not None:
            loss = loss + self.extra_loss()
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        for layer in self.route_layers:
            layer.route = None
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_schedule is not None:
            self.lr_schedule.step()
        self.step += 1
        return float(loss.detach())

    def run(self, hooks: Hooks | None = None) -> None:
        hooks = hooks or Hooks()
        if hooks.resume:
            self.load_state(hooks.resume)
        unet = self.base.unet
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        try:
            while self.step < self.cfg.steps:
                if hooks.should_cancel and hooks.should_cancel():
                    raise TrainingCanceled(f"canceled at step {self.step}")
                if hooks.should_pause and self.step > 0 and hooks.should_pause():
                    if hooks.checkpoint:
                        hooks.checkpoint(self.step, self.state())
                    raise TrainingPaused(self.step)
                loss = self.train_step()
                if hooks.progress:
                    hooks.progress(self.step, self.cfg.steps, loss)
                every = self.cfg.checkpoint_every
                if hooks.checkpoint and every and self.step % every == 0 and self.step < self.cfg.steps:
                    hooks.checkpoint(self.step, self.state())
                pe = hooks.preview_every
                if hooks.preview and pe and self.step % pe == 0 and self.step < self.cfg.steps:
                    for prompt in [self.expand(p) for p in hooks.preview_prompts] or [self.preview_prompt]:
                        hooks.preview(self.step, self.sample(prompt))
        finally:
            for layer in self.route_layers:
                layer.route = None
            if self.cfg.gradient_checkpointing:
                unet.disable_gradient_checkpointing()

    def expand(self, prompt: str) -> str:
        """`{content}` / `{style}` as the phrases of the concepts trained here (the first of each kind)."""
        phrases: dict[str, str] = {}
        for g in self.groups:
            phrases.setdefault(g.samples.concept.kind, g.samples.concept.phrase)
        for kind, phrase in phrases.items():
            prompt = prompt.replace("{" + kind + "}", phrase)
        return prompt

    @torch.no_grad()
    def sample(self, prompt: str, seed: int = 0, steps: int = 10, guidance: float = 5.0) -> Image.Image:
        """One image drawn with the adapter as trained so far (the layers stay live, unmerged)."""
        unet = self.base.unet
        was_training = unet.training
        unet.eval()
        try:
            res = self.base.resolution
            return self.base.pipe(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=res,
                height=res,
                generator=torch.Generator(device="cpu").manual_seed(seed),
            ).images[0]
        finally:
            unet.train(was_training)

    # checkpoints: safetensors, so a resumed job never unpickles anything
    def state(self) -> bytes:
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        for i, p in enumerate(self.params):
            for k, v in self.optimizer.state.get(p, {}).items():
                tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        tensors["rng"] = self.gen.get_state()
        meta = {"step": str(self.step), "n_params": str(len(self.params))}
        if self.scaler:
            meta["scaler"] = json.dumps({"scale": float(self.scaler.get_scale())})
        return st_save(tensors, metadata=meta)

    def load_state(self, data: bytes) -> None:
        try:
            tensors = st_load(data)
            meta = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
        except Exception as exc:
            raise ConfigError(f"not a training checkpoint: {exc}") from exc
        if int(meta["n_params"]) != len(self.params):
            raise ConfigError("checkpoint belongs to a different run (parameter count differs)")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                src = tensors[f"param.{i}"]
                if src.shape != p.shape:
                    raise ConfigError("checkpoint belongs to a different run (shapes differ)")
                p.copy_(src.to(p.device))
        state = {}
        for i, p in enumerate(self.params):
            keys = [k for k in tensors if k.startswith(f"opt.{i}.")]
            if keys:
                state[i] = {
                    k.split(".", 2)[2]: tensors[k].to(p.device) if tensors[k].dim() else tensors[k] for k in keys
                }
        sd = self.optimizer.state_dict()
        sd["state"] = state
        self.optimizer.load_state_dict(sd)
        self.gen.set_state(tensors["rng"])
        self.step = int(meta["step"])
        self.lr_schedule = self._lr_schedule(self.step)


def _resolution(base: BaseModel, cfg: TrainConfig) -> int:
    return cfg.resolution or base.resolution


PRIOR_SAMPLE_STEPS = 20


@torch.no_grad()
def prior_concept(base: BaseModel, concept: Concept, cfg: TrainConfig) -> Concept:
    """The class images of prior preservation: `cfg.prior_images` drawings by the base model
    (no adapter on it) of the concept's captions with a word the model knows in place of
    the new concept, cycling through captions and words; captioned with exactly that prompt."""
    if adapter_layers(base.unet):
        raise ConfigError("prior images must be drawn by the bare base model (an adapter is on it)")
    words, texts = base.prior_words(concept), concept.texts()
    slot = "{" + concept.kind + "}"
    prompts = [texts[i % len(texts)].replace(slot, words[i % len(words)]) for i in range(cfg.prior_images)]
    res = _resolution(base, cfg)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 104729)  # not the training draws
    images = []
    for start in range(0, len(prompts), 8):
        out = base.pipe(
            prompt=prompts[start : start + 8],
            num_inference_steps=PRIOR_SAMPLE_STEPS,
            guidance_scale=5.0,
            width=res,
            height=res,
            generator=gen,
        )
        images += list(out.images)
    return Concept(concept.kind, images, word=concept.word, token="", captions=prompts)


def _meta(base: BaseModel, cfg: TrainConfig | None = None) -> dict:
    return {
        "base_model": base.model_id,
        "base_model_hash": base.model_hash,
        "base_arch": base.arch,
        "resolution": _resolution(base, cfg) if cfg is not None else base.resolution,
    }


# ---------------------------------------------------------------- break stage
class BreakStage:
    """Train a content or style PLP adapter with MCP (DESIGN.md section 1).

    Each step: `batch_size` rows of the concept (they train the concept's half) and one
    row from each of the `k` auxiliary sets (they train the other half), in one forward
    and one backward pass: L = L_primary + (1/k) sum_i L_aux_i.
    """

    def __init__(self, base: BaseModel, concept: Concept, aux: list[Concept], plp: PLPConfig, cfg: TrainConfig):
        for a in aux:
            if a.kind == concept.kind:
                raise ConfigError(f"auxiliary sets of a {concept.kind} must be of the opposite kind, got {a.kind}")
        self.base, self.concept, self.aux, self.plp, self.cfg = base, concept, aux, plp, cfg
        self.token_hooks: IdentifierEmbeddings | None = None
        try:
            self._setup(base, concept, aux, plp, cfg)
        except BaseException:  # nothing of a stage that never started stays on the shared base
            self._release()
            raise

    def _release(self) -> None:
        remove_adapters(self.base.unet)
        if self.token_hooks:
            self.token_hooks.remove()

    def _setup(self, base: BaseModel, concept: Concept, aux: list[Concept], plp: PLPConfig, cfg: TrainConfig) -> None:
        prior = prior_concept(base, concept, cfg) if cfg.prior_preservation else None  # before any layer
        self.layers = inject_plp(base.unet, plp)
        self.primary_half = plp.half_for(concept.kind)
        self.other_half = "down" if self.primary_half == "up" else "up"
        for layer in self.layers.values():
            layer.primary = self.primary_half
        res = _resolution(base, cfg)
        groups = [RowGroup(_samples(base, concept, res, cfg), cfg.batch_size, 1.0, True)]
        k = len(aux)
        for a in aux:
            groups.append(RowGroup(_samples(base, a, res, cfg), 1, 1.0 / k, False))
        if prior is not None:  # trains the concept's own half: it must keep what the base draws
            groups.append(RowGroup(_samples(base, prior, res, cfg), 1, cfg.prior_loss_weight, True))
        self.prior = prior
        primary = [layer.half(self.primary_half) for layer in self.layers.values()]
        other = [layer.half(self.other_half) for layer in self.layers.values()]
        train_other = k > 0 and cfg.aux_lr_factor > 0
        for p in other:
            p.requires_grad_(train_other)
        params = [{"params": primary, "lr": cfg.learning_rate}]
        if train_other:
            params.append({"params": other, "lr": cfg.learning_rate * cfg.aux_lr_factor})
        # pivotal tuning: the identifier's own embedding, learnt from the concept's rows
        self.token_vectors: list[nn.Parameter] = []
        if cfg.train_token_embedding and concept.token:
            self.token_vectors = [nn.Parameter(v) for v in initial_vectors(base.pipe, concept.token)]
            self.token_hooks = IdentifierEmbeddings(base.pipe, {concept.token: self.token_vectors})
            groups[0].samples.live = True
            params.append({"params": self.token_vectors, "lr": cfg.token_learning_rate or cfg.learning_rate})
        # strict: each row's gradient reaches only its own half; released: both halves
        # see the joint loss (each at its own rate)
        routed = list(self.layers.values()) if cfg.routing == "strict" else []
        self.session = TrainingSession(base, params, groups, cfg, route_layers=routed)

    def train(self, hooks: Hooks | None = None) -> Adapter:
        try:
            self.session.run(hooks)
            return self.adapter()
        finally:
            self._release()

    def adapter(self) -> Adapter:
        c = self.concept
        tensors = plp_state_dict(self.layers)
        for i, v in enumerate(self.token_vectors):
            tensors[token_key(c.kind, i)] = v.detach().float().cpu().contiguous()
        return Adapter(
            kind=c.kind,
            method="b4m",
            tensors=tensors,
            rank=self.plp.rank,
            alpha=self.plp.alpha,
            plp=self.plp,
            tokens={c.kind: c.token},
            words={c.kind: c.phrase_word},
            steps=self.cfg.steps,
            seed=self.cfg.seed,
            extra={
                "aux": [a.phrase for a in self.aux],
                "aux_lr_factor": self.cfg.aux_lr_factor,
                "learning_rate": self.cfg.learning_rate,
                "routing": self.cfg.routing,
                # the prior's prompts (None: no prior preservation) and weight
                "prior": self.prior.captions if self.prior is not None else None,
                "prior_loss_weight": self.cfg.prior_loss_weight if self.prior is not None else None,
                "training": training_facts(self.session),
            },
            **_meta(self.base, self.cfg),
        )


# ---------------------------------------------------------------- make stage
def check_composable(content: Adapter, style: Adapter) -> None:
    """Raise `IncompatibleAdapters` naming the first thing that keeps two adapters apart."""
    if content.kind == style.kind:
        raise IncompatibleAdapters(f"both adapters are {content.kind} adapters: fuse one content with one style")
    if content.kind != "content" or style.kind != "style":
        raise IncompatibleAdapters(f"expected a content and a style adapter, got {content.kind} and {style.kind}")
    for a in (content, style):
        if a.method != "b4m":
            raise IncompatibleAdapters(f"the {a.kind} adapter was made by {a.method!r}, not b4m: use a baseline fusion")
    if content.base_model_hash != style.base_model_hash:
        raise IncompatibleAdapters(
            f"adapters were trained on different base models ({content.base_model} vs {style.base_model})"
        )
    if why := plp_mismatch(content.plp, style.plp):
        raise IncompatibleAdapters(why)
    wide, narrow = _wide_and_narrow(content, style)
    if not set(narrow.layer_names) <= set(wide.layer_names):
        raise IncompatibleAdapters("adapters cover different layers")
    for name in narrow.layer_names:
        for part in ("A", "C"):
            if not _same_basis(content.tensors[f"{name}.{part}"], style.tensors[f"{name}.{part}"]):
                raise IncompatibleAdapters(f"frozen bases differ at {name}.{part}")


def _wide_and_narrow(content: Adapter, style: Adapter) -> tuple[Adapter, Adapter]:
    """The adapter on the larger of two nested target sets, then the other (content first
    when they cover the same set)."""
    if covering_targets(content.plp.targets, style.plp.targets) == style.plp.targets != content.plp.targets:
        return style, content
    return content, style


def _same_basis(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of a half-precision file (2^-8 relative, bf16's step): an fp32
    adapter and an fp16 one trained on the same bases compose; other bases differ at order 1."""
    if torch.equal(a, b):
        return True
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool((a - b).abs().max() <= 2**-8 * a.abs().max().clamp_min(1e-12))


@torch.no_grad()
def block_norms(adapter: Adapter) -> dict[str, float]:
    """The blocks of a composed PLP update dW = [A; B][C, D], Frobenius norms summed over
    layers (scaled as applied): the content block, the style block and the interaction of
    the two trained halves (B D: never trained together in the break stage). A C is 0 with
    exact bases."""
    plp = adapter.plp
    out = {"content": 0.0, "style": 0.0, "interaction": 0.0}
    if plp is None:
        return out
    t = adapter.tensors
    for name in adapter.layer_names:
        a, b, c, d = (t[f"{name}.{p}"].float() for p in "ABCD")
        bc, ad, bd = (torch.linalg.matrix_norm(x @ y).item() * plp.scale for x, y in ((b, c), (a, d), (b, d)))
        out["content"] += bc if plp.content_half == "up" else ad
        out["style"] += ad if plp.content_half == "up" else bc
        out["interaction"] += bd
    return out


def compose(content: Adapter, style: Adapter) -> Adapter:
    """The bare composition: shared bases, content half from one, style half from the other.
    Adapters on nested target sets compose over the larger one; on a layer only one of them
    covers, the other's half is zero (so it starts from that adapter's update alone)."""
    check_composable(content, style)
    wide, _ = _wide_and_narrow(content, style)
    plp = wide.plp
    content_part = "B" if plp.content_half == "up" else "D"
    style_part = "D" if content_part == "B" else "B"
    tensors = {}
    for name in wide.layer_names:
        for part in ("A", "C"):
            tensors[f"{name}.{part}"] = wide.tensors[f"{name}.{part}"].clone()
        for source, part in ((content, content_part), (style, style_part)):
            own = source.tensors.get(f"{name}.{part}")
            tensors[f"{name}.{part}"] = (
                own.clone() if own is not None else torch.zeros_like(wide.tensors[f"{name}.{part}"])
            )
    for source in (content, style):  # learnt identifier embeddings travel with their half
        tensors |= {k: v.clone() for k, v in source.tensors.items() if k.startswith(f"{TOKEN_PREFIX}{source.kind}.")}
    fused = Adapter(
        kind="fused",
        method="b4m",
        tensors=tensors,
        rank=plp.rank,
        alpha=plp.alpha,
        plp=plp,
        base_model=content.base_model,
        base_model_hash=content.base_model_hash,
        base_arch=content.base_arch,
        resolution=content.resolution,
        tokens={**content.tokens, **style.tokens},
        words={**content.words, **style.words},
        steps=0,
        seed=0,
    )
    fused.extra["blocks_composed"] = block_norms(fused)  # before any make step
    return fused


def _concept_for(adapter: Adapter, concept: Concept) -> Concept:
    """The reference set, named with the identifier and word the adapter learnt (an empty
    word: the adapter learnt its identifier alone)."""
    kind = concept.kind
    learnt = adapter.words.get(kind)
    return Concept(
        kind=kind,
        images=concept.images,
        captions=concept.captions,
        template=concept.template,
        word=learnt or concept.word,
        token=adapter.tokens.get(kind, concept.token),
        with_word=concept.with_word if learnt is None else bool(learnt),
    )


def _check_base(base: BaseModel, *adapters: Adapter) -> None:
    for a in adapters:
        if a.base_model_hash and a.base_model_hash != base.model_hash:
            raise IncompatibleAdapters(
                f"the {a.kind} adapter was trained on {a.base_model!r}, not on the loaded base {base.model_id!r}"
            )


def _pair_set(base: BaseModel, content: Concept, style: Concept, cfg: TrainConfig) -> Concept:
    """The content in the style, pictured from the references (data.synthesized_pairs), as a
    content set whose captions name the style too: read by the model's captioner where it has
    one (`"pair"`: the scene only), else "{content} in {style} style"."""
    images = synthesized_pairs(content, style, cfg.make_pairs, cfg.seed)
    if base.captioner is not None and cfg.captions == "auto":
        texts = base.captioner("pair", images)
    else:
        texts = ["a {content} in {style} style"] * len(images)
    captions = [t.replace("{style}", style.phrase) for t in texts]
    return replace(content, images=images, captions=captions)


class MakeStage:
    """Compose, then fine-tune both halves on both reference sets (no routing)."""

    def __init__(
        self,
        base: BaseModel,
        content: Adapter,
        style: Adapter,
        content_set: Concept,
        style_set: Concept,
        cfg: TrainConfig,
    ):
        self.fused = compose(content, style)
        _check_base(base, content, style)
        self.base, self.cfg = base, cfg
        # the references are encoded with the identifiers' learnt embeddings (kept as learnt)
        self.token_hooks = IdentifierEmbeddings(base.pipe, adapter_vectors(self.fused.tensors, self.fused.tokens))
        try:
            self._setup(base, content, style, content_set, style_set, cfg)
        except BaseException:  # nothing of a stage that never started stays on the shared base
            self._release()
            raise

    def _release(self) -> None:
        remove_adapters(self.base.unet)
        self.token_hooks.remove()

    def _setup(self, base, content, style, content_set, style_set, cfg) -> None:
        self.layers = inject_plp(base.unet, self.fused.plp)
        load_plp_state_dict(self.layers, self.fused.tensors, parts=("A", "B", "C", "D"))
        res = _resolution(base, cfg)
        self.content_set = _concept_for(content, content_set)
        self.style_set = _concept_for(style, style_set)
        # split routing: content rows are "primary" and train only the content half
        split = cfg.make_routing == "split"
        for layer in self.layers.values():
            layer.primary = self.fused.plp.half_for("content")
        groups = [
            RowGroup(_samples(base, self.content_set, res, cfg), cfg.batch_size, 1.0, True),
            RowGroup(_samples(base, self.style_set, res, cfg), cfg.batch_size, cfg.make_style_weight, False),
        ]
        if cfg.make_pairs:
            pairs = _pair_set(base, self.content_set, self.style_set, cfg)
            groups.append(RowGroup(_samples(base, pairs, res, cfg), cfg.batch_size, 1.0, True))
        params = [{"params": [p for l in self.layers.values() for p in (l.B, l.D)]}]
        self.session = TrainingSession(
            base, params, groups, cfg, route_layers=list(self.layers.values()) if split else None
        )

    def train(self, hooks: Hooks | None = None) -> Adapter:
        try:
            self.session.run(hooks)
            out = self.fused
            learnt_tokens = {k: v for k, v in out.tensors.items() if k.startswith(TOKEN_PREFIX)}
            out.tensors = plp_state_dict(self.layers) | learnt_tokens
            out.steps, out.seed = self.cfg.steps, self.cfg.seed
            out.extra["blocks"] = block_norms(out)
            out.extra["training"] = training_facts(self.session)
            return out
        finally:
            self._release()


# ---------------------------------------------------------------- baselines
class LoRAStage:
    """Plain LoRA on one or more reference sets: a single-concept LoRA or joint DB+LoRA."""

    def __init__(
        self,
        base: BaseModel,
        concepts: list[Concept],
        rank: int,
        alpha: float,
        targets: str,
        cfg: TrainConfig,
        kind: str,
        method: str,
    ):
        self.base, self.concepts, self.cfg = base, concepts, cfg
        self.rank, self.alpha, self.targets, self.kind, self.method = rank, alpha, targets, kind, method
        for p in base.unet.parameters():
            p.requires_grad_(False)
        init = torch.Generator().manual_seed(cfg.seed)  # the kaiming draw of every `down`
        self.layers = inject(
            base.unet,
            target_layer_names(base.unet, targets),
            lambda name, lin: LoRALinear(lin, rank, alpha, generator=init),
        )
        res = _resolution(base, cfg)
        groups = [RowGroup(_samples(base, c, res, cfg), cfg.batch_size, 1.0) for c in concepts]
        params = [{"params": [p for l in self.layers.values() for p in (l.up, l.down)]}]
        self.session = TrainingSession(base, params, groups, cfg)

    def train(self, hooks: Hooks | None = None) -> Adapter:
        try:
            self.session.run(hooks)
            tensors = {}
            for name, l in self.layers.items():
                tensors[f"{name}.up"] = l.up.detach().float().cpu()
                tensors[f"{name}.down"] = l.down.detach().float().cpu()
            return Adapter(
                kind=self.kind,
                method=self.method,
                tensors=tensors,
                rank=self.rank,
                alpha=self.alpha,
                tokens={c.kind: c.token for c in self.concepts},
                words={c.kind: c.phrase_word for c in self.concepts},
                steps=self.cfg.steps,
                seed=self.cfg.seed,
                extra={"targets": self.targets},
                **_meta(self.base, self.cfg),
            )
        finally:
            remove_adapters(self.base.unet)


def direct_merge(content: Adapter, style: Adapter, weights: tuple[float, float] = (1.0, 1.0)) -> Adapter:
    """Eq. 3: W0 + l1 dW1 + l2 dW2, stored exactly as one LoRA of rank r1 + r2."""
    _check_pair(content, style)
    lc, ls = content.low_rank(), style.low_rank()
    tensors = {}
    for name in sorted(set(lc) | set(ls)):
        ups, downs = [], []
        for lr_, w in ((lc, weights[0]), (ls, weights[1])):
            if name in lr_:
                up, down, scale = lr_[name]
                ups.append(up.float() * scale * w)
                downs.append(down.float())
        tensors[f"{name}.up"] = torch.cat(ups, dim=1)
        tensors[f"{name}.down"] = torch.cat(downs, dim=0)
    rank = max(t.shape[0] for k, t in tensors.items() if k.endswith(".down"))
    return _fused_baseline(content, style, "merge", tensors, rank, extra={"weights": list(weights)})


def _check_pair(content: Adapter, style: Adapter) -> None:
    if content.kind != "content" or style.kind != "style":
        raise IncompatibleAdapters(f"expected a content and a style adapter, got {content.kind} and {style.kind}")
    if content.base_model_hash != style.base_model_hash:
        raise IncompatibleAdapters("adapters were trained on different base models")


def _fused_baseline(
    content: Adapter, style: Adapter, method: str, tensors: dict, rank: int, extra: dict, steps: int = 0, seed: int = 0
) -> Adapter:
    # Scales are baked into `up`, so alpha = rank gives scale 1. Layers of different
    # ranks are padded with zero columns so the file has one rank.
    for name in [k[:-5] for k in tensors if k.endswith(".down")]:
        up, down = tensors[f"{name}.up"], tensors[f"{name}.down"]
        if down.shape[0] < rank:
            pad = rank - down.shape[0]
            tensors[f"{name}.up"] = torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1)
            tensors[f"{name}.down"] = torch.cat([down, down.new_zeros(pad, down.shape[1])], dim=0)
    return Adapter(
        kind="fused",
        method=method,
        tensors=tensors,
        rank=rank,
        alpha=float(rank),
        base_model=content.base_model,
        base_model_hash=content.base_model_hash,
        base_arch=content.base_arch,
        resolution=content.resolution,
        tokens={**content.tokens, **style.tokens},
        words={**content.words, **style.words},
        steps=steps,
        seed=seed,
        extra={"targets": content.targets, **extra},
    )


class ZipLoRAStage:
    """ZipLoRA: learn per-column merger vectors so the merged adapter reproduces each
    source LoRA on its own prompts, with |m1 . m2| pushing them onto different columns."""

    def __init__(
        self,
        base: BaseModel,
        content: Adapter,
        style: Adapter,
        content_set: Concept,
        style_set: Concept,
        cfg: TrainConfig,
        overlap_weight: float = 0.01,
    ):
        _check_pair(content, style)
        _check_base(base, content, style)
        self.base, self.content, self.style, self.cfg = base, content, style, cfg
        lc, ls = content.low_rank(), style.low_rank()
        names = sorted(set(lc) & set(ls))
        if not names:
            raise IncompatibleAdapters("the two adapters share no layers")
        for p in base.unet.parameters():
            p.requires_grad_(False)

        def factory(name, lin):
            (u1, d1, s1), (u2, d2, s2) = lc[name], ls[name]
            return ZipLoRALinear(lin, u1, d1, s1, u2, d2, s2)

        self.layers = inject(base.unet, names, factory)
        res = _resolution(base, cfg)
        cset, sset = _concept_for(content, content_set), _concept_for(style, style_set)
        groups = [
            RowGroup(_samples(base, cset, res, cfg), cfg.batch_size, 1.0),
            RowGroup(_samples(base, sset, res, cfg), cfg.batch_size, 1.0),
        ]
        params = [{"params": [p for l in self.layers.values() for p in (l.m1, l.m2)]}]
        self.session = TrainingSession(
            base,
            params,
            groups,
            cfg,
            target_fn=self._targets,
            extra_loss=lambda: overlap_weight * sum(l.overlap() for l in self.layers.values()) / len(self.layers),
        )
        self._n_content = cfg.batch_size

    @torch.no_grad()
    def _targets(self, batch: dict, noisy: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = []
        n = self._n_content
        for mode, rows in (("first", slice(0, n)), ("second", slice(n, None))):
            for l in self.layers.values():
                l.mode = mode
            sub = {k: v[rows] for k, v in batch.items()}
            out.append(self.session.predict(sub, noisy[rows], t[rows]).float())
        for l in self.layers.values():
            l.mode = "merged"
        return torch.cat(out)

    def train(self, hooks: Hooks | None = None) -> Adapter:
        try:
            self.session.run(hooks)
            tensors = {}
            for name, l in self.layers.items():
                tensors[f"{name}.up"] = l.up_weight().detach().float().cpu()
                tensors[f"{name}.down"] = l.down_weight().detach().float().cpu()
            rank = max(t.shape[0] for k, t in tensors.items() if k.endswith(".down"))
            return _fused_baseline(
                self.content, self.style, "ziplora", tensors, rank, extra={}, steps=self.cfg.steps, seed=self.cfg.seed
            )
        finally:
            remove_adapters(self.base.unet)


# ------------------------------------------------------- one call shape for all
def _expanded(base: BaseModel, concept: Concept, cfg: TrainConfig) -> Concept:
    """The references with the copies `cfg` asks for: recombined with known concepts, then
    zoomed out (every stage sees the same set)."""
    if cfg.recombine and concept.kind in cfg.recombine_kinds.split("+"):
        concept = recombined(concept, base.known_images(concept.kind, cfg.seed), cfg.recombine, cfg.seed)
    return augmented(concept, cfg.augment, cfg.augment_min_scale, cfg.seed)


CONCEPT_METHODS = ("b4m", "lora")
FUSION_METHODS = ("b4m", "joint", "merge", "ziplora")


def train_concept(
    base: BaseModel,
    concept: Concept,
    method: str = "b4m",
    aux: list[Concept] | None = None,
    plp: PLPConfig | None = None,
    cfg: TrainConfig | None = None,
    hooks: Hooks | None = None,
) -> Adapter:
    """Break stage (`b4m`) or a plain LoRA (`lora`, the baselines' first stage)."""
    plp, cfg = plp or base.plp_config(), cfg or TrainConfig()
    concept = base.describe(_expanded(base, concept, cfg), cfg.captions == "auto")
    aux = [base.describe(a, cfg.captions == "auto") for a in aux or []]
    if method == "b4m":
        return BreakStage(base, concept, list(aux or []), plp, cfg).train(hooks)
    if method == "lora":
        return LoRAStage(base, [concept], plp.rank, plp.alpha, plp.targets, cfg, concept.kind, "lora").train(hooks)
    raise ConfigError(f"concept method must be one of {CONCEPT_METHODS}, got {method!r}")


def fuse(
    base: BaseModel,
    content: Adapter | None,
    style: Adapter | None,
    content_set: Concept,
    style_set: Concept,
    method: str = "b4m",
    cfg: TrainConfig | None = None,
    hooks: Hooks | None = None,
    plp: PLPConfig | None = None,
) -> Adapter:
    """Make one adapter for a content x style pair by the chosen method.

    `b4m`: compose + fine-tune (default 50 steps); `joint`: one LoRA trained from scratch
    on both sets; `merge`: direct sum; `ziplora`: learnt merger vectors (default 100).
    """
    auto = cfg is None or cfg.captions == "auto"
    if cfg is not None:  # the make stage sees the references as the break stage did
        content_set, style_set = (_expanded(base, c, cfg) for c in (content_set, style_set))
    content_set, style_set = base.describe(content_set, auto), base.describe(style_set, auto)
    if method == "b4m":
        cfg = cfg or TrainConfig(steps=50)
        if cfg.steps == 0:
            _check_base(base, content, style)
            return compose(content, style)
        return MakeStage(base, content, style, content_set, style_set, cfg).train(hooks)
    if method == "joint":
        plp = plp or (content.plp if content and content.plp else PLPConfig())
        cset = _concept_for(content, content_set) if content else content_set
        sset = _concept_for(style, style_set) if style else style_set
        return LoRAStage(
            base, [cset, sset], plp.rank, plp.alpha, plp.targets, cfg or TrainConfig(), "fused", "joint"
        ).train(hooks)
    if method == "merge":
        _check_base(base, content, style)
        return direct_merge(content, style)
    if method == "ziplora":
        return ZipLoRAStage(base, content, style, content_set, style_set, cfg or TrainConfig(steps=100)).train(hooks)
    raise ConfigError(f"fusion method must be one of {FUSION_METHODS}, got {method!r}")
