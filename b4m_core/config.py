"""Settings of a PLP adapter and of the training stages.

Everything an adapter needs to be rebuilt bit-for-bit lives in `PLPConfig`; it is
written into every adapter file so two adapters can be checked for composability.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

BasisMode = Literal["exact", "paper", "random", "principal"]
BasisScale = Literal["legacy", "balanced"]
ContentHalf = Literal["up", "down"]
TargetSet = Literal["attn", "cross", "kv", "transformer", "attn+conv", "attn+fineconv"]
Routing = Literal["strict", "released"]
Kind = Literal["content", "style", "fused"]

BASIS_MODES = ("exact", "paper", "random", "principal")
BASIS_SCALES = ("legacy", "balanced")
CONTENT_HALVES = ("up", "down")
TARGET_SETS = ("attn", "cross", "kv", "transformer", "attn+conv", "attn+fineconv")
# the target sets each one contains (its layers are a superset of theirs): a content and a
# style adapter on nested sets compose, the half missing on a layer being zero there
TARGET_SUBSETS: dict[str, frozenset[str]] = {
    "kv": frozenset({"kv"}),
    "cross": frozenset({"cross", "kv"}),
    "attn": frozenset({"attn", "cross", "kv"}),
    "transformer": frozenset({"transformer", "attn", "cross", "kv"}),
    "attn+conv": frozenset({"attn+conv", "attn+fineconv", "attn", "cross", "kv"}),
    "attn+fineconv": frozenset({"attn+fineconv", "attn", "cross", "kv"}),
}
ROUTINGS = ("strict", "released")
MAKE_ROUTINGS = ("joint", "split")

# Samplers by the names A1111 and ComfyUI users know, each a diffusers scheduler built from
# the base model's own scheduler config (so its timestep spacing and prediction type hold).
# "default" is the model's own. The API's contract lists the same names (tested).
SCHEDULERS: dict[str, tuple[str, dict] | None] = {
    "default": None,
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS, as Stable Diffusion ships it
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
    "dpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}
# Defaults by architecture, under what a model's own `b4m_defaults.json` says. SDXL: the
# paper's settings (rank 64, rate 1e-4, batch 1), rho 0.5 and MCP k = 3, bf16 autocast and
# gradient checkpointing (a k = 3 break step at 1024 px: 35 GiB without, 10 GiB with, on
# an H100; docs/bench). SD 1/2: mixed precision only. Off CUDA both train in fp32.
ARCH_DEFAULTS: dict[str, dict] = {
    "sdxl": {
        "rank": 64,
        "rho": 0.5,
        "learning_rate": 1e-4,
        "break_steps": 500,
        "make_steps": 50,
        "batch_size": 1,
        "aux_sets": 3,
        "mixed_precision": "auto",
        "gradient_checkpointing": True,
    },
    "sd1": {"mixed_precision": "auto"},
    "sd2": {"mixed_precision": "auto"},
}

TIMESTEP_BIASES = ("none", "earlier", "later", "range")  # diffusers' training scripts' names
# diffusers.optimization's schedules that need nothing but warmup and the step count
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class ConfigError(ValueError):
    """A setting is out of range or two adapters cannot be combined."""


@dataclass(frozen=True)
class PLPConfig:
    """Shape of a partly learnable projection (DESIGN.md section 1)."""

    rank: int = 16
    alpha: float = 16.0
    rho: float = 0.5
    basis_mode: BasisMode = "exact"
    basis_seed: int = 0
    content_half: ContentHalf = "up"
    targets: TargetSet = "attn"
    # `exact` bases: "legacy" draws A and C at different scales (A's columns 3-6x C's rows,
    # so the half trained through A learns 3-6x faster); "balanced" gives both the same
    # Frobenius norm, so an optimizer step on either half moves the layer alike (DESIGN.md 1).
    # Adapter files without the field are legacy ones.
    basis_scale: BasisScale = "legacy"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")
        if self.basis_mode in ("exact", "principal") and self.rank < 2:
            raise ConfigError(f"basis_mode {self.basis_mode!r} needs rank >= 2 (two orthogonal halves)")
        if not 0.0 <= self.rho < 1.0:
            raise ConfigError(f"rho must be in [0, 1), got {self.rho}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}")
        if self.basis_mode not in BASIS_MODES:
            raise ConfigError(f"basis_mode must be one of {BASIS_MODES}, got {self.basis_mode!r}")
        if self.content_half not in CONTENT_HALVES:
            raise ConfigError(f"content_half must be one of {CONTENT_HALVES}, got {self.content_half!r}")
        if self.targets not in TARGET_SETS:
            raise ConfigError(f"targets must be one of {TARGET_SETS}, got {self.targets!r}")
        if self.basis_scale not in BASIS_SCALES:
            raise ConfigError(f"basis_scale must be one of {BASIS_SCALES}, got {self.basis_scale!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def half_for(self, kind: str) -> str:
        """Which trainable half ('up' = B, 'down' = D) holds a concept of this kind."""
        if kind == "content":
            return self.content_half
        if kind == "style":
            return "down" if self.content_half == "up" else "up"
        raise ConfigError(f"kind must be 'content' or 'style', got {kind!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PLPConfig:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: d[k] for k in names if k in d})


# what two PLP adapters must share to compose (their frozen bases follow from these)
COMPOSE_FIELDS = (
    ("basis_seed", "basis seed"),
    ("basis_mode", "basis mode"),
    ("basis_scale", "basis scale"),
    ("rank", "rank"),
    ("rho", "rho"),
    ("content_half", "content_half"),
    ("alpha", "alpha"),
)


def covering_targets(a: str, b: str) -> str | None:
    """The larger of two nested target sets (None: neither contains the other)."""
    if b in TARGET_SUBSETS[a]:
        return a
    if a in TARGET_SUBSETS[b]:
        return b
    return None


def plp_mismatch(content: PLPConfig | dict, style: PLPConfig | dict) -> str | None:
    """Why a content and a style adapter of these PLP shapes cannot compose (None: they can,
    as far as the settings go; the bases themselves are compared bit for bit at fusion).
    Takes settings or their dicts (adapter metadata), so a caller without torch can check."""
    c = content if isinstance(content, PLPConfig) else PLPConfig.from_dict(content)
    s = style if isinstance(style, PLPConfig) else PLPConfig.from_dict(style)
    for attr, label in COMPOSE_FIELDS:
        if getattr(c, attr) != getattr(s, attr):
            return f"adapters differ in {label}: {getattr(c, attr)!r} vs {getattr(s, attr)!r}"
    # nested target sets compose (e.g. a content on attention + convolutions, a style on
    # attention): the fused adapter covers the larger set
    if covering_targets(c.targets, s.targets) is None:
        return f"adapters cover target sets neither of which contains the other: {c.targets!r} vs {s.targets!r}"
    return None


@dataclass
class TrainConfig:
    """One training run (break stage, make stage or a baseline)."""

    steps: int = 300
    learning_rate: float = 1e-3
    # The auxiliary half trains 10x slower, as in the released code. Measured on the micro
    # model (hexagon, k=3, 400 steps at 5e-3): factor 1.0 learnt nothing (probe 0/6), 0.1 4/6.
    aux_lr_factor: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 1  # primary samples a step; MCP adds one row per auxiliary set
    resolution: int | None = None  # None: the model's own sample size
    seed: int = 0
    # autocast on CUDA; "auto": bf16 where the GPU has it, else fp16 with loss scaling. The CPU
    # path always trains in fp32, whatever is asked.
    mixed_precision: Literal["no", "auto", "fp16", "bf16"] = "no"
    # MCP: "strict" routes the concept's loss to its own half and the auxiliary losses to the
    # other half only; "released" is what the authors' code does in effect: one joint loss
    # on both halves, the other half at `aux_lr_factor` times the rate (DESIGN.md 1).
    routing: Routing = "strict"
    # The make stage: "joint" (the paper) fine-tunes both halves on both reference sets;
    # "split" sends the content references' loss to the content half only and the style
    # references' to the style half only (the break stage's separation, kept while fusing).
    make_routing: Literal["joint", "split"] = "joint"
    make_style_weight: float = 1.0  # the make stage's style-reference loss, relative to the content's
    # images without a caption: "auto" has the base model's captioner describe them (where it
    # has one), "template" trains them on the model's prompt template alone
    captions: Literal["auto", "template"] = "auto"
    gradient_checkpointing: bool = False
    # Which noise levels a step trains on, as diffusers' training scripts name it: "none"
    # (uniform), "later" (the noisiest `portion` of timesteps, where layout and shape are
    # decided, weighted `multiplier` times), "earlier" (the least noisy: texture and detail),
    # "range" (only timesteps begin..end).
    timestep_bias_strategy: Literal["none", "earlier", "later", "range"] = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    # Min-SNR loss weighting (Hang et al. 2023; diffusers' `--snr_gamma`, kohya's
    # `min_snr_gamma`): each row's loss scaled by min(SNR, gamma) / SNR (epsilon targets) or
    # / (SNR + 1) (v targets), so the nearly clean timesteps stop dominating; None: off
    snr_gamma: float | None = None
    # Pivotal tuning: the concept's identifier token gets its own input embedding, learnt
    # with the adapter (b4m_core/tokens.py) at `token_learning_rate` (None: learning_rate).
    train_token_embedding: bool = False
    token_learning_rate: float | None = None
    # DreamBooth's prior preservation: the break stage also trains, through the concept's
    # half and at `prior_loss_weight`, on `prior_images` drawn by the base model itself for
    # the concept's captions with a word it knows in place of the new concept (the model's
    # `prior_words`, else the concept's class word), so the adapter keeps what the base does
    # for everything but the identifier (backgrounds, positions, other things).
    prior_preservation: bool = False
    prior_images: int = 8
    prior_loss_weight: float = 1.0
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    # The learning rate over the run, as diffusers' training scripts name it (`--lr_scheduler`,
    # `--lr_warmup_steps`; diffusers.optimization.get_scheduler): constant, constant_with_warmup,
    # linear, cosine, cosine_with_restarts or polynomial (to 0 at `steps`)
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    center_crop: bool = True
    # each draw mirrors a reference left-right with probability 1/2 (both versions are
    # encoded once at setup, so the latents are the VAE's own, not flipped latents)
    random_flip: bool = False
    # `augment` zoomed-out, moved copies of every reference (data.augmented), shrunk to
    # between `augment_min_scale` and 1 of the frame, captioned like any uncaptioned image
    augment: int = 0
    augment_min_scale: float = 0.5
    # `recombine` copies of every reference with the other factor swapped for a known one from
    # the model's bank (data.recombined): a content refilled with known surfaces, a style cut
    # to known shapes
    recombine: int = 0
    recombine_kinds: str = "content+style"  # which reference sets get them: content | style | content+style
    # the make stage also trains on `make_pairs` pictures per content reference of the content
    # in the style, made from the references (data.synthesized_pairs), captioned with both
    make_pairs: int = 0
    # The diffusion loss weighted to where the subject is (kohya's `masked_loss`, with the
    # subject found as the pixels away from the plain border colour, data.foreground_mask):
    # which reference sets get it (none | content | style | content+style, by the set's kind,
    # in every stage) and the weight left on the background (0: none of the loss)
    loss_mask: str = "none"
    loss_mask_background: float = 0.1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        if self.learning_rate <= 0:
            raise ConfigError("learning_rate must be > 0")
        if self.aux_lr_factor < 0:
            raise ConfigError("aux_lr_factor must be >= 0")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.augment < 0 or not 0 < self.augment_min_scale <= 1:
            raise ConfigError("augment must be >= 0 and augment_min_scale in (0, 1]")
        if self.make_pairs < 0:
            raise ConfigError(f"make_pairs must be >= 0, got {self.make_pairs}")
        if self.recombine < 0:
            raise ConfigError(f"recombine must be >= 0, got {self.recombine}")
        if self.recombine_kinds not in ("content", "style", "content+style"):
            raise ConfigError(f"recombine_kinds must be content, style or content+style, got {self.recombine_kinds!r}")
        if self.loss_mask not in ("none", "content", "style", "content+style"):
            raise ConfigError(f"loss_mask must be none, content, style or content+style, got {self.loss_mask!r}")
        if not 0 <= self.loss_mask_background <= 1:
            raise ConfigError(f"loss_mask_background must be in [0, 1], got {self.loss_mask_background}")
        if self.prior_images < 1 or self.prior_loss_weight < 0:
            raise ConfigError("prior_images must be >= 1 and prior_loss_weight >= 0")
        if self.make_style_weight <= 0:
            raise ConfigError(f"make_style_weight must be > 0, got {self.make_style_weight}")
        if self.make_routing not in MAKE_ROUTINGS:
            raise ConfigError(f"make_routing must be one of {MAKE_ROUTINGS}, got {self.make_routing!r}")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.captions not in ("auto", "template"):
            raise ConfigError(f"captions must be auto or template, got {self.captions!r}")
        if self.mixed_precision not in ("no", "auto", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be no, auto, fp16 or bf16, got {self.mixed_precision!r}")
        if self.timestep_bias_strategy not in TIMESTEP_BIASES:
            raise ConfigError(
                f"timestep_bias_strategy must be one of {TIMESTEP_BIASES}, got {self.timestep_bias_strategy!r}"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ConfigError(f"snr_gamma must be > 0 (or None: off), got {self.snr_gamma}")
        if self.token_learning_rate is not None and self.token_learning_rate <= 0:
            raise ConfigError("token_learning_rate must be > 0")
        if self.timestep_bias_multiplier <= 0:
            raise ConfigError("timestep_bias_multiplier must be > 0")
        if not 0 < self.timestep_bias_portion <= 1:
            raise ConfigError("timestep_bias_portion must be in (0, 1]")
        if not 0 <= self.timestep_bias_begin < self.timestep_bias_end:
            raise ConfigError("timestep_bias_begin must be >= 0 and below timestep_bias_end")
