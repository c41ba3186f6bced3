"""Putting adapter layers into a diffusers UNet, taking them out, merging them in.

Works on any `UNet2DConditionModel` (SD 1.x/2.x and SDXL): targets are found by
walking diffusers' `Attention` (and `FeedForward`, `ResnetBlock2D`) modules, not by
hard-coded names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .config import TARGET_SETS, ConfigError, PLPConfig
from .layers import LowRankLinear, PLPLinear, adaptable

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def target_layer_names(unet: nn.Module, targets: str = "attn") -> list[str]:
    """Names of the linear layers an adapter of this target set covers.

    `attn`: every attention's q, k, v and output projection (the released code);
    `cross`: cross-attention only (the paper's text);
    `kv`: cross-attention's key and value projections only (Custom Diffusion's choice): they
    read only the text, so an update acts per token rather than on every image feature;
    `transformer`: `attn` and the transformer blocks' feed-forward layers (twice the
    parameters of the attention projections in each block);
    `attn+conv`: `attn` and both 3x3 convolutions of every ResNet block (LoCon's layers):
    textures are drawn by the convolutions, which attention-only adapters never touch;
    `attn+fineconv`: `attn` and the convolutions at the UNet's full latent resolution only
    (the first down block and the last up block): fine texture and edges, not the coarse
    levels where a scene's layout (size, place) is decided.
    """
    if targets not in TARGET_SETS:
        raise ConfigError(f"targets must be one of {TARGET_SETS}, got {targets!r}")
    names = []
    fine = ("down_blocks.0.", f"up_blocks.{len(getattr(unet, 'up_blocks', [])) - 1}.")
    for name, module in unet.named_modules():
        if targets in ("attn+conv", "attn+fineconv") and isinstance(module, ResnetBlock2D):
            if targets == "attn+conv" or name.startswith(fine):
                names += [f"{name}.{c}" for c in ("conv1", "conv2") if _is_layer(module.get_submodule(c))]
            continue
        if targets == "transformer" and isinstance(module, FeedForward):
            names += [f"{name}.{n}" for n in _linear_names(module)]
            continue
        if not isinstance(module, Attention):
            continue
        if targets in ("cross", "kv") and not getattr(module, "is_cross_attention", False):
            continue
        for proj in ("to_k", "to_v") if targets == "kv" else PROJECTIONS:
            if _is_layer(module.get_submodule(proj)):
                names.append(f"{name}.{proj}")
    if not names:
        raise ConfigError("the model has no attention layers to adapt")
    return names


def _is_layer(module: nn.Module) -> bool:
    """An adaptable layer, an injected adapter counting as its base."""
    return isinstance(module, LowRankLinear) or adaptable(module)


def _linear_names(module: nn.Module) -> list[str]:
    """Linear layers inside a module, an injected adapter counting as its layer (not its base)."""
    found: list[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(f + ".") for f in found):
            continue
        if isinstance(m, (nn.Linear, LowRankLinear)):
            found.append(name)
    return found


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def inject(
    unet: nn.Module, names: Iterable[str], factory: Callable[[str, nn.Module], LowRankLinear]
) -> dict[str, LowRankLinear]:
    """Replace each named `nn.Linear` (or `nn.Conv2d`) with `factory(name, layer)`; returns
    the new layers."""
    remove_adapters(unet)
    layers = {}
    for name in names:
        base = unet.get_submodule(name)
        if not adaptable(base):
            raise ConfigError(f"{name} is not a linear layer or an ungrouped convolution")
        layer = factory(name, base)
        _set_submodule(unet, name, layer)
        layers[name] = layer
    return layers


def inject_plp(unet: nn.Module, config: PLPConfig) -> dict[str, PLPLinear]:
    for p in unet.parameters():
        p.requires_grad_(False)
    names = target_layer_names(unet, config.targets)
    return inject(unet, names, lambda name, base: PLPLinear(base, config, name))


def adapter_layers(unet: nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in unet.named_modules() if isinstance(m, LowRankLinear)}


def remove_adapters(unet: nn.Module) -> None:
    """Put the original linear layers back (their weights untouched)."""
    for name, layer in list(adapter_layers(unet).items()):
        _set_submodule(unet, name, layer.base)


def plp_state_dict(layers: dict[str, PLPLinear]) -> dict[str, torch.Tensor]:
    """A, B, C, D of every layer, detached copies on the CPU in float32."""
    out = {}
    for name, layer in layers.items():
        for part in ("A", "B", "C", "D"):
            out[f"{name}.{part}"] = getattr(layer, part).detach().float().cpu().contiguous()
    return out


def load_plp_state_dict(
    layers: dict[str, PLPLinear], state: dict[str, torch.Tensor], parts: Iterable[str] = ("B", "D")
) -> None:
    """Copy the named halves from `state` into the injected layers (shapes checked)."""
    with torch.no_grad():
        for name, layer in layers.items():
            for part in parts:
                key = f"{name}.{part}"
                if key not in state:
                    raise ConfigError(f"adapter has no tensor {key}: built for another model or target set")
                dst = getattr(layer, part)
                if dst.shape != state[key].shape:
                    raise ConfigError(f"{key}: shape {tuple(state[key].shape)} != model's {tuple(dst.shape)}")
                dst.copy_(state[key].to(dst.device, dst.dtype))


class MergedWeights:
    """Adds low-rank updates into base weights and takes them out again exactly.

    Unmerging restores a saved copy of each touched weight instead of subtracting, so
    switching adapters many times never drifts (and works in fp16/bf16).
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self._saved: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def merge(self, updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """`updates`: layer name -> (up, down, scale)."""
        self.unmerge()
        for name, (up, down, scale) in updates.items():
            linear = self.unet.get_submodule(name)
            if isinstance(linear, LowRankLinear):
                linear = linear.base
            w = linear.weight
            delta = scale * (up.to(w.device, torch.float32) @ down.to(w.device, torch.float32))
            if w.dim() == 4 and delta.shape == w.flatten(1).shape:  # a convolution: out x (in kh kw)
                delta = delta.view(w.shape)
            if delta.shape != w.shape:
                raise ConfigError(f"{name}: update {tuple(delta.shape)} does not fit weight {tuple(w.shape)}")
            self._saved[name] = w.detach().clone()
            w.copy_((w.float() + delta).to(w.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        for name, saved in self._saved.items():
            linear = self.unet.get_submodule(name)
            if isinstance(linear, LowRankLinear):
                linear = linear.base
            linear.weight.copy_(saved)
        self._saved.clear()

    @property
    def merged(self) -> bool:
        return bool(self._saved)
