"""Adapter files converted to the LoRA layouts other tools load, with numpy alone.

The service's API converts on download without importing torch; `Adapter.export` uses
the same functions, so there is one conversion. A b4m file holds per layer either the PLP
parts `<layer>.A/.B/.C/.D` (method b4m) or `<layer>.up/.down` (the LoRA baselines), and its
settings as JSON under the `b4m` metadata key. The low-rank update of a layer is
`scale * up @ down`, with `up = [A; B]`, `down = [C, D]` for PLP and `scale = alpha / rank`.
"""

from __future__ import annotations

import json
import re

import numpy as np
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

FORMATS = ("b4m", "diffusers", "kohya")
DTYPES = ("fp32", "fp16", "bf16")
# kohya's `ss_base_model_version` and the SAI model spec's architecture, per base family
# (micro's UNet is SD 1.x-shaped: tools that read these see the layout it has)
KOHYA_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "micro": "sd_v1"}
SAI_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "micro": "stable-diffusion-v1/lora",
}


TOKEN_PREFIX = "token."  # learnt identifier embeddings in a b4m file (b4m_core/tokens.py)
SDXL_ENCODER_KEYS = ("clip_l", "clip_g")


class FormatError(ValueError):
    """Not a b4m adapter file, or a format this version does not write."""


def read(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors, b4m metadata) of an adapter file."""
    try:
        # an fp16-stored adapter converts like an fp32 one (each output dtype is asked for)
        tensors = {k: v.astype(np.float32) for k, v in np_load(data).items()}
        meta = read_metadata(data)
    except Exception as exc:  # safetensors raises several types on garbage
        raise FormatError(f"not a safetensors adapter file: {exc}") from exc
    if not meta:
        raise FormatError(
            "the file has no b4m metadata: it is not an adapter made by b4m "
            "(plain LoRA files can be used with diffusers directly)"
        )
    return tensors, meta


def _header(data: bytes) -> dict:
    """A safetensors file's JSON header (8-byte little-endian length, then the JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])


def read_metadata(data: bytes) -> dict | None:
    """The `b4m` metadata of a safetensors file's bytes."""
    raw = (_header(data).get("__metadata__") or {}).get("b4m")
    return json.loads(raw) if raw else None


def stored_dtype(data: bytes) -> str:
    """fp32 | fp16 | bf16: the tensor type of a file's tensors (mixed: fp32)."""
    found = {v["dtype"] for k, v in _header(data).items() if k != "__metadata__"}
    return {frozenset({"F16"}): "fp16", frozenset({"BF16"}): "bf16"}.get(frozenset(found), "fp32")


def low_rank(tensors: dict[str, np.ndarray], meta: dict) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per layer (up, down, scale): the ordinary LoRA the adapter is."""
    plp = meta["method"] == "b4m"
    suffix = ".A" if plp else ".up"
    scale = float(meta["alpha"]) / int(meta["rank"])
    out = {}
    for name in sorted(k[: -len(suffix)] for k in tensors if k.endswith(suffix)):
        if plp:
            up = np.concatenate([tensors[f"{name}.A"], tensors[f"{name}.B"]], axis=0)
            down = np.concatenate([tensors[f"{name}.C"], tensors[f"{name}.D"]], axis=1)
        else:
            up, down = tensors[f"{name}.up"], tensors[f"{name}.down"]
        out[name] = (up.astype(np.float32), down.astype(np.float32), scale)
    return out


# a ResNet block's two convolutions (targets `attn+conv`); diffusers' `ResnetBlock2D` draws
# both with 3x3 kernels in every UNet it builds
_RESNET_CONV = re.compile(r"(.*resnets\.\d+)\.(conv1|conv2)")


def as_kernels(name: str, up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A convolution's factors as the kernels LoCon files hold: down (r, in, 3, 3), up (out, r,
    1, 1); a linear layer's unchanged."""
    if not _RESNET_CONV.fullmatch(name):
        return up, down
    return up.reshape(up.shape[0], up.shape[1], 1, 1), down.reshape(down.shape[0], -1, 3, 3)


def to_diffusers(tensors: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """`unet.<layer>.lora_A.weight` (down) / `.lora_B.weight` (up, the scale baked in): the
    PEFT layout `save_lora_weights` writes and `load_lora_weights` of the SD and SDXL
    pipelines reads (it reads the older `.lora.down/.lora.up` files b4m wrote before too)."""
    out = {}
    for name, (up, down, scale) in low_rank(tensors, meta).items():
        up, down = as_kernels(name, up * np.float32(scale), down)
        out[f"unet.{name}.lora_A.weight"] = np.ascontiguousarray(down)
        out[f"unet.{name}.lora_B.weight"] = np.ascontiguousarray(up)
    return out


def to_kohya(tensors: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    """`lora_unet_<layer>.lora_down.weight`, `.lora_up.weight`, `.alpha` (ComfyUI, A1111).
    The layer names are the ones kohya's sd-scripts write: diffusers' module names for SD 1/2,
    the original (LDM / SGM) UNet's for SDXL (`input_blocks_4_1_...`)."""
    parts = low_rank(tensors, meta)
    rename = lambda n: n  # noqa: E731
    if base_arch(tensors, meta) == "sdxl":
        per_block = layers_per_block(parts)
        rename = lambda n: ldm_unet_name(n, per_block)  # noqa: E731
    out = {}
    for name, (up, down, scale) in parts.items():
        key = "lora_unet_" + rename(name).replace(".", "_")
        up, down = as_kernels(name, up, down)
        out[f"{key}.lora_down.weight"] = np.ascontiguousarray(down)
        out[f"{key}.lora_up.weight"] = np.ascontiguousarray(up)
        out[f"{key}.alpha"] = np.array(scale * down.shape[0], dtype=np.float32)
    return out


_DOWN = re.compile(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.attentions\.0\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)")
_INPUT = re.compile(r"input_blocks\.(\d+)\.1\.(.+)")
_MIDDLE = re.compile(r"middle_block\.1\.(.+)")
_OUTPUT = re.compile(r"output_blocks\.(\d+)\.1\.(.+)")
# ResNet blocks: diffusers' conv1 / conv2 are the original's in_layers.2 / out_layers.3
_RES_DOWN = re.compile(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(conv1|conv2)")
_RES_MID = re.compile(r"mid_block\.resnets\.([01])\.(conv1|conv2)")
_RES_UP = re.compile(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(conv1|conv2)")
_RES_INPUT = re.compile(r"input_blocks\.(\d+)\.0\.(in_layers\.2|out_layers\.3)")
_RES_MIDDLE = re.compile(r"middle_block\.([02])\.(in_layers\.2|out_layers\.3)")
_RES_OUTPUT = re.compile(r"output_blocks\.(\d+)\.0\.(in_layers\.2|out_layers\.3)")
_LDM_CONV = {"conv1": "in_layers.2", "conv2": "out_layers.3"}
_DIFFUSERS_CONV = {v: k for k, v in _LDM_CONV.items()}


def layers_per_block(layer_names) -> int:
    """The UNet's `layers_per_block`, read from its attention layers (one per down-block layer)."""
    found = [int(m.group(2)) for n in layer_names if (m := _DOWN.match(n))]
    return max(found) + 1 if found else 2


def _input_block(i: int, j: int, per_block: int) -> int:
    """The original UNet's `input_blocks` index of down block i, layer j (each down block: L
    layers and a downsampler, after `conv_in`)."""
    return i * (per_block + 1) + j + 1


def _output_block(i: int, j: int, per_block: int) -> int:
    """The original UNet's `output_blocks` index of up block i, layer j (L + 1 layers each)."""
    return i * (per_block + 1) + j


def ldm_unet_name(name: str, per_block: int) -> str:
    """A diffusers UNet layer's name in the original UNet's numbering: down block i, layer j is
    `input_blocks.{i(L+1)+j+1}`, up block i, layer j `output_blocks.{i(L+1)+j}`; in each, the
    ResNet block is `.0` (its conv1 / conv2 the original's `in_layers.2` / `out_layers.3`) and
    the attention `.1` (inside it the names agree). The mid block is `middle_block.0`, `.1`
    (its attention) and `.2`."""
    if m := _RES_DOWN.fullmatch(name):
        block = _input_block(int(m.group(1)), int(m.group(2)), per_block)
        return f"input_blocks.{block}.0.{_LDM_CONV[m.group(3)]}"
    if m := _RES_MID.fullmatch(name):
        return f"middle_block.{2 * int(m.group(1))}.{_LDM_CONV[m.group(2)]}"
    if m := _RES_UP.fullmatch(name):
        block = _output_block(int(m.group(1)), int(m.group(2)), per_block)
        return f"output_blocks.{block}.0.{_LDM_CONV[m.group(3)]}"
    if m := _DOWN.match(name):
        return f"input_blocks.{_input_block(int(m.group(1)), int(m.group(2)), per_block)}.1.{m.group(3)}"
    if m := _MID.match(name):
        return f"middle_block.1.{m.group(1)}"
    if m := _UP.match(name):
        return f"output_blocks.{_output_block(int(m.group(1)), int(m.group(2)), per_block)}.1.{m.group(3)}"
    raise FormatError(f"no original-UNet name for layer {name!r}")


def diffusers_unet_name(name: str, per_block: int) -> str:
    """`ldm_unet_name` inverted."""

    def down(index: str) -> tuple[int, int]:  # (down block, layer) of an `input_blocks` index
        return divmod(int(index) - 1, per_block + 1)

    def up(index: str) -> tuple[int, int]:  # (up block, layer) of an `output_blocks` index
        return divmod(int(index), per_block + 1)

    if m := _RES_INPUT.fullmatch(name):
        return "down_blocks.{}.resnets.{}.".format(*down(m.group(1))) + _DIFFUSERS_CONV[m.group(2)]
    if m := _RES_MIDDLE.fullmatch(name):
        return f"mid_block.resnets.{int(m.group(1)) // 2}.{_DIFFUSERS_CONV[m.group(2)]}"
    if m := _RES_OUTPUT.fullmatch(name):
        return "up_blocks.{}.resnets.{}.".format(*up(m.group(1))) + _DIFFUSERS_CONV[m.group(2)]
    if m := _INPUT.match(name):
        return "down_blocks.{}.attentions.{}.".format(*down(m.group(1))) + m.group(2)
    if m := _MIDDLE.match(name):
        return f"mid_block.attentions.0.{m.group(1)}"
    if m := _OUTPUT.match(name):
        return "up_blocks.{}.attentions.{}.".format(*up(m.group(1))) + m.group(2)
    raise FormatError(f"not an original-UNet attention or ResNet layer: {name!r}")


def identifier_vectors(tensors: dict, tokens: dict[str, str]) -> dict[str, list]:
    """{identifier: [vectors per text encoder]} for every kind whose learnt embedding the
    adapter carries (`token.<kind>.<i>`; numpy arrays or torch tensors alike)."""
    out = {}
    for kind, token in tokens.items():
        vecs = []
        while f"{TOKEN_PREFIX}{kind}.{len(vecs)}" in tensors:
            vecs.append(tensors[f"{TOKEN_PREFIX}{kind}.{len(vecs)}"])
        if vecs and token:
            out[token] = vecs
    return out


def identifier_embeddings(tensors: dict[str, np.ndarray], meta: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per identifier token whose input embedding the adapter learnt (pivotal tuning), its
    textual-inversion file: `{"emb_params": vectors}` for one text encoder (kohya's and
    A1111's embedding layout), `{"clip_l", "clip_g"}` for SDXL's two (the layout diffusers'
    advanced DreamBooth script writes). diffusers reads either with
    `load_textual_inversion(state[key], token=...)`; A1111 takes the token from the file name."""
    out = {}
    for token, vecs in sorted(identifier_vectors(tensors, meta.get("tokens") or {}).items()):
        vecs = [np.ascontiguousarray(v.astype(np.float32)) for v in vecs]
        out[token] = {"emb_params": vecs[0]} if len(vecs) == 1 else dict(zip(SDXL_ENCODER_KEYS, vecs))
    return out


def base_arch(tensors: dict[str, np.ndarray], meta: dict) -> str:
    """sd1 | sd2 | sdxl | micro: recorded at training, else read from the layers (files made
    before it was recorded): SDXL has several transformer blocks per attention, SD 2's
    cross-attention reads 1024-wide text features."""
    if meta.get("base_arch"):
        return meta["base_arch"]
    if meta.get("base_model") == "micro":
        return "micro"
    names = list(tensors)
    if any(".transformer_blocks.1." in n for n in names):
        return "sdxl"
    for n in names:
        if ".attn2.to_k" in n and n.endswith(".down"):
            width = tensors[n].shape[1]
        elif ".attn2.to_k" in n and n.endswith(".C"):
            width = tensors[n].shape[1] + tensors[n[:-2] + ".D"].shape[1]
        else:
            continue
        return "sd2" if width == 1024 else "sd1"
    return "sd1"


def trigger_phrases(meta: dict) -> list[str]:
    """What a prompt names to call the adapter's concepts: `<token> <word>` per kind."""
    tokens, words = meta.get("tokens") or {}, meta.get("words") or {}
    return [f"{tokens[k]} {words.get(k, '')}".strip() for k in ("content", "style") if tokens.get(k)]


def usage_hint(meta: dict) -> str:
    phrases = dict(zip([k for k in ("content", "style") if (meta.get("tokens") or {}).get(k)], trigger_phrases(meta)))
    if "content" in phrases and "style" in phrases:
        return f"a {phrases['content']} in {phrases['style']} style"
    if "content" in phrases:
        return f"a photo of {phrases['content']}"
    return f"a picture in {phrases['style']} style" if "style" in phrases else ""


def describe(tensors: dict[str, np.ndarray], meta: dict, fmt: str) -> dict[str, str]:
    """The metadata other tools read: kohya's `ss_*` keys (LoRA managers, A1111, ComfyUI)
    and the SAI model spec's `modelspec.*` (trigger phrase, architecture, resolution);
    ours stays under `b4m`."""
    arch = base_arch(tensors, meta)
    extra = meta.get("extra") or {}
    res = int(meta.get("resolution") or extra.get("resolution") or 0)
    phrases = trigger_phrases(meta)
    what = {"fused": "content x style", "content": "content", "style": "style"}.get(meta["kind"], meta["kind"])
    title = f"b4m {what}: {', '.join(phrases)}" if phrases else f"b4m {what}"
    info = {
        "b4m": json.dumps(meta, sort_keys=True),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(meta["rank"]),
        "ss_network_alpha": str(float(meta["alpha"])),
        "ss_base_model_version": KOHYA_VERSION[arch],
        "ss_v2": str(arch == "sd2"),
        "ss_sd_model_name": str(meta.get("base_model", "")),
        "ss_max_train_steps": str(int(meta.get("steps", 0))),
        "ss_steps": str(int(meta.get("steps", 0))),
        "ss_seed": str(int(meta.get("seed", 0))),
        "ss_training_comment": f"Break-for-Make {what} adapter ({meta['method']}); prompt: {usage_hint(meta)}",
        "ss_tag_frequency": json.dumps({f"b4m_{meta['kind']}": dict.fromkeys(phrases, 1)}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": SAI_ARCHITECTURE[arch],
        "modelspec.implementation": "diffusers"
        if fmt == "diffusers"
        else "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.trigger_phrase": ", ".join(phrases),
        "modelspec.usage_hint": usage_hint(meta),
        "modelspec.prediction_type": "epsilon",
    }
    if extra.get("learning_rate") is not None:
        info["ss_learning_rate"] = str(extra["learning_rate"])
    if res:
        info["ss_resolution"] = f"({res}, {res})"
        info["modelspec.resolution"] = f"{res}x{res}"
    return info


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _save(tensors: dict[str, np.ndarray], metadata: dict[str, str], dtype: str) -> bytes:
    """safetensors bytes in `dtype`. numpy has no bfloat16, so bf16 files are laid out here
    (the format is a JSON header and the raw little-endian buffers)."""
    if dtype == "fp32":
        return np_save(tensors, metadata=metadata)
    if dtype == "fp16":
        return np_save({k: v.astype(np.float16) for k, v in tensors.items()}, metadata=metadata)
    header: dict = {"__metadata__": metadata}
    buffers, offset = [], 0
    for name in sorted(tensors):
        raw = _bf16_bits(tensors[name]).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        buffers.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the buffers start 8-byte aligned
    return len(head).to_bytes(8, "little") + head + b"".join(buffers)


def convert(data: bytes, fmt: str, dtype: str = "fp32") -> bytes:
    """A b4m adapter file's bytes in `fmt` (b4m: unchanged), its tensors in `dtype`."""
    if fmt not in FORMATS:
        raise FormatError(f"export format must be b4m, diffusers or kohya, got {fmt!r}")
    if dtype not in DTYPES:
        raise FormatError(f"export dtype must be fp32, fp16 or bf16, got {dtype!r}")
    if fmt == "b4m" and stored_dtype(data) == dtype:
        return data
    tensors, meta = read(data)
    if fmt == "b4m":
        return _save(tensors, {"b4m": json.dumps(meta, sort_keys=True)}, dtype)
    info = describe(tensors, meta, fmt)
    if fmt == "diffusers":
        return _save(to_diffusers(tensors, meta), info, dtype)
    return _save(to_kohya(tensors, meta), info, dtype)


def model_card(data: bytes, weights_name: str = "pytorch_lora_weights.safetensors", samples: str | None = None) -> str:
    """A README.md for a diffusers export (the Hugging Face model-card layout: YAML front
    matter, then how to prompt and load it): trigger phrases, base model, method, settings."""
    tensors, meta = read(data)
    arch, phrases, extra = base_arch(tensors, meta), trigger_phrases(meta), meta.get("extra") or {}
    plp = meta.get("plp") or {}
    front = [
        "---",
        f"base_model: {json.dumps(str(meta.get('base_model', '')))}",
        "library_name: diffusers",
        "tags: [text-to-image, lora, diffusers, break-for-make]",
        f"instance_prompt: {json.dumps(usage_hint(meta))}",
        "---",
    ]
    settings = [
        ("kind", meta["kind"]),
        ("method", meta["method"]),
        ("base model", f"{meta.get('base_model', '')} ({arch})"),
        ("rank / alpha", f"{meta['rank']} / {meta['alpha']}"),
        ("rho, bases", f"{plp['rho']}, {plp.get('basis_mode')} / {plp.get('basis_scale', 'legacy')}" if plp else None),
        ("steps", meta.get("steps")),
        ("learning rate", extra.get("learning_rate")),
        ("MCP auxiliary sets", len(extra["aux"]) if "aux" in extra else None),
        ("resolution", meta.get("resolution") or None),
        ("seed", meta.get("seed")),
    ]
    lines = front + [
        "",
        f"# {describe(tensors, meta, 'diffusers')['modelspec.title']}",
        "",
        "A LoRA made with Break-for-Make (B4M): content and style learnt as separate halves of one "
        "low-rank update, then composed.",
        "",
        "## Trigger words",
        "",
        *[f"- `{p}`" for p in phrases],
        "",
        f"Prompt: `{usage_hint(meta)}`",
        "",
        "## Use with diffusers",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f"pipe = DiffusionPipeline.from_pretrained({json.dumps(str(meta.get('base_model', '')))})",
        f'pipe.load_lora_weights(".", weight_name="{weights_name}")',
        f"image = pipe({json.dumps(usage_hint(meta))}).images[0]",
        "```",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings if v is not None],
    ]
    embeddings = identifier_embeddings(tensors, meta)
    if embeddings:
        lines += [
            "",
            "## Learnt identifier embeddings",
            "",
            "The identifiers' input embeddings were learnt with the adapter (pivotal tuning); "
            "load them beside the LoRA, or the trigger words read as plain text:",
            "",
            "```python",
            "from safetensors.torch import load_file",
            "",
        ]
        for token, state in embeddings.items():
            file = embedding_file_name(token)
            if "emb_params" in state:
                lines.append(f'pipe.load_textual_inversion(load_file("{file}")["emb_params"], token="{token}")')
            else:
                lines += [
                    f'state = load_file("{file}")',
                    f'pipe.load_textual_inversion(state["clip_l"], token="{token}", '
                    "text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)",
                    f'pipe.load_textual_inversion(state["clip_g"], token="{token}", '
                    "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)",
                ]
        lines += ["```"]
    if samples:
        lines += ["", "## Samples", "", f"![samples]({samples})"]
    return "\n".join(lines) + "\n"


def sample_grid(images: list) -> bytes:
    """PIL images (or PNG bytes) side by side, as one PNG: the model card's sample grid."""
    import io

    from PIL import Image

    ims = [Image.open(io.BytesIO(im)).convert("RGB") if isinstance(im, bytes) else im.convert("RGB") for im in images]
    w, h = ims[0].size
    grid = Image.new("RGB", (w * len(ims), h), "white")
    for i, im in enumerate(ims):
        grid.paste(im.resize((w, h)), (i * w, 0))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def write_export(data: bytes, fmt: str, out, dtype: str = "fp32", samples: bytes | None = None) -> list:
    """Write a b4m adapter file's bytes as `fmt` to `out`: a file, or a folder (a path that is
    a folder or has no suffix), which for diffusers gets the weights as
    `pytorch_lora_weights.safetensors` with a model card `README.md` beside them, as
    `save_lora_weights` and the Hub lay them out (and `samples`, a PNG grid, as
    `samples.png`, shown in the card). Returns the paths written."""
    from pathlib import Path

    out = Path(out)
    converted = convert(data, fmt, dtype)
    tensors, meta = read(data)
    # learnt identifier embeddings travel as textual-inversion files named by their token (a
    # LoRA file holds none that diffusers reads): beside the weights in a folder, else in
    # `<stem>_embeddings/`
    embeddings = identifier_embeddings(tensors, meta) if fmt != "b4m" else {}
    if not (out.is_dir() or not out.suffix):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(converted)
        return [out] + _write_embeddings(embeddings, out.parent / f"{out.stem}_embeddings", dtype)
    out.mkdir(parents=True, exist_ok=True)
    name = "pytorch_lora_weights.safetensors" if fmt == "diffusers" else f"adapter_{fmt}.safetensors"
    (out / name).write_bytes(converted)
    written = [out / name] + _write_embeddings(embeddings, out, dtype)
    if fmt == "diffusers":
        if samples:
            (out / "samples.png").write_bytes(samples)
            written.append(out / "samples.png")
        (out / "README.md").write_text(model_card(data, name, samples="samples.png" if samples else None))
        written.append(out / "README.md")
    return written


def embedding_file_name(token: str) -> str:
    return re.sub(r"[^\w.-]", "_", token) + ".safetensors"


def _write_embeddings(embeddings: dict[str, dict[str, np.ndarray]], folder, dtype: str) -> list:
    written = []
    for token, state in embeddings.items():
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / embedding_file_name(token)
        path.write_bytes(_save(state, {"b4m_token": token}, dtype))
        written.append(path)
    return written
