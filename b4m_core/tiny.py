"""Tiny randomly initialised SD 1.x-style and SDXL-style pipelines, built in code.

For tests and benchmarks: they exercise the real diffusers loading, training and
generation paths in seconds on a CPU. They draw noise; they prove plumbing, not taste.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: every byte maps to a printable character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_tokenizer(folder: Path, max_length: int = 32) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges): real class, no download."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _text_config(hidden: int, proj: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        projection_dim=proj or hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_act="gelu",
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=32,
    )


def build_tiny_sd(
    folder: str | Path,
    seed: int = 0,
    channels: tuple[int, int] = (32, 64),
    cross_attention_dim: int = 48,
    sample_size: int = 16,
    layers_per_block: int = 1,
    sd2_style: bool = False,
) -> Path:
    """Save a tiny SD 1.x-style pipeline (32x32 images, 16x16 latents by default) to `folder`.

    The size arguments make a somewhat larger model for benchmarks; `sd2_style` uses
    SD 2.x's linear projections and v-prediction.
    """
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=layers_per_block,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        use_linear_projection=sd2_style,
    )
    text_encoder = CLIPTextModel(_text_config(cross_attention_dim))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp))
        pipe = StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDPMScheduler(
                num_train_timesteps=1000,
                beta_schedule="scaled_linear",
                beta_start=0.00085,
                beta_end=0.012,
                steps_offset=1,
                clip_sample=False,
                prediction_type="v_prediction" if sd2_style else "epsilon",
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
    return folder


TINY_SDXL_DEFAULTS = {"rank": 4, "break_steps": 20, "make_steps": 5, "learning_rate": 1e-3, "aux_sets": 0}


def build_tiny_sdxl(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny SDXL-style pipeline: two text encoders, text_time added conditioning."""
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok1 = make_tokenizer(Path(tmp) / "t1")
        tok2 = make_tokenizer(Path(tmp) / "t2")
        pipe = StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=CLIPTextModel(_text_config(32)),
            tokenizer=tok1,
            text_encoder_2=CLIPTextModelWithProjection(_text_config(32, proj=32)),
            tokenizer_2=tok2,
            unet=unet,
            scheduler=EulerDiscreteScheduler(
                num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
            ),
            force_zeros_for_empty_prompt=True,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
    # SDXL's architecture defaults (rank 64, 500 steps, ...) sized down for a 32-wide test model;
    # the precision and checkpointing ones stay SDXL's, so tests run the service's SDXL path
    (folder / "b4m_defaults.json").write_text(json.dumps(TINY_SDXL_DEFAULTS, indent=2))
    return folder
