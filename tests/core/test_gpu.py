"""The method on a CUDA device in mixed precision (skipped where there is none): break and
make stages train with finite losses, the fused adapter draws, and a reload matches."""

import math

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_break_make_generate_on_cuda(tiny_sd_path, concepts, precision):
    from b4m_core.adapter import Adapter
    from b4m_core.config import PLPConfig, TrainConfig
    from b4m_core.generation import GenerationRequest, Generator
    from b4m_core.models import load_base
    from b4m_core.training import Hooks, fuse, train_concept

    base = load_base(str(tiny_sd_path), device="cuda")
    content, style, aux_styles, aux_contents = concepts
    plp = PLPConfig(rank=4, alpha=4.0)
    losses = []
    cfg = TrainConfig(steps=4, mixed_precision=precision)
    c = train_concept(
        base,
        content,
        aux=aux_styles,
        plp=plp,
        cfg=cfg,
        hooks=Hooks(progress=lambda step, total, loss: losses.append(loss)),
    )
    s = train_concept(base, style, aux=aux_contents, plp=plp, cfg=cfg)
    fused = fuse(base, c, s, content, style, cfg=TrainConfig(steps=2, mixed_precision=precision))
    assert losses and all(math.isfinite(x) for x in losses)
    assert Adapter.from_bytes(fused.to_bytes()).metadata() == fused.metadata()
    gen = Generator(base)
    gen.set_adapter(fused, fuse=True)
    images = gen.generate(GenerationRequest("a {content} in {style} style", steps=2, num_images=1))
    assert images[0].size[0] > 0
