import pytest
import torch
from diffusers import DiffusionPipeline

from b4m_core.adapter import Adapter
from b4m_core.config import ConfigError, PLPConfig, TrainConfig
from b4m_core.generation import GenerationRequest, Generator, expand_prompt
from b4m_core.injection import adapter_layers, remove_adapters
from b4m_core.training import fuse, train_concept


def _unet_out(base_or_pipe, is_sdxl):
    unet = base_or_pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 32, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if is_sdxl:
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32),
        }
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=ctx, **kw).sample


@pytest.fixture(scope="module")
def fused_adapters(sd, sdxl):
    from b4m_core.data import Concept

    from ..helpers.images import random_images

    out = {}
    for name, base in (("sd", sd), ("sdxl", sdxl), ("sd_conv", sd), ("sdxl_conv", sdxl)):
        content = Concept("content", random_images(0, 2), "dog")
        style = Concept("style", random_images(1, 2), "ink")
        plp = PLPConfig(rank=4, targets="attn+conv" if name.endswith("_conv") else "attn")
        cfg = TrainConfig(steps=2, learning_rate=5e-2)
        c = train_concept(base, content, plp=plp, cfg=cfg)
        s = train_concept(base, style, plp=plp, cfg=cfg)
        out[name] = fuse(base, c, s, content, style, cfg=TrainConfig(steps=1, learning_rate=5e-2))
    return out


@pytest.mark.parametrize("which", ["sd", "sdxl", "sd_conv", "sdxl_conv"])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_exported_lora_loads_in_diffusers_and_matches(request, tmp_path, fused_adapters, which, fmt):
    """`_conv`: adapters on the ResNet convolutions too (LoCon layout: 3x3 down, 1x1 up)."""
    base = request.getfixturevalue(which.removesuffix("_conv"))
    path = request.getfixturevalue(f"tiny_{which.removesuffix('_conv')}_path")
    adapter = fused_adapters[which]
    gen = Generator(base)
    plain = _unet_out(base, base.is_sdxl)
    gen.set_adapter(adapter, fuse=False)
    ours = _unet_out(base, base.is_sdxl)
    gen.set_adapter(None)
    assert (ours - plain).abs().max() > 1e-4  # the adapter does something

    file = tmp_path / f"lora_{fmt}.safetensors"
    file.write_bytes(adapter.export(fmt))
    pipe = DiffusionPipeline.from_pretrained(str(path))
    pipe.load_lora_weights(str(file))
    theirs = _unet_out(pipe, base.is_sdxl)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_exports_carry_kohya_and_modelspec_metadata_in_every_dtype(tmp_path, fused_adapters, dtype):
    import json

    from safetensors import safe_open

    from b4m_core.formats import write_export

    for which, version, arch in (
        ("sd", "sd_v1", "stable-diffusion-v1/lora"),
        ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    ):
        adapter = fused_adapters[which]
        for fmt in ("kohya", "diffusers"):
            path = tmp_path / f"{which}_{fmt}_{dtype}.safetensors"
            path.write_bytes(adapter.export(fmt, dtype))
            with safe_open(str(path), "pt") as f:
                meta, first = f.metadata(), f.get_tensor(next(iter(f.keys())))
            assert first.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
            assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == arch
            assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == adapter.alpha
            assert meta["ss_network_module"] == "networks.lora" and meta["ss_v2"] == "False"
            assert meta["ss_sd_model_name"] == adapter.base_model and meta["ss_steps"] == str(adapter.steps)
            res = adapter.resolution
            assert (
                res > 0
                and meta["ss_resolution"] == f"({res}, {res})"
                and meta["modelspec.resolution"] == f"{res}x{res}"
            )
            assert meta["modelspec.trigger_phrase"] == "sks dog, zwx ink"
            assert json.loads(meta["ss_tag_frequency"]) == {"b4m_fused": {"sks dog": 1, "zwx ink": 1}}
            assert (
                meta["modelspec.usage_hint"] == "a sks dog in zwx ink style"
                and "sks dog" in meta["ss_training_comment"]
            )
            assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"].startswith(
                "b4m content x style"
            )
            assert json.loads(meta["b4m"])["tokens"] == adapter.tokens  # ours kept
    # bf16 values are float32 rounded to 8 bits of mantissa; the b4m file itself reloads in any dtype
    again = Adapter.from_bytes(fused_adapters["sd"].export("b4m", dtype))
    for k, v in fused_adapters["sd"].tensors.items():
        assert torch.allclose(again.tensors[k].float(), v.float(), rtol=1e-2, atol=1e-3)
    # a folder: the weights and a model card beside them, as the Hub lays them out
    written = write_export(fused_adapters["sd"].to_bytes(), "diffusers", tmp_path / f"card_{dtype}", dtype)
    assert [p.name for p in written] == ["pytorch_lora_weights.safetensors", "README.md"]
    card = written[1].read_text()
    assert card.startswith("---\nbase_model:") and "`sks dog`" in card and "`zwx ink`" in card
    assert "load_lora_weights" in card and "| method | b4m |" in card


def test_kohya_keys_and_alpha(fused_adapters):
    sd_ = fused_adapters["sd"].to_kohya()
    keys = list(sd_)
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in sd_


def test_sdxl_kohya_exports_use_the_original_unet_names_and_map_back(fused_adapters):
    """SDXL kohya files name layers as kohya's sd-scripts do (the original UNet's
    `input_blocks_4_1_...`), so every kohya consumer finds them; every key maps back to the
    adapter's own layer. (diffusers' loader reading them back is the export test above.)"""
    from b4m_core.formats import FormatError, diffusers_unet_name, layers_per_block, ldm_unet_name

    # the real SDXL UNet (layers_per_block 2): its first attention layers in each block
    for ours, theirs in {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k": "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0": "middle_block.1.transformer_blocks.3.attn2.to_out.0",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
        "up_blocks.1.attentions.0.proj_in": "output_blocks.3.1.proj_in",
    }.items():
        assert ldm_unet_name(ours, 2) == theirs and diffusers_unet_name(theirs, 2) == ours
    with pytest.raises(FormatError):
        ldm_unet_name("conv_in", 2)
    adapter = fused_adapters["sdxl"]
    per_block = layers_per_block(adapter.layer_names)
    assert per_block == 1  # the tiny SDXL-shaped model's
    keys = adapter.to_kohya()
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert all(
        k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_", "lora_unet_output_blocks_"))
        for k in layers
    )
    flat = {"lora_unet_" + ldm_unet_name(n, per_block).replace(".", "_"): n for n in adapter.layer_names}
    assert set(flat) == layers and len(layers) == len(adapter.layer_names)  # one key per layer, none lost
    for key, name in flat.items():
        assert diffusers_unet_name(ldm_unet_name(name, per_block), per_block) == name
        up, down, scale = adapter.low_rank()[name]
        assert torch.equal(keys[f"{key}.lora_up.weight"], up) and torch.equal(keys[f"{key}.lora_down.weight"], down)


def test_conv_adapters_export_as_locon_kernels_under_kohyas_resnet_names(fused_adapters):
    """ResNet convolutions (targets `attn+conv`) export as kohya's LoCon files name them: the
    original UNet's `in_layers_2` / `out_layers_3` for SDXL, a 3x3 down and a 1x1 up kernel;
    every key maps back to the adapter's own layer."""
    from b4m_core.formats import diffusers_unet_name, layers_per_block, ldm_unet_name

    for ours, theirs in {  # the real SDXL UNet (layers_per_block 2)
        "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
        "down_blocks.1.resnets.1.conv2": "input_blocks.5.0.out_layers.3",
        "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
        "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
        "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
        "up_blocks.2.resnets.0.conv2": "output_blocks.6.0.out_layers.3",
    }.items():
        assert ldm_unet_name(ours, 2) == theirs and diffusers_unet_name(theirs, 2) == ours
    adapter = fused_adapters["sdxl_conv"]
    convs = [n for n in adapter.layer_names if n.endswith(("conv1", "conv2"))]
    assert convs and len(convs) < len(adapter.layer_names)  # attention layers and convolutions
    per_block = layers_per_block(adapter.layer_names)
    keys = adapter.to_kohya()
    for name in adapter.layer_names:
        key = "lora_unet_" + ldm_unet_name(name, per_block).replace(".", "_")
        assert diffusers_unet_name(ldm_unet_name(name, per_block), per_block) == name
        up, down, _ = adapter.low_rank()[name]
        if name in convs:
            assert keys[f"{key}.lora_down.weight"].shape == (down.shape[0], down.shape[1] // 9, 3, 3)
            assert keys[f"{key}.lora_up.weight"].shape == (*up.shape, 1, 1)
            assert torch.equal(keys[f"{key}.lora_down.weight"].flatten(1), down)
        else:
            assert torch.equal(keys[f"{key}.lora_down.weight"], down)
    assert len({k.rsplit(".", 2)[0] for k in keys if k.endswith(".weight")}) == len(adapter.layer_names)


@pytest.mark.parametrize("which", ["sd", "sdxl", "sd_conv", "sdxl_conv"])
def test_fused_and_unfused_draw_the_same_and_switching_restores_base(request, fused_adapters, which):
    base = request.getfixturevalue(which.removesuffix("_conv"))
    adapter = fused_adapters[which]
    gen = Generator(base)
    weights_before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    req = GenerationRequest(prompt="a {content} in {style} style", steps=3, num_images=2, seed=4)
    gen.set_adapter(None)
    bare = gen.generate(GenerationRequest(prompt="a dog", steps=3, seed=4))
    gen.set_adapter(adapter, fuse=True)
    fused_imgs = gen.generate(req)
    assert not adapter_layers(base.unet)  # merged: no extra modules at all
    gen.set_adapter(adapter, fuse=False)
    unfused_imgs = gen.generate(req)
    assert len(fused_imgs) == 2 and fused_imgs[0].size == (32, 32)
    for a, b in zip(fused_imgs, unfused_imgs):
        diff = (torch.tensor(list(a.getdata())) - torch.tensor(list(b.getdata()))).abs().max()
        assert diff <= 2
    gen.set_adapter(adapter, fuse=True)
    gen.set_adapter(None)
    after = base.unet.state_dict()
    assert all(torch.equal(weights_before[k], after[k]) for k in weights_before)
    again = gen.generate(GenerationRequest(prompt="a dog", steps=3, seed=4))
    assert list(again[0].getdata()) == list(bare[0].getdata())


def test_strength_scales_the_update_zero_is_the_base_model(fused_adapters, sd):
    from b4m_core.config import ConfigError

    adapter = fused_adapters["sd"]
    gen = Generator(sd)
    weights = lambda: {k: v.clone() for k, v in sd.unet.state_dict().items()}
    bare = weights()
    req = GenerationRequest(prompt="a dog", steps=2, seed=1)
    gen.set_adapter(None)
    bare_img = list(gen.generate(req)[0].getdata())
    merged = {}
    for strength in (0.0, 0.5, 1.0):
        gen.set_adapter(adapter, fuse=True, strength=strength)
        merged[strength] = weights()
    for k in bare:  # the merged update is linear in the strength
        assert torch.allclose(merged[0.0][k], bare[k])
        half, full = merged[0.5][k] - bare[k], merged[1.0][k] - bare[k]
        assert torch.allclose(2 * half, full, atol=1e-5), k
    assert any(not torch.equal(merged[1.0][k], bare[k]) for k in bare)
    for merge in (True, False):
        gen.set_adapter(adapter, fuse=merge, strength=0.0)
        assert list(gen.generate(req)[0].getdata()) == bare_img
    with pytest.raises(ConfigError, match="strength"):
        gen.set_adapter(adapter, strength=2.5)
    gen.set_adapter(None)


def test_content_and_style_scales_act_on_their_own_blocks(fused_adapters, sd):
    """content_scale scales the content block (B's output rows), style_scale the style block
    (D's input columns), each linearly; a refusal leaves the drawn adapter in place."""
    from b4m_core.config import ConfigError

    adapter = fused_adapters["sd"]
    assert adapter.plp.content_half == "up"  # B holds the content, D the style

    def deltas(**scales):
        return {n: up @ down for n, (up, down, _) in adapter.low_rank(**scales).items()}

    full, no_content, no_style = deltas(), deltas(content_scale=0.0), deltas(style_scale=0.0)
    half_style = deltas(style_scale=0.5)
    for name in full:
        dm, dn = adapter.tensors[f"{name}.A"].shape[0], adapter.tensors[f"{name}.C"].shape[1]
        assert torch.count_nonzero(no_content[name][dm:]) == 0  # B's rows: content gone
        assert torch.allclose(no_content[name][:dm], full[name][:dm])  # A's rows untouched
        assert torch.count_nonzero(no_style[name][:, dn:]) == 0  # D's columns: style gone
        assert torch.allclose(no_style[name][:, :dn], full[name][:, :dn])
        assert torch.allclose(2 * half_style[name][:, dn:], full[name][:, dn:], atol=1e-6)
    assert any(torch.count_nonzero(full[n][dm:]) for n in full)  # the content block is not empty

    gen = Generator(sd)
    weights = lambda: {k: v.clone() for k, v in sd.unet.state_dict().items()}
    gen.set_adapter(adapter, fuse=True)
    as_made = weights()
    gen.set_adapter(adapter, fuse=True, content_scale=0.3, style_scale=1.7)
    scaled = weights()
    assert any(not torch.equal(as_made[k], scaled[k]) for k in as_made)
    for bad in ({"content_scale": -0.1}, {"style_scale": 2.5}):
        with pytest.raises(ConfigError, match="_scale"):
            gen.set_adapter(adapter, fuse=True, **bad)
        after = weights()  # refused before anything was taken off
        assert all(torch.equal(scaled[k], after[k]) for k in scaled)
    plain_lora = Adapter(
        kind="fused",
        method="joint",
        tensors={"x.up": torch.zeros(2, 1), "x.down": torch.zeros(1, 2)},
        rank=1,
        alpha=1.0,
    )
    with pytest.raises(ConfigError, match="no separate halves"):
        plain_lora.low_rank(style_scale=0.5)
    gen.set_adapter(None)


def test_content_end_and_style_start_schedule_the_halves_over_the_sampling_steps(fused_adapters, sd):
    """content_end = 0 draws what content_scale = 0 draws, the full window what the adapter
    draws as made, a window in between something else; the adapter is as set afterwards,
    merged or not; windows outside [0, 1] or on an adapter without halves are refused."""
    adapter = fused_adapters["sd"]
    gen = Generator(sd)
    req = lambda **kw: GenerationRequest("a {content} in {style} style", seed=3, steps=6, guidance=3.0, **kw)
    pixels = lambda r: list(gen.generate(r)[0].getdata())
    weights = lambda: {k: v.clone() for k, v in sd.unet.state_dict().items()}
    for merge in (True, False):
        gen.set_adapter(adapter, fuse=merge, content_scale=0.0)
        no_content = pixels(req())
        gen.set_adapter(adapter, fuse=merge, style_scale=0.0)
        no_style = pixels(req())
        gen.set_adapter(adapter, fuse=merge)
        as_set = weights()
        full = pixels(req())
        assert pixels(req(content_end=0.0)) == no_content
        assert pixels(req(style_start=1.0)) == no_style
        halfway = pixels(req(content_end=0.5))
        assert halfway not in (full, no_content)
        after = weights()
        assert all(torch.equal(as_set[k], after[k]) for k in as_set)  # restored after the schedule
        assert pixels(req()) == full
    for bad in ({"content_end": 1.5}, {"style_start": -0.1}):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            gen.generate(req(**bad))
    plain = Adapter(kind="fused", method="joint", tensors={}, rank=1, alpha=1.0)
    gen.set_adapter(plain)
    with pytest.raises(ConfigError, match="B4M"):
        gen.generate(GenerationRequest("a cat", content_end=0.5))
    gen.set_adapter(None)


def test_strength_grid_script_draws_a_content_by_style_grid(tmp_path, fused_adapters, tiny_sd_path):
    """bench/strength_grid.py (the README's content-strength x style-strength grid) runs on
    a fused adapter of a non-micro model: a PNG of len(scales)^2 cells, no probe reads."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    fused_adapters["sd"].save(tmp_path / "fused.safetensors")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, str(root / "bench/strength_grid.py"), "--adapter", str(tmp_path / "fused.safetensors")]
        + ["--base", tiny_sd_path, "--scales", "0,2", "--steps", "2", "--out", str(tmp_path / "grid.png")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert r.returncode == 0, r.stderr
    side = fused_adapters["sd"].resolution or 32
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] >= 2 * side and grid.size[1] >= 2 * side


def test_prompt_expansion_and_errors(fused_adapters, sd):
    a = fused_adapters["sd"]
    assert expand_prompt("a {content} in {style} style", a) == "a sks dog in zwx ink style"
    content_only = Adapter(
        kind="content",
        method="b4m",
        tensors={},
        rank=4,
        alpha=4,
        plp=PLPConfig(rank=4),
        tokens={"content": "sks"},
        words={"content": "dog"},
    )
    with pytest.raises(ConfigError, match="no style"):
        expand_prompt("{content} in {style}", content_only)
    with pytest.raises(ConfigError):
        expand_prompt("{content}", None)
    gen = Generator(sd)
    for bad in ({"steps": 0}, {"width": 33}, {"num_images": 0}, {"guidance": -1}):
        with pytest.raises(ConfigError):
            gen.generate(GenerationRequest(prompt="x", **bad))


def test_adapter_for_another_base_is_refused(fused_adapters, sdxl):
    with pytest.raises(ConfigError, match="trained on"):
        Generator(sdxl).set_adapter(fused_adapters["sd"])
    remove_adapters(sdxl.unet)


def test_adapter_file_roundtrip_and_metadata(tmp_path, fused_adapters):
    a = fused_adapters["sd"]
    path = a.save(tmp_path / "f.safetensors")
    b = Adapter.load(path)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    meta = b.metadata()
    for key in (
        "base_model",
        "base_model_hash",
        "method",
        "rank",
        "alpha",
        "plp",
        "targets",
        "tokens",
        "words",
        "steps",
        "seed",
    ):
        assert meta[key] not in (None, ""), key
    assert meta["plp"]["rho"] == 0.5 and meta["plp"]["basis_mode"] == "exact"
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(ConfigError):
        Adapter.load(tmp_path / "junk.safetensors")
    with pytest.raises(ConfigError):
        Adapter.load(tmp_path / "missing.safetensors")


def test_base_hash_ignores_load_dtype_but_tells_models_apart(tiny_sd_path, tmp_path, sd):
    from b4m_core.models import load_base
    from b4m_core.tiny import build_tiny_sd

    bf16 = load_base(str(tiny_sd_path), device="cpu", dtype=torch.bfloat16)
    assert bf16.model_hash == sd.model_hash
    other = load_base(str(build_tiny_sd(tmp_path / "other", seed=1)), device="cpu")
    assert other.model_hash != sd.model_hash


def test_every_named_scheduler_draws_and_the_model_keeps_its_own(sd):
    """Each name in SCHEDULERS draws with the diffusers scheduler it names, built from the
    model's own config; "default" is the model's scheduler, which is back in place after
    every request (training reads it); an unknown name is refused before drawing."""
    from typing import get_args

    from b4m_contract.schemas import Scheduler
    from b4m_core.generation import SCHEDULERS

    assert list(get_args(Scheduler)) == list(SCHEDULERS)  # the API takes exactly these names
    gen = Generator(sd)
    gen.set_adapter(None)
    own = sd.pipe.scheduler
    pixels = {}
    for name, spec in SCHEDULERS.items():
        req = GenerationRequest(prompt="a dog", steps=3, seed=1, scheduler=name)
        pixels[name] = bytes(gen.generate(req)[0].tobytes())
        assert sd.pipe.scheduler is own
        used = gen.scheduler(name)
        assert type(used).__name__ == (type(own).__name__ if spec is None else spec[0])
        for key, value in (spec or ("", {}))[1].items():
            assert used.config[key] == value
        assert used.config.num_train_timesteps == own.config.num_train_timesteps
    default_again = bytes(gen.generate(GenerationRequest(prompt="a dog", steps=3, seed=1))[0].tobytes())
    assert default_again == pixels["default"]
    assert len(set(pixels.values())) >= len(SCHEDULERS) // 2  # they really sample differently
    with pytest.raises(ConfigError, match="scheduler must be one of"):
        gen.generate(GenerationRequest(prompt="a dog", steps=3, scheduler="k_lms_magic"))
    assert sd.pipe.scheduler is own
