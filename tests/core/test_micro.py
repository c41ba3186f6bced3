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
    held = set(world.HELDOUT_CONTENTS) | set(world.HELDOUT_STYLES) | set(world.DEV_CONTENTS) | set(world.DEV_STYLES)
    for i in range(1500):
        _, caption, scene = world.training_sample(i)
        assert scene.content not in held and scene.style not in held
        assert not any(h in caption for h in held)


def test_rich_world_names_families_never_a_heldout_or_named_concept():
    """The rich world (UNet pre-training beside the named concepts): seeded, varied, captioned
    in the world's grammar by attributes only: no dev or test concept's name, and none of the
    named concepts' words, which keep their meaning."""
    import re

    from b4m_core.micro import pretrain

    a, b = world.rich_sample(7), world.rich_sample(7)
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    held = set(world.HELDOUT_CONTENTS) | set(world.HELDOUT_STYLES) | set(world.DEV_CONTENTS) | set(world.DEV_STYLES)
    named = set(world.PRETRAIN_CONTENTS) | set(world.PRETRAIN_STYLES)
    captions = [world.rich_sample(i)[1] for i in range(600)]
    words = {w for c in captions for w in re.findall(r"[a-z-]+", c)}
    assert not words & (held | named), words & (held | named)
    assert 0.03 < captions.count("") / len(captions) < 0.2  # unconditional examples for guidance
    families = {f for f in ("banded", "tiled", "rippled", "chevron", "dotted", "mottled", "speckled", "criss-cross")}
    assert families <= words and {"blob", "polygon", "badge", "oval", "tile", "plus"} <= words
    assert len(set(captions)) > 500  # hundreds of distinct families x colours x places
    image, caption = world.rich_sample(3)
    assert image.size == (world.SIZE, world.SIZE)
    # the pre-training set mixes them in at the asked share
    arr, caps = pretrain.render_dataset(10, seed=0, workers=1, rich_fraction=0.3)
    assert arr.shape == (10, world.SIZE, world.SIZE, 3)
    rich = [c for c in caps if c and not any(f" {n} " in f" {c} " for n in world.PRETRAIN_CONTENTS)]
    assert caps[7:] == [world.rich_sample(i)[1] for i in range(7, 10)] and len(rich) >= 2


def test_dev_and_test_splits_are_disjoint_and_out_of_pretraining():
    from b4m_core.micro import pretrain

    (tc, ts), (dc, ds) = world.SPLITS["test"], world.SPLITS["dev"]
    assert len(dc) >= 4 and len(ds) >= 4 and not set(tc) & set(dc) and not set(ts) & set(ds)
    assert not (set(dc) | set(ds)) & (set(world.PRETRAIN_CONTENTS) | set(world.PRETRAIN_STYLES))
    # pre-training draws only its own concepts (the sampler's defaults are those lists)
    assert pretrain.PRETRAIN_CONTENTS is world.PRETRAIN_CONTENTS and pretrain.PRETRAIN_STYLES is world.PRETRAIN_STYLES
    assert world.CONTENTS[: len(world.PRETRAIN_CONTENTS) + 4] == world.PRETRAIN_CONTENTS + tc  # probe rows kept


def test_reference_sets_follow_the_paper():
    for name in world.HELDOUT_CONTENTS + world.DEV_CONTENTS:
        scenes = reference_scenes("content", name)
        assert len(scenes) == CONTENT_IMAGES and len({s.style for s in scenes}) == CONTENT_IMAGES
        assert all(s.style in world.PRETRAIN_STYLES for s in scenes)
        concept = reference_concept("content", name)
        assert len(concept.images) == CONTENT_IMAGES and concept.kind == "content"
        assert all(concept.phrase in p for p in concept.prompts())
    for name in world.HELDOUT_STYLES + world.DEV_STYLES:
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
    for split, (contents, styles) in world.SPLITS.items():
        acc = vae_recon_probe(vae, probe, "cpu", scenes=heldout_scenes(per=12, split=split), by="heldout")
        assert set(acc) == set(contents) | set(styles), acc
        assert all(acc[c] >= 0.8 for c in contents), (split, acc)
        # measured with 24 scenes each: galaxy 0.67, every other style >= 0.92 (docs/micro.md)
        assert np.mean([acc[s] for s in styles]) >= 0.8 and min(acc[s] for s in styles) >= 0.5, (split, acc)


@pytest.fixture(scope="module")
def micro():
    from b4m_core.models import load_base

    return load_base("micro", device="cpu")


def test_micro_loads_as_a_diffusers_pipeline_and_draws(micro):
    from b4m_core.config import ConfigError
    from b4m_core.generation import GenerationRequest, Generator

    assert micro.resolution == 64 and not micro.is_sdxl
    images = Generator(micro).generate(
        GenerationRequest("a large striped star in the center on a white background", steps=4, num_images=2)
    )
    assert len(images) == 2 and images[0].size == (64, 64)
    assert np.asarray(images[0]).std() > 3
    # Karras sigmas on micro's cosine schedule repeat timesteps (diffusers' solver would index
    # past its end): a clear refusal, and the next request draws as before
    gen = Generator(micro)
    with pytest.raises(ConfigError, match="repeated timesteps"):
        gen.generate(GenerationRequest("a star", steps=20, scheduler="dpmpp_2m_karras"))
    again = gen.generate(
        GenerationRequest("a large striped star in the center on a white background", steps=4, num_images=2)
    )
    assert np.array_equal(np.asarray(again[0]), np.asarray(images[0]))


def test_micro_measured_defaults_fill_what_a_run_leaves_out(micro):
    from b4m_core.training import train_concept

    # rho 0.75: Table 1's rho sweep on this model (docs/quality/README.md); a given value wins
    assert micro.plp_config().rho == 0.75 and micro.plp_config(rho=0.5, rank=4).rho == 0.5
    assert micro.default("break_steps", 300) == 250 and micro.default("learning_rate", 1e-3) == 5e-3
    from b4m_core.config import TrainConfig

    adapter = train_concept(micro, reference_concept("style", "plaid"), cfg=TrainConfig(steps=1))
    assert adapter.plp.rho == 0.75
    # principal bases: the dev split's 3 seeds (docs/quality/README.md, Session J)
    assert micro.plp_config().basis_mode == "principal" and adapter.plp.basis_mode == "principal"


def test_micro_prior_words_are_its_pretraining_concepts(micro):
    """Prior preservation on micro draws known shapes / styles in the new concept's place (the
    class word "shape" is not in its grammar); models without the list use the class word."""
    from b4m_core.micro.world import PRETRAIN_CONTENTS, PRETRAIN_STYLES

    assert micro.prior_words(reference_concept("content", "fish")) == list(PRETRAIN_CONTENTS)
    assert micro.prior_words(reference_concept("style", "lava")) == list(PRETRAIN_STYLES)
    assert set(PRETRAIN_CONTENTS).isdisjoint(world.HELDOUT_CONTENTS + world.DEV_CONTENTS)


def test_one_defaults_path_fills_every_caller_from_the_models_file(micro):
    """CLI, worker, demo and bench all take BaseModel.plp_config / train_config: what the caller
    gave wins, then the model's b4m_defaults.json, then the dataclasses' own."""
    from dataclasses import replace

    from b4m_core import cli
    from b4m_core.micro.quality import Settings

    rec = micro.recommended
    brk, make = micro.train_config("break"), micro.train_config("make")
    assert (brk.steps, brk.learning_rate) == (rec["break_steps"], rec["learning_rate"])
    assert make.steps == rec["make_steps"] and make.learning_rate == rec["learning_rate"]  # falls back
    assert micro.train_config("break", steps=7, learning_rate=1e-4).steps == 7
    with pytest.raises(ValueError):
        micro.train_config("fuse")

    other = replace(
        micro,
        recommended=rec
        | {"rank": 32, "basis_mode": "principal", "batch_size": 4, "train_token_embedding": True, "make_steps": 9},
    )
    plp = other.plp_config()
    assert (plp.rank, plp.alpha, plp.basis_mode) == (32, 32.0, "principal")
    assert other.plp_config(rank=8).alpha == 8.0 and other.plp_config(rank=8, alpha=4.0).alpha == 4.0
    cfg = other.train_config("break")
    assert cfg.batch_size == 4 and cfg.train_token_embedding and other.train_config("make").steps == 9
    # the noise levels a model trains best on hold for both stages, and a caller's choice wins
    later = replace(micro, recommended=rec | {"timestep_bias_strategy": "later", "timestep_bias_multiplier": 3.0})
    for stage in ("break", "make"):
        got = later.train_config(stage)
        assert (got.timestep_bias_strategy, got.timestep_bias_multiplier) == ("later", 3.0)
    assert later.train_config("break", timestep_bias_strategy="none").timestep_bias_strategy == "none"
    assert Settings().resolved(later).timestep_bias_multiplier == 3.0
    assert Settings(timestep_bias_strategy="none").resolved(later).timestep_bias_strategy == "none"
    assert not other.train_config("break", train_token_embedding=False).train_token_embedding
    # the bench resolves its settings through the same path
    s = Settings().resolved(other)
    assert (s.rank, s.basis_mode, s.batch_size, s.train_token_embedding, s.break_steps, s.make_steps) == (
        32,
        "principal",
        4,
        True,
        rec["break_steps"],
        9,
    )
    # and so does the CLI: no flag given -> the model's; a flag wins
    args = cli.build_parser().parse_args(["train", "content", "--images", "x", "--word", "w", "--out", "o"])
    assert cli._train_config(args, other, "break").batch_size == 4
    args = cli.build_parser().parse_args(
        [
            "train",
            "content",
            "--images",
            "x",
            "--word",
            "w",
            "--out",
            "o",
            "--batch-size",
            "2",
            "--no-train-token-embedding",
        ]
    )
    cfg = cli._train_config(args, other, "break")
    assert cfg.batch_size == 2 and not cfg.train_token_embedding


def test_uncaptioned_references_are_described_by_the_micro_captioner(micro):
    """An upload without captions trains on what the probe reads of each image (the known
    style or shape, background, size, position), in the grammar the model was trained on."""
    from dataclasses import replace

    for kind, name in (("content", "fish"), ("style", "rainbow"), ("content", "hexagon")):
        shipped = reference_concept(kind, name)
        bare = replace(shipped, captions=[None] * len(shipped.images))
        described = micro.describe(bare)
        scenes = reference_scenes(kind, name)
        other = "style" if kind == "content" else "content"
        for caption, scene in zip(described.captions, scenes):
            assert "{" + kind + "}" in caption and f"on a {scene.background} background" in caption, caption
            assert "a large" in caption and "in the center" in caption, caption
        hits = sum(f" {getattr(sc, other)} " in f" {c} " for c, sc in zip(described.captions, scenes))
        assert hits >= len(scenes) - 1, described.captions  # the known concept it is shown with
        assert all(name not in c for c in described.captions)  # the new concept stays the token's
    # a caption the user gave is kept; without the captioner, the model's own template
    partly = replace(bare, captions=["a {content} on a lawn"] + [None] * (len(bare.images) - 1))
    assert micro.describe(partly).captions[0] == "a {content} on a lawn"
    templated = micro.describe(bare, use_captioner=False)
    assert templated.captions == bare.captions and templated.prompts()[0] == "a hkx shape"


def test_recombined_copies_keep_the_concept_and_swap_the_other_factor(micro):
    """`recombine`: a content's shape refilled with the bank's known surfaces, a style's surface
    cut to the bank's known shapes; the probe still reads the concept in each copy and the
    captioner names the known factor it was given; seeded; training takes the copies."""
    from dataclasses import replace

    from b4m_core.config import ConfigError, TrainConfig
    from b4m_core.data import foreground_mask, recombined

    probe, _ = load_probe()
    for kind, name in (("content", "fish"), ("style", "rainbow")):
        refs = reference_concept(kind, name)
        bare = replace(refs, captions=[None] * len(refs.images))
        others = micro.known_images(kind, seed=1)
        out = recombined(bare, others, 3, seed=1)
        copies = out.images[len(refs.images) :]
        assert len(copies) == 3 * len(refs.images) and out.captions[len(refs.images) :] == [None] * len(copies)
        reads = predict(probe, copies)
        assert sum(r[kind] == name for r in reads) >= len(copies) - 1, reads  # the concept kept
        other = "style" if kind == "content" else "content"
        assert len({r[other] for r in reads}) >= 3, reads  # the other factor varies
        known = world.PRETRAIN_STYLES if kind == "content" else world.PRETRAIN_CONTENTS
        assert sum(r[other] in known for r in reads) >= len(copies) - 1, reads
        captions = micro.describe(out).captions[len(refs.images) :]
        assert sum(f" {r[other]} " in f" {c} " for r, c in zip(reads, captions)) >= len(copies) - 1, captions
        if kind == "content":  # the shape is the reference's own, pixel for pixel
            for i, ref in enumerate(refs.images):
                for copy in copies[3 * i : 3 * i + 3]:
                    assert (foreground_mask(copy) != foreground_mask(ref)).mean() < 0.02
        again = recombined(bare, others, 3, seed=1)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, again.images))
    assert recombined(bare, others, 0) is bare
    with pytest.raises(ConfigError, match="bank"):
        recombined(bare, [], 1)
    with pytest.raises(ConfigError, match="recombine"):
        TrainConfig(recombine=-1)
    with pytest.raises(ConfigError, match="recombine_kinds"):
        TrainConfig(recombine=1, recombine_kinds="shape")
    from b4m_core.training import train_concept

    plain, more, other_kind = (
        train_concept(micro, bare, cfg=TrainConfig(steps=3, recombine=n, recombine_kinds=k))
        for n, k in ((0, "style"), (3, "style"), (3, "content"))
    )
    assert any(not torch.equal(plain.tensors[k], more.tensors[k]) for k in plain.tensors)  # the copies trained
    assert all(torch.equal(plain.tensors[k], other_kind.tensors[k]) for k in plain.tensors)  # a style gets none


def test_make_stage_trains_on_pictures_of_the_pair_made_from_the_references(micro):
    """`make_pairs`: each content reference's subject refilled with the style references'
    surface is a picture of the content in the style (the probe reads both), captioned by the
    captioner's scene reading with both identifiers; the make stage trains on them."""
    from b4m_core.config import ConfigError, PLPConfig, TrainConfig
    from b4m_core.data import synthesized_pairs
    from b4m_core.training import _pair_set, fuse, train_concept

    c, s = reference_concept("content", "fish"), reference_concept("style", "rainbow")
    pics = synthesized_pairs(c, s, 2, seed=0)
    assert len(pics) == 2 * len(c.images)
    reads = predict(load_probe()[0], pics)
    assert sum(r["content"] == "fish" for r in reads) >= len(pics) - 1, reads
    assert sum(r["style"] == "rainbow" for r in reads) >= len(pics) - 2, reads
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pics, synthesized_pairs(c, s, 2, seed=0)))
    pairs = _pair_set(micro, c, s, TrainConfig(make_pairs=2))
    scenes = reference_scenes("content", "fish")
    for i, prompt in enumerate(pairs.prompts()):
        assert f"{c.phrase} in {s.phrase} style" in prompt, prompt
        assert f"on a {scenes[i // 2].background} background" in prompt, prompt
    assert _pair_set(micro, c, s, TrainConfig(make_pairs=1, captions="template")).prompts()[0] == (
        f"a {c.phrase} in {s.phrase} style"
    )
    with pytest.raises(ConfigError, match="make_pairs"):
        TrainConfig(make_pairs=-1)
    plp = PLPConfig(rank=4)
    ca, sa = (train_concept(micro, x, plp=plp, cfg=TrainConfig(steps=1)) for x in (c, s))
    plain, more = (fuse(micro, ca, sa, c, s, cfg=TrainConfig(steps=3, make_pairs=n)) for n in (0, 2))
    assert any(not torch.equal(plain.tensors[k], more.tensors[k]) for k in plain.tensors)


def test_mcp_is_the_default_with_the_models_bank(micro):
    sets = micro.auxiliary_sets("content", seed=0)
    assert len(sets) == micro.default("aux_sets", 0) >= 1
    assert all(a.kind == "style" and a.word in world.PRETRAIN_STYLES for a in sets)
    assert micro.auxiliary_sets("style", 2)[0].kind == "content" and micro.auxiliary_sets("style", 0) == []


def test_token_bound_auxiliary_sets_are_named_by_their_token():
    """The paper's auxiliary sets are new concepts told apart by their identifiers: with
    `generic_word` the bank names each as a user's concept is named ("vqz pattern"), so the
    same pictures and captions differ only in the token; without, the known word stays."""
    from b4m_core.micro.bank import AUX_TOKENS, aux_bank

    for kind, generic in (("content", "pattern"), ("style", "shape")):
        known = aux_bank(kind, 3, seed=1, token_bound=True)
        named = aux_bank(kind, 3, seed=1, token_bound=True, generic_word=True)
        assert [a.phrase for a in named] == [f"{t} {generic}" for t in AUX_TOKENS[:3]]
        assert [a.phrase.split()[1] for a in known] == [a.word for a in known] != [generic] * 3
        for a, b in zip(known, named):  # the same sets, only the name differs
            assert a.captions == b.captions and all(x.tobytes() == y.tobytes() for x, y in zip(a.images, b.images))
        assert [a.phrase for a in aux_bank(kind, 3, seed=1)] == [a.word for a in known]  # no token: the word


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
    """Every row of Table 1 runs end to end on the dev split and is scored, with intervals
    over pairs and seeds (tiny steps: plumbing only)."""
    import json

    from b4m_core.micro.quality import Settings, run_quality

    tiny = Settings(
        break_steps=1,
        make_steps=1,
        ziplora_steps=1,
        aux_sets=1,
        images_per_pair=1,
        single_images=1,
        sample_steps=1,
        rank=4,
        seeds=2,
    )
    res = run_quality(tmp_path, settings=tiny, contents=["fish"], styles=["lava"], log=lambda m: None, split="dev")
    names = list(res["methods"])
    assert len(names) == 17 and names[0] == "B4M" and "ZipLoRA" in names
    assert {"B4M w/o MCP (k=1)", "B4M no auxiliary sets (k=0)", "B4M balanced bases", "B4M released routing"} <= set(
        names
    )
    assert res["seeds"] == [0, 1] and res["settings"]["split"] == "dev"
    for r in res["methods"].values():
        for k in ("content", "style", "prompt", "average"):
            lo, hi = r["aggregate"]["probe"][k + "_ci"]
            assert 0.0 <= lo <= r["aggregate"]["probe"][k] <= hi <= 1.0
        assert -1.0 <= r["aggregate"]["paper"]["content_effnet"] <= 1.0
    b4m = res["methods"]["B4M"]
    assert set(b4m["pairs"]) == {"fish|lava|0", "fish|lava|1"}  # a pair per seed
    assert set(b4m["single"]["content"]["cells"]) == {"fish|0", "fish|1"}
    assert res["methods"]["B4M rho=0.75"]["same_as"] == "B4M"  # micro's measured default rho
    assert res["methods"]["B4M w/o MCP (k=1)"]["same_as"] == "B4M"  # this tiny bench's k is 1
    assert "same_as" not in res["methods"]["B4M released routing"]
    assert "same_as" not in res["methods"]["B4M uncaptioned (auto captions)"]
    assert "Joint LoRA (DB+LoRA) - B4M" in res["differences"]
    assert (tmp_path / "grid.png").is_file() and "| Method |" in (tmp_path / "table.md").read_text()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["time_to_new_pair"]["b4m_compose_and_finetune_s"] > 0 and saved["seeds"] == [0, 1]
    # what the probe read is kept per pair and summed per row, and the table says it
    reads = b4m["reads"]["style"]
    assert set(reads["accuracy"]) == {"lava"}
    assert reads["accuracy"]["lava"] == b4m["aggregate"]["probe"]["style"]  # one pair: the same mean
    assert abs(sum(share for _, share in reads["most_read"]) - 1.0) < 1e-9  # 2 images: at most 2 labels
    assert "read most:" in (tmp_path / "table.md").read_text()


def test_read_summary_names_the_probes_attractor():
    """A label the probe reads for far more than its share shows at the top of `most_read`,
    and each asked concept's accuracy counts only its own images."""
    from b4m_core.micro.quality import read_summary

    def pair(read_styles):
        return {"probe": {}, "reads": {"content": ["fish"] * len(read_styles), "style": read_styles}}

    per_pair = {
        "fish|rainbow|0": pair(["rainbow", "rainbow"]),
        "fish|lava|0": pair(["rainbow", "lava"]),
        "fish|leopard|0": pair(["rainbow", "rainbow"]),
    }
    s = read_summary(per_pair)["style"]
    assert s["accuracy"] == {"rainbow": 1.0, "lava": 0.5, "leopard": 0.0}
    assert s["most_read"][0] == ["rainbow", 5 / 6] and s["most_read"][1] == ["lava", 1 / 6]
    # reads in these shares whatever was asked: 1/3 x 5/6 (rainbow) + 1/3 x 1/6 (lava) + 1/3 x 0
    assert abs(s["chance_from_reads"] - 1 / 3) < 1e-12
    assert read_summary({"fish|lava|0": {"probe": {}}}) is None  # rows scored before reads were kept


def test_quality_bench_adapter_cache_trains_once_and_drawing_settings_reuse_it(tmp_path):
    """With `adapter_cache`, a rerun that changes only how fused adapters are drawn trains
    nothing and reads the same adapters; a training setting changes the key."""
    from dataclasses import replace

    from b4m_core.micro.quality import Settings, run_quality

    cache = tmp_path / "cache"
    tiny = Settings(break_steps=1, make_steps=1, aux_sets=0, images_per_pair=1, single_images=1, sample_steps=1)
    tiny = replace(tiny, rank=4, adapter_cache=str(cache))
    run = lambda out, s: run_quality(
        tmp_path / out, settings=s, contents=["fish"], styles=["lava"], log=lambda m: None, split="dev", only=["B4M"]
    )
    first = run("a", tiny)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and [f.split("_")[0] for f in files] == ["content", "fused", "style"]
    assert {"b4m break (per concept)", "b4m make (per pair)"} <= set(first["timings_s"])
    again = run("b", replace(tiny, style_scale=0.0, sampler="euler"))  # drawing only: loaded, not trained
    assert "b4m break (per concept)" not in again["timings_s"] and "b4m make (per pair)" not in again["timings_s"]
    assert (
        again["methods"]["B4M"]["pairs"]["fish|lava|0"]["blocks"]
        == first["methods"]["B4M"]["pairs"]["fish|lava|0"]["blocks"]
    )
    assert len(list(cache.iterdir())) == 3
    run("c", replace(tiny, break_steps=2))  # a training setting: new adapters
    assert len(list(cache.iterdir())) == 6
    # MCP's ablation settings reach the break stage (the adapter records what trained it)
    from b4m_core.adapter import Adapter

    before = set(cache.iterdir())
    run("d", replace(tiny, aux_sets=1, aux_lr_factor=1.0, routing="released"))
    made = {p.name.split("_")[0]: Adapter.load(p) for p in set(cache.iterdir()) - before}
    assert sorted(made) == ["content", "fused", "style"]
    for kind in ("content", "style"):
        assert (made[kind].extra["aux_lr_factor"], made[kind].extra["routing"]) == (1.0, "released")
        assert len(made[kind].extra["aux"]) == 1


def test_adapter_cache_keys_ignore_drawing_and_switched_off_settings():
    from b4m_core.micro.quality import Settings, training_spec

    base = training_spec(Settings())
    assert training_spec(Settings(style_scale=1.5, guidance=7.0, seeds=3, sampler="euler_a")) == base  # drawing only
    assert training_spec(Settings(prior_images=4, prior_preservation=False)) == base  # the prior is off
    assert training_spec(Settings(prior_preservation=True)) != base
    assert training_spec(Settings(learning_rate=1e-2)) != base
    # settings at their default are not in the key: adding a setting keeps every cached adapter
    assert "caption_form" not in base and training_spec(Settings(caption_form="adjective")) != base
    from b4m_core.config import ConfigError
    from b4m_core.micro.captioner import caption_images
    from b4m_core.models import load_base

    micro = load_base("micro")
    for bad in ({"prompt_form": "question"}, {"caption_form": "suffix"}):
        with pytest.raises(ConfigError, match="_form must be one of"):
            Settings(**bad).resolved(micro)
    with pytest.raises(ConfigError, match="sampler must be one of"):  # refused before any training
        Settings(sampler="plms")
    with pytest.raises(ValueError, match="style_form"):
        caption_images("style", [], style_form="suffix")
    # a break-stage adapter does not depend on the make stage's settings; a fused one does
    assert training_spec(Settings(make_steps=0), "break") == training_spec(Settings(), "break")
    assert training_spec(Settings(make_steps=0)) != base
    assert training_spec(Settings(make_augment=2), "break") == training_spec(Settings(), "break")
    assert training_spec(Settings(make_augment=2)) != base
    # the style adapters may cover fewer layers than the contents (nested sets compose)
    mixed = Settings(targets="attn+conv", style_targets="attn").resolved(micro)
    assert (mixed.plp("content").targets, mixed.plp("style").targets) == ("attn+conv", "attn")


def test_bootstrap_interval_covers_the_mean_and_narrows_with_data():
    from b4m_core.micro.quality import bootstrap, paired_difference

    rng = np.random.default_rng(0)
    small, large = rng.random((4, 2)), rng.random((64, 8))
    lo, hi = bootstrap(small)
    assert lo <= small.mean() <= hi
    lo2, hi2 = bootstrap(large)
    assert hi2 - lo2 < hi - lo
    assert bootstrap(np.full((5, 3), 0.25)) == (0.25, 0.25)
    d = paired_difference(large + 0.3, large)
    assert d["beyond_noise"] and abs(d["mean"] - 0.3) < 1e-9
    same = paired_difference(large, large)
    assert same["mean"] == 0.0 and not same["beyond_noise"]


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


def test_quality_bench_method_filter_refuses_unknown_rows(tmp_path, tiny_sd_path):
    from b4m_core.config import ConfigError
    from b4m_core.micro.quality import methods, run_quality

    with pytest.raises(ConfigError, match="no method matches"):
        run_quality(tmp_path / "q", only=["no such row"])
    assert not (tmp_path / "q").exists()  # refused before writing anything
    # `--base`: a micro-shaped folder (e.g. a pre-training run installed into a copy) is
    # scored like the shipped one; any other model is refused before anything trains
    import shutil

    from b4m_core.micro.model import MODEL_DIR
    from b4m_core.models import load_base

    copy = shutil.copytree(MODEL_DIR, tmp_path / "micro_copy")
    assert load_base(str(copy), device="cpu").arch == "micro"
    with pytest.raises(ConfigError, match="micro-shaped"):
        run_quality(tmp_path / "r", base=str(tiny_sd_path), only=["B4M"])
    from b4m_core.micro.quality import select_rows

    assert [m.name for m in select_rows(methods(16), ["b4m", "joint"])] == ["B4M", "Joint LoRA (DB+LoRA)"]
    assert len(select_rows(methods(16), ["rho"])) == 3
    names = [m.name for m in methods(16)]
    assert sum("w/o mcp" in n.lower() for n in names) == 1 and sum("rho" in n for n in names) == 3


def test_bootstrap_resamples_units_and_seeds():
    """Every resample draws whole units and whole seeds: one bad seed widens the interval."""
    from b4m_core.micro.quality import bootstrap

    cells = np.zeros((8, 3))
    cells[:, 2] = 1.0  # seed 2 scores 1 on every unit, the others 0
    lo, hi = bootstrap(cells)
    assert lo < 1 / 3 < hi and lo <= 0.01 and hi >= 0.65  # seed resampling alone moves it from 0 to 1


def test_single_prompts_name_a_known_other_concept():
    """An adapter alone is drawn on a prompt like the pre-training captions: a content in a
    known style, a style on a known shape (never the new concept bare)."""
    from b4m_core.micro.quality import single_prompt
    from b4m_core.micro.world import PRETRAIN_CONTENTS, PRETRAIN_STYLES

    for i in range(4):
        c = single_prompt("content", "large", "center", "white", i)
        s = single_prompt("style", "small", "top left", "blue", i)
        assert "{content}" in c and any(f" {k} style" in c for k in PRETRAIN_STYLES), c
        assert "{style}" in s and any(f" {k} in " in s for k in PRETRAIN_CONTENTS), s


def test_ddim_and_ddpm_on_micro_do_not_clip_its_latents():
    """Micro's scheduler config (DPM-Solver) does not name `clip_sample`, and DDIM's own
    default clips x0 to [-1, 1], which suits pixel models only: drawn that way the micro
    model gave washed-out specks (dev bench: prompt 0.29 against 0.82). Built from the
    model's config, both keep the latents unclipped and draw the subject on a flat field."""
    from b4m_core.generation import GenerationRequest, Generator
    from b4m_core.models import load_base

    gen = Generator(load_base("micro"))
    prompt = "a large circle in striped style on a blue background"
    default = np.asarray(gen.generate(GenerationRequest(prompt, seed=0, steps=20))[0], dtype=np.float32)
    for name in ("ddim", "ddpm"):
        assert gen.scheduler(name).config.clip_sample is False
    ddim = np.asarray(gen.generate(GenerationRequest(prompt, seed=0, steps=20, scheduler="ddim"))[0], dtype=np.float32)
    # clipped, the picture was a pale field (pixel std ~30 against ~70 for the model's own sampler)
    assert ddim.std() > 0.7 * default.std()
    assert abs(ddim.mean() - default.mean()) < 30
