import numpy as np
import pytest
import torch

from b4m_core.config import PLPConfig, TrainConfig
from b4m_core.injection import adapter_layers, remove_adapters
from b4m_core.layers import make_bases
from b4m_core.training import BreakStage, Hooks, TrainingCanceled, TrainingPaused, train_concept


@pytest.fixture
def clean(sd, sdxl):
    yield
    remove_adapters(sd.unet)
    remove_adapters(sdxl.unet)


def _grads(stage, weights_mask):
    """Gradients of one batch where only the rows with `weights_mask` count."""
    s = stage.session
    batch, weights, route = s.draw()
    for layer in stage.layers.values():
        layer.route = route
    loss = (s.row_losses(batch, route) * weights * weights_mask(route)).sum()
    loss.backward()
    out = {}
    for half in ("up", "down"):
        out[half] = (
            torch.stack(
                [
                    (l.half(half).grad if l.half(half).grad is not None else torch.zeros_like(l.half(half))).abs().sum()
                    for l in stage.layers.values()
                ]
            )
            .sum()
            .item()
        )
    for l in stage.layers.values():
        l.route = None
        l.B.grad = l.D.grad = None
        # the trainable halves start at zero, so move them to see gradients reach both
    return out


@pytest.mark.parametrize("kind", ["content", "style"])
@pytest.mark.parametrize("content_half", ["up", "down"])
def test_mcp_routes_each_loss_to_its_own_half(sd, concepts, clean, kind, content_half):
    content, style, aux_styles, aux_contents = concepts
    concept, aux = (content, aux_styles) if kind == "content" else (style, aux_contents)
    plp = PLPConfig(rank=4, content_half=content_half)
    stage = BreakStage(sd, concept, aux, plp, TrainConfig(steps=1))
    with torch.no_grad():  # non-zero halves so gradients can reach both B and D
        for l in stage.layers.values():
            l.B.normal_(0, 0.1)
            l.D.normal_(0, 0.1)
    primary = plp.half_for(kind)
    other = "down" if primary == "up" else "up"
    only_primary = _grads(stage, lambda route: route.float())
    only_aux = _grads(stage, lambda route: (~route).float())
    both = _grads(stage, lambda route: torch.ones_like(route, dtype=torch.float))
    remove_adapters(sd.unet)
    assert only_primary[primary] > 0 and only_primary[other] == 0.0
    assert only_aux[other] > 0 and only_aux[primary] == 0.0
    assert both[primary] > 0 and both[other] > 0


def test_training_moves_halves_and_keeps_bases(sd, concepts, clean):
    content, _, aux_styles, _ = concepts
    plp = PLPConfig(rank=4, basis_seed=5)
    seen = []
    adapter = train_concept(
        sd,
        content,
        aux=aux_styles[:2],
        plp=plp,
        cfg=TrainConfig(steps=3, learning_rate=1e-2),
        hooks=Hooks(progress=lambda s, t, l: seen.append((s, t, l))),
    )
    assert [s for s, _, _ in seen] == [1, 2, 3] and all(t == 3 for _, t, _ in seen)
    assert all(torch.isfinite(torch.tensor(l)) for _, _, l in seen)
    assert not adapter_layers(sd.unet)  # injection removed after training
    for name in adapter.layer_names:
        lin = sd.unet.get_submodule(name)
        a, c = make_bases(plp, name, lin.out_features, lin.in_features)
        assert torch.equal(adapter.tensors[f"{name}.A"], a)
        assert torch.equal(adapter.tensors[f"{name}.C"], c)
    assert sum(adapter.tensors[f"{n}.B"].abs().sum() for n in adapter.layer_names) > 0
    assert sum(adapter.tensors[f"{n}.D"].abs().sum() for n in adapter.layer_names) > 0
    assert adapter.kind == "content" and adapter.tokens == {"content": "sks"} and adapter.words == {"content": "dog"}


def test_k0_trains_only_the_concept_half(sdxl, concepts, clean):
    content, *_ = concepts
    adapter = train_concept(sdxl, content, aux=[], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=2))
    assert sum(adapter.tensors[f"{n}.B"].abs().sum() for n in adapter.layer_names) > 0
    assert all(adapter.tensors[f"{n}.D"].abs().sum() == 0 for n in adapter.layer_names)


def test_aux_lr_factor_slows_the_other_half(sd, concepts, clean):
    content, _, aux_styles, _ = concepts

    def d_norm(factor):
        a = train_concept(
            sd, content, aux=aux_styles[:1], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=2, aux_lr_factor=factor)
        )
        return sum(a.tensors[f"{n}.D"].abs().sum() for n in a.layer_names)

    assert d_norm(0.1) < 0.5 * d_norm(1.0)


def test_same_seed_same_adapter(sd, concepts, clean):
    content, _, aux_styles, _ = concepts
    run = lambda seed: train_concept(
        sd, content, aux=aux_styles[:1], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=2, seed=seed)
    )
    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert any(not torch.equal(a.tensors[k], c.tensors[k]) for k in a.tensors if k.endswith(".B"))


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_resume_matches_unbroken_run(request, concepts, clean, which):
    base = request.getfixturevalue(which)
    content, _, aux_styles, _ = concepts
    plp, cfg = PLPConfig(rank=4), TrainConfig(steps=6, seed=3, checkpoint_every=2)
    saved = {}
    unbroken = train_concept(
        base,
        content,
        aux=aux_styles[:2],
        plp=plp,
        cfg=cfg,
        hooks=Hooks(checkpoint=lambda step, state: saved.__setitem__(step, state)),
    )
    assert sorted(saved) == [2, 4]

    # interrupted at step 3 (after the step-2 checkpoint), resumed in a fresh stage
    stop_at = {"n": 0}

    def cancel():
        stop_at["n"] += 1
        return stop_at["n"] > 3

    with pytest.raises(TrainingCanceled):
        train_concept(base, content, aux=aux_styles[:2], plp=plp, cfg=cfg, hooks=Hooks(should_cancel=cancel))
    assert not adapter_layers(base.unet)
    resumed = train_concept(base, content, aux=aux_styles[:2], plp=plp, cfg=cfg, hooks=Hooks(resume=saved[2]))
    for k in unbroken.tensors:
        assert torch.allclose(unbroken.tensors[k], resumed.tensors[k], atol=1e-6), k


def test_gradient_checkpointing_gives_same_result(sd, concepts, clean):
    content, _, aux_styles, _ = concepts
    run = lambda gc: train_concept(
        sd, content, aux=aux_styles[:2], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=2, gradient_checkpointing=gc)
    )
    a, b = run(False), run(True)
    for k in a.tensors:
        assert torch.allclose(a.tensors[k], b.tensors[k], atol=1e-5), k


def test_cross_and_kv_targets_cover_only_cross_attention(sd, concepts, clean):
    content, *_ = concepts
    a = train_concept(sd, content, plp=PLPConfig(rank=4, targets="cross"), cfg=TrainConfig(steps=1))
    assert a.layer_names and all(".attn2." in n for n in a.layer_names)
    b = train_concept(sd, content, plp=PLPConfig(rank=4, targets="attn"), cfg=TrainConfig(steps=1))
    assert any(".attn1." in n for n in b.layer_names) and len(b.layer_names) == 2 * len(a.layer_names)
    # kv: the cross-attention's key and value projections, the layers that read only the text
    kv = train_concept(sd, content, plp=PLPConfig(rank=4, targets="kv"), cfg=TrainConfig(steps=1))
    assert sorted(kv.layer_names) == sorted(n for n in a.layer_names if n.endswith((".to_k", ".to_v")))
    assert len(kv.layer_names) == len(a.layer_names) // 2


def test_transformer_targets_add_the_feed_forward_layers_and_compose(sd, concepts, clean):
    """`transformer`: attention plus the feed-forward layers of every transformer block; the
    halves compose, fuse and generate like attention-only ones."""
    from b4m_core.generation import GenerationRequest, Generator
    from b4m_core.training import compose, fuse

    content, style, *_ = concepts
    plp = PLPConfig(rank=4, targets="transformer")
    c = train_concept(sd, content, plp=plp, cfg=TrainConfig(steps=1))
    s = train_concept(sd, style, plp=plp, cfg=TrainConfig(steps=1))
    ff = [n for n in c.layer_names if ".ff." in n]
    attn = [n for n in c.layer_names if ".ff." not in n]
    assert {n.rsplit(".ff.", 1)[1] for n in ff} == {"net.0.proj", "net.2"}
    assert len(ff) == len(attn) // 4  # two feed-forward layers per block, eight attention projections
    assert not any(n.endswith(".base") for n in c.layer_names)
    assert compose(c, s).layer_names == c.layer_names
    fused = fuse(sd, c, s, content, style, cfg=TrainConfig(steps=1))
    assert set(fused.layer_names) == set(c.layer_names)
    gen = Generator(sd)
    bare = np.asarray(gen.generate(GenerationRequest(prompt="a photo", steps=2))[0], dtype=float)
    for fuse_weights in (True, False):
        gen.set_adapter(fused, fuse=fuse_weights)
        drawn = np.asarray(gen.generate(GenerationRequest(prompt="a photo", steps=2))[0], dtype=float)
        assert np.abs(drawn - bare).max() > 0  # the feed-forward updates reach the picture


def test_conv_targets_add_every_resnet_convolution_and_train_both_halves_under_mcp(sd, concepts, clean):
    """`attn+conv`: attention and both convolutions of every ResNet block (LoCon's layers).
    With MCP rows routed, the content's own half and its auxiliary half both learn in the
    convolutions; content and style compose into their own blocks, with no interaction."""
    from diffusers.models.resnet import ResnetBlock2D

    from b4m_core.training import block_norms, compose

    content, style, aux_styles, _ = concepts
    plp = PLPConfig(rank=4, targets="attn+conv", basis_mode="principal")
    cfg = TrainConfig(steps=2, learning_rate=5e-2)
    c = train_concept(sd, content, aux=aux_styles, plp=plp, cfg=cfg)
    s = train_concept(sd, style, plp=plp, cfg=cfg)
    resnets = [n for n, m in sd.unet.named_modules() if isinstance(m, ResnetBlock2D)]
    convs = [n for n in c.layer_names if n.endswith((".conv1", ".conv2"))]
    assert sorted(convs) == sorted(f"{r}.{k}" for r in resnets for k in ("conv1", "conv2"))
    attn = train_concept(sd, content, plp=PLPConfig(rank=4), cfg=TrainConfig(steps=1))
    assert sorted(set(c.layer_names) - set(convs)) == sorted(attn.layer_names)
    # a 3x3 convolution's update is a matrix out x (in 3 3)
    name = convs[0]
    conv = sd.unet.get_submodule(name)
    assert c.tensors[f"{name}.D"].shape[1] + c.tensors[f"{name}.C"].shape[1] == conv.in_channels * 9
    half = c.plp.half_for("content")
    own, aux = ("B", "D") if half == "up" else ("D", "B")
    assert all(c.tensors[f"{n}.{own}"].abs().sum() > 0 for n in convs)
    assert sum(c.tensors[f"{n}.{aux}"].abs().sum() for n in convs) > 0  # MCP reached the aux half
    norms = block_norms(compose(c, s))
    assert norms["content"] > 0 and norms["style"] > 0 and norms["interaction"] == 0


def test_fineconv_targets_take_the_convolutions_of_the_full_resolution_blocks_only(sd):
    from b4m_core.injection import target_layer_names

    every = target_layer_names(sd.unet, "attn+conv")
    fine = target_layer_names(sd.unet, "attn+fineconv")
    attn = set(target_layer_names(sd.unet, "attn"))
    last_up = f"up_blocks.{len(sd.unet.up_blocks) - 1}."
    convs = [n for n in every if n not in attn]
    assert set(fine) - attn == {n for n in convs if n.startswith(("down_blocks.0.", last_up))}
    assert attn < set(fine) < set(every)


def test_aux_must_be_the_opposite_kind(sd, concepts, clean):
    content, _, _, aux_contents = concepts
    from b4m_core.config import ConfigError

    with pytest.raises(ConfigError, match="opposite kind"):
        BreakStage(sd, content, aux_contents, PLPConfig(rank=4), TrainConfig(steps=1))


def test_sd2_style_model_with_v_prediction(tmp_path, concepts):
    from b4m_core.generation import GenerationRequest, Generator
    from b4m_core.models import load_base
    from b4m_core.tiny import build_tiny_sd

    base = load_base(str(build_tiny_sd(tmp_path / "sd2", sd2_style=True)), device="cpu")
    assert base.pipe.scheduler.config.prediction_type == "v_prediction"
    content, style, aux_styles, aux_contents = concepts
    c = train_concept(base, content, aux=aux_styles[:1], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=2))
    s = train_concept(base, style, aux=aux_contents[:1], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=2))
    from b4m_core.training import fuse

    f = fuse(base, c, s, content, style, cfg=TrainConfig(steps=1))
    gen = Generator(base)
    gen.set_adapter(f)
    assert len(gen.generate(GenerationRequest("a {content} in {style} style", steps=2))) == 1


def test_released_routing_trains_both_halves_on_the_joint_loss(sd, concepts, clean):
    """`routing="released"`: the auxiliary rows' loss reaches the concept's own half too, as
    in the authors' code (its other half still trains at aux_lr_factor times the rate)."""
    content, _, aux_styles, _ = concepts
    plp = PLPConfig(rank=4)
    stage = BreakStage(sd, content, aux_styles, plp, TrainConfig(steps=1, routing="released"))
    assert stage.session.route_layers == []
    rates = sorted(g["lr"] for g in stage.session.optimizer.param_groups)
    assert rates == [pytest.approx(1e-4), pytest.approx(1e-3)]
    with torch.no_grad():
        for l in stage.layers.values():
            l.B.normal_(0, 0.1)
            l.D.normal_(0, 0.1)
    session = stage.session
    batch, weights, route = session.draw()
    (session.row_losses(batch, route) * weights * (~route).float()).sum().backward()  # the auxiliary rows alone
    grads = {h: sum(l.half(h).grad.abs().sum().item() for l in stage.layers.values()) for h in ("up", "down")}
    remove_adapters(sd.unet)
    assert grads["up"] > 0 and grads["down"] > 0  # strict routing gives the content half (up) 0 here


def test_a_paused_run_checkpoints_where_it_stopped_and_resumes_exactly(sd, concepts, clean):
    """`Hooks.should_pause` (a worker shutting down): the run saves its state at the current
    step, not the last periodic checkpoint, so resuming loses no step and ends bit-equal."""
    content, _, aux_styles, _ = concepts
    plp, cfg = PLPConfig(rank=4), TrainConfig(steps=6, seed=3, checkpoint_every=4)
    unbroken = train_concept(sd, content, aux=aux_styles[:2], plp=plp, cfg=cfg)
    saved, asked = {}, {"n": 0}

    def pause() -> bool:
        asked["n"] += 1
        return asked["n"] > 2  # asked after each step from the first: true after step 3

    with pytest.raises(TrainingPaused) as stopped:
        train_concept(
            sd,
            content,
            aux=aux_styles[:2],
            plp=plp,
            cfg=cfg,
            hooks=Hooks(should_pause=pause, checkpoint=lambda step, state: saved.__setitem__(step, state)),
        )
    assert stopped.value.step == 3 and sorted(saved) == [3]  # not the periodic step-4 one: it never came
    assert not adapter_layers(sd.unet)
    resumed = train_concept(sd, content, aux=aux_styles[:2], plp=plp, cfg=cfg, hooks=Hooks(resume=saved[3]))
    for k in unbroken.tensors:
        assert torch.allclose(unbroken.tensors[k], resumed.tensors[k], atol=1e-6), k


def test_images_are_read_upright_from_their_exif_orientation(tmp_path):
    """A phone photo stores its pixels sideways with an EXIF orientation tag; it trains as seen."""
    import numpy as np
    from PIL import Image

    from b4m_core.data import open_image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white: a 40x20 landscape as stored
    im = Image.fromarray(pixels)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    seen = open_image(tmp_path / "photo.jpg")
    assert seen.size == (20, 40)  # upright: portrait
    arr = np.asarray(seen, np.float32)
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # the white half is now on top


def test_timestep_bias_follows_diffusers_strategies():
    from b4m_core.config import ConfigError
    from b4m_core.training import timestep_weights

    assert timestep_weights(TrainConfig(), 1000) is None  # uniform
    w = timestep_weights(TrainConfig(timestep_bias_strategy="later", timestep_bias_multiplier=3.0), 1000)
    assert w[:750].eq(1).all() and w[750:].eq(3).all()  # the noisiest quarter weighted 3x
    w = timestep_weights(
        TrainConfig(timestep_bias_strategy="earlier", timestep_bias_multiplier=2.0, timestep_bias_portion=0.5), 1000
    )
    assert w[:500].eq(2).all() and w[500:].eq(1).all()
    w = timestep_weights(
        TrainConfig(timestep_bias_strategy="range", timestep_bias_begin=600, timestep_bias_end=900), 1000
    )
    assert w.nonzero().flatten().tolist() == list(range(600, 900))
    for bad in (
        {"timestep_bias_strategy": "sooner"},
        {"timestep_bias_multiplier": 0.0},
        {"timestep_bias_portion": 1.5},
        {"timestep_bias_begin": 900, "timestep_bias_end": 600},
    ):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


def test_min_snr_weighting_caps_the_clean_timesteps(sd, concepts, clean):
    """`snr_gamma` (diffusers' `--snr_gamma`): rows on noisy timesteps (SNR <= gamma) keep
    their loss, nearly clean ones get gamma / SNR (epsilon) or gamma / (SNR + 1) (v); a run
    with it trains differently from one without; the setting is checked."""
    from diffusers import DDPMScheduler

    from b4m_core.config import ConfigError
    from b4m_core.training import min_snr_weights

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    t = torch.tensor([0, 100, 500, 900, 999])
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    w = min_snr_weights(sched, t, 5.0)
    assert snr[0] > 5 and snr[-1] < 5  # the schedule spans both sides of gamma
    assert torch.allclose(w, torch.where(snr > 5, 5 / snr, torch.ones_like(snr)).float(), rtol=1e-4)
    assert w[0] < 0.01 and w[-1] == 1.0
    v = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    assert torch.allclose(min_snr_weights(v, t, 5.0), (snr.clamp(max=5) / (snr + 1)).float(), rtol=1e-4)
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match="snr_gamma"):
            TrainConfig(snr_gamma=bad)

    content, _, _, _ = concepts
    runs = [
        train_concept(sd, content, aux=[], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=2, learning_rate=1e-2, **kw))
        for kw in ({}, {"snr_gamma": 5.0})
    ]
    bs = [n for n in runs[0].tensors if n.endswith(".B")]
    assert any(not torch.equal(runs[0].tensors[n], runs[1].tensors[n]) for n in bs)


def test_lr_scheduler_follows_diffusers_and_resumes_at_its_step(sd, concepts, clean):
    """`lr_scheduler` / `lr_warmup_steps` (diffusers' names): each step's rate is the schedule's
    at that step for every parameter group; a run resumed from a checkpoint continues the
    schedule where it stopped (same adapter as unbroken); constant is the untouched path."""
    import math

    from b4m_core.config import ConfigError

    content, _, aux_styles, _ = concepts
    cfg = TrainConfig(steps=6, seed=3, learning_rate=1e-2, lr_scheduler="cosine", lr_warmup_steps=2)
    stage = BreakStage(sd, content, aux_styles[:1], PLPConfig(rank=4), cfg)
    base_rates = [g["initial_lr"] for g in stage.session.optimizer.param_groups]  # the rates asked
    seen = []
    for _ in range(cfg.steps):
        seen.append([g["lr"] for g in stage.session.optimizer.param_groups])
        stage.session.train_step()
    remove_adapters(sd.unet)
    want = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)]
    assert base_rates == pytest.approx([1e-2, 1e-3])  # the auxiliary half at its factor
    for rates, factor in zip(seen, want):
        assert rates == pytest.approx([factor * r for r in base_rates]), (rates, factor)
    assert BreakStage(sd, content, [], PLPConfig(rank=4), TrainConfig(steps=2)).session.lr_schedule is None
    remove_adapters(sd.unet)

    cfg = TrainConfig(steps=6, seed=3, lr_scheduler="linear", lr_warmup_steps=1, checkpoint_every=2)
    saved = {}
    unbroken = train_concept(
        sd, content, aux=[], plp=PLPConfig(rank=4), cfg=cfg, hooks=Hooks(checkpoint=lambda s, st: saved.update({s: st}))
    )
    resumed = train_concept(sd, content, aux=[], plp=PLPConfig(rank=4), cfg=cfg, hooks=Hooks(resume=saved[4]))
    for k in unbroken.tensors:
        assert torch.allclose(unbroken.tensors[k], resumed.tensors[k], atol=1e-6), k
    constant = train_concept(sd, content, aux=[], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=6, seed=3))
    assert any(not torch.equal(unbroken.tensors[k], constant.tensors[k]) for k in unbroken.tensors if k.endswith(".B"))
    for bad in ({"lr_scheduler": "step"}, {"lr_scheduler": "piecewise_constant"}, {"lr_warmup_steps": -1}):
        with pytest.raises(ConfigError, match="lr_"):
            TrainConfig(**bad)


def test_a_range_bias_trains_only_on_its_timesteps(sd, concepts, clean):
    """The steps draw their timesteps from the range, and the run stays repeatable."""
    from b4m_core.training import BreakStage

    content, _, _, _ = concepts
    cfg = TrainConfig(steps=3, timestep_bias_strategy="range", timestep_bias_begin=700, timestep_bias_end=710)
    stage = BreakStage(sd, content, [], PLPConfig(rank=4), cfg)
    seen = []
    add_noise = stage.session.scheduler.add_noise
    stage.session.scheduler.add_noise = lambda x, n, t: seen.extend(t.tolist()) or add_noise(x, n, t)
    stage.session.run()
    assert len(seen) == 3 and all(700 <= t < 710 for t in seen), seen


def test_prior_preservation_trains_on_the_base_models_own_class_images(sd, concepts, clean):
    """DreamBooth's prior: class images drawn by the bare base for the concept's captions with
    its class word (no identifier), trained through the concept's half beside its references."""
    from b4m_core.config import ConfigError
    from b4m_core.injection import inject_plp
    from b4m_core.training import prior_concept

    content, *_ = concepts
    cfg = TrainConfig(steps=2, learning_rate=1e-2, prior_preservation=True, prior_images=3, prior_loss_weight=0.5)
    prior = prior_concept(sd, content, cfg)
    assert prior.prompts() == ["a photo of dog"] * 3 and prior.token == ""  # no identifier in the prompt
    assert len(prior.images) == 3 and prior.images[0].size == (sd.resolution, sd.resolution)
    again = prior_concept(sd, content, cfg)  # deterministic for a seed
    assert all(list(a.getdata()) == list(b.getdata()) for a, b in zip(prior.images, again.images))
    stage = BreakStage(sd, content, [], PLPConfig(rank=4), cfg)
    groups = stage.session.groups
    assert groups[-1].samples.concept is stage.prior and groups[-1].weight == 0.5 and groups[-1].primary
    remove_adapters(sd.unet)
    with_prior = train_concept(sd, content, aux=[], plp=PLPConfig(rank=4), cfg=cfg)
    without = train_concept(sd, content, aux=[], plp=PLPConfig(rank=4), cfg=TrainConfig(steps=2, learning_rate=1e-2))
    bs = [n for n in with_prior.tensors if n.endswith(".B")]
    assert any(not torch.equal(with_prior.tensors[n], without.tensors[n]) for n in bs)
    assert all(with_prior.tensors[n.replace(".B", ".D")].abs().sum() == 0 for n in bs)  # k = 0: D untouched
    inject_plp(sd.unet, PLPConfig(rank=4))
    with pytest.raises(ConfigError, match="bare base model"):
        prior_concept(sd, content, cfg)
    remove_adapters(sd.unet)
    with pytest.raises(ConfigError, match="prior_images"):
        TrainConfig(prior_preservation=True, prior_images=0)


def test_architecture_defaults_choose_precision_and_checkpointing(sd, sdxl, concepts, clean):
    """SDXL's defaults turn on gradient checkpointing and "auto" mixed precision (which is fp32
    off CUDA); a model's own b4m_defaults.json wins over its architecture's (the tiny SDXL's
    rank 4, not SDXL's 64); SD 1 keeps checkpointing off. The adapter records how it trained."""
    from b4m_core.models import ARCH_DEFAULTS
    from b4m_core.training import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "no"
    assert resolve_precision("bf16", torch.device("cpu")) == "no"
    assert sdxl.recommended["mixed_precision"] == "auto" and sdxl.recommended["gradient_checkpointing"] is True
    assert sdxl.plp_config().rank == 4 and ARCH_DEFAULTS["sdxl"]["rank"] == 64
    cfg = sdxl.train_config("break", steps=2)
    assert cfg.gradient_checkpointing and cfg.mixed_precision == "auto"
    assert not sdxl.train_config("break", gradient_checkpointing=False).gradient_checkpointing  # a caller's wins
    assert not sd.train_config("make").gradient_checkpointing and sd.train_config("make").mixed_precision == "auto"
    content = concepts[0]
    adapter = train_concept(sdxl, content, aux=[], plp=sdxl.plp_config(), cfg=cfg)
    assert adapter.extra["training"] == {"precision": "no", "gradient_checkpointing": True}
    assert not sdxl.unet.is_gradient_checkpointing  # switched off again after the run


def test_a_model_without_class_words_names_concepts_by_identifier_alone(sd, concepts, clean, monkeypatch):
    from b4m_core.data import DEFAULT_TOKENS
    from b4m_core.generation import expand_prompt
    from b4m_core.training import fuse

    content, style, _, _ = concepts
    plp, cfg = PLPConfig(rank=4), TrainConfig(steps=1)
    ctok, stok = DEFAULT_TOKENS["content"], DEFAULT_TOKENS["style"]
    # the DreamBooth convention by default: the identifier and the class word
    assert sd.describe(content).prompts()[0].endswith(f"{ctok} dog")
    worded = train_concept(sd, content, plp=plp, cfg=cfg)
    assert worded.words == {"content": "dog"}
    assert expand_prompt("a {content}", worded) == f"a {ctok} dog"

    # a model whose grammar has no such word (micro: "shape" / "pattern" cost its known styles
    # 0.96 -> 0.54 probe accuracy) says so in its defaults; the user's word is still taken
    monkeypatch.setitem(sd.recommended, "phrase_with_word", False)
    assert sd.describe(content).prompts()[0].endswith(f" {ctok}") and "dog" not in sd.describe(content).prompts()[0]
    ca = train_concept(sd, content, plp=plp, cfg=cfg)
    sa = train_concept(sd, style, plp=plp, cfg=cfg)
    assert ca.words == {"content": ""} and sa.words == {"style": ""}
    fused = fuse(sd, ca, sa, content, style, cfg=cfg)
    assert expand_prompt("a {content} in {style} style", fused) == f"a {ctok} in {stok} style"
    # adapters trained with a word keep it wherever they go
    monkeypatch.setitem(sd.recommended, "phrase_with_word", True)
    mixed = fuse(sd, worded, sa, content, style, cfg=cfg)
    assert expand_prompt("a {content} in {style} style", mixed) == f"a {ctok} dog in {stok} style"
