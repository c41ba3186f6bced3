import dataclasses
import subprocess
import sys

import pytest
import torch

from b4m_core.adapter import Adapter
from b4m_core.config import PLPConfig, TrainConfig
from b4m_core.training import IncompatibleAdapters, compose, fuse, train_concept

from ..helpers.images import write_images


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "b4m_core", *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.slow
@pytest.mark.parametrize("content_half", ["up", "down"])
def test_separate_processes_share_bases_and_compose_exactly(tmp_path, tiny_sd_path, content_half):
    cdir, sdir = write_images(tmp_path / "c", 0, 3), write_images(tmp_path / "s", 1, 2)
    common = ["--base", tiny_sd_path, "--steps", 2, "--rank", 4, "--basis-seed", 11, "--content-half", content_half]
    _cli("train", "content", "--images", cdir, "--class-word", "dog", "--out", tmp_path / "c.safetensors", *common)
    _cli("train", "style", "--images", sdir, "--style-word", "ink", "--out", tmp_path / "s.safetensors", *common)
    c, s = Adapter.load(tmp_path / "c.safetensors"), Adapter.load(tmp_path / "s.safetensors")
    fused = compose(c, s)
    content_part, style_part = ("B", "D") if content_half == "up" else ("D", "B")
    for name in c.layer_names:
        for part in ("A", "C"):
            assert torch.equal(c.tensors[f"{name}.{part}"], s.tensors[f"{name}.{part}"])
        assert torch.equal(fused.tensors[f"{name}.{content_part}"], c.tensors[f"{name}.{content_part}"])
        assert torch.equal(fused.tensors[f"{name}.{style_part}"], s.tensors[f"{name}.{style_part}"])
        # the four blocks of dW (DESIGN.md section 1)
        up, down, scale = fused.low_rank()[name]
        dw = scale * up @ down
        A, B, C, D = (fused.tensors[f"{name}.{p}"] for p in "ABCD")
        dm, dn = A.shape[0], C.shape[1]
        assert dw[:dm, :dn].abs().max() < 1e-6
        assert torch.allclose(dw[:dm, dn:], scale * A @ D, atol=1e-6)
        assert torch.allclose(dw[dm:, :dn], scale * B @ C, atol=1e-6)
        assert torch.allclose(dw[dm:, dn:], scale * B @ D, atol=1e-6)
    assert fused.kind == "fused" and fused.tokens == {"content": "sks", "style": "zwx"}
    assert fused.words == {"content": "dog", "style": "ink"}
    # the block norms it records, summed over layers: the same blocks as above
    blocks = fused.extra["blocks_composed"]
    for block, (x, y) in {"content": "BC", "style": "AD", "interaction": "BD"}.items():
        if content_half == "down" and block != "interaction":
            x, y = {"BC": "AD", "AD": "BC"}[x + y]
        want = sum(
            float(torch.linalg.matrix_norm(fused.tensors[f"{n}.{x}"] @ fused.tensors[f"{n}.{y}"])) * fused.plp.scale
            for n in c.layer_names
        )
        assert blocks[block] == pytest.approx(want, rel=1e-4) and blocks[block] > 0
    # the content's learnt half came from the content adapter and is non-zero
    assert sum(c.tensors[f"{n}.{content_part}"].abs().sum() for n in c.layer_names) > 0


@pytest.fixture(scope="module")
def pair(sd):
    from b4m_core.data import Concept

    from ..helpers.images import random_images

    content = Concept("content", random_images(0, 3), "dog")
    style = Concept("style", random_images(1, 2), "ink")
    plp = PLPConfig(rank=4)
    c = train_concept(sd, content, plp=plp, cfg=TrainConfig(steps=1))
    s = train_concept(sd, style, plp=plp, cfg=TrainConfig(steps=1))
    return c, s, content, style


def _with(adapter, **plp_changes):
    return dataclasses.replace(adapter, plp=dataclasses.replace(adapter.plp, **plp_changes))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"basis_seed": 9}, "basis seed"),
        ({"basis_mode": "random"}, "basis mode"),
        ({"rank": 8}, "rank"),
        ({"rho": 0.25}, "rho"),
        ({"content_half": "down"}, "content_half"),
    ],
)
def test_every_mismatch_is_refused(pair, change, message):
    c, s, *_ = pair
    with pytest.raises(IncompatibleAdapters, match=message):
        compose(c, _with(s, **change))


def test_nested_target_sets_compose_over_the_larger_one(pair, sd):
    """A content on attention + convolutions and a style on attention compose: the fused
    adapter covers the convolutions with the style half zero there (its attention layers as
    the style made them), the make stage trains it; sets neither of which contains the other
    are refused before any tensor is read."""
    from b4m_core.config import plp_mismatch

    c_attn, s, content, style = pair
    plp = dataclasses.replace(c_attn.plp, targets="attn+conv")
    c = train_concept(sd, content, plp=plp, cfg=TrainConfig(steps=1, learning_rate=1e-2))
    convs = sorted(set(c.layer_names) - set(s.layer_names))
    assert convs and all(n.endswith((".conv1", ".conv2")) for n in convs)
    style_part = "D" if plp.content_half == "up" else "B"
    bare = compose(c, s)
    assert bare.plp.targets == "attn+conv" and sorted(bare.layer_names) == sorted(c.layer_names)
    assert all(not bare.tensors[f"{n}.{style_part}"].any() for n in convs)
    assert all(torch.equal(bare.tensors[f"{n}.{style_part}"], s.tensors[f"{n}.{style_part}"]) for n in s.layer_names)
    tuned = fuse(sd, c, s, content, style, cfg=TrainConfig(steps=2, learning_rate=1e-2))
    assert any(tuned.tensors[f"{n}.{style_part}"].any() for n in convs)
    # the API checks the same from the adapters' metadata, without torch
    assert plp_mismatch(c.plp.to_dict(), s.plp.to_dict()) is None
    assert "neither of which" in plp_mismatch({"targets": "transformer"}, {"targets": "attn+fineconv"})
    with pytest.raises(IncompatibleAdapters, match="neither of which contains"):
        compose(_with(c, targets="transformer"), _with(s, targets="attn+conv"))


def test_other_base_model_and_same_kind_are_refused(pair, sd):
    c, s, content, style = pair
    with pytest.raises(IncompatibleAdapters, match="different base models"):
        compose(c, dataclasses.replace(s, base_model_hash="0" * 16, base_model="other"))
    with pytest.raises(IncompatibleAdapters, match="both adapters are content"):
        compose(c, c)
    with pytest.raises(IncompatibleAdapters, match="both adapters are style"):
        compose(s, s)
    with pytest.raises(IncompatibleAdapters, match="expected a content and a style"):
        compose(s, c)
    other = dataclasses.replace(c, base_model_hash="f" * 16)
    other_s = dataclasses.replace(s, base_model_hash="f" * 16)
    with pytest.raises(IncompatibleAdapters, match="not on the loaded base"):
        fuse(sd, other, other_s, content, style, cfg=TrainConfig(steps=1))


def test_steps_zero_is_the_bare_composition_and_steps_move_both_halves(pair, sd):
    c, s, content, style = pair
    bare = fuse(sd, c, s, content, style, cfg=TrainConfig(steps=0))
    ref = compose(c, s)
    assert all(torch.equal(bare.tensors[k], ref.tensors[k]) for k in ref.tensors)
    tuned = fuse(sd, c, s, content, style, cfg=TrainConfig(steps=2, learning_rate=1e-2))
    assert tuned.steps == 2 and tuned.kind == "fused"
    for part in ("B", "D"):
        assert any(not torch.equal(tuned.tensors[f"{n}.{part}"], ref.tensors[f"{n}.{part}"]) for n in c.layer_names)
    for part in ("A", "C"):
        assert all(torch.equal(tuned.tensors[f"{n}.{part}"], ref.tensors[f"{n}.{part}"]) for n in c.layer_names)


def test_baselines_share_the_call_shape(sd, pair):
    _, _, content, style = pair
    plp = PLPConfig(rank=4)
    lc = train_concept(sd, content, method="lora", plp=plp, cfg=TrainConfig(steps=1))
    ls = train_concept(sd, style, method="lora", plp=plp, cfg=TrainConfig(steps=1))
    merged = fuse(sd, lc, ls, content, style, method="merge")
    # direct merge is exactly dW_content + dW_style
    for name in lc.layer_names:
        u, d, sc = merged.low_rank()[name]
        expect = sum(x[2] * x[0] @ x[1] for x in (lc.low_rank()[name], ls.low_rank()[name]))
        assert torch.allclose(sc * u @ d, expect, atol=1e-6)
    zl = fuse(sd, lc, ls, content, style, method="ziplora", cfg=TrainConfig(steps=2, learning_rate=1e-2))
    assert zl.method == "ziplora" and zl.rank == 8
    joint = fuse(sd, lc, ls, content, style, method="joint", cfg=TrainConfig(steps=2))
    assert joint.method == "joint" and joint.tokens == {"content": "sks", "style": "zwx"}
    for a in (merged, zl, joint):
        again = Adapter.from_bytes(a.to_bytes())
        assert again.method == a.method and again.kind == "fused"


def test_principal_halves_compose_with_no_interaction_block(sd):
    """With `principal` bases (disjoint latent coordinates, the interaction coordinates of B and
    D never trained) a content and a style trained with MCP compose into their two blocks
    alone, before and after the make stage: B D is exactly zero. `exact` bases leave an
    interaction block no stage trained."""
    from b4m_core.data import Concept
    from b4m_core.training import block_norms

    from ..helpers.images import random_images

    content = Concept("content", random_images(0, 3), "dog")
    style = Concept("style", random_images(1, 2), "ink")
    cfg = TrainConfig(steps=3, learning_rate=1e-2)
    norms = {}
    for mode in ("principal", "exact"):
        plp = PLPConfig(rank=4, basis_mode=mode)
        # MCP: each break stage also trains its other half on an auxiliary set of the other kind
        c = train_concept(sd, content, aux=[style], plp=plp, cfg=cfg)
        s = train_concept(sd, style, aux=[content], plp=plp, cfg=cfg)
        norms[mode] = block_norms(compose(c, s))
        if mode == "principal":  # and after a make stage that trains both halves together
            norms["made"] = block_norms(fuse(sd, c, s, content, style, cfg=TrainConfig(steps=2, learning_rate=1e-2)))
    for key in ("principal", "made"):
        assert norms[key]["content"] > 0 and norms[key]["style"] > 0
        assert norms[key]["interaction"] == 0.0
    assert norms["exact"]["interaction"] > 1e-3 * norms["exact"]["content"]


@pytest.mark.parametrize("routing", ["joint", "split"])
def test_split_make_routing_sends_each_reference_set_to_its_own_half(pair, sd, routing):
    """`make_routing="split"`: the content references' loss moves only the content half (B
    with content_half up) and the style references' only the style half (D); "joint" (the
    paper) moves both halves with either set."""
    from b4m_core.training import MakeStage

    c, s, content, style = pair
    moved = {}
    for only in ("content", "style"):
        stage = MakeStage(sd, c, s, content, style, TrainConfig(steps=1, learning_rate=1e-2, make_routing=routing))
        try:
            stage.session.groups[1 if only == "content" else 0].weight = 0.0  # rows of the other set count nothing
            before = {(n, p): getattr(layer, p).detach().clone() for n, layer in stage.layers.items() for p in "BD"}
            stage.session.train_step()
            moved[only] = {
                p: any(not torch.equal(getattr(layer, p), before[(n, p)]) for n, layer in stage.layers.items())
                for p in "BD"
            }
        finally:
            stage._release()
    if routing == "split":
        assert moved == {"content": {"B": True, "D": False}, "style": {"B": False, "D": True}}
    else:
        assert moved == {"content": {"B": True, "D": True}, "style": {"B": True, "D": True}}


def test_random_flip_draws_each_reference_and_its_mirror(sd):
    from b4m_core.data import Concept
    from b4m_core.training import SampleSet

    from ..helpers.images import random_images

    concept = Concept("content", random_images(0, 2), "dog")
    samples = SampleSet(sd, concept, 32, True, flip=True)
    assert len(samples) == 2 and samples.mean.shape[0] == 4  # the mirrors encoded once, beside the images
    assert not torch.equal(samples.mean[0], samples.mean[2])
    samples.std.zero_()  # no sampling noise: each draw is one of the two encodings exactly
    gen = torch.Generator().manual_seed(0)
    drawn = samples.draw(torch.zeros(32, dtype=torch.long), gen)["latents"]
    expect = [(samples.mean[i] - samples.shift) * samples.scaling for i in (0, 2)]
    hits = [sum(torch.equal(row, e) for row in drawn) for e in expect]
    assert sum(hits) == 32 and min(hits) > 0
    assert len(SampleSet(sd, concept, 32, True)) == 2  # no flip: the images alone


def test_augment_adds_zoomed_out_moved_copies_captioned_by_the_captioner(sd):
    """`augment`: copies of each reference shrunk into the frame on its border colour, the
    reference's caption kept (None stays None, for the captioner); seeded; training takes them."""
    import numpy as np
    from PIL import Image

    from b4m_core.config import ConfigError, TrainConfig
    from b4m_core.data import Concept, augmented
    from b4m_core.training import train_concept

    red = Image.new("RGB", (32, 32), (10, 20, 200))
    red.paste(Image.new("RGB", (16, 16), (250, 0, 0)), (8, 8))  # a red square, centred, on blue
    concept = Concept("content", [red, red.copy()], "dog", captions=["a {content} on blue", None])
    out = augmented(concept, 3, min_scale=0.5, seed=1)
    assert (
        len(out.images) == 8
        and out.captions == ["a {content} on blue", None] + ["a {content} on blue"] * 3 + [None] * 3
    )
    assert all(im.size == (32, 32) for im in out.images)
    for copy in out.images[2:]:
        arr = np.asarray(copy).astype(int)
        assert (np.abs(arr[0, 0] - [10, 20, 200]) <= 2).all()  # filled with the border colour
        red_px = (arr[..., 0] > 150).sum()
        assert 0 < red_px < 16 * 16  # the square, smaller
    same = augmented(concept, 3, min_scale=0.5, seed=1)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out.images, same.images))
    assert augmented(concept, 0) is concept
    with pytest.raises(ConfigError, match="augment"):
        TrainConfig(augment=-1)
    with pytest.raises(ConfigError, match="augment"):
        TrainConfig(augment_min_scale=0)
    plain, more = (train_concept(sd, concept, cfg=TrainConfig(steps=2, augment=n)) for n in (0, 2))
    assert any(not torch.equal(plain.tensors[k], more.tensors[k]) for k in plain.tensors)  # the copies trained


def test_fp16_adapter_files_are_half_the_size_and_still_compose(tmp_path, pair, sd):
    """An adapter stored in fp16 is about half the bytes, loads as fp32 within fp16's rounding,
    and composes with an fp32 adapter trained on the same bases (the bases compare at the
    file's precision); adapters on other bases are still refused."""
    from b4m_core import formats
    from b4m_core.config import ConfigError

    c, s, content, style = pair
    full, half = c.to_bytes(), c.to_bytes("fp16")
    assert formats.stored_dtype(full) == "fp32" and formats.stored_dtype(half) == "fp16"
    saved = sum(v.numel() * 2 for v in c.tensors.values())  # 2 of each tensor element's 4 bytes
    assert abs((len(full) - len(half)) - saved) < 256  # the headers differ only in offsets' digits
    back = Adapter.from_bytes(half)
    assert back.metadata() == Adapter.from_bytes(full).metadata()
    for k, v in c.tensors.items():
        assert back.tensors[k].dtype == torch.float32
        assert torch.allclose(back.tensors[k], v, rtol=2**-10, atol=1e-7), k
    made = fuse(sd, back, s, content, style, cfg=TrainConfig(steps=1))  # fp16 content, fp32 style
    assert made.kind == "fused"
    assert formats.stored_dtype(formats.convert(half, "b4m", "fp32")) == "fp32"  # served as asked
    assert formats.convert(half, "b4m", "fp16") == half
    path = back.save(tmp_path / "c16.safetensors", "fp16")
    assert formats.stored_dtype(path.read_bytes()) == "fp16"
    with pytest.raises(IncompatibleAdapters, match="frozen bases differ"):
        other = dataclasses.replace(s, tensors={k: v.clone() for k, v in s.tensors.items()})
        first = next(k for k in other.tensors if k.endswith(".A"))
        other.tensors[first] = torch.randn_like(other.tensors[first])
        compose(back, other)
    with pytest.raises(ConfigError, match="adapter dtype"):
        c.to_bytes("bf16")


def test_loss_mask_weighs_the_loss_to_the_subject(sd):
    """`loss_mask`: the references of the kinds named get per-pixel loss weights at latent
    size (1 on the subject found against the border colour, `loss_mask_background` elsewhere,
    mirrored with the image); an error where the weight is 0 costs nothing; unmasked sets in
    the same batch weigh every pixel alike; the unmasked path is the plain mean."""
    from PIL import Image

    from b4m_core.config import ConfigError, TrainConfig
    from b4m_core.data import Concept, loss_weights
    from b4m_core.training import RowGroup, TrainingSession, _samples, train_concept

    from ..helpers.images import random_images

    # a red square in the left half of a blue frame
    image = Image.new("RGB", (32, 32), (10, 20, 200))
    image.paste(Image.new("RGB", (12, 12), (250, 0, 0)), (2, 10))
    w = loss_weights(image, (8, 8), 0.25)
    assert w.shape == (1, 8, 8)
    assert w[0, 4, 1] == 1.0 and w[0, 0, 7] == 0.25 and w[0, 4, 6] == 0.25

    style = Concept("style", [image, image.copy()], "ink")
    content = Concept("content", random_images(0, 2), "dog")
    cfg = TrainConfig(steps=1, loss_mask="style", loss_mask_background=0.0, random_flip=True)
    masked, plain = _samples(sd, style, 32, cfg), _samples(sd, content, 32, cfg)
    assert plain.loss_weights is None and masked.loss_weights.shape[0] == 4  # the mirrors too
    assert torch.equal(masked.loss_weights[2], masked.loss_weights[0].flip(-1))
    assert masked.loss_weights.shape[-2:] == masked.mean.shape[-2:]

    def session(target_fn=None):
        knob = torch.nn.Parameter(torch.zeros(1))
        groups = [RowGroup(plain, 1, 1.0), RowGroup(masked, 2, 1.0, False)]
        return TrainingSession(sd, [{"params": [knob]}], groups, cfg, target_fn=target_fn)

    def off_by_100_on_the_background(batch, noisy, t, noise):
        with torch.no_grad():
            pred = run.predict(batch, noisy, t)
        return pred + 100.0 * background

    run = session(off_by_100_on_the_background)
    batch, _, route = run.draw()
    weights = batch["loss_weights"]
    background = (weights == 0).float()
    assert torch.equal(weights[0], torch.ones_like(weights[0]))  # the content row: every pixel
    assert background[1:].any() and (weights[1:] == 1).any()
    assert run.row_losses(batch, route).abs().max() < 1e-6  # an error on the background is free
    unweighted = run.row_losses(dict(batch, loss_weights=torch.ones_like(weights)), route)
    assert unweighted[0] < 1e-6 and unweighted[1:].min() > 1000  # ... and costs where it is weighed

    bare = TrainingSession(sd, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], [RowGroup(plain, 1, 1.0)], cfg)
    assert "loss_weights" not in bare.draw()[0]

    for bad in ({"loss_mask": "shape"}, {"loss_mask_background": 1.5}):
        with pytest.raises(ConfigError, match="loss_mask"):
            TrainConfig(**bad)
    a, b = (train_concept(sd, style, cfg=TrainConfig(steps=2, loss_mask=m)) for m in ("none", "style"))
    assert any(not torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
