"""Speed and memory of b4m at real model sizes, with random weights (no download).

Builds an SDXL-shaped (or SD 1.5-shaped) pipeline from the architectures' configs with
random weights on the device (speed and memory do not depend on the values), then times,
through `b4m_core` as the service calls it:

- break stage: plain LoRA (`method=lora`), PLP k = 0, PLP MCP k = 3, each with and without
  gradient checkpointing;
- make stage (50 steps by default), with and without checkpointing;
- generation: bare, fused, unfused, and switching a fused adapter.

Each training row runs twice (`--steps-short`, `--steps`) so the slope is the per-step cost
and the intercept the setup (bases, latents, text). Prints the ratios the targets are on
(PLP / LoRA step, k = 3 / k = 0 step, setup) and peak memory per row, writes JSON.

    python bench/sdxl_scale.py --arch sdxl --json docs/bench/sdxl_scale_h100.json   # a GPU
    python bench/sdxl_scale.py --arch toy-sdxl --steps 3 --steps-short 1            # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from b4m_core.config import PLPConfig, TrainConfig
from b4m_core.data import Concept
from b4m_core.generation import GenerationRequest, Generator
from b4m_core.models import ARCH_DEFAULTS, BaseModel
from b4m_core.tiny import make_tokenizer
from b4m_core.training import fuse, train_concept

# The published configs' shapes (stabilityai/stable-diffusion-xl-base-1.0, runwayml SD 1.5),
# and toy versions of each for a CPU smoke run.
SDXL_UNET = dict(
    sample_size=128,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD15_UNET = dict(
    sample_size=64,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8,
    cross_attention_dim=768,
)
TOY_SDXL_UNET = SDXL_UNET | dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=64,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=16,
)
TOY_SD15_UNET = SD15_UNET | dict(
    sample_size=16,
    block_out_channels=(32, 32, 64, 64),
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=16,
)
# CLIP ViT-L/14 and OpenCLIP bigG/14 text towers: (hidden, layers, heads, projection)
TEXT = {"L": (768, 12, 12, 768), "G": (1280, 32, 20, 1280), "toy-L": (32, 2, 2, 32), "toy-G": (32, 2, 2, 32)}
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024)
TOY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=128, norm_num_groups=8)


def text_encoder(kind: str, with_projection: bool):
    hidden, layers, heads, proj = TEXT[kind]
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=proj,
        bos_token_id=512,  # the character-level tokenizer's (tiny.make_tokenizer)
        eos_token_id=513,
        pad_token_id=513,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def vae(toy: bool, sdxl: bool) -> AutoencoderKL:
    shape = TOY_VAE if toy else VAE
    n = len(shape["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        scaling_factor=0.13025 if sdxl else 0.18215,
        **shape,
    )


def build(arch: str, device: torch.device, dtype: torch.dtype) -> BaseModel:
    """The pipeline from configs, random weights, as a loaded BaseModel."""
    toy, sdxl = arch.startswith("toy-"), arch.endswith("sdxl")
    torch.manual_seed(0)
    unet_cfg = {"sdxl": SDXL_UNET, "toy-sdxl": TOY_SDXL_UNET, "sd15": SD15_UNET, "toy-sd15": TOY_SD15_UNET}[arch]
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **unet_cfg)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    prefix = "toy-" if toy else ""
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(Path(tmp) / "t1", max_length=77)
        if sdxl:
            tok2 = make_tokenizer(Path(tmp) / "t2", max_length=77)
            pipe = StableDiffusionXLPipeline(
                vae=vae(toy, True),
                text_encoder=text_encoder(prefix + "L", False),
                text_encoder_2=text_encoder(prefix + "G", True),
                tokenizer=tok,
                tokenizer_2=tok2,
                unet=unet,
                scheduler=scheduler,
            )
        else:
            pipe = StableDiffusionPipeline(
                vae=vae(toy, False),
                text_encoder=text_encoder(prefix + "L", False),
                tokenizer=tok,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    return BaseModel(
        pipe=pipe,
        model_id=f"random-{arch}",
        model_hash=f"random-{arch}",
        is_sdxl=sdxl,
        device=device,
        dtype=dtype,
        recommended=dict(ARCH_DEFAULTS["sdxl" if sdxl else "sd1"]),
        arch="sdxl" if sdxl else "sd1",
    )


def images(seed: int, n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, fn):
    """(result, seconds, peak GiB on CUDA else None)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return out, time.perf_counter() - t, peak


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["sdxl", "sd15", "toy-sdxl", "toy-sd15"], default="sdxl")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="weights (default: bf16 on CUDA)")
    ap.add_argument("--mixed-precision", default="auto", help="training autocast (auto: bf16 where supported)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=30, help="the longer run of each training row")
    ap.add_argument("--steps-short", type=int, default=5, help="the shorter run (slope = per-step cost)")
    ap.add_argument("--make-steps", type=int, default=50)
    ap.add_argument("--sample-steps", type=int, default=30)
    ap.add_argument("--only", nargs="*", default=None, help="training rows to run (default: all)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    base = build(args.arch, device, dtype)
    res = base.resolution
    content = Concept("content", images(0, 4, res), "dog")
    style = Concept("style", images(1, 2, res), "ink")
    aux_styles = [Concept("style", images(10 + i, 2, res), f"s{i}", token=f"xs{i}") for i in range(3)]
    aux_contents = [Concept("content", images(20 + i, 2, res), f"c{i}", token=f"xc{i}") for i in range(3)]
    plp = PLPConfig(rank=args.rank, alpha=float(args.rank), rho=args.rho)
    out: dict = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "weights_dtype": str(dtype).replace("torch.", ""),
        "mixed_precision": args.mixed_precision,
        "resolution": res,
        "rank": args.rank,
        "rho": args.rho,
        "unet_params_M": sum(p.numel() for p in base.unet.parameters()) / 1e6,
        "rows": {},
    }

    def cfg(steps: int, ckpt: bool) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            learning_rate=1e-4,
            batch_size=1,
            mixed_precision=args.mixed_precision,
            gradient_checkpointing=ckpt,
            seed=1,
        )

    breaks = {}
    rows = {
        "lora": lambda s, ck: train_concept(base, content, method="lora", plp=plp, cfg=cfg(s, ck)),
        "plp_k0": lambda s, ck: train_concept(base, content, aux=[], plp=plp, cfg=cfg(s, ck)),
        "plp_k3": lambda s, ck: train_concept(base, content, aux=aux_styles, plp=plp, cfg=cfg(s, ck)),
    }
    train_concept(base, content, aux=[], plp=plp, cfg=cfg(1, False))  # warm-up (kernels, allocator)
    for name, run in rows.items():
        for ckpt in (False, True):
            key = f"{name}{'_ckpt' if ckpt else ''}"
            if args.only and key not in args.only:
                continue
            (_, t_short, m_short) = timed(device, lambda: run(args.steps_short, ckpt))
            (adapter, t_long, m_long) = timed(device, lambda: run(args.steps, ckpt))
            per_step = (t_long - t_short) / (args.steps - args.steps_short)
            out["rows"][key] = {
                "s_per_step": per_step,
                "setup_s": max(t_short - args.steps_short * per_step, 0.0),
                f"total_s_{args.steps}_steps": t_long,
                "peak_GiB": max(m_short or 0, m_long or 0) or None,
            }
            print(key, json.dumps(out["rows"][key]), flush=True)
            if key == "plp_k3":
                breaks["content"] = adapter
    if "content" not in breaks:
        breaks["content"] = train_concept(base, content, aux=[], plp=plp, cfg=cfg(2, False))
    breaks["style"] = train_concept(base, style, aux=aux_contents[:1], plp=plp, cfg=cfg(2, False))
    fused = None
    for ckpt in (False, True):
        key = f"make{'_ckpt' if ckpt else ''}"
        if args.only and key not in args.only:
            continue
        fused, t, m = timed(
            device,
            lambda: fuse(base, breaks["content"], breaks["style"], content, style, cfg=cfg(args.make_steps, ckpt)),
        )
        out["rows"][key] = {
            f"total_s_{args.make_steps}_steps": t,
            "s_per_step": t / max(args.make_steps, 1),
            "peak_GiB": m,
        }
        print(key, json.dumps(out["rows"][key]), flush=True)
    if fused is None:
        fused = fuse(base, breaks["content"], breaks["style"], content, style, cfg=cfg(1, False))

    gen = Generator(base)
    req = GenerationRequest("a {content} in {style} style", steps=args.sample_steps, seed=0)
    draws = {}
    for label, setting in (("bare", None), ("fused", True), ("unfused", False)):
        gen.set_adapter(None if setting is None else fused, fuse=bool(setting))
        gen.generate(GenerationRequest("a {content} in {style} style" if setting is not None else "a dog", steps=2))
        prompt_req = req if setting is not None else GenerationRequest("a dog", steps=args.sample_steps, seed=0)
        _, t, m = timed(device, lambda: gen.generate(prompt_req))
        draws[label] = {"s": t, "peak_GiB": m}
    _, t_switch, _ = timed(device, lambda: gen.set_adapter(fused, fuse=True))
    draws["switch_fused_s"] = t_switch
    out["generation"] = draws
    out["adapter_file_MB"] = {d: len(fused.to_bytes(d)) / 1e6 for d in ("fp32", "fp16")}

    r = out["rows"]

    def ratio(a: str, b: str) -> float | None:
        return r[a]["s_per_step"] / r[b]["s_per_step"] if a in r and b in r and r[b]["s_per_step"] > 0 else None

    out["ratios"] = {
        "plp_k0_over_lora_step": ratio("plp_k0", "lora"),
        "plp_k3_over_k0_step": ratio("plp_k3", "plp_k0"),
        "plp_k3_ckpt_over_k3_step": ratio("plp_k3_ckpt", "plp_k3"),
        "make_ckpt_over_make_step": ratio("make_ckpt", "make"),
        "setup_s_plp_k3": r.get("plp_k3", {}).get("setup_s"),
    }
    print(json.dumps(out["ratios"], indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
