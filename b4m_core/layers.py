"""Adapter layers wrapping an `nn.Linear` or `nn.Conv2d`: PLP (the method), plain LoRA, ZipLoRA.

Every layer computes `base(x) + scale * up @ (down @ x)` through two small matmuls,
never the full `m x n` update, so it costs what a LoRA of the same rank costs. A
convolution's weight is read as the matrix `out x (in kh kw)` (LoCon's factorisation): `down`
is a rank-channel convolution with the base's kernel, stride and padding, `up` a 1x1 one, so
every update, basis, composition and merge is the same matrix algebra for both kinds.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, PLPConfig


# --------------------------------------------------------------------------- bases
def _layer_seed(basis_seed: int, layer_name: str, m: int, n: int, rank: int) -> int:
    key = f"{basis_seed}|{layer_name}|{m}x{n}|r{rank}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def _principal(w: torch.Tensor, h: int, side: str) -> torch.Tensor:
    """The top `h` singular vectors of `w` (left: columns, right: rows), each signed so its
    largest entry is positive (SVD signs differ between LAPACK builds)."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    vecs = u[:, :h].T if side == "left" else vh[:h]  # h x len
    if vecs.shape[0] < h:  # a layer narrower than h: pad with zero directions
        vecs = torch.cat([vecs, vecs.new_zeros(h - vecs.shape[0], vecs.shape[1])])
    signs = torch.sign(vecs.gather(1, vecs.abs().argmax(dim=1, keepdim=True)))
    vecs = vecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    return vecs if side == "right" else vecs.T


def make_bases(
    config: PLPConfig, layer_name: str, m: int, n: int, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen `A` (dm x r) and `C` (r x dn) for one layer (copies: callers may write into
    them). Bases that depend on the config alone are drawn once per process: a worker that
    trains many concepts on one model skips the draws (on SDXL, ~1.2 s a run)."""
    key = (config.basis_mode, config.basis_scale, config.basis_seed, config.rank, config.rho)
    if config.basis_mode == "principal":  # a function of the base weights too: keyed by them
        a, c = _principal_bases(key, layer_name, m, n, weight)
    else:
        a, c = _cached_bases(key, layer_name, m, n)
    return a.clone(), c.clone()


_PRINCIPAL_CACHE: OrderedDict = OrderedDict()
PRINCIPAL_CACHE_BYTES = 256 * 2**20  # least recently used bases beyond this are dropped


def _principal_bases(key: tuple, layer_name: str, m: int, n: int, weight: torch.Tensor | None):
    """`principal` bases, each layer's SVD done once per process for the same weights (the
    weights' bytes are in the key, so a changed base gets new bases): a run that trains many
    concepts on one model skips ~80 % of its setup (micro) instead of redoing every SVD."""
    if weight is None:
        raise ConfigError("basis_mode 'principal' needs the base layer's weight")
    w = weight.detach().to("cpu").contiguous()
    digest = hashlib.blake2b(w.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
    full = (key, layer_name, m, n, str(w.dtype), digest)
    hit = _PRINCIPAL_CACHE.get(full)
    if hit is not None:
        _PRINCIPAL_CACHE.move_to_end(full)
        return hit
    config = PLPConfig(rank=key[3], rho=key[4], basis_mode=key[0], basis_scale=key[1], basis_seed=key[2])
    hit = _draw_bases(config, layer_name, m, n, w)
    _PRINCIPAL_CACHE[full] = hit
    _principal_cached[0] += _nbytes(hit)
    while _principal_cached[0] > PRINCIPAL_CACHE_BYTES and len(_PRINCIPAL_CACHE) > 1:
        _principal_cached[0] -= _nbytes(_PRINCIPAL_CACHE.popitem(last=False)[1])
    return hit


_principal_cached = [0]  # bytes held in _PRINCIPAL_CACHE


def _nbytes(pair: tuple[torch.Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in pair)


@functools.lru_cache(maxsize=1024)  # layers: ~3 SDXL-sized adapter shapes at rank 64
def _cached_bases(key: tuple, layer_name: str, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    mode, scale, seed, rank, rho = key
    config = PLPConfig(rank=rank, rho=rho, basis_mode=mode, basis_scale=scale, basis_seed=seed)
    return _draw_bases(config, layer_name, m, n, None)


def _draw_bases(
    config: PLPConfig, layer_name: str, m: int, n: int, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`make_bases`, drawn.

    A pure function of (basis seed, layer name, shape, rank, mode), and for `principal`
    of the base layer's weight `W0` (m x n): drawn in float64 on the CPU from a generator
    seeded by a hash, so every process on every machine gets the same bits and any
    content adapter composes with any style adapter.
    """
    r = config.rank
    dm, dn = math.floor(config.rho * m), math.floor(config.rho * n)
    g = torch.Generator(device="cpu").manual_seed(_layer_seed(config.basis_seed, layer_name, m, n, r))
    f64 = dict(dtype=torch.float64, generator=g)
    if config.basis_mode == "principal":
        # exact's construction (A C = 0, rank r/2 each) on the directions W0 itself reads and
        # writes most: C reads the top right singular vectors of W0's first dn columns, A
        # writes along the top left singular vectors of its first dm rows. A frozen random
        # read learns a concept like a LoRA with a frozen down projection (measured: 0.71
        # vs 0.92-0.96 for a LoRA); these are the directions a trained one would favour.
        if weight is None:
            raise ConfigError("basis_mode 'principal' needs the base layer's weight")
        w = weight.detach().to("cpu", torch.float64)
        # The two halves own disjoint latent coordinates (A the first r/2, C the rest), not
        # two rotated subspaces: Adam normalises each element, so under a rotation a content's
        # B leaks into A's subspace and a composed pair gets an interaction block B D no stage
        # trained (measured: 171-288 against content blocks of ~415, with a garbled fused
        # picture). Axis-aligned, B's columns over A's coordinates and D's rows over C's get
        # no gradient in a k = 0 break stage and stay zero, so B_content D_style = 0 exactly.
        h = r // 2
        ga = _principal(w[:dm, :], h, "left") if dm else w.new_zeros(0, h)
        gc = _principal(w[:, :dn], r - h, "right") if dn else w.new_zeros(r - h, 0)
        # the balanced scale of `exact` (legacy norms sqrt(dm) and sqrt(h dn / n), geometric mean)
        target = math.sqrt(math.sqrt(dm) * math.sqrt(h * dn / max(n, 1)))
        a = torch.cat([ga * (target / math.sqrt(h)), ga.new_zeros(dm, r - h)], dim=1)
        c = torch.cat([gc.new_zeros(h, dn), gc * (target / math.sqrt(r - h))], dim=0)
        return a.float().contiguous(), c.float().contiguous()
    if config.basis_mode == "exact":
        # A = G_A Q1^T, C = Q2 G_C with Q orthonormal: A C = G_A (Q1^T Q2) G_C = 0.
        q, _ = torch.linalg.qr(torch.randn(r, r, **f64))
        h = r // 2
        q1, q2 = q[:, :h], q[:, h:]
        a = (torch.randn(dm, h, **f64) / math.sqrt(h)) @ q1.T
        c = q2 @ (torch.randn(r - h, dn, **f64) / math.sqrt(max(n, 1)))
        if config.basis_scale == "balanced":
            # Same Frobenius norm for both (the geometric mean of the legacy ones, so the
            # two halves together learn about as fast as before), keeping A C = 0.
            na, nc = torch.linalg.matrix_norm(a), torch.linalg.matrix_norm(c)
            if na > 0 and nc > 0:
                target = torch.sqrt(na * nc)
                a, c = a * (target / na), c * (target / nc)
    elif config.basis_mode == "paper":
        # The released code: rows of one random orthogonal matrix for both projections.
        # Their truncations are not orthogonal, so A C is small but not zero. Layers that
        # are not square use an orthogonal matrix of the larger side.
        size = max(m, n, 2 * r)
        o, _ = torch.linalg.qr(torch.randn(size, size, **f64))
        c = o[:r, :dn] * math.sqrt(size / max(n, 1))
        a = o[r : 2 * r, :dm].T * math.sqrt(size / max(n, 1))
    else:  # random: the "w/o Orth" ablation
        a = torch.randn(dm, r, **f64) / math.sqrt(r)
        c = torch.randn(r, dn, **f64) / math.sqrt(max(n, 1))
    return a.float().contiguous(), c.float().contiguous()


# ------------------------------------------------------------ gradient routing
class _RoutedLinear(torch.autograd.Function):
    """`x @ w.T` whose weight gradient only sums over the rows where `row_mask` is 1.

    The input gradient flows from every row: this is exactly "that row used a detached
    copy of `w`", in one forward and one backward pass.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
        w_c = w.to(x.dtype)
        ctx.save_for_backward(x, w_c, row_mask)
        ctx.w_dtype = w.dtype
        return x @ w_c.T

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out: torch.Tensor):
        x, w, row_mask = ctx.saved_tensors
        grad_x = grad_out @ w if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            shape = (row_mask.shape[0],) + (1,) * (grad_out.dim() - 1)
            g = grad_out * row_mask.to(grad_out.dtype).view(shape)
            grad_w = (g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])).to(ctx.w_dtype)
        return grad_x, grad_w, None


def _linear(x: torch.Tensor, w: torch.Tensor, row_mask: torch.Tensor | None) -> torch.Tensor:
    if row_mask is None or not (torch.is_grad_enabled() and w.requires_grad):
        return F.linear(x, w.to(x.dtype))
    return _RoutedLinear.apply(x, w, row_mask)


def _rows(full: torch.Tensor, frozen: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """Per batch row, `full` where `row_mask` is set, else `frozen` (the same values computed
    with the trainable part detached): the weight's gradient sums over the masked rows only."""
    return torch.where(row_mask.view((-1,) + (1,) * (full.dim() - 1)), full, frozen)


def adaptable(module: nn.Module) -> bool:
    """A layer an adapter can wrap: a linear layer, or an ungrouped 2-D convolution."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


# ------------------------------------------------------------------- layers
class LowRankLinear(nn.Module):
    """Base of all adapter layers: wraps a frozen `nn.Linear` (or `nn.Conv2d`, its weight read
    as `out x (in kh kw)`) and adds `scale * up @ down`."""

    def __init__(self, base: nn.Linear | nn.Conv2d, scale: float):
        super().__init__()
        if not adaptable(base):
            raise ConfigError(f"an adapter wraps a linear layer or an ungrouped convolution, not {base!r}")
        self.base = base
        self.scale = float(scale)
        if isinstance(base, nn.Conv2d):
            kh, kw = base.kernel_size
            self.in_features, self.out_features = base.in_channels * kh * kw, base.out_channels
            self.conv: dict | None = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
            self.conv = None
        self.enabled = True

    def up_weight(self) -> torch.Tensor:  # m x R
        raise NotImplementedError

    def down_weight(self) -> torch.Tensor:  # R x n
        raise NotImplementedError

    def apply_down(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`w` (R x n) applied to the layer's input: a matmul, or a rank-R convolution."""
        w = w.to(x.dtype)
        if self.conv is None:
            return F.linear(x, w)
        return F.conv2d(x, w.view(w.shape[0], -1, *self.base.kernel_size), None, **self.conv)

    def apply_up(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """`w` (m x R) applied to the rank-R features: a matmul, or a 1x1 convolution."""
        w = w.to(h.dtype)
        return F.linear(h, w) if self.conv is None else F.conv2d(h, w[:, :, None, None])

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_up(self.apply_down(x, self.down_weight()), self.up_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + self.scale * self.delta_forward(x)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """The full `m x n` update; for merging and tests only, never in training."""
        return self.scale * (self.up_weight().float() @ self.down_weight().float())


class PLPLinear(LowRankLinear):
    """Partly learnable projection: `W_up = [A; B]`, `W_down = [C, D]`, `A`, `C` frozen.

    `route` (a bool tensor over the batch, or None) makes the layer route gradients
    for MCP: rows marked True update only the `primary` half, the other rows only the
    other half, as if each row saw the other half detached.
    """

    def __init__(self, base: nn.Linear, config: PLPConfig, layer_name: str):
        super().__init__(base, config.scale)
        m, n, r = self.out_features, self.in_features, config.rank
        self.layer_name = layer_name
        self.rank = r
        self.dm, self.dn = math.floor(config.rho * m), math.floor(config.rho * n)
        a, c = make_bases(config, layer_name, m, n, base.weight.flatten(1))
        dev = base.weight.device
        self.register_buffer("A", a.to(dev))
        self.register_buffer("C", c.to(dev))
        # B = 0, D = 0: the adapter starts as the identity; A, C != 0 keep gradients alive.
        self.B = nn.Parameter(torch.zeros(m - self.dm, r, device=dev))
        self.D = nn.Parameter(torch.zeros(r, n - self.dn, device=dev))
        self.route: torch.Tensor | None = None
        self.primary: str = "up"  # which half the rows marked True train
        if config.basis_mode == "principal":
            # A owns latent coordinates [0, r/2), C the rest (make_bases). B's columns over A's
            # coordinates and D's rows over C's only ever form the interaction block B D (two
            # halves never trained together; under MCP it outgrew the content block, 601 vs
            # 333, and erased the fused shape): they get no gradient, so they stay 0 and any
            # two adapters compose into their content and style blocks alone.
            h = r // 2
            keep_b = torch.zeros(1, r, device=dev)
            keep_b[:, h:] = 1
            keep_d = torch.zeros(r, 1, device=dev)
            keep_d[:h] = 1
            self.B.register_hook(lambda g: g * keep_b.to(g.dtype))
            self.D.register_hook(lambda g: g * keep_d.to(g.dtype))

    def up_weight(self) -> torch.Tensor:
        return torch.cat([self.A, self.B], dim=0)

    def down_weight(self) -> torch.Tensor:
        return torch.cat([self.C, self.D], dim=1)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.route is None:
            return super().delta_forward(x)
        mask_up = self.route if self.primary == "up" else ~self.route
        mask_down = ~mask_up
        if self.conv is not None:
            # a convolution's input columns are (channel, kernel offset) pairs, not slices of
            # x: both halves' products are computed twice, once with the trainable half
            # detached, and each row takes the copy its route allows (the rank-R products
            # are small next to the base convolution)
            down = torch.cat([self.C, self.D], dim=1)
            h = _rows(self.apply_down(x, down), self.apply_down(x, down.detach()), mask_down)
            up = torch.cat([self.A, self.B], dim=0)
            return _rows(self.apply_up(h, up), self.apply_up(h, up.detach()), mask_up)
        # h = C x[:dn] + D x[dn:]; out = [A h ; B h], each trainable matmul routed.
        h = F.linear(x[..., : self.dn], self.C.to(x.dtype)) + _linear(x[..., self.dn :], self.D, mask_down)
        return torch.cat([F.linear(h, self.A.to(x.dtype)), _linear(h, self.B, mask_up)], dim=-1)

    def half(self, name: str) -> nn.Parameter:
        return self.B if name == "up" else self.D


class LoRALinear(LowRankLinear):
    """Plain LoRA (the baselines, and any adapter applied unfused for inference)."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        up: torch.Tensor | None = None,
        down: torch.Tensor | None = None,
        trainable: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__(base, alpha / rank)
        dev = base.weight.device
        m, n = self.out_features, self.in_features
        if down is None:
            down = torch.empty(rank, n)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        if up is None:
            up = torch.zeros(m, rank)
        if up.shape != (m, rank) or down.shape != (rank, n):
            raise ConfigError(
                f"adapter shapes {tuple(up.shape)} / {tuple(down.shape)} do not fit a {m}x{n} layer at rank {rank}"
            )
        self.rank = rank
        self.up = nn.Parameter(up.float().to(dev), requires_grad=trainable)
        self.down = nn.Parameter(down.float().to(dev), requires_grad=trainable)

    def up_weight(self) -> torch.Tensor:
        return self.up

    def down_weight(self) -> torch.Tensor:
        return self.down


class ZipLoRALinear(LowRankLinear):
    """Two frozen LoRAs mixed by learnt per-column merger vectors (ZipLoRA).

    `dW = dW1 diag(m1) + dW2 diag(m2)`. `mode` selects the merged layer or one of the
    two source LoRAs alone (the distillation targets).
    """

    def __init__(self, base: nn.Linear, up1, down1, scale1, up2, down2, scale2):
        super().__init__(base, 1.0)
        dev = base.weight.device
        self.register_buffer("up1", (up1.float() * scale1).to(dev))
        self.register_buffer("down1", down1.float().to(dev))
        self.register_buffer("up2", (up2.float() * scale2).to(dev))
        self.register_buffer("down2", down2.float().to(dev))
        self.m1 = nn.Parameter(torch.ones(self.in_features, device=dev))
        self.m2 = nn.Parameter(torch.ones(self.in_features, device=dev))
        self.mode = "merged"

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "first":
            return self.apply_up(self.apply_down(x, self.down1), self.up1)
        if self.mode == "second":
            return self.apply_up(self.apply_down(x, self.down2), self.up2)
        # diag(m) scales the down projection's columns (R x n: cheap, and right for convolutions)
        first = self.apply_up(self.apply_down(x, self.down1 * self.m1), self.up1)
        return first + self.apply_up(self.apply_down(x, self.down2 * self.m2), self.up2)

    def up_weight(self) -> torch.Tensor:
        return torch.cat([self.up1, self.up2], dim=1)

    def down_weight(self) -> torch.Tensor:
        return torch.cat([self.down1 * self.m1, self.down2 * self.m2], dim=0)

    def overlap(self) -> torch.Tensor:
        """ZipLoRA's |m1 . m2| term: merger vectors should pick different columns."""
        return (self.m1 * self.m2).abs().sum()
