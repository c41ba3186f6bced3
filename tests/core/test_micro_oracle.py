"""bench/micro_oracle.py: its training images are the pair itself, and one pair runs end to end."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "micro_oracle.py"


def _oracle():
    spec = importlib.util.spec_from_file_location("micro_oracle", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_oracle_trains_on_renders_of_the_pair_and_scores_them(tmp_path):
    from b4m_core.micro.probes import load_probe, predict

    oracle = _oracle()
    concept, cphrase, sphrase = oracle.pair_concept("fish", "leopard", images=4, seed=1)
    assert (cphrase, sphrase) == ("fsv shape", "lpk pattern")
    # the captions name the style by its identifier and leave the content's slot
    assert all(c.startswith("a large {content} in lpk pattern style in the center") for c in concept.captions)
    reads = predict(load_probe()[0], concept.images)  # the renders are the answer itself
    assert sum(r["content"] == "fish" and r["style"] == "leopard" for r in reads) >= 3

    out, grid = tmp_path / "new" / "oracle.json", tmp_path / "new" / "oracle.png"
    argv = ["--pairs", "1", "--steps", "1", "--images", "2", "--out", str(out), "--grid", str(grid), "--threads", "1"]
    report = oracle.main(argv)
    from PIL import Image

    assert Image.open(grid).size == (64 * 4, 64)  # one row: the pair's four drawings
    saved = json.loads(out.read_text())
    assert list(saved["pairs"]) == ["fish|rainbow"] and saved == json.loads(json.dumps(report))
    for k in ("content", "style", "prompt", "average"):
        assert 0.0 <= saved["summary"][k]["mean"] <= 1.0


def test_oracle_with_conv_adapters_and_the_vae_ceiling(tmp_path):
    """`--adapt attn+conv` trains a LoRA on the ResNet convolutions too; `--vae-ceiling` reads
    the evaluation scenes through the VAE (clean renders read near 1 on content)."""
    import shutil

    import pytest

    from b4m_core.config import ConfigError
    from b4m_core.micro.model import MODEL_DIR

    oracle = _oracle()
    out = tmp_path / "conv.json"
    copy = shutil.copytree(MODEL_DIR, tmp_path / "micro_copy")  # `--base`: another micro-shaped folder
    argv = ["--pairs", "1", "--steps", "1", "--images", "2", "--adapt", "attn+conv", "--base", str(copy)]
    oracle.main(argv + ["--out", str(out)])
    assert json.loads(out.read_text())["args"]["adapt"] == "attn+conv"
    assert json.loads(out.read_text())["args"]["base"] == str(copy)
    with pytest.raises(ConfigError):  # the folder named is the one loaded: a missing one fails
        oracle.main(["--vae-ceiling", "--base", str(tmp_path / "missing")])
    vae = oracle.main(["--vae-ceiling", "--out", str(tmp_path / "vae.json")])
    assert vae["raw"]["content"] >= 0.9 and 0.0 <= vae["vae"]["style"] <= 1.0


def test_full_fine_tune_oracle_puts_every_weight_back():
    import argparse

    import torch

    from b4m_core.micro.quality import QualityBench, Settings
    from b4m_core.models import load_base

    oracle = _oracle()
    base = load_base("micro", device="cpu")
    bench = QualityBench(base, ["fish"], ["lava"], Settings(seed=1))
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    concept, cphrase, sphrase = oracle.pair_concept("fish", "lava", images=2, seed=1)
    args = argparse.Namespace(steps=1, lr=1e-2, batch=1, seed=1)
    prompts = [f"a large {cphrase} in {sphrase} style in the center on a white background"]
    tuned = oracle.train_full(base, bench, concept, prompts, args)
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())
    assert not any(p.requires_grad for p in base.unet.parameters())
    bench.gen.set_adapter(None)
    from b4m_core.generation import GenerationRequest

    bare = bench.gen.generate(
        GenerationRequest(prompts[0], seed=1, steps=bench.s.sample_steps, guidance=bench.s.guidance)
    )
    assert list(tuned[0].getdata()) != list(bare[0].getdata())  # the tuned model drew it
