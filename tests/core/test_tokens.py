"""Pivotal tuning: identifier embeddings learnt with an adapter, carried into fusions and
drawn with, without touching the base model's tokenizer or embedding tables."""

import pytest
import torch

from b4m_core.config import ConfigError, PLPConfig, TrainConfig
from b4m_core.generation import Generator
from b4m_core.injection import remove_adapters
from b4m_core.tokens import IdentifierEmbeddings, _replace, piece_ids
from b4m_core.training import fuse, train_concept


@pytest.fixture
def clean(sd, sdxl):
    yield
    remove_adapters(sd.unet)
    remove_adapters(sdxl.unet)


def test_only_whole_runs_of_the_pieces_are_replaced():
    ids = torch.tensor([[1, 5, 6, 2, 5, 7, 5, 6]])
    embeds = torch.zeros(1, 8, 2)
    vecs = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    out = _replace(ids, embeds, torch.tensor([5, 6]), vecs)
    assert out[0, :, 0].tolist() == [0, 1, 2, 0, 0, 0, 1, 2]  # "5 7" is not the identifier


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_the_identifier_embedding_is_learnt_and_drawn_with(request, concepts, clean, which):
    base = request.getfixturevalue(which)
    content, style, _, _ = concepts
    table = base.pipe.text_encoder.get_input_embeddings().weight.clone()
    before = base.encode_prompts(["a photo of sks dog", "a photo of a dog"])[0]
    cfg = TrainConfig(steps=3, learning_rate=1e-2, train_token_embedding=True, token_learning_rate=0.5)
    adapter = train_concept(base, content, plp=PLPConfig(rank=4), cfg=cfg)

    n_encoders = 2 if which == "sdxl" else 1
    for i in range(n_encoders):
        vec = adapter.tensors[f"token.content.{i}"]
        tok = base.pipe.tokenizer if i == 0 else base.pipe.tokenizer_2
        assert vec.shape[0] == len(piece_ids(tok, "sks"))
    # trained, while the base model's own table and encoding stay as they were
    assert torch.equal(base.pipe.text_encoder.get_input_embeddings().weight, table)
    assert torch.equal(base.encode_prompts(["a photo of sks dog", "a photo of a dog"])[0], before)

    gen = Generator(base)
    gen.set_adapter(adapter)
    with_adapter = base.encode_prompts(["a photo of sks dog", "a photo of a dog"])[0]
    assert not torch.allclose(with_adapter[0], before[0])  # the identifier reads the learnt vector
    assert torch.equal(with_adapter[1], before[1])  # a prompt without it is untouched
    gen.set_adapter(None)
    assert torch.equal(base.encode_prompts(["a photo of sks dog"])[0], before[:1])


def test_learnt_identifiers_travel_into_the_fusion(sd, concepts, clean):
    content, style, _, _ = concepts
    plp = PLPConfig(rank=4)
    cfg = TrainConfig(steps=2, train_token_embedding=True, token_learning_rate=0.5)
    ca = train_concept(sd, content, plp=plp, cfg=cfg)
    sa = train_concept(sd, style, plp=plp, cfg=TrainConfig(steps=2))  # a style without one
    fused = fuse(sd, ca, sa, content, style, cfg=TrainConfig(steps=1))
    assert torch.equal(fused.tensors["token.content.0"], ca.tensors["token.content.0"])
    assert not any(k.startswith("token.style") for k in fused.tensors)
    assert fused.layer_names == ca.layer_names  # the token tensors are not layers
    # and the file round-trips them
    from b4m_core.adapter import Adapter

    again = Adapter.from_bytes(fused.to_bytes())
    assert torch.equal(again.tensors["token.content.0"], fused.tensors["token.content.0"])


def test_an_embedding_of_the_wrong_width_is_refused(sd):
    with pytest.raises(ConfigError, match="does not fit"):
        IdentifierEmbeddings(sd.pipe, {"sks": [torch.zeros(len(piece_ids(sd.pipe.tokenizer, "sks")), 3)]})


def test_a_stage_that_fails_to_start_leaves_the_base_model_as_it_was(sd, concepts, clean, monkeypatch):
    """A break or make stage whose setup fails after it put its layers and identifier hooks on
    the shared base (a worker keeps one loaded) takes them off again."""
    from b4m_core import training
    from b4m_core.injection import adapter_layers

    content, style, _, _ = concepts
    plp, cfg = PLPConfig(rank=4), TrainConfig(steps=1, train_token_embedding=True)
    ca, sa = train_concept(sd, content, plp=plp, cfg=cfg), train_concept(sd, style, plp=plp, cfg=cfg)
    before = sd.encode_prompts(["a photo of sks dog"])[0]

    def refuse(*args, **kwargs):
        raise RuntimeError("no room")

    monkeypatch.setattr(training, "TrainingSession", refuse)
    with pytest.raises(RuntimeError, match="no room"):
        train_concept(sd, content, plp=plp, cfg=cfg)
    with pytest.raises(RuntimeError, match="no room"):
        fuse(sd, ca, sa, content, style, cfg=TrainConfig(steps=1))
    assert not adapter_layers(sd.unet)
    assert not sd.pipe.text_encoder.get_input_embeddings()._forward_hooks
    assert torch.equal(sd.encode_prompts(["a photo of sks dog"])[0], before)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_learnt_identifiers_export_as_textual_inversion_files_diffusers_loads(
    request, tmp_path, concepts, clean, which
):
    """Exports carry the learnt identifier embeddings as textual-inversion files named by the
    token; a plain diffusers pipeline that loads them (as the model card says) encodes the
    trigger prompt as b4m's Generator does."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from b4m_core.formats import write_export

    base, path = request.getfixturevalue(which), request.getfixturevalue(f"tiny_{which}_path")
    cfg = TrainConfig(steps=2, train_token_embedding=True, token_learning_rate=0.5)
    adapter = train_concept(base, concepts[0], plp=PLPConfig(rank=4), cfg=cfg)
    written = write_export(adapter.to_bytes(), "diffusers", tmp_path / "lora")
    assert [p.name for p in written] == ["pytorch_lora_weights.safetensors", "sks.safetensors", "README.md"]
    assert "load_textual_inversion" in written[-1].read_text()
    kohya = write_export(adapter.to_bytes(), "kohya", tmp_path / "k.safetensors", "fp16")
    assert [str(p.relative_to(tmp_path)) for p in kohya] == ["k.safetensors", "k_embeddings/sks.safetensors"]

    prompt = ["a photo of sks dog"]
    gen = Generator(base)
    gen.set_adapter(adapter, fuse=False)
    ours = base.encode_prompts(prompt)[0]
    gen.set_adapter(None)
    plain = base.encode_prompts(prompt)[0]

    pipe = DiffusionPipeline.from_pretrained(str(path))
    state = load_file(str(tmp_path / "lora" / "sks.safetensors"))
    if which == "sdxl":
        pipe.load_textual_inversion(
            state["clip_l"], token="sks", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token="sks", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        theirs = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    else:
        pipe.load_textual_inversion(state["emb_params"], token="sks")
        theirs = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    assert not torch.allclose(ours, plain, atol=1e-4)  # the learnt vectors matter
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
