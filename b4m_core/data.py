"""Reference images, identifier tokens and prompt templates.

A `Concept` is what the user hands over: a few images of one content (with its class
word) or one style (with its style word), and the identifier token that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ConfigError
from .files import image_files

DEFAULT_TOKENS = {"content": "sks", "style": "zwx"}
# {content} / {style} expand to "<token> <word>"; a sidecar caption may use them too.
DEFAULT_TEMPLATES = {"content": "a photo of {content}", "style": "a picture in {style} style"}


def concept_phrase(token: str, word: str) -> str:
    return f"{token} {word}".strip()


@dataclass
class Concept:
    """Reference images of one content or one style."""

    kind: str  # "content" | "style"
    images: list[Image.Image]
    word: str  # class word ("dog") or style word ("watercolor")
    token: str | None = None  # None: the default identifier; "" : none (a concept the model knows)
    captions: list[str | None] = field(default_factory=list)
    template: str = ""
    # whether prompts name the concept with its word after the identifier ("sks dog", the
    # DreamBooth convention) or with the identifier alone: a base model's choice
    # (`phrase_with_word` in b4m_defaults.json), for models whose grammar has no such word
    with_word: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("content", "style"):
            raise ConfigError(f"concept kind must be content or style, got {self.kind!r}")
        if not self.images:
            raise ConfigError(f"no images given for the {self.kind}")
        if not self.word or not self.word.strip():
            raise ConfigError(f"a {self.kind} needs a {'class' if self.kind == 'content' else 'style'} word")
        if self.token is None:
            self.token = DEFAULT_TOKENS[self.kind]
        self.template = self.template or DEFAULT_TEMPLATES[self.kind]
        if not self.captions:
            self.captions = [None] * len(self.images)
        if len(self.captions) != len(self.images):
            raise ConfigError("one caption per image (or none)")

    @property
    def phrase(self) -> str:
        return concept_phrase(self.token, self.phrase_word)

    @property
    def phrase_word(self) -> str:
        """The word that follows the identifier in prompts ("" when the identifier stands alone);
        an adapter records it, so that prompts expand the way it trained."""
        return self.word if self.with_word else ""

    def texts(self) -> list[str]:
        """One training text per image with `{content}` / `{style}` where the concept goes: the
        caption if given (a known concept's full caption, token "", as given), else the template."""
        slot, out = "{" + self.kind + "}", []
        for cap in self.captions:
            text = cap or self.template
            if slot not in text and not (cap and not self.token):
                text = f"{self.template}, {text}"
            out.append(text)
        return out

    def prompts(self) -> list[str]:
        """One training prompt per image: `texts()` with the concept's phrase in its place."""
        return [t.replace("{" + self.kind + "}", self.phrase) for t in self.texts()]


def load_image_folder(paths: str | Path | list, max_images: int = 100) -> tuple[list[Image.Image], list[str | None]]:
    """Images of a folder (sorted by name), or of image files and folders, with optional
    same-stem `.txt` captions."""
    files = image_files(paths)
    images, captions = [], []
    for p in files:
        images.append(open_image(p))
        cap = p.with_suffix(".txt")
        captions.append(cap.read_text().strip() if cap.is_file() else None)
    if len(images) > max_images:
        raise ConfigError(f"{len(images)} images in {paths}; at most {max_images}")
    return images, captions


def open_image(path_or_file) -> Image.Image:
    try:
        with Image.open(path_or_file) as im:
            im.load()
            # a phone photo stores its pixels sideways with an EXIF orientation: train it upright
            return ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ConfigError(f"cannot read image {getattr(path_or_file, 'name', path_or_file)}: {exc}") from exc


def load_concept(
    kind: str, folder: str | Path | list, word: str, token: str | None = None, template: str = ""
) -> Concept:
    images, captions = load_image_folder(folder)
    return Concept(kind=kind, images=images, word=word, token=token, captions=captions, template=template)


def zoomed_out(image: Image.Image, scale: float, cx: float, cy: float) -> Image.Image:
    """`image` shrunk by `scale` and placed with its centre at (`cx`, `cy`) (fractions of the
    free room: 0 left/top, 1 right/bottom), on a canvas of its own size filled with its border
    colour (the median of its outermost pixels: the background, for a centred subject)."""
    fill = tuple(int(v) for v in _border_colour(np.asarray(image.convert("RGB"))))
    w, h = image.size
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = image.convert("RGB").resize((sw, sh), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (w, h), fill)
    canvas.paste(small, (round(cx * (w - sw)), round(cy * (h - sh))))
    return canvas


def augmented(concept: Concept, copies: int, min_scale: float = 0.5, seed: int = 0) -> Concept:
    """The references and `copies` zoomed-out, moved copies of each (DreamBooth trainers'
    scale augmentation): references that all show a large, centred subject teach an adapter
    "large and centred" along with the concept, and a prompt asking for it small in a corner
    then loses. A copy keeps its reference's caption; uncaptioned copies are described by the
    model's captioner like any image (which then reads their new size and place)."""
    if copies <= 0:
        return concept
    rng = np.random.default_rng([seed, 0xA6])
    images, captions = list(concept.images), list(concept.captions)
    for image, caption in zip(concept.images, concept.captions):
        for _ in range(copies):
            scale = float(rng.uniform(min_scale, 1.0))
            images.append(zoomed_out(image, scale, float(rng.uniform()), float(rng.uniform())))
            captions.append(caption)
    return replace(concept, images=images, captions=captions)


def _border_colour(arr: np.ndarray) -> np.ndarray:
    ring = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return np.median(ring, axis=0)


def foreground_mask(image: Image.Image, threshold: float = 40.0) -> np.ndarray:
    """Where the subject is (H x W, 0 or 1): pixels away from the border colour (the
    background, for a subject on a plain ground), closed and with its small holes filled, so
    a pattern whose colours meet the background's still counts as the subject (a large hole,
    such as a ring's, stays background)."""
    from scipy import ndimage

    arr = np.asarray(image.convert("RGB"), np.float32)
    far = np.abs(arr - _border_colour(arr)).max(axis=2) > threshold
    mask = ndimage.binary_closing(far, iterations=2, border_value=0) | far
    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if n:
        sizes = ndimage.sum(np.ones_like(holes), holes, index=np.arange(1, n + 1))
        mask |= np.isin(holes, 1 + np.flatnonzero(sizes <= max(8, mask.sum() // 20)))
    return mask.astype(np.float32)


def loss_weights(image: Image.Image, size: tuple[int, int], background: float) -> torch.Tensor:
    """Per-pixel loss weights at latent `size` (1 x h x w): 1 on the subject, `background` on
    the rest, each latent pixel the mean over the image pixels it covers."""
    mask = torch.from_numpy(foreground_mask(image))[None, None]
    cover = torch.nn.functional.adaptive_avg_pool2d(mask, size)[0]
    return background + (1.0 - background) * cover


def texture_field(image: Image.Image) -> np.ndarray:
    """The subject's surface spread over the whole frame (H x W x 3): the largest square
    inside its mask, mirrored outwards (no seams, the pattern at its own scale)."""
    from scipy import ndimage

    arr = np.asarray(image.convert("RGB"), np.float32)
    mask = foreground_mask(image) > 0.5
    if not mask.any():
        return arr
    depth = ndimage.distance_transform_cdt(mask, metric="chessboard")
    cy, cx = np.unravel_index(int(depth.argmax()), depth.shape)
    half = max(int(depth.max()) - 1, 1)
    patch = arr[max(cy - half, 0) : cy + half + 1, max(cx - half, 0) : cx + half + 1]
    h, w = arr.shape[:2]
    reps = (-(-h // patch.shape[0]) + 1, -(-w // patch.shape[1]) + 1)
    tiled = np.pad(patch, ((0, patch.shape[0] * reps[0]), (0, patch.shape[1] * reps[1]), (0, 0)), mode="symmetric")
    return tiled[:h, :w]


def surface(image: Image.Image) -> np.ndarray:
    """A style reference's surface over the whole frame: its own pixels where its subject is,
    mirrored outwards elsewhere (texture_field)."""
    own = foreground_mask(image)[..., None]
    return own * np.asarray(image.convert("RGB"), np.float32) + (1 - own) * texture_field(image)


def synthesized_pairs(content: Concept, style: Concept, copies: int, seed: int = 0) -> list[Image.Image]:
    """Pictures of the content in the style made from the references alone: each content
    reference's subject refilled with a style reference's surface, `copies` per content
    reference (the style references taken in turn from a seeded start)."""
    start = int(np.random.default_rng([seed, 0xFA]).integers(len(style.images)))
    out = []
    for i, image in enumerate(content.images):
        image = image.convert("RGB")
        mask = foreground_mask(image)[..., None]
        for j in range(copies):
            other = style.images[(start + i * copies + j) % len(style.images)].convert("RGB").resize(image.size)
            pixels = mask * surface(other) + (1 - mask) * np.asarray(image, np.float32)
            out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


def recombined(concept: Concept, others: list[Image.Image], copies: int, seed: int = 0) -> Concept:
    """The references and `copies` recombined copies of each: the concept kept, the other
    factor taken from `others` (images of concepts the model knows, of the opposite kind:
    its MCP bank). A content's shape is refilled with a known surface, a style's surface is
    cut to a known shape (placed as in that image). Two to four references show a content
    in a few surfaces and a style on a few shapes, and an adapter learns those along with
    its concept; copies that vary the other factor leave only the concept in common. The
    copies carry no caption: the model's captioner reads what they show."""
    if copies <= 0:
        return concept
    if not others:
        raise ConfigError("recombined copies need images of known concepts (this base model has no bank)")
    rng = np.random.default_rng([seed, 0xC0])
    images, captions = list(concept.images), list(concept.captions)
    # each known concept once before any twice
    order = np.concatenate([rng.permutation(len(others)) for _ in range(-(-copies * len(images) // len(others)))])
    for i, image in enumerate(concept.images):
        image = image.convert("RGB")
        for j in range(copies):
            other = others[int(order[i * copies + j])].convert("RGB").resize(image.size)
            if concept.kind == "content":
                mask, fill, ground = foreground_mask(image), texture_field(other), image
            else:
                mask, fill, ground = foreground_mask(other), surface(image), other
            ground = np.asarray(ground, np.float32)
            out = mask[..., None] * fill + (1 - mask[..., None]) * ground
            images.append(Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)))
            captions.append(None)
    return replace(concept, images=images, captions=captions)


@dataclass
class Prepared:
    """One image ready for the UNet: pixels in [-1, 1] and SDXL's size/crop facts."""

    pixels: torch.Tensor  # 3 x H x W
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def preprocess(image: Image.Image, resolution: int, center_crop: bool = True) -> Prepared:
    """Resize the short side to `resolution`, crop a square, scale to [-1, 1]."""
    w, h = image.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    im = image.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left = top = 0
    im = im.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return Prepared(arr, (h, w), (round(top / s), round(left / s)))
