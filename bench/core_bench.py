"""Core benchmark: costs of PLP training, MCP batching, fused generation and adapter switching.

Every figure is a ratio of two things measured side by side in this one run
(interleaved repetitions, medians), so the machine's speed cancels out.

    python bench/core_bench.py [--device cuda] [--reps 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from peft import LoraConfig
from PIL import Image

from b4m_core.config import PLPConfig, TrainConfig
from b4m_core.data import Concept
from b4m_core.generation import GenerationRequest, Generator
from b4m_core.injection import inject_plp, remove_adapters
from b4m_core.models import load_base
from b4m_core.tiny import build_tiny_sd
from b4m_core.training import BreakStage, RowGroup, SampleSet, TrainingSession, train_concept


def images(seed, n, size=64):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fns: dict, reps: int, device) -> dict:
    """Median seconds of each fn, measured round-robin so drift hits all alike."""
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default=None, help="a diffusers folder; default: a small SD-style model built here")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    path = args.model or str(
        build_tiny_sd(tmp / "bench_sd", channels=(64, 128), cross_attention_dim=128, sample_size=16, layers_per_block=2)
    )
    base = load_base(path, device=device)
    unet = base.unet
    rank = args.rank
    results = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "rank": rank,
        "batch": args.batch,
        "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
    }
    print(f"model: {results['unet_params_M']}M-parameter UNet, {base.resolution}px, device {device}", flush=True)

    content = Concept("content", images(0, 4), "dog")
    aux = [Concept("style", images(10 + i, 2), f"s{i}", token=f"x{i}") for i in range(3)]
    res = base.resolution
    cset = SampleSet(base, content, res, True)
    _aux_sets = [SampleSet(base, a, res, True) for a in aux]  # built as MCP would: their cost counts

    # 1. PLP training step vs a PEFT LoRA of the same rank, same UNet and batch ----------
    plp = PLPConfig(rank=rank, alpha=rank)
    cfg = TrainConfig(steps=10**9, max_grad_norm=None)
    layers = inject_plp(unet, plp)
    plp_params = [p for l in layers.values() for p in (l.B, l.D)]
    plp_session = TrainingSession(base, [{"params": plp_params}], [RowGroup(cset, args.batch, 1.0)], cfg)
    remove_adapters(unet)
    targets = sorted({n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0" for n in layers})
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    peft_params = [p for p in unet.parameters() if p.requires_grad]
    peft_session = TrainingSession(base, [{"params": peft_params}], [RowGroup(cset, args.batch, 1.0)], cfg)
    unet.disable_adapters()

    def peft_step():
        unet.enable_adapters()
        peft_session.train_step()
        unet.disable_adapters()

    from b4m_core.injection import _set_submodule

    def plp_step():
        # swap the PLP layers in place of PEFT's for the step, and PEFT's back after
        previous = {n: unet.get_submodule(n) for n in layers}
        for n, l in layers.items():
            _set_submodule(unet, n, l)
        try:
            plp_session.train_step()
        finally:
            for n, m in previous.items():
                _set_submodule(unet, n, m)

    # Module swapping costs microseconds; the step is what is measured.
    t = interleaved({"peft_lora": peft_step, "plp": plp_step}, args.reps, device)
    results["train_step_s"] = t
    results["plp_vs_peft_lora"] = t["plp"] / t["peft_lora"]
    print(
        f"[1] training step, rank {rank}, batch {args.batch}: PEFT LoRA {t['peft_lora'] * 1e3:.1f} ms, "
        f"PLP {t['plp'] * 1e3:.1f} ms -> PLP/LoRA = {results['plp_vs_peft_lora']:.3f}x (target <= 1.10)",
        flush=True,
    )
    # PEFT leaves its wrapper modules behind: continue on a freshly loaded copy
    base = load_base(path, device=device)
    unet = base.unet

    # 2. MCP k=3 in one batched pass vs 4 separate forward/backward passes -------------
    stage = BreakStage(base, content, aux, plp, TrainConfig(steps=10**9, max_grad_norm=None))
    s = stage.session

    def batched():
        s.train_step()

    def separate():
        # the same work the naive way: one pass per row (content, then each style), each
        # with its own backward, gradients accumulated, one optimizer step
        batch, weights, route = s.draw()
        for i in range(route.shape[0]):
            rows = slice(i, i + 1)
            sub = {k: v[rows] for k, v in batch.items()}
            loss = (s.row_losses(sub, route[rows]) * weights[rows]).sum()
            loss.backward()
        for l in stage.layers.values():
            l.route = None
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)

    t = interleaved({"batched": batched, "separate": separate}, args.reps, device)
    remove_adapters(unet)
    results["mcp_step_s"] = t
    results["mcp_separate_over_batched"] = t["separate"] / t["batched"]
    print(
        f"[2] MCP step, k=3: one batched pass {t['batched'] * 1e3:.1f} ms, 4 separate passes "
        f"{t['separate'] * 1e3:.1f} ms -> speed-up {results['mcp_separate_over_batched']:.2f}x (target >= 1.5)",
        flush=True,
    )

    # 3. Generation: fused adapter vs bare base; unfused reported ---------------------
    adapter = train_concept(base, content, aux=aux[:1], plp=plp, cfg=TrainConfig(steps=2))
    gen = Generator(base)
    req = GenerationRequest(prompt="a photo of {content}", steps=10, seed=0, num_images=1)
    bare_req = GenerationRequest(prompt="a photo of sks dog", steps=10, seed=0, num_images=1)
    state = {"mode": None}

    def run(mode):
        def fn():
            if state["mode"] != mode:
                gen.set_adapter(None if mode == "bare" else adapter, fuse=(mode == "fused"))
                state["mode"] = mode
            gen.generate(bare_req if mode == "bare" else req)

        return fn

    # switching is measured separately below: each timed call follows an untimed one in
    # the same mode; the order of the modes alternates between repetitions
    modes = ["bare", "fused", "unfused"]
    times = {m: [] for m in modes}
    for i in range(2 * args.reps):
        for m in modes if i % 2 == 0 else modes[::-1]:
            fn = run(m)
            fn()
            times[m].append(timed(fn, device))
    t = {m: statistics.median(v) for m, v in times.items()}
    results["generate_s"] = t
    results["fused_vs_bare"] = t["fused"] / t["bare"]
    results["unfused_vs_bare"] = t["unfused"] / t["bare"]
    print(
        f"[3] generation, 10 steps: bare {t['bare'] * 1e3:.0f} ms, fused {t['fused'] * 1e3:.0f} ms "
        f"({results['fused_vs_bare']:.3f}x, target <= 1.05), unfused {t['unfused'] * 1e3:.0f} ms "
        f"({results['unfused_vs_bare']:.3f}x)",
        flush=True,
    )

    # 4. Switching adapters in a loaded pipeline vs loading the pipeline afresh ------------
    other = train_concept(base, Concept("content", images(5, 2), "cat"), plp=plp, cfg=TrainConfig(steps=1))
    flip = {"i": 0}

    def switch(fuse: bool):
        def fn():  # alternate between two adapters so every call really switches
            flip["i"] ^= 1
            gen.set_adapter(adapter if flip["i"] else other, fuse=fuse)

        return fn

    def reload():
        load_base(path, device=device)

    t = interleaved(
        {"switch_fused": switch(True), "switch_unfused": switch(False), "reload": reload}, args.reps, device
    )
    results["switch_s"] = t
    results["reload_over_switch_fused"] = t["reload"] / t["switch_fused"]
    results["reload_over_switch_unfused"] = t["reload"] / t["switch_unfused"]
    print(
        f"[4] adapter switch: fused {t['switch_fused'] * 1e3:.1f} ms, unfused {t['switch_unfused'] * 1e3:.1f} ms, "
        f"pipeline reload {t['reload'] * 1e3:.0f} ms -> switching is {results['reload_over_switch_fused']:.0f}x "
        f"(fused) / {results['reload_over_switch_unfused']:.0f}x (unfused) faster than reloading",
        flush=True,
    )

    # 5. Principal bases: a run's first injection (an SVD per layer) vs a later one ---------
    from b4m_core import layers as layer_mod

    principal = PLPConfig(rank=rank, alpha=rank, basis_mode="principal")

    def inject_cold():
        layer_mod._PRINCIPAL_CACHE.clear()
        layer_mod._principal_cached[0] = 0
        inject_plp(unet, principal)
        remove_adapters(unet)

    def inject_warm():
        inject_plp(unet, principal)
        remove_adapters(unet)

    t = interleaved({"cold": inject_cold, "warm": inject_warm}, args.reps, device)
    results["principal_inject_s"] = t
    results["principal_cold_over_warm"] = t["cold"] / t["warm"]
    print(
        f"[5] principal bases: first injection {t['cold'] * 1e3:.0f} ms, later ones (bases cached under the "
        f"weights' bytes) {t['warm'] * 1e3:.0f} ms -> {results['principal_cold_over_warm']:.1f}x",
        flush=True,
    )

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
