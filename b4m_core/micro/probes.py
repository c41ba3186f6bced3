"""Probes: classifiers that read back what a micro-world image shows.

One small CNN with a head per attribute (content, style, background, position, size),
trained on the renderer over every content and style, held-out ones included, so it
can score images drawn after customization too.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .world import BACKGROUNDS, CONTENTS, POSITIONS, SIZES, STYLES, Scene, random_scene, render

HEADS = {
    "content": CONTENTS,
    "style": STYLES,
    "background": tuple(BACKGROUNDS),
    "position": tuple(POSITIONS),
    "size": tuple(SIZES),
}


class ProbeNet(nn.Module):
    def __init__(self, width: int = 48):
        super().__init__()
        w = width

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
                nn.Conv2d(o, o, 3, stride=2, padding=1),
                nn.BatchNorm2d(o),
                nn.ReLU(),
            )

        self.features = nn.Sequential(block(3, w), block(w, 2 * w), block(2 * w, 2 * w), block(2 * w, 4 * w))
        # keep the 4x4 map (not a global pool): position must stay readable
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, 256), nn.ReLU(), nn.Dropout(0.1))
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.neck(self.features(x))
        return {k: h(z) for k, h in self.heads.items()}


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def labels_of(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([HEADS[k].index(getattr(s, k)) for s in scenes]) for k in HEADS}


def _render_one(args) -> np.ndarray:
    scene, seed = args
    return np.asarray(render(scene, seed), dtype=np.uint8)


def probe_dataset(n: int, seed: int, workers: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Renders over every content and style (held-out ones too), uniform attributes."""
    rng = np.random.default_rng([seed, 7])
    scenes = [random_scene(rng, CONTENTS, STYLES) for _ in range(n)]
    jobs = [(s, int(seed) * 1_000_003 + i) for i, s in enumerate(scenes)]
    if workers > 1:
        from multiprocessing import Pool

        with Pool(workers) as pool:
            arrays = pool.map(_render_one, jobs, chunksize=256)
    else:
        arrays = [_render_one(j) for j in jobs]
    x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    return x, labels_of(scenes)


def _blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gaussian blur of a random strength per image (sigma 0 to 1.2 px): generated images
    come through the VAE a little soft, and the probe must read them as a person would."""
    sigma = torch.rand(x.shape[0], generator=g).to(x.device) * 1.2 + 1e-3
    r = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 5)
    b, c, h, w = x.shape
    y = x.reshape(1, b * c, h, w)
    kh = k.repeat_interleave(c, 0).view(b * c, 1, 1, 5)
    y = F.conv2d(F.pad(y, (2, 2, 0, 0), mode="replicate"), kh, groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, 2, 2), mode="replicate"), kh.transpose(2, 3), groups=b * c)
    return y.view(b, c, h, w)


def train_probe(
    steps: int = 3000,
    batch: int = 128,
    n_train: int = 40000,
    seed: int = 0,
    device: str = "cpu",
    log=print,
    workers: int = 1,
    init: ProbeNet | None = None,
    lr: float = 2e-3,
    vae=None,
) -> tuple[ProbeNet, dict]:
    """`vae`: half of each batch is the renders' reconstructions through it, so the probe
    reads an image as it comes out of the model's decoder (every generated image does)."""
    torch.manual_seed(seed)
    x, y = probe_dataset(n_train, seed, workers)
    xt, yt = probe_dataset(4000, seed + 1, workers)  # held-out test renders (other seeds)
    x_rec = reconstruct(vae, x) if vae is not None else None
    net = (init or ProbeNet()).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    x, xt = x.to(device), xt.to(device)
    x_rec = x_rec.to(device) if x_rec is not None else None
    y = {k: v.to(device) for k, v in y.items()}
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g).to(device)
        xb = x[idx]
        if x_rec is not None:
            xb = torch.where((torch.rand(batch, generator=g) < 0.5).to(device)[:, None, None, None], x_rec[idx], xb)
        # small colour jitter so generated images (slightly off the renderer) still read
        xb = _blur(xb, g) + 0.04 * torch.randn(xb.shape[0], 3, 1, 1, device=device) + 0.03 * torch.randn_like(xb)
        out = net(xb)
        loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0:
            log(f"probe step {step} loss {loss.item():.3f}")
    acc = evaluate_probe(net, xt, {k: v.to(device) for k, v in yt.items()})
    acc_blur = evaluate_probe(
        net, _blur(xt, torch.Generator().manual_seed(seed + 2)), {k: v.to(device) for k, v in yt.items()}
    )
    acc.update({f"{k}_blurred": v for k, v in acc_blur.items()})
    return net.cpu().eval(), acc


@torch.no_grad()
def reconstruct(vae, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Images (N x 3 x 64 x 64 in [-1, 1]) encoded and decoded by `vae` (latent means)."""
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch].to(dev)
        out.append(vae.decode(vae.encode(xb).latent_dist.mean).sample.clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_probe(net: ProbeNet, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    net.eval()
    preds = predict_tensor(net, x)
    return {k: float((preds[k] == y[k].cpu()).float().mean()) for k in HEADS}


@torch.no_grad()
def predict_tensor(net: ProbeNet, x: torch.Tensor, batch: int = 512) -> dict[str, torch.Tensor]:
    net.eval()
    dev = next(net.parameters()).device
    outs = {k: [] for k in HEADS}
    for i in range(0, x.shape[0], batch):
        o = net(x[i : i + batch].to(dev))
        for k in HEADS:
            outs[k].append(o[k].argmax(dim=1).cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


def predict(net: ProbeNet, images: list[Image.Image]) -> list[dict[str, str]]:
    """What each image shows, by name."""
    idx = predict_tensor(net, to_tensor(images))
    return [{k: HEADS[k][int(idx[k][i])] for k in HEADS} for i in range(len(images))]


def load_probe(path: str | None = None, grow: bool = False) -> tuple[ProbeNet, dict]:
    """The shipped probe (or one at `path`) and its recorded test accuracy.

    `grow`: a probe saved before classes were appended to a head (the world gained concepts)
    keeps its rows for the old classes; the new rows start fresh, for a fine-tune."""
    import json
    from pathlib import Path

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = path or str(Path(__file__).resolve().parent / "probe.safetensors")
    net = ProbeNet()
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()}
    if grow:
        own = net.state_dict()
        for k, v in state.items():
            if v.shape != own[k].shape and k.startswith("heads."):
                state[k] = torch.cat([v, own[k][v.shape[0] :]])
    net.load_state_dict(state)
    with safe_open(path, framework="pt") as f:
        acc = json.loads((f.metadata() or {}).get("test_accuracy", "{}"))
    return net.eval(), acc


def save_probe(net: ProbeNet, acc: dict, path: str | None = None) -> str:
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    path = path or str(Path(__file__).resolve().parent / "probe.safetensors")
    save_file(
        {k: v.contiguous().half() if v.is_floating_point() else v.contiguous() for k, v in net.state_dict().items()},
        path,
        metadata={"test_accuracy": json.dumps(acc)},
    )
    return path


def main() -> None:
    """Retrain (or, with --finetune, continue training) the shipped probe on this machine.

    python -m b4m_core.micro.probes --finetune --steps 1000 --images 20000
    """
    import argparse
    import json
    import os
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--finetune", action="store_true", help="start from the shipped probe")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-vae", action="store_true", help="train on clean renders only (not the shipped VAE's too)")
    args = ap.parse_args()
    t = time.time()
    init = load_probe(grow=True)[0] if args.finetune else None
    vae = None
    if not args.no_vae:
        from diffusers import AutoencoderKL

        from .model import MODEL_DIR

        vae = AutoencoderKL.from_pretrained(str(MODEL_DIR / "vae"), dtype=torch.float32).to(args.device).eval()
    net, acc = train_probe(
        args.steps,
        batch=args.batch,
        n_train=args.images,
        seed=args.seed,
        device=args.device,
        workers=os.cpu_count() or 1,
        init=init,
        lr=args.lr,
        vae=vae,
    )
    path = save_probe(net, acc, args.out)
    print(json.dumps({"probe": path, "test_accuracy": acc, "seconds": round(time.time() - t, 1)}, indent=2))


if __name__ == "__main__":
    main()
