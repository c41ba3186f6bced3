import numpy as np
import pytest
import torch

from b4m_core.micro import world
from b4m_core.micro.probes import load_probe, predict, predict_tensor, probe_dataset
from b4m_core.micro.references import CONTENT_IMAGES, STYLE_IMAGES, reference_concept, reference_scenes


def test_renderer_is_deterministic_and_covers_every_concept():
    scene = world.Scene("star", "brick", "blue", "top left", "large")
    a, b = world.render(scene, 5), world.render(scene, 5)
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(world.render(scene, 6)))
    assert len(world.PRETRAIN_CONTENTS) >= 12 and len(world.PRETRAIN_STYLES) >= 12
    assert len(world.HELDOUT_CONTENTS) >= 4 and len(world.HELDOUT_STYLES) >= 4
    assert {"brick", "grass", "gravel"} <= set(world.PRETRAIN_STYLES)
    for c in world.CONTENTS:
        for s in world.STYLES:
            arr = np.asarray(world.render(world.Scene(c, s, "white", "center", "large"), 0))
            assert arr.std() > 5, (c, s)  # something was drawn


def test_captions_are_plain_english_and_pretraining_never_shows_heldout():
    assert (
        world.Scene("hexagon", "plaid", "white", "center", "small").caption()
        == "a small plaid hexagon in the center on a white background"
    )
    assert world.Scene("arrow", "brick", "pink", "top left", "large").caption(frozenset()) == "a brick arrow"
    assert (
        world.Scene("arrow", "wavy", "pink", "top left", "large").caption(frozenset({"position"}))
        == "a wavy arrow in the top left corner"
    )
    held = set(world.HELDOUT_CONTENTS) | set(world.HELDOUT_STYLES)
    for i in range(1500):
        _, caption, scene = world.training_sample(i)
        assert scene.content not in held and scene.style not in held
        assert not any(h in caption for h in held)


def test_reference_sets_follow_the_paper():
    for name in world.HELDOUT_CONTENTS:
        scenes = reference_scenes("content", name)
        assert len(scenes) == CONTENT_IMAGES and len({s.style for s in scenes}) == CONTENT_IMAGES
        assert all(s.style in world.PRETRAIN_STYLES for s in scenes)
        concept = reference_concept("content", name)
        assert len(concept.images) == CONTENT_IMAGES and concept.kind == "content"
        assert all(concept.phrase in p for p in concept.prompts())
    for name in world.HELDOUT_STYLES:
        scenes = reference_scenes("style", name)
        assert len(scenes) == STYLE_IMAGES and len({s.content for s in scenes}) == STYLE_IMAGES
        assert len(reference_concept("style", name).images) == STYLE_IMAGES


def test_shipped_probe_reads_fresh_renders():
    probe, recorded = load_probe()
    assert all(recorded[k] >= 0.95 for k in ("content", "style", "background", "position", "size")), recorded
    x, y = probe_dataset(300, seed=12345)
    pred = predict_tensor(probe, x)
    for k in y:
        acc = float((pred[k] == y[k]).float().mean())
        assert acc >= 0.9, (k, acc)
    # and the shipped reference images, held-out concepts included
    c = reference_concept("content", "hexagon")
    assert [p["content"] for p in predict(probe, c.images)] == ["hexagon"] * len(c.images)


def test_generic_vae_images_are_deterministic_and_varied():
    a, b = world.generic_image(3), world.generic_image(3)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    means = np.stack([np.asarray(world.generic_image(i), np.float32).mean(axis=(0, 1)) for i in range(40)])
    assert means.std(axis=0).min() > 20  # colours all over the cube, not the world's palette


def test_shipped_vae_carries_heldout_concepts():
    """The customization benchmark is only fair if the VAE can reproduce the held-out
    concepts at all: the probe must read them back from its reconstructions."""
    from diffusers import AutoencoderKL

    from b4m_core.micro.model import MODEL_DIR
    from b4m_core.micro.pretrain import heldout_scenes, vae_recon_probe

    vae = AutoencoderKL.from_pretrained(str(MODEL_DIR / "vae"), dtype=torch.float32)
    probe, _ = load_probe()
    acc = vae_recon_probe(vae, probe, "cpu", scenes=heldout_scenes(per=12), by="heldout")
    assert all(acc[c] >= 0.8 for c in world.HELDOUT_CONTENTS), acc
    assert (
        np.mean([acc[s] for s in world.HELDOUT_STYLES]) >= 0.6 and min(acc[s] for s in world.HELDOUT_STYLES) >= 0.3
    ), acc


@pytest.fixture(scope="module")
def micro():
    from b4m_core.models import load_base

    return load_base("micro", device="cpu")


def test_micro_loads_as_a_diffusers_pipeline_and_draws(micro):
    from b4m_core.generation import GenerationRequest, Generator

    assert micro.resolution == 64 and not micro.is_sdxl
    images = Generator(micro).generate(
        GenerationRequest("a large striped star in the center on a white background", steps=4, num_images=2)
    )
    assert len(images) == 2 and images[0].size == (64, 64)
    assert np.asarray(images[0]).std() > 3


def test_micro_measured_defaults_fill_what_a_run_leaves_out(micro):
    from b4m_core.training import train_concept

    # rho 0.75: Table 1's rho sweep on this model (docs/quality/README.md); a given value wins
    assert micro.plp_config().rho == 0.75 and micro.plp_config(rho=0.5, rank=4).rho == 0.5
    assert micro.default("break_steps", 300) == 250 and micro.default("learning_rate", 1e-3) == 5e-3
    from b4m_core.config import TrainConfig

    adapter = train_concept(micro, reference_concept("style", "plaid"), cfg=TrainConfig(steps=1))
    assert adapter.plp.rho == 0.75


def test_micro_weights_are_small():
    from b4m_core.micro.model import MODEL_DIR

    total = sum(p.stat().st_size for p in MODEL_DIR.rglob("*") if p.is_file())
    assert total <= 40 * 2**20, total


def test_break_and_make_on_micro_with_shipped_references(micro):
    from b4m_core.config import PLPConfig, TrainConfig
    from b4m_core.training import fuse, train_concept

    c = reference_concept("content", "hexagon")
    s = reference_concept("style", "plaid")
    aux = [reference_concept("style", "zigzag")]
    plp = PLPConfig(rank=4)
    ca = train_concept(micro, c, aux=aux, plp=plp, cfg=TrainConfig(steps=2))
    sa = train_concept(micro, s, plp=plp, cfg=TrainConfig(steps=2))
    f = fuse(micro, ca, sa, c, s, cfg=TrainConfig(steps=1))
    assert f.tokens == {"content": "hkx", "style": "pdk"} and f.base_model == "micro"


@pytest.mark.slow
def test_quality_bench_smoke(tmp_path):
    """Every method of Table 1 runs end to end and is scored (tiny steps: plumbing only)."""
    import json

    from b4m_core.micro.quality import Settings, run_quality

    tiny = Settings(
        break_steps=2,
        make_steps=1,
        lora_steps=2,
        joint_steps=2,
        ziplora_steps=1,
        aux_sets=1,
        images_per_pair=2,
        sample_steps=2,
        rank=4,
    )
    res = run_quality(tmp_path, settings=tiny, contents=["hexagon"], styles=["plaid"], log=lambda m: None)
    names = list(res["methods"])
    assert len(names) == 13 and "ZipLoRA" in names and "B4M rho=0.75" in names
    assert {"B4M w/o MCP (k=1)", "B4M no auxiliary sets (k=0)", "B4M balanced bases", "B4M released routing"} <= set(
        names
    )
    for r in res["methods"].values():
        for k in ("content", "style", "prompt", "average"):
            assert 0.0 <= r["aggregate"]["probe"][k] <= 1.0
        assert -1.0 <= r["aggregate"]["paper"]["content_effnet"] <= 1.0
    assert res["methods"]["B4M rho=0.5"]["same_as"] == "B4M (content up)"
    assert res["methods"]["B4M w/o MCP (k=1)"]["same_as"] == "B4M (content up)"  # this tiny bench's k is 1
    assert "same_as" not in res["methods"]["B4M released routing"]
    assert (tmp_path / "grid.png").is_file() and "| Method |" in (tmp_path / "table.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["time_to_new_pair"]["b4m_compose_and_finetune_s"] > 0


@pytest.mark.slow
def test_demo_cli_smoke(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "b4m_core",
            "demo",
            "--quick",
            "--break-steps",
            "2",
            "--make-steps",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 68, 3 * 68)  # header row/column of references + 2 x 2 pairs
    assert len(list((tmp_path / "adapters").glob("fused_*.safetensors"))) == 4


def test_step_budget_fits_steps_to_time():
    from b4m_core.micro.pretrain import StepBudget

    now = [0.0]  # a clock that steps take 2 ms on, whatever the machine's speed
    budget = StepBudget(0.4, "test", warmup=5, probe=20, clock=lambda: now[0])
    step = 0
    while step < budget.update(step):
        now[0] += 0.002
        step += 1
    # measured 500 steps/s after the warm-up; 0.35 s were left at step 25: 25 + 175 (less rounding)
    assert 198 <= step <= 200 and abs(now[0] - 0.4) < 0.005, (step, now[0])


def test_quality_bench_method_filter_refuses_unknown_rows(tmp_path):
    from b4m_core.config import ConfigError
    from b4m_core.micro.quality import methods, run_quality

    with pytest.raises(ConfigError, match="no method matches"):
        run_quality(tmp_path / "q", only=["no such row"])
    assert not (tmp_path / "q").exists()  # refused before writing anything
    names = [m.name for m in methods(16)]
    assert sum("w/o mcp" in n.lower() for n in names) == 1 and sum("rho" in n for n in names) == 3
