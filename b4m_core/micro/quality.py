"""`b4m bench quality`: the paper's Table 1 on the micro world.

For every held-out content x held-out style pair, every method trains or composes an
adapter, draws images for fixed prompts that name attributes, and is scored on
content, style and prompt alignment: exactly, with the probes, and paper-style, with
EfficientNet-lite0 and Magenta style vectors. Writes `results.json`, `table.md`
(laid out like Table 1) and `grid.png` (pairs x methods).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..adapter import Adapter
from ..config import SCHEDULERS, ConfigError, PLPConfig, TrainConfig
from ..generation import GenerationRequest, Generator
from ..models import BaseModel, load_base
from ..training import fuse, train_concept
from .bank import aux_bank
from .metrics import PaperMetrics
from .probes import load_probe, predict
from .references import reference_concept
from .world import (
    CONTENTS,
    PRETRAIN_CONTENTS,
    PRETRAIN_STYLES,
    SPLITS,
    STYLES,
    random_scene,
    render,
)

# (size, position, background) named by each evaluation prompt
EVAL_ATTRIBUTES = [
    ("large", "center", "white"),
    ("small", "top left", "blue"),
    ("large", "bottom right", "yellow"),
    ("small", "center", "pink"),
    ("large", "top right", "green"),
    ("small", "bottom left", "black"),
]


def _where(position: str) -> str:
    return "in the center" if position == "center" else f"in the {position} corner"


# how a fused pair's prompt names its style: "in_style" ("a large {content} in {style} style
# ..."), or "adjective", the micro world's own caption grammar ("a large {style} {content} ...")
PROMPT_FORMS = ("in_style", "adjective")


def eval_prompt(size: str, position: str, background: str, form: str = "in_style") -> str:
    if form not in PROMPT_FORMS:
        raise ConfigError(f"prompt_form must be one of {PROMPT_FORMS}, got {form!r}")
    thing = "{style} {content}" if form == "adjective" else "{content} in {style} style"
    return f"a {size} {thing} {_where(position)} on a {background} background"


def single_prompt(kind: str, size: str, position: str, background: str, i: int = 0) -> str:
    """A prompt for one break-stage adapter alone: the content in a known style, or the style
    on a known shape (cycled through the pre-training concepts). Every pre-training caption
    names a style and a shape, so a prompt that names only one is one the model never saw."""
    if kind == "content":
        known = PRETRAIN_STYLES[i % len(PRETRAIN_STYLES)]
        return f"a {size} {{content}} in {known} style {_where(position)} on a {background} background"
    thing = PRETRAIN_CONTENTS[i % len(PRETRAIN_CONTENTS)]
    return f"a {size} {thing} in {{style}} style {_where(position)} on a {background} background"


@dataclass(frozen=True)
class Settings:
    """One bench run. `None`: the base model's measured default (b4m_defaults.json)."""

    break_steps: int | None = None
    make_steps: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None  # rows of each reference set a step (MCP adds one row per auxiliary set)
    make_batch_size: int | None = None  # the make stage's rows of each reference set a step
    make_learning_rate: float | None = None  # None: the model's make rate (else its break rate)
    rho: float | None = None
    content_half: str | None = None
    basis_mode: str | None = None
    basis_scale: str | None = None
    routing: str = "strict"
    make_routing: str = "joint"  # joint (the paper) | split (each reference set trains its own half)
    make_style_weight: float = 1.0  # the make stage's style-reference loss relative to the content's
    random_flip: bool = False  # every training run mirrors references left-right at random
    augment: int = 0  # zoomed-out, moved copies of each reference in every training run (TrainConfig)
    augment_min_scale: float = 0.5
    make_augment: int | None = None  # the make stage's copies (None: `augment`), e.g. only there
    recombine: int = 0  # copies of each reference recombined with the bank's known concepts (TrainConfig)
    recombine_kinds: str = "content+style"  # the reference sets that get them
    make_pairs: int = 0  # the make stage's pictures of the pair per content reference (TrainConfig)
    loss_mask: str = "none"  # reference sets whose loss is weighted to the subject (TrainConfig)
    loss_mask_background: float = 0.1  # the background's weight in those
    snr_gamma: float | None = None  # Min-SNR loss weighting (TrainConfig); None: off
    lr_scheduler: str = "constant"  # every stage's rate schedule (TrainConfig, diffusers' names)
    lr_warmup_steps: int = 0
    aux_sets: int | None = None  # MCP auxiliary sets (None: the model's `aux_sets`)
    token_bound_aux: bool = False  # each auxiliary set gets its own identifier token (the paper's)
    # auxiliary sets named by their own known word ("vqz brick") or by the generic word a
    # user's concept gets ("vqz pattern": only the token tells them apart, as the paper's are)
    aux_generic_word: bool = False
    # the auxiliary half's rate relative to the concept's in the break stage (TrainConfig's own
    # default, as the released code): with `strict` routing the only thing the auxiliary rows train
    aux_lr_factor: float = TrainConfig.aux_lr_factor
    captions: str = "sidecar"  # sidecar (hand-written, shipped) | auto (the model's captioner) | template
    # the words each concept is named with beside its identifier ("fsv shape", "rbq pattern"):
    # user (the class / style word a user would type) | none (the identifier alone)
    concept_words: str = "user"
    lora_steps: int | None = None  # None: the break stage's steps (same budget)
    # the joint LoRA baseline trains as a plain LoRA learns well here (Session L, dev split: at
    # the break stage's 5e-3 and batch 1 a plain LoRA breaks): 1.6x the break steps (400 at
    # micro's 250), batch 2 of each reference set, lr 2e-3
    joint_steps: int | None = None
    joint_batch_size: int = 2
    joint_learning_rate: float = 2e-3
    ziplora_steps: int = 100
    lora_learning_rate: float | None = None  # the per-concept LoRA baselines' rate (None: learning_rate)
    rank: int | None = None
    targets: str | None = None  # layers an adapter covers: attn | cross | transformer (attn + feed-forward)
    # the style adapters' layers when they differ (None: `targets`); nested sets compose, e.g.
    # contents on attn+conv with styles on attn (the style half is zero on the convolutions)
    style_targets: str | None = None
    # every training run's timestep bias (TrainConfig): none | later | earlier | range
    timestep_bias_strategy: str | None = None  # None: the model's (b4m_defaults.json), else none
    timestep_bias_multiplier: float | None = None
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    # pivotal tuning: every break stage also learns its identifier's embedding
    train_token_embedding: bool | None = None
    token_learning_rate: float | None = None  # None: the break stage's learning rate
    # DreamBooth prior preservation in every break stage (TrainConfig); None: the model's default
    prior_preservation: bool | None = None
    prior_images: int | None = None
    prior_loss_weight: float | None = None
    # drawing a fused B4M adapter: its content and style halves scaled apart (generation's
    # content_scale / style_scale; 1 = as made)
    content_scale: float = 1.0
    style_scale: float = 1.0
    # ... and over the sampling steps (generation's content_end / style_start)
    content_end: float = 1.0
    style_start: float = 0.0
    prompt_form: str = "in_style"  # PROMPT_FORMS: how the fused pairs' prompts name the style
    # how the captioner names a style reference's new style (captioner.caption_images)
    caption_form: str = "in_style"
    images_per_pair: int = 4
    single_images: int = 4  # images per break-stage adapter scored alone (0: skip)
    sample_steps: int = 20
    sampler: str = "default"  # the drawing scheduler (config.SCHEDULERS; default: the model's own)
    guidance: float = 5.0
    seed: int = 0
    seeds: int = 1  # seeds seed, seed + 1, ...: training and sampling both change
    # a folder: every B4M adapter is saved there under a hash of what trained it, and a later
    # run with the same training settings loads it instead (drawing-only settings such as
    # style_scale then cost no training). Valid for one code state: clear it after a change.
    adapter_cache: str | None = None

    def __post_init__(self):
        # a drawing setting is only used after every adapter is trained: refuse it before
        if self.sampler not in SCHEDULERS:
            raise ConfigError(f"sampler must be one of {', '.join(SCHEDULERS)}, got {self.sampler!r}")

    def resolved(self, base: BaseModel) -> Settings:
        """Every `None` filled from the base model's measured defaults, through the same path
        the CLI, the worker and the demo take (BaseModel.plp_config / train_config)."""
        # refused now, not after hours of training (or, for the captioner, never)
        for label, v in (("prompt_form", self.prompt_form), ("caption_form", self.caption_form)):
            if v not in PROMPT_FORMS:
                raise ConfigError(f"{label} must be one of {PROMPT_FORMS}, got {v!r}")
        plp = base.plp_config(
            rank=self.rank,
            rho=self.rho,
            content_half=self.content_half,
            basis_mode=self.basis_mode,
            basis_scale=self.basis_scale,
            targets=self.targets,
        )
        brk = base.train_config(
            "break",
            steps=self.break_steps,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            train_token_embedding=self.train_token_embedding,
            token_learning_rate=self.token_learning_rate,
            prior_preservation=self.prior_preservation,
            prior_images=self.prior_images,
            prior_loss_weight=self.prior_loss_weight,
            timestep_bias_strategy=self.timestep_bias_strategy,
            timestep_bias_multiplier=self.timestep_bias_multiplier,
        )
        make = base.train_config("make", steps=self.make_steps, learning_rate=self.make_learning_rate)
        return replace(
            self,
            break_steps=brk.steps,
            make_steps=make.steps,
            make_batch_size=make.batch_size,
            make_learning_rate=make.learning_rate,
            learning_rate=brk.learning_rate,
            batch_size=brk.batch_size,
            train_token_embedding=brk.train_token_embedding,
            token_learning_rate=brk.token_learning_rate,
            prior_preservation=brk.prior_preservation,
            prior_images=brk.prior_images,
            prior_loss_weight=brk.prior_loss_weight,
            timestep_bias_strategy=brk.timestep_bias_strategy,
            timestep_bias_multiplier=brk.timestep_bias_multiplier,
            rank=plp.rank,
            rho=plp.rho,
            content_half=plp.content_half,
            basis_mode=plp.basis_mode,
            basis_scale=plp.basis_scale,
            targets=plp.targets,
            aux_sets=self.aux_sets if self.aux_sets is not None else base.default("aux_sets", 0),
            lora_steps=self.lora_steps or brk.steps,
            joint_steps=self.joint_steps or round(1.6 * brk.steps),
            lora_learning_rate=self.lora_learning_rate or brk.learning_rate,
        )

    def plp(self, kind: str = "content") -> PLPConfig:
        return PLPConfig(
            rank=self.rank,
            alpha=float(self.rank),
            rho=self.rho,
            content_half=self.content_half,
            basis_mode=self.basis_mode,
            basis_scale=self.basis_scale,
            targets=(self.style_targets or self.targets) if kind == "style" else self.targets,
        )


# settings that change how adapters are drawn and scored, not how they are trained
DRAW_ONLY = frozenset(
    {"content_scale", "style_scale", "content_end", "style_start", "prompt_form", "images_per_pair", "single_images"}
    | {"sample_steps", "sampler", "guidance", "seeds", "adapter_cache"}
)


# settings a break-stage adapter does not depend on (the make stage's and the baselines')
NOT_BREAK = frozenset(
    {"make_steps", "make_batch_size", "make_learning_rate", "lora_steps", "joint_steps", "ziplora_steps"}
    | {"lora_learning_rate", "joint_batch_size", "joint_learning_rate", "make_routing", "make_style_weight"}
    | {"make_augment", "make_pairs"}
)


def training_spec(s: Settings, stage: str = "make") -> dict:
    """What trains an adapter of `stage` (break | make) under `s`: every setting but the
    drawing-only ones (and for a break stage, the make stage's) and those left at their
    default, and the prior's count and weight only when the prior is on (so adding a new
    setting, or switching one off, keeps the adapter cache's keys)."""
    skip = DRAW_ONLY | (NOT_BREAK if stage == "break" else frozenset())
    defaults = {f.name: f.default for f in fields(Settings)}
    spec = {k: v for k, v in asdict(s).items() if k not in skip and v != defaults[k]}
    if not spec.get("prior_preservation"):
        for k in ("prior_preservation", "prior_images", "prior_loss_weight"):
            spec.pop(k, None)
    return spec


def setting_changes(items: list[str]) -> dict:
    """`KEY=VALUE` strings as typed changes to `Settings` (`--set` of `b4m bench quality`)."""
    types = {f.name: f.type for f in fields(Settings)}
    changes: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in types or not value:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(types)}")
        kind = types[key]
        try:
            if "bool" in kind:
                changes[key] = value.lower() in ("1", "true", "yes")
            elif "int" in kind:
                changes[key] = int(value)
            elif "float" in kind:
                changes[key] = float(value)
            else:
                changes[key] = value
        except ValueError as exc:
            raise ConfigError(f"--set {item!r}: {exc}") from exc
    return changes


# 2 x 2 pairs, few steps: a smoke run of every row
QUICK = Settings(break_steps=80, make_steps=20, ziplora_steps=40)


@dataclass
class Method:
    """One table row: a family of method and what it changes of the run's settings."""

    name: str
    family: str  # "b4m" | "joint" | "merge" | "ziplora"
    overrides: dict = field(default_factory=dict)

    def settings(self, s: Settings) -> Settings:
        return replace(s, **self.overrides)

    def key(self, s: Settings) -> tuple:
        """Rows with the same key share their adapters (and their scores)."""
        eff = self.settings(s)
        if self.family == "b4m":
            return ("b4m", eff)
        if self.family == "joint":
            return ("joint", eff.plp(), eff.joint_steps, eff.joint_learning_rate, eff.joint_batch_size, eff.captions)
        return (self.family, eff.plp(), eff.lora_steps, eff.lora_learning_rate, eff.batch_size, eff.captions)


def methods(rank: int = 16) -> list[Method]:
    """The rows of the table; the first is the shipped defaults, the one the targets are on."""
    return [
        Method("B4M", "b4m"),
        Method("B4M uncaptioned (auto captions)", "b4m", {"captions": "auto"}),
        Method("B4M uncaptioned (template only)", "b4m", {"captions": "template"}),
        Method("B4M (content down)", "b4m", {"content_half": "down"}),
        Method("Joint LoRA (DB+LoRA)", "joint"),
        Method("Direct merge", "merge"),
        Method("ZipLoRA", "ziplora"),
        Method("B4M w/o MCP (k=1)", "b4m", {"aux_sets": 1}),  # the paper's ablation: one style per content
        Method("B4M no auxiliary sets (k=0)", "b4m", {"aux_sets": 0}),
        Method("B4M token-bound auxiliary sets", "b4m", {"token_bound_aux": True}),
        Method("B4M random bases (w/o Orth)", "b4m", {"basis_mode": "random"}),
        Method("B4M rho=0.25", "b4m", {"rho": 0.25}),
        Method("B4M rho=0.5", "b4m", {"rho": 0.5}),
        Method("B4M rho=0.75", "b4m", {"rho": 0.75}),
        Method("B4M balanced bases", "b4m", {"basis_scale": "balanced"}),
        Method("B4M uncaptioned, principal bases", "b4m", {"captions": "auto", "basis_mode": "principal"}),
        Method("B4M released routing", "b4m", {"routing": "released"}),
    ]


def bootstrap(cells: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of a (units x seeds) array, resampling units and seeds."""
    cells = np.asarray(cells, dtype=np.float64)
    if cells.ndim == 1:
        cells = cells[:, None]
    rng = np.random.default_rng(seed)
    u, k = cells.shape
    # all n resamples at once: (n, u, 1) unit and (n, 1, k) seed indices pick (n, u, k) cells
    units, seeds = rng.integers(0, u, (n, u, 1)), rng.integers(0, k, (n, 1, k))
    means = cells[units, seeds].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired_difference(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> dict:
    """Mean of a - b over the same (unit, seed) cells with its 95% bootstrap interval."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    lo, hi = bootstrap(d, n, seed)
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "beyond_noise": bool(lo > 0 or hi < 0)}


SCORES = ("content", "style", "prompt", "average")


class QualityBench:
    def __init__(
        self,
        base: BaseModel,
        contents: list[str],
        styles: list[str],
        settings: Settings,
        log: Callable[[str], None] = print,
    ):
        self.base, self.contents, self.styles, self.log = base, contents, styles, log
        self.s = settings.resolved(base)
        if self.s.caption_form != "in_style" and base.captioner is not None:
            base.captioner = partial(base.captioner, style_form=self.s.caption_form)
        self.gen = Generator(base)
        self.probe, self.probe_acc = load_probe()
        rng = np.random.default_rng(7)
        self.metrics = PaperMetrics([render(random_scene(rng, CONTENTS, STYLES), i) for i in range(200)])
        self.sidecar = {("content", c): reference_concept("content", c) for c in contents}
        self.sidecar.update({("style", s): reference_concept("style", s) for s in styles})
        self.timings: dict[str, list[float]] = {}

    def refs(self, s: Settings) -> dict:
        """The reference sets as this row trains on them: with the shipped hand-written
        captions, or with none (as an upload without captions reaches the service)."""
        refs = self.sidecar
        if s.concept_words == "none":
            refs = {k: replace(c, with_word=False) for k, c in refs.items()}
        if s.captions == "sidecar":
            return refs
        return {k: replace(c, captions=[None] * len(c.images)) for k, c in refs.items()}

    def _time(self, key: str, fn):
        t = time.perf_counter()
        out = fn()
        self.timings.setdefault(key, []).append(time.perf_counter() - t)
        return out

    def _cfg(self, s: Settings, steps: int, lr: float | None = None, **extra) -> TrainConfig:
        given = dict(
            steps=steps,
            learning_rate=lr or s.learning_rate,
            seed=s.seed,
            batch_size=s.batch_size,
            captions="template" if s.captions == "template" else "auto",
            timestep_bias_strategy=s.timestep_bias_strategy,
            timestep_bias_multiplier=s.timestep_bias_multiplier,
            timestep_bias_portion=s.timestep_bias_portion,
            timestep_bias_begin=s.timestep_bias_begin,
            timestep_bias_end=s.timestep_bias_end,
            train_token_embedding=s.train_token_embedding,
            token_learning_rate=s.token_learning_rate,
            prior_preservation=s.prior_preservation,
            prior_images=s.prior_images,
            prior_loss_weight=s.prior_loss_weight,
            random_flip=s.random_flip,
            augment=s.augment,
            augment_min_scale=s.augment_min_scale,
            recombine=s.recombine,
            recombine_kinds=s.recombine_kinds,
            loss_mask=s.loss_mask,
            loss_mask_background=s.loss_mask_background,
            snr_gamma=s.snr_gamma,
            lr_scheduler=s.lr_scheduler,
            lr_warmup_steps=s.lr_warmup_steps,
        )
        return TrainConfig(**(given | extra))

    def _trained(self, s: Settings, what: tuple[str, ...], timing: str, train: Callable[[], Adapter]) -> Adapter:
        """`train()` timed under `timing`, or the adapter a run with the same training settings
        left in `s.adapter_cache` (then untimed)."""
        if not s.adapter_cache:
            return self._time(timing, train)
        stage = "make" if what[0] == "fused" else "break"
        spec = training_spec(s, stage) | {"what": list(what), "base": self.base.model_hash}
        key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = Path(s.adapter_cache) / f"{'_'.join(what)}_{key}.safetensors"
        if path.is_file():
            return Adapter.load(path)
        adapter = self._time(timing, train)
        adapter.save(path)
        return adapter

    def breaks(self, s: Settings) -> dict:
        """Every content's and style's break-stage adapter under settings `s`."""
        refs, out = self.refs(s), {}
        for kind, names in (("content", self.contents), ("style", self.styles)):
            for n in names:
                aux = aux_bank(
                    kind, s.aux_sets, seed=s.seed, token_bound=s.token_bound_aux, generic_word=s.aux_generic_word
                )
                out[(kind, n)] = self._trained(
                    s,
                    (kind, n),
                    "b4m break (per concept)",
                    lambda: train_concept(
                        self.base,
                        refs[(kind, n)],
                        "b4m",
                        aux=aux,
                        plp=s.plp(kind),
                        cfg=self._cfg(s, s.break_steps, routing=s.routing, aux_lr_factor=s.aux_lr_factor),
                    ),
                )
        return out

    def adapters(self, m: Method, cache: dict, seed: int) -> tuple[dict, dict | None]:
        """Per pair, the fused adapter of method `m`; for B4M also the break-stage adapters."""
        s = replace(m.settings(self.s), seed=seed)
        refs = self.refs(s)
        if m.family == "b4m":
            single = self.breaks(s)
            pairs = {}
            for c in self.contents:
                for st in self.styles:
                    pairs[(c, st)] = self._trained(
                        s,
                        ("fused", c, st),
                        "b4m make (per pair)",
                        lambda: fuse(
                            self.base,
                            single[("content", c)],
                            single[("style", st)],
                            refs[("content", c)],
                            refs[("style", st)],
                            "b4m",
                            cfg=self._cfg(
                                s,
                                s.make_steps,
                                lr=s.make_learning_rate,
                                batch_size=s.make_batch_size,
                                make_routing=s.make_routing,
                                make_style_weight=s.make_style_weight,
                                make_pairs=s.make_pairs,
                                **({} if s.make_augment is None else {"augment": s.make_augment}),
                            ),
                        ),
                    )
            return pairs, single
        if m.family in ("merge", "ziplora"):
            key = ("lora", s.plp(), s.lora_steps, s.lora_learning_rate, s.batch_size, s.captions, seed)
            if key not in cache:
                cache[key] = {
                    (kind, n): self._time(
                        "lora (per concept)",
                        lambda: train_concept(
                            self.base,
                            refs[(kind, n)],
                            "lora",
                            plp=s.plp(),
                            cfg=self._cfg(s, s.lora_steps, lr=s.lora_learning_rate),
                        ),
                    )
                    for kind, names in (("content", self.contents), ("style", self.styles))
                    for n in names
                }
            single = cache[key]
        out = {}
        for c in self.contents:
            for st in self.styles:
                cref, sref = refs[("content", c)], refs[("style", st)]
                if m.family == "joint":
                    out[(c, st)] = self._time(
                        "joint (per pair)",
                        lambda: fuse(
                            self.base,
                            None,
                            None,
                            cref,
                            sref,
                            "joint",
                            cfg=self._cfg(s, s.joint_steps, lr=s.joint_learning_rate, batch_size=s.joint_batch_size),
                            plp=s.plp(),
                        ),
                    )
                elif m.family == "merge":
                    out[(c, st)] = self._time(
                        "merge (per pair)",
                        lambda: fuse(self.base, single[("content", c)], single[("style", st)], cref, sref, "merge"),
                    )
                else:
                    out[(c, st)] = self._time(
                        "ziplora (per pair)",
                        lambda: fuse(
                            self.base,
                            single[("content", c)],
                            single[("style", st)],
                            cref,
                            sref,
                            "ziplora",
                            cfg=self._cfg(s, s.ziplora_steps, lr=1e-2),
                        ),
                    )
        return out, None

    def _draw(
        self, adapter, prompts: list[str], seed: int, halves: tuple = (1.0, 1.0), window: tuple = (1.0, 0.0)
    ) -> list[Image.Image]:
        self.gen.set_adapter(adapter, fuse=True, content_scale=halves[0], style_scale=halves[1])
        images = []
        for i, prompt in enumerate(prompts):
            req = GenerationRequest(
                prompt,
                seed=seed + i,
                steps=self.s.sample_steps,
                guidance=self.s.guidance,
                scheduler=self.s.sampler,
                content_end=window[0],
                style_start=window[1],
            )
            images += self._time("generate (per image)", lambda: self.gen.generate(req))
        self.gen.set_adapter(None)
        return images

    def draw(self, adapter, seed: int | None = None) -> tuple[list[Image.Image], list[tuple]]:
        attrs = EVAL_ATTRIBUTES[: self.s.images_per_pair]
        seed = self.s.seed if seed is None else seed
        b4m = adapter.method == "b4m"
        halves = (self.s.content_scale, self.s.style_scale) if b4m else (1.0, 1.0)
        window = (self.s.content_end, self.s.style_start) if b4m else (1.0, 0.0)
        return self._draw(adapter, [eval_prompt(*a, self.s.prompt_form) for a in attrs], seed, halves, window), attrs

    def score(self, images, attrs, content: str, style: str) -> dict:
        reads = predict(self.probe, images)
        n = len(images)
        probe = {
            "content": sum(r["content"] == content for r in reads) / n,
            "style": sum(r["style"] == style for r in reads) / n,
            "prompt": sum(
                (r["size"] == a[0]) + (r["position"] == a[1]) + (r["background"] == a[2]) for r, a in zip(reads, attrs)
            )
            / (3 * n),
        }
        probe["average"] = (probe["content"] + probe["style"] + probe["prompt"]) / 3
        paper = self.metrics.score(
            images, self.sidecar[("content", content)].images, self.sidecar[("style", style)].images
        )
        # what the probe read, not only whether it was right: a label read for far more than its
        # share of the images (an attractor, e.g. blurry colour read as "rainbow") inflates that
        # concept's score for every method (read_summary)
        labels = {k: [r[k] for r in reads] for k in ("content", "style")}
        return {"probe": probe, "paper": paper, "reads": labels}

    def score_single(
        self, kind: str, name: str, adapter, seed: int, keep: list | None = None, asked: list | None = None
    ) -> float:
        """How often a break-stage adapter alone draws its own concept (probe), on prompts
        that name only it (and, for a style, a known shape). `keep` receives the images;
        `asked` one bool per image: did the prompt's known other half come through (the
        known style a content is asked in, the known shape a style is asked on)?"""
        attrs = [EVAL_ATTRIBUTES[i % len(EVAL_ATTRIBUTES)] for i in range(self.s.single_images)]
        prompts = [single_prompt(kind, *a, i) for i, a in enumerate(attrs)]
        images = self._draw(adapter, prompts, seed)
        if keep is not None:
            keep += images
        reads = predict(self.probe, images)
        if asked is not None:
            other, known = ("style", PRETRAIN_STYLES) if kind == "content" else ("content", PRETRAIN_CONTENTS)
            asked += [r[other] == known[i % len(known)] for i, r in enumerate(reads)]
        return sum(r[kind] == name for r in reads) / len(reads)

    def run(self, method_list: list[Method], on_method: Callable[[dict], None] | None = None) -> dict:
        seeds = [self.s.seed + i for i in range(self.s.seeds)]
        results = {
            "methods": {},
            "pairs": [[c, s] for c in self.contents for s in self.styles],
            "seeds": seeds,
            "probe_test_accuracy": self.probe_acc,
        }
        grid_cells: dict[str, dict] = {}
        seen: dict[tuple, str] = {}
        cache: dict = {}
        for m in method_list:
            key = m.key(self.s)
            if key in seen:  # the same adapters as an earlier row (e.g. the rho sweep's default)
                results["methods"][m.name] = dict(results["methods"][seen[key]], same_as=seen[key])
                grid_cells[m.name] = grid_cells[seen[key]]
                continue
            seen[key] = m.name
            t = time.perf_counter()
            per_pair: dict[str, dict] = {}
            singles: dict[str, dict] = {"content": {}, "style": {}}
            for seed in seeds:
                fused, single = self.adapters(m, cache, seed)
                for (c, st), adapter in fused.items():
                    images, attrs = self.draw(adapter, seed)
                    per_pair[f"{c}|{st}|{seed}"] = self.score(images, attrs, c, st)
                    blocks = {k: adapter.extra[k] for k in ("blocks_composed", "blocks") if k in adapter.extra}
                    if blocks:  # B4M: how large each block of the update is, composed and after make
                        per_pair[f"{c}|{st}|{seed}"]["blocks"] = blocks
                    if seed == seeds[0]:
                        grid_cells.setdefault(m.name, {})[(c, st)] = images
                if single is not None and self.s.single_images:
                    for (kind, name), adapter in single.items():
                        singles[kind][f"{name}|{seed}"] = self.score_single(kind, name, adapter, seed)
            row = {"aggregate": _aggregate(per_pair, seeds), "pairs": per_pair, "seconds": time.perf_counter() - t}
            if any("blocks" in p for p in per_pair.values()):
                row["blocks"] = {
                    stage: {
                        b: float(np.mean([p["blocks"][stage][b] for p in per_pair.values()]))
                        for b in ("content", "style", "interaction")
                    }
                    for stage in next(p["blocks"] for p in per_pair.values() if "blocks" in p)
                }
            if reads := read_summary(per_pair):
                row["reads"] = reads
            if singles["content"]:
                row["single"] = {k: _mean_ci(v, seeds) | {"cells": v} for k, v in singles.items()}
            results["methods"][m.name] = row
            p = row["aggregate"]["probe"]
            self.log(
                f"{m.name}: "
                + ", ".join(f"{k} {p[k]:.3f} [{p[k + '_ci'][0]:.3f}, {p[k + '_ci'][1]:.3f}]" for k in SCORES)
                + (
                    f"; alone: content {row['single']['content']['mean']:.3f}, style {row['single']['style']['mean']:.3f}"
                    if "single" in row
                    else ""
                )
            )
            if on_method:  # partial results survive an interrupted run
                on_method(results)
        results["differences"] = _differences(results)
        results["timings_s"] = {k: {"mean": float(np.mean(v)), "n": len(v)} for k, v in self.timings.items()}
        return results, grid_cells


def _cells(values: dict[str, float], seeds: list[int]) -> np.ndarray:
    """{'unit|...|seed': value} as a (units x seeds) array."""
    units = sorted({k.rsplit("|", 1)[0] for k in values})
    return np.array([[values[f"{u}|{sd}"] for sd in seeds] for u in units])


def _mean_ci(values: dict[str, float], seeds: list[int]) -> dict:
    cells = _cells(values, seeds)
    lo, hi = bootstrap(cells)
    return {"mean": float(cells.mean()), "ci": [lo, hi]}


def _aggregate(per_pair: dict, seeds: list[int]) -> dict:
    agg = {}
    for grp in ("probe", "paper"):
        agg[grp] = {}
        for k in next(iter(per_pair.values()))[grp]:
            m = _mean_ci({name: p[grp][k] for name, p in per_pair.items()}, seeds)
            agg[grp][k], agg[grp][k + "_ci"] = m["mean"], m["ci"]
    return agg


def read_summary(per_pair: dict, top: int = 3) -> dict | None:
    """Per concept kind: the probe's accuracy on each asked concept, and the labels it read
    most with their share of all images (None for rows scored before reads were kept). A
    label read far above its share of the asked concepts is an attractor: its concept's
    accuracy there is partly the probe's default, not the method's drawing."""
    if not per_pair or not all("reads" in p for p in per_pair.values()):
        return None
    out = {}
    for i, kind in enumerate(("content", "style")):
        hits: dict[str, list[bool]] = {}
        counts: dict[str, int] = {}
        for key, p in per_pair.items():
            asked = key.split("|")[i]
            for label in p["reads"][kind]:
                hits.setdefault(asked, []).append(label == asked)
                counts[label] = counts.get(label, 0) + 1
        n = sum(counts.values())
        most = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        out[kind] = {
            "accuracy": {c: float(np.mean(h)) for c, h in hits.items()},
            "most_read": [[label, c / n] for label, c in most],
            # the accuracy of drawings read with these shares whatever was asked: the part of
            # the score the probe's reading habits give for free
            "chance_from_reads": sum(len(h) / n * counts.get(c, 0) / n for c, h in hits.items()),
        }
    return out


def _differences(results: dict) -> dict:
    """Each row against the first (the shipped B4M) on the probe scores, paired over the same
    pairs and seeds; `beyond_noise` when the 95% interval of the difference excludes 0."""
    rows = {n: r for n, r in results["methods"].items() if "same_as" not in r}
    if not rows:
        return {}
    first_name, first = next(iter(rows.items()))
    seeds = results["seeds"]
    out = {}
    for name, r in rows.items():
        if name == first_name:
            continue
        out[f"{name} - {first_name}"] = {
            k: paired_difference(
                _cells({n: p["probe"][k] for n, p in r["pairs"].items()}, seeds),
                _cells({n: p["probe"][k] for n, p in first["pairs"].items()}, seeds),
            )
            for k in SCORES
        }
    return out


def time_to_new_pair(t: dict) -> dict:
    """Seconds from two concepts' references to a pair adapter, per method."""
    g = lambda k: t.get(k, {}).get("mean", float("nan"))
    b4m = g("b4m make (per pair)")
    out = {
        "b4m_compose_and_finetune_s": b4m,
        "ziplora_merge_training_s": g("ziplora (per pair)"),
        "joint_lora_from_scratch_s": g("joint (per pair)"),
    }
    out["ziplora_over_b4m"] = out["ziplora_merge_training_s"] / b4m
    out["joint_over_b4m"] = out["joint_lora_from_scratch_s"] / b4m
    return out


def write_table(results: dict, path: Path) -> str:
    """Table 1's layout: probe means with their 95% intervals over pairs and seeds."""
    ci = lambda m, lohi: f"{m:.3f} [{lohi[0]:.2f}, {lohi[1]:.2f}]"
    lines = [
        f"Pairs: {len(results['pairs'])}; seeds: {results['seeds']}; cells: mean [95% bootstrap interval]. "
        "Alone: each break-stage adapter on its own prompts.",
        "",
        "| Method | Content (probe) | Style (probe) | Prompt (probe) | Average (probe) | "
        "Content alone | Style alone | Content (EffNet cos) | Style (Magenta cos) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        p, q = r["aggregate"]["probe"], r["aggregate"]["paper"]
        alone = [
            ci(r["single"][k]["mean"], r["single"][k]["ci"]) if "single" in r else "-" for k in ("content", "style")
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(ci(p[k], p[k + "_ci"]) for k in SCORES)
            + f" | {alone[0]} | {alone[1]} | {q['content_effnet']:.3f} | {q['style_magenta']:.3f} |"
        )
    diffs = results.get("differences") or {}
    if diffs:
        lines += ["", "Paired differences against the first row (average; * = the interval excludes 0):", ""]
        for name, d in diffs.items():
            a = d["average"]
            star = " *" if a["beyond_noise"] else ""
            lines.append(f"- {name}: {a['mean']:+.3f} [{a['lo']:+.3f}, {a['hi']:+.3f}]{star}")
    summaries = {n: read_summary(r["pairs"]) for n, r in results["methods"].items() if "same_as" not in r}
    if any(summaries.values()):
        lines += [
            "",
            "What the probe read in the fused images: accuracy per asked style, and the styles it read "
            "most (share of all images; a share far above 1 / the number of styles asked is an attractor "
            "that inflates its style's accuracy):",
            "",
        ]
        for name, summary in summaries.items():
            if summary:
                st = summary["style"]
                acc = ", ".join(f"{c} {a:.2f}" for c, a in st["accuracy"].items())
                most = ", ".join(f"{label} {share:.0%}" for label, share in st["most_read"])
                lines.append(
                    f"- {name}: {acc}; read most: {most}; "
                    f"the same reads whatever was asked would score {st['chance_from_reads']:.2f}"
                )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def save_rows(rows: list[list[Image.Image]], path: str | Path) -> None:
    """Rows of drawings (one row per concept or pair) as one grid image."""
    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            grid.paste(im, (x * w, y * h))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def write_grid(cells: dict, pairs: list, path: Path) -> None:
    """Rows: pairs; columns: methods; each cell the pair's first two images side by side."""
    names = list(cells)
    rows = []
    for c, s in pairs:
        row = []
        for n in names:
            ims = cells[n][(c, s)][:2]
            cell = np.concatenate([np.asarray(im.convert("RGB")) for im in ims], axis=1)
            row.append(np.pad(cell, ((2, 2), (2, 2), (0, 0)), constant_values=255))
        rows.append(np.concatenate(row, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def select_rows(rows: list[Method], only: list[str] | None) -> list[Method]:
    """The rows named in `only`: a name matches its row exactly (case aside), else every row
    whose name contains it ("rho" picks the rho sweep, "B4M" only the first row)."""
    if not only:
        return rows
    picked = set()
    for o in only:
        exact = [m.name for m in rows if m.name.lower() == o.lower()]
        picked |= set(exact or [m.name for m in rows if o.lower() in m.name.lower()])
    return [m for m in rows if m.name in picked]


def run_quality(
    out_dir: str | Path,
    quick: bool = False,
    base: str = "micro",
    log=print,
    settings: Settings | None = None,
    contents=None,
    styles=None,
    only: list[str] | None = None,
    split: str = "test",
    device: str | None = None,
) -> dict:
    """The table on one split's concepts: `test` (only reported) or `dev` (where settings
    are chosen)."""
    settings = settings or (QUICK if quick else Settings())
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rows = select_rows(methods(settings.rank), only)
    if not rows:
        raise ConfigError(f"no method matches {only}: {[m.name for m in methods(settings.rank)]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split_contents, split_styles = SPLITS[split]
    contents = list(contents or (split_contents[:2] if quick else split_contents))
    styles = list(styles or (split_styles[:2] if quick else split_styles))
    t0 = time.perf_counter()
    model = load_base(base, device=device)
    if model.arch != "micro":  # the world's probe, captioner and bank read only micro's scenes
        raise ConfigError(f"the quality bench needs a micro-shaped model folder, {base!r} is {model.arch}")
    bench = QualityBench(model, contents, styles, settings, log=log)
    partial = lambda r: (out / "results.partial.json").write_text(json.dumps(r, indent=2))
    results, cells = bench.run(rows, on_method=partial)
    results["settings"] = asdict(bench.s) | {"quick": quick, "split": split, "base": base}
    results["time_to_new_pair"] = time_to_new_pair(results["timings_s"])
    results["total_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.partial.json").unlink(missing_ok=True)
    table = write_table(results, out / "table.md")
    write_grid(cells, [tuple(p) for p in results["pairs"]], out / "grid.png")
    (out / "grid_columns.txt").write_text("\n".join(cells) + "\n")
    log(table)
    log(json.dumps(results["time_to_new_pair"]))
    return results
