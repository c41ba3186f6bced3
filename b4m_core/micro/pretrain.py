"""Pre-train the micro model (VAE, then UNet) and its probes, reproducibly.

    python -m b4m_core.micro.pretrain --out b4m_core/micro/model --device cuda \
        --images 100000 --vae-seconds 60 --unet-seconds 240 --probe-steps 3000

Data: renders of the pre-training contents and styles only (held-out concepts never
appear), captions naming a random subset of the attributes, 10% empty captions for
classifier-free guidance. Every random draw comes from `--seed`. Time budgets stop a
stage gracefully (the learning-rate schedule is fitted to the measured speed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

from .model import SCHEDULER_CONFIG, load_text_encoder, new_unet, new_vae, save_micro
from .probes import HEADS, labels_of, predict_tensor, to_tensor, train_probe
from .world import (
    BACKGROUNDS,
    CONTENTS,
    POSITIONS,
    PRETRAIN_CONTENTS,
    PRETRAIN_STYLES,
    SIZES,
    SPLITS,
    Scene,
    generic_image,
    rich_sample,
    training_sample,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _render(i: int):
    im, cap, _ = training_sample(i)
    return np.asarray(im, dtype=np.uint8), cap


def _render_rich(i: int):
    im, cap = rich_sample(i)
    return np.asarray(im, dtype=np.uint8), cap


def render_dataset(n: int, seed: int, workers: int, rich_fraction: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """`n` pre-training examples: the world's named concepts, and `rich_fraction` of them from
    the rich world (shape and surface families named by their attributes)."""
    ids = [seed * 10_000_000 + i for i in range(n)]
    n_rich = round(n * rich_fraction)
    with Pool(workers) as pool:
        named = pool.map(_render, ids[: n - n_rich], chunksize=256)
        out = named + pool.map(_render_rich, ids[n - n_rich :], chunksize=256)
    return np.stack([o[0] for o in out]), [o[1] for o in out]


def _render_generic(i: int):
    return np.asarray(generic_image(i), dtype=np.uint8)


def render_generic(n: int, seed: int, workers: int) -> np.ndarray:
    with Pool(workers) as pool:
        return np.stack(pool.map(_render_generic, [seed * 10_000_000 + i for i in range(n)], chunksize=256))


def _lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class StepBudget:
    """Fits a stage's step count to a time budget, measuring speed after a warm-up
    (the first steps on a GPU are slow and would make the estimate far too low)."""

    def __init__(self, seconds: float, name: str, warmup: int = 20, probe: int = 50, clock=time.time):
        self.seconds, self.name, self.warmup, self.probe, self.clock = seconds, name, warmup, probe, clock
        self.start = clock()
        self.t_warm = None
        self.total = 10**9

    def update(self, step: int) -> int:
        if step == self.warmup:
            self.t_warm = self.clock()
        elif step == self.warmup + self.probe:
            rate = self.probe / (self.clock() - self.t_warm)
            left = self.seconds - (self.clock() - self.start)
            self.total = max(100, step + int(rate * left))
            log(f"{self.name}: {rate:.1f} steps/s -> {self.total} steps")
        return self.total


def train_vae(images: torch.Tensor, seconds: float, batch: int, device: str, seed: int):
    torch.manual_seed(seed)
    vae = new_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    budget, step = StepBudget(seconds, "vae"), 0
    while True:
        total = budget.update(step)
        if step >= total:
            break
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, total, 1e-3)
        idx = torch.randint(0, images.shape[0], (batch,), generator=g)
        x = images[idx].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / (x[0].numel())
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 500 == 0:
            log(f"vae step {step}/{total} loss {loss.item():.4f} mse {F.mse_loss(rec, x).item():.4f}")
    return vae.eval().requires_grad_(False), step


def finetune_vae(
    old,
    world: torch.Tensor,
    generic: torch.Tensor,
    seconds: float,
    batch: int,
    device: str,
    seed: int,
    anchor: float = 1.0,
    lr: float = 3e-4,
):
    """Teach a trained VAE generic images without moving its latent space.

    The UNet was trained on the old encoder's latents, so: the new encoder's means on world
    images are pulled to the old ones (`anchor`), and the new decoder is also trained to
    decode the old latents; the generic half of each batch is plain reconstruction."""
    import copy

    new = copy.deepcopy(old).train().requires_grad_(True)
    old.eval().requires_grad_(False)
    opt = torch.optim.AdamW(new.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    budget, step, half = StepBudget(seconds, "vae-finetune"), 0, batch // 2
    as_x = lambda t: t.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    while True:
        total = budget.update(step)
        if step >= total:
            break
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, total, lr, warmup=50)
        xw = as_x(world[torch.randint(0, world.shape[0], (half,), generator=g)])
        xg = as_x(generic[torch.randint(0, generic.shape[0], (half,), generator=g)])
        x = torch.cat([xw, xg])
        dist = new.encode(x).latent_dist
        rec = new.decode(dist.sample()).sample
        with torch.no_grad():
            mu_old = old.encode(xw).latent_dist.mean
        rec_old = new.decode(mu_old).sample
        loss = (
            F.mse_loss(rec, x)
            + 0.5 * F.l1_loss(rec, x)
            + F.mse_loss(rec_old, xw)
            + 0.5 * F.l1_loss(rec_old, xw)
            + anchor * F.mse_loss(dist.mean[:half], mu_old)
            + 1e-4 * dist.kl().mean() / x[0].numel()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 250 == 0:
            log(
                f"vae-finetune step {step}/{total} loss {loss.item():.4f} anchor {F.mse_loss(dist.mean[:half], mu_old).item():.4f}"
            )
    return new.eval().requires_grad_(False), step


@torch.no_grad()
def standardize_latents(vae, images: torch.Tensor, device: str, n: int = 8192) -> dict:
    """Fold per-channel latent mean and std into the VAE's 1x1 quant convs.

    StableDiffusionPipeline decodes `latents / scaling_factor` with no shift, so the
    latents themselves must be centred: after this they are ~N(0, 1) per channel and
    `scaling_factor` is 1. Exact: the decoder sees the same values as before.
    """
    x = images[:n].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    mu = torch.cat([vae.encode(x[i : i + 1024]).latent_dist.mean for i in range(0, x.shape[0], 1024)])
    m, s = mu.mean(dim=(0, 2, 3)), mu.std(dim=(0, 2, 3))
    c = m.shape[0]
    q, pq = vae.quant_conv, vae.post_quant_conv
    # encoder: mean rows -> (mean - m) / s ; logvar rows -> logvar - 2 log s
    q.weight[:c] /= s.view(-1, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - m) / s
    q.bias[c:] -= 2 * torch.log(s)
    # decoder input z' = (z - m) / s, so z = s z' + m: W z + b = (W s) z' + (W m + b)
    pq.bias += pq.weight[:, :, 0, 0] @ m
    pq.weight *= s.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
    return {"latent_mean": m.tolist(), "latent_std": s.tolist()}


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device: str, batch: int = 1024):
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        d = vae.encode(x).latent_dist
        means.append(d.mean.half())
        stds.append(d.std.half())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def encode_captions(captions: list[str], encoder, tokenizer, device: str):
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    embeds = []
    for i in range(0, len(unique), 1024):
        tok = tokenizer(
            unique[i : i + 1024],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        embeds.append(encoder(tok.input_ids.to(device))[0].half())
    return torch.cat(embeds), torch.tensor([index[c] for c in captions])


def _fits(unet, batch: int, ctx_dim: int, ctx_len: int, device: str) -> bool:
    """One forward+backward at this batch size: True when it fits in device memory."""
    if not device.startswith("cuda"):
        return True
    try:
        x = torch.randn(batch, 4, 16, 16, device=device)
        ctx = torch.randn(batch, ctx_len, ctx_dim, device=device)
        t = torch.zeros(batch, dtype=torch.long, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            unet(x, t, encoder_hidden_states=ctx).sample.float().mean().backward()
        unet.zero_grad(set_to_none=True)
        return True
    except torch.cuda.OutOfMemoryError:
        unet.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False


def train_unet(
    mean,
    std,
    scaling: float,
    embeds,
    cap_idx,
    seconds: float,
    batch: int,
    device: str,
    seed: int,
    lr: float = 4e-4,
    ema_decay: float = 0.999,
    init_from: str | None = None,
    min_snr: float = 5.0,
):
    torch.manual_seed(seed)
    unet = new_unet().to(device)
    if init_from:  # continue an earlier run (e.g. GPU pre-training, then more steps on a CPU)
        from diffusers import UNet2DConditionModel

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(init_from, dtype=torch.float32).state_dict())
    while batch > 64 and not _fits(unet, batch, embeds.shape[-1], embeds.shape[1], device):
        batch //= 2  # the step is launch-bound on a GPU: the largest batch that fits is the fastest
    log(f"unet batch {batch}")
    ema = new_unet().to(device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    ema_params, train_params = list(ema.parameters()), list(unet.parameters())
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    acp = sched.alphas_cumprod.to(device)
    # min-SNR-gamma weighting (Hang et al. 2023) for an epsilon target: min(snr, g) / snr.
    # It keeps the many near-noise-free steps from dominating and converges faster.
    snr = (acp / (1 - acp)).clamp(min=1e-8)
    weight = (torch.clamp(snr, max=min_snr) / snr) if min_snr > 0 else torch.ones_like(snr)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    g = torch.Generator(device=device).manual_seed(seed)
    use_bf16 = device.startswith("cuda")
    budget, step = StepBudget(seconds, "unet"), 0
    while True:
        total = budget.update(step)
        if step >= total:
            break
        for pg in opt.param_groups:
            pg["lr"] = _lr_at(step, total, lr)
        idx = torch.randint(0, mean.shape[0], (batch,), generator=g, device=device)
        lat = mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g, device=device)
        lat = lat * scaling
        noise = torch.randn(lat.shape, generator=g, device=device)
        t = torch.randint(0, 1000, (batch,), generator=g, device=device)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        ctx = embeds[cap_idx[idx]].float()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        loss = (weight[t] * (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, train_params, 1 - d)
        step += 1
        if step % 1000 == 0:
            log(f"unet step {step}/{total} loss {loss.item():.4f}")
    return ema.eval(), step, batch


def heldout_scenes(per: int = 24, split: str = "test") -> list[Scene]:
    """Held-out styles on pre-training contents and held-out contents in pre-training styles."""
    contents, styles = SPLITS[split]
    rng = np.random.default_rng(5)
    bgs = tuple(BACKGROUNDS)
    out = [
        Scene(str(rng.choice(PRETRAIN_CONTENTS)), st, bgs[i % 6], "center", "large")
        for st in styles
        for i in range(per)
    ]
    return out + [
        Scene(c, str(rng.choice(PRETRAIN_STYLES)), bgs[i % 6], "center", "large") for c in contents for i in range(per)
    ]


@torch.no_grad()
def vae_recon_probe(
    vae, probe, device: str, n_repeat: int = 2, scenes: list[Scene] | None = None, by: str | None = None
) -> dict:
    """Probe accuracy on VAE reconstructions of the fixed prompt set's scenes (or `scenes`):
    the ceiling for what the UNet can reach (textures the VAE loses no UNet can draw).
    `by="heldout"`: accuracy per held-out style and content instead."""
    from PIL import Image

    from .world import render

    scenes = scenes or eval_prompts() * n_repeat
    imgs = [render(s, 10_000 + i) for i, s in enumerate(scenes)]
    x = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    rec = ((rec.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
    preds = predict_tensor(probe, to_tensor([Image.fromarray(r) for r in rec]))
    y = labels_of(scenes)
    if by == "heldout":
        out = {}
        for name in sorted({sc.style for sc in scenes} - set(PRETRAIN_STYLES)) + sorted(
            {sc.content for sc in scenes} - set(PRETRAIN_CONTENTS)
        ):
            head = "content" if name in CONTENTS else "style"
            rows = torch.tensor([getattr(sc, head) == name for sc in scenes])
            out[name] = round(float((preds[head][rows] == y[head][rows]).float().mean()), 4)
        return out
    return {k: round(float((preds[k].cpu() == y[k]).float().mean()), 4) for k in HEADS}


EVAL_PARTS = ("background", "position", "size")


def eval_prompts(seed: int = 0) -> list[Scene]:
    """The fixed prompt set: every pre-training content x style, attributes drawn once."""
    rng = np.random.default_rng([seed, 99])
    bgs, poss, sizes = tuple(BACKGROUNDS), tuple(POSITIONS), tuple(SIZES)
    return [
        Scene(c, s, bgs[rng.integers(len(bgs))], poss[rng.integers(len(poss))], sizes[rng.integers(len(sizes))])
        for c in PRETRAIN_CONTENTS
        for s in PRETRAIN_STYLES
    ]


@torch.no_grad()
def evaluate_base(
    pipe, probe, guidance: float, steps: int = 20, batch: int = 48, seed: int = 0, scenes: list[Scene] | None = None
) -> dict:
    scenes = scenes or eval_prompts(seed)
    images = []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i : i + batch]
        gen = torch.Generator("cpu").manual_seed(seed + i)
        out = pipe(
            [s.caption() for s in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            negative_prompt=[""] * len(chunk),
        )
        images += out.images
    preds = predict_tensor(probe, to_tensor(images))
    y = labels_of(scenes)
    return {"n": len(scenes), **{k: float((preds[k] == y[k]).float().mean()) for k in HEADS}}, images


def eval_shipped(args) -> dict:
    """Score an existing micro model folder on the fixed prompt set, on this machine."""
    from ..models import load_base
    from .probes import load_probe

    base = load_base(args.out, device=args.device)
    probe, _ = load_probe()
    probe.to(args.device)
    report = {"model": args.out, "device": args.device, "threads": torch.get_num_threads(), "eval": {}}
    for guidance in args.eval_guidance:
        t = time.time()
        acc, _ = evaluate_base(base.pipe, probe, guidance)
        report["eval"][str(guidance)] = {**acc, "seconds": round(time.time() - t, 1)}
        log(f"guidance {guidance}: {report['eval'][str(guidance)]}")
    gen = torch.Generator("cpu").manual_seed(0)
    base.pipe("a large striped circle", num_inference_steps=20, generator=gen)  # warm
    t = time.time()
    for _ in range(5):
        base.pipe("a large striped circle", num_inference_steps=20, generator=gen)
    report["one_image_20_steps_s"] = round((time.time() - t) / 5, 3)
    text = json.dumps(report, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "model"))
    ap.add_argument("--probe-out", default=None, help="default: OUT/../probe.safetensors")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-seconds", type=float, default=60)
    ap.add_argument("--vae-batch", type=int, default=128)
    ap.add_argument("--unet-seconds", type=float, default=240)
    ap.add_argument("--unet-batch", type=int, default=256)
    ap.add_argument("--unet-lr", type=float, default=4e-4)
    ap.add_argument("--min-snr", type=float, default=5.0, help="min-SNR loss weighting gamma (0: plain MSE)")
    ap.add_argument("--unet-from", default=None, help="a UNet folder to continue training from")
    ap.add_argument("--probe-steps", type=int, default=3000, help="0: load --probe-from instead")
    ap.add_argument("--probe-from", default=None, help="an already trained probe (safetensors)")
    ap.add_argument("--vae-from", default=None, help="an already trained VAE folder: skip VAE training")
    ap.add_argument(
        "--vae-finetune",
        action="store_true",
        help="fine-tune --vae-from on world + generic images for --vae-seconds, keeping its latent space",
    )
    ap.add_argument("--generic-images", type=int, default=0, help="generic VAE images (default: --images)")
    ap.add_argument(
        "--rich-fraction",
        type=float,
        default=0.0,
        help="share of the UNet's examples from the rich world (world.rich_sample: shape and surface families)",
    )
    ap.add_argument("--probe-images", type=int, default=40_000)
    ap.add_argument("--text-encoder", default=None, help="MiniLM folder (default: the installed package)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument(
        "--eval-only",
        action="store_true",
        help="only score the model in --out (default: the shipped one) on the fixed prompt set",
    )
    ap.add_argument("--eval-guidance", type=float, nargs="+", default=[3.0, 5.0, 7.5])
    ap.add_argument("--report", default=None, help="write timings and accuracies here (JSON)")
    args = ap.parse_args()
    dev = args.device
    if args.eval_only:
        return eval_shipped(args)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    report = {"args": vars(args)}
    t0 = time.time()

    probe_out = Path(args.probe_out) if args.probe_out else Path(args.out).parent / "probe.safetensors"
    probe_out.parent.mkdir(parents=True, exist_ok=True)
    if args.probe_steps == 0:
        from .probes import load_probe

        probe, probe_acc = load_probe(args.probe_from)
    else:
        probe, probe_acc = train_probe(
            steps=args.probe_steps, n_train=args.probe_images, seed=args.seed, device=dev, log=log, workers=args.workers
        )
    report["probe_test_accuracy"] = probe_acc
    save_file(
        {k: v.contiguous().half() if v.is_floating_point() else v.contiguous() for k, v in probe.state_dict().items()},
        str(probe_out),
        metadata={"test_accuracy": json.dumps(probe_acc)},
    )
    log(f"probe test accuracy {probe_acc} ({time.time() - t0:.0f}s)")
    probe.to(dev)

    t = time.time()
    arr, captions = render_dataset(args.images, args.seed, args.workers, args.rich_fraction)
    images = torch.from_numpy(arr)
    report["render_s"] = time.time() - t
    log(f"rendered {len(captions)} images in {report['render_s']:.1f}s")

    t = time.time()
    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae_from, dtype=torch.float32).to(dev).eval().requires_grad_(False)
        vae_steps = None
    else:
        vae, vae_steps = train_vae(images, args.vae_seconds, args.vae_batch, dev, args.seed)
    report["vae"] = {
        "steps": vae_steps,
        "seconds": time.time() - t,
        "from": args.vae_from,
        "params_M": sum(p.numel() for p in vae.parameters()) / 1e6,
    }
    if args.vae_finetune:  # keep the latent space the shipped UNet was trained on: no re-standardising
        held = heldout_scenes()
        report["vae"]["before_finetune"] = {
            "recon_probe": vae_recon_probe(vae, probe, dev),
            "heldout": vae_recon_probe(vae, probe, dev, scenes=held, by="heldout"),
        }
        log(f"before fine-tuning: {report['vae']['before_finetune']}")
        generic = torch.from_numpy(render_generic(args.generic_images or args.images, args.seed + 1, args.workers))
        t = time.time()
        vae, ft_steps = finetune_vae(vae, images, generic, args.vae_seconds, args.vae_batch, dev, args.seed)
        report["vae"]["finetune"] = {
            "steps": ft_steps,
            "seconds": time.time() - t,
            "batch": args.vae_batch,
            "generic_images": int(generic.shape[0]),
        }
        report["vae"]["heldout_recon_probe"] = vae_recon_probe(vae, probe, dev, scenes=held, by="heldout")
        log(f"after fine-tuning, held out: {report['vae']['heldout_recon_probe']}")
    elif not (args.vae_from and args.unet_from):  # a UNet continued on a kept VAE keeps its latents
        report["vae"].update(standardize_latents(vae, images, dev))
    report["vae"]["recon_probe"] = vae_recon_probe(vae, probe, dev)
    log(f"probe accuracy on VAE reconstructions: {report['vae']['recon_probe']}")
    mean, std = encode_latents(vae, images, dev)
    scaling = 1.0
    with torch.no_grad():
        x = images[:256].to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
        report["vae"]["recon_mse"] = float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))
    log(f"vae {report['vae']}; latents now mean {float(mean.float().mean()):.3f} std {float(mean.float().std()):.3f}")

    encoder, tokenizer = load_text_encoder(args.text_encoder)
    encoder.to(dev)
    embeds, cap_idx = encode_captions(captions, encoder, tokenizer, dev)
    cap_idx = cap_idx.to(dev)
    log(f"{embeds.shape[0]} unique captions")

    t = time.time()
    if args.unet_seconds == 0 and args.unet_from:  # keep a trained UNet as it is (e.g. a VAE-only run)
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(args.unet_from, dtype=torch.float32).to(dev).eval()
        unet_steps, unet_batch = 0, 0
    else:
        unet, unet_steps, unet_batch = train_unet(
            mean.to(dev),
            std.to(dev),
            scaling,
            embeds,
            cap_idx,
            args.unet_seconds,
            args.unet_batch,
            dev,
            args.seed,
            lr=args.unet_lr,
            init_from=args.unet_from,
            min_snr=args.min_snr,
        )
    report["unet"] = {
        "steps": unet_steps,
        "seconds": time.time() - t,
        "batch": unet_batch,
        "samples": unet_steps * unet_batch,
        "params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
    }
    log(f"unet {report['unet']}")

    save_micro(args.out, unet, vae, tokenizer)
    sizes = {str(p.relative_to(args.out)): p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file()}
    report["files_MB"] = round(sum(sizes.values()) / 2**20, 2)

    pipe = StableDiffusionPipeline.from_pretrained(
        args.out, text_encoder=encoder.float(), dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    ).to(dev)
    pipe.set_progress_bar_config(disable=True)
    report["eval"] = {}
    for guidance in args.eval_guidance:
        acc, imgs = evaluate_base(pipe, probe, guidance)
        report["eval"][str(guidance)] = acc
        log(f"guidance {guidance}: {acc}")
    grid = np.concatenate(
        [np.concatenate([np.asarray(im) for im in imgs[r * 12 : (r + 1) * 12]], 1) for r in range(12)], 0
    )
    from PIL import Image

    Image.fromarray(grid).save(Path(args.out).parent / "pretrain_samples.png")
    report["total_s"] = time.time() - t0
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.report:
        Path(args.report).write_text(text)


if __name__ == "__main__":
    main()
