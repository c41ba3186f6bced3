"""CUDA check: break and make stages in bf16 (and fp16) on the SDXL-style tiny model.

Reports seconds per step and peak GPU memory for each precision, checks the adapters
are finite and that a fused adapter draws. Needs a CUDA GPU; nothing else depends on it.

    python bench/gpu_check.py [--steps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
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
from PIL import Image

from b4m_core.config import PLPConfig, TrainConfig
from b4m_core.data import Concept
from b4m_core.generation import GenerationRequest, Generator
from b4m_core.models import load_base
from b4m_core.tiny import build_tiny_sdxl
from b4m_core.training import Hooks, fuse, train_concept


def images(seed, n):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(n)]


def timed_run(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t, torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    path = build_tiny_sdxl(Path(tempfile.mkdtemp()) / "tiny_sdxl")
    content = Concept("content", images(0, 3), "dog")
    style = Concept("style", images(1, 2), "ink")
    aux_s = [Concept("style", images(10 + i, 2), f"s{i}", token=f"x{i}") for i in range(3)]
    aux_c = [Concept("content", images(20 + i, 2), f"c{i}", token=f"y{i}") for i in range(3)]
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps}
    plp = PLPConfig(rank=8)
    for label, weight_dtype, mp in (
        ("fp32", torch.float32, "no"),
        ("bf16", torch.bfloat16, "bf16"),
        ("fp16-autocast", torch.float32, "fp16"),
    ):
        base = load_base(str(path), device="cuda", dtype=weight_dtype)
        cfg = TrainConfig(steps=args.steps, mixed_precision=mp, seed=1)
        losses = []
        hooks = Hooks(progress=lambda s, t, l: losses.append(l))
        train_concept(base, content, aux=aux_s, plp=plp, cfg=TrainConfig(steps=2, mixed_precision=mp))  # warm-up
        c, t_c, m_c = timed_run(lambda: train_concept(base, content, aux=aux_s, plp=plp, cfg=cfg, hooks=hooks))
        s, t_s, m_s = timed_run(lambda: train_concept(base, style, aux=aux_c, plp=plp, cfg=cfg))
        mk_cfg = TrainConfig(steps=args.steps, mixed_precision=mp, seed=1)
        f, t_f, m_f = timed_run(lambda: fuse(base, c, s, content, style, cfg=mk_cfg))
        finite = all(torch.isfinite(t).all().item() for a in (c, s, f) for t in a.tensors.values())
        gen = Generator(base)
        gen.set_adapter(f, fuse=True)
        imgs, t_g, m_g = timed_run(
            lambda: gen.generate(GenerationRequest("a {content} in {style} style", steps=20, num_images=4))
        )
        arr = np.asarray(imgs[0])
        results[label] = {
            "break_content_s_per_step": t_c / args.steps,
            "break_style_s_per_step": t_s / args.steps,
            "make_s_per_step": t_f / args.steps,
            "peak_mem_MiB_break": max(m_c, m_s),
            "peak_mem_MiB_make": m_f,
            "generate_4_images_20_steps_s": t_g,
            "peak_mem_MiB_generate": m_g,
            "adapters_finite": finite,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "image_std": float(arr.std()),
        }
        print(label, json.dumps(results[label]), flush=True)
        assert finite, f"{label}: non-finite adapter values"
        del base, gen
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
