import subprocess
import sys

import pytest
import torch
from torch import nn

from b4m_core.config import ConfigError, PLPConfig
from b4m_core.layers import PLPLinear, make_bases


@pytest.mark.parametrize("m,n", [(64, 64), (64, 48), (320, 2048), (40, 33)])
@pytest.mark.parametrize("rank", [4, 5, 16])
def test_exact_bases_give_zero_ac(m, n, rank):
    a, c = make_bases(PLPConfig(rank=rank, basis_mode="exact"), "blk.attn2.to_k", m, n)
    assert a.shape == (m // 2, rank) and c.shape == (rank, n // 2)
    assert (a @ c).abs().max().item() < 1e-6
    assert a.abs().max() > 0 and c.abs().max() > 0


def test_paper_bases_are_small_not_zero_and_random_are_not_small():
    m = n = 64
    a, c = make_bases(PLPConfig(rank=8, basis_mode="paper"), "x", m, n)
    ac_paper = (a @ c).abs().max().item()
    assert ac_paper > 1e-4  # not exactly zero: the released code's construction
    ar, cr = make_bases(PLPConfig(rank=8, basis_mode="random"), "x", m, n)
    ac_random = (ar @ cr).abs().max().item()
    ae, ce = make_bases(PLPConfig(rank=8, basis_mode="exact"), "x", m, n)
    assert ac_random > 1e-3
    assert (ae @ ce).abs().max().item() < 1e-6 < ac_paper
    # paper bases are rows of one orthogonal matrix: C's rows are orthogonal to each other
    full_c = make_bases(PLPConfig(rank=8, rho=0.999, basis_mode="paper"), "x", m, n)[1]
    gram = full_c @ full_c.T
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max() < 0.05 * torch.diag(gram).abs().min()


@pytest.mark.parametrize("m,n", [(64, 64), (64, 48), (40, 384)])
def test_principal_bases_read_and_write_along_the_weights_top_directions(m, n):
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    cfg = PLPConfig(rank=8, basis_mode="principal")
    a, c = make_bases(cfg, "x", m, n, w)
    assert a.shape == (m // 2, 8) and c.shape == (8, n // 2)
    assert (a @ c).abs().max().item() < 1e-6  # exact: A C = 0
    assert torch.linalg.matrix_norm(a) == pytest.approx(torch.linalg.matrix_norm(c).item(), rel=1e-4)
    # C's rows span the top right singular vectors of W0's first n/2 columns: projecting
    # onto them keeps more of W0 than a random basis of the same rank (exact's) does
    _, _, vh = torch.linalg.svd(w[:, : n // 2].double(), full_matrices=False)
    basis = torch.linalg.svd(c.double(), full_matrices=False)[2][:4].T
    assert torch.allclose(basis @ basis.T @ vh[:4].T, vh[:4].T, atol=1e-5)
    kept = lambda cc: torch.linalg.matrix_norm(w[:, : n // 2] @ torch.linalg.pinv(cc) @ cc).item()
    assert kept(c) > 1.3 * kept(make_bases(PLPConfig(rank=8), "x", m, n)[1])
    # the halves own disjoint latent coordinates (so Adam keeps a k = 0 half in its own)
    assert not a[:, 4:].any() and not c[:4].any()
    # the same weight gives the same bits (the sign of every singular vector is fixed)
    assert torch.equal(a, make_bases(cfg, "x", m, n, w.clone())[0])
    with pytest.raises(ConfigError, match="needs the base layer's weight"):
        make_bases(cfg, "x", m, n)


def test_bases_depend_on_seed_name_and_shape_only():
    cfg = PLPConfig(rank=8, basis_seed=3)
    a1, c1 = make_bases(cfg, "layer.a", 32, 32)
    a2, c2 = make_bases(cfg, "layer.a", 32, 32)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    a3, _ = make_bases(cfg, "layer.b", 32, 32)
    a4, _ = make_bases(PLPConfig(rank=8, basis_seed=4), "layer.a", 32, 32)
    assert not torch.equal(a1, a3) and not torch.equal(a1, a4)


def test_bases_identical_in_another_process():
    code = (
        "import torch,sys; from b4m_core.layers import make_bases; from b4m_core.config import PLPConfig;"
        "a,c=make_bases(PLPConfig(rank=8,basis_seed=7),'l',48,40); sys.stdout.write(str(float(a.double().sum()))"
        "+' '+str(float(c.double().sum())))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    a, c = make_bases(PLPConfig(rank=8, basis_seed=7), "l", 48, 40)
    assert float(out[0]) == float(a.double().sum()) and float(out[1]) == float(c.double().sum())


def test_config_rejects_bad_values():
    for kwargs in (
        {"rank": 0},
        {"rho": 1.0},
        {"rho": -0.1},
        {"basis_mode": "x"},
        {"content_half": "left"},
        {"targets": "all"},
        {"alpha": 0},
        {"rank": 1},
    ):
        with pytest.raises(ConfigError):
            PLPConfig(**kwargs)


def _layer(m=24, n=20, **kw):
    torch.manual_seed(0)
    return PLPLinear(nn.Linear(n, m), PLPConfig(rank=4, alpha=8, **kw), "l")


def test_plp_starts_as_identity_and_matches_full_update():
    layer = _layer()
    x = torch.randn(3, 5, 20)
    assert torch.allclose(layer(x), layer.base(x), atol=1e-6)  # A C x is 0 up to float rounding
    with torch.no_grad():
        layer.B.normal_()
        layer.D.normal_()
    expected = layer.base(x) + x @ layer.delta_weight().T
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # block structure of dW: top-left is A C = 0 in exact mode
    dw = layer.delta_weight()
    assert dw[: layer.dm, : layer.dn].abs().max() < 1e-6
    assert torch.allclose(dw[: layer.dm, layer.dn :], layer.scale * layer.A @ layer.D, atol=1e-6)
    assert torch.allclose(dw[layer.dm :, : layer.dn], layer.scale * layer.B @ layer.C, atol=1e-6)
    assert torch.allclose(dw[layer.dm :, layer.dn :], layer.scale * layer.B @ layer.D, atol=1e-6)


def test_a_c_are_buffers_b_d_parameters():
    layer = _layer()
    names = {n for n, _ in layer.named_parameters()}
    assert "B" in names and "D" in names and "A" not in names and "C" not in names
    assert {"A", "C"} <= {n for n, _ in layer.named_buffers()}


def _layer_change_per_adam_step(layer: PLPLinear, half: str) -> float:
    """|dW| after one Adam step on one half (the other frozen), from B = D = 0."""
    torch.manual_seed(1)
    x, target = torch.randn(8, layer.in_features), torch.randn(8, layer.out_features)
    with torch.no_grad():  # a start where both halves get gradients
        layer.B.normal_(0, 0.01)
        layer.D.normal_(0, 0.01)
    before = layer.delta_weight().clone()
    opt = torch.optim.Adam([layer.half(half)], lr=1e-3)
    ((layer(x) - target) ** 2).mean().backward()
    opt.step()
    return (layer.delta_weight() - before).norm().item()


@pytest.mark.parametrize("m,n,rank", [(64, 64, 4), (320, 320, 16), (320, 768, 16)])
def test_balanced_bases_let_either_half_move_the_layer_alike(m, n, rank):
    """DESIGN.md 1: A and C at one scale, so an optimizer step on B (through B C) and on D
    (through A D) change the layer by comparable amounts; the legacy exact bases do not."""
    moves = {}
    for scale in ("legacy", "balanced"):
        torch.manual_seed(0)
        layer = PLPLinear(nn.Linear(n, m), PLPConfig(rank=rank, alpha=rank, basis_scale=scale), "blk.attn.to_k")
        assert (layer.A @ layer.C).abs().max() < 1e-5  # still exact
        moves[scale] = _layer_change_per_adam_step(layer, "up") / _layer_change_per_adam_step(layer, "down")
        if scale == "balanced":
            assert torch.isclose(torch.linalg.matrix_norm(layer.A), torch.linalg.matrix_norm(layer.C), rtol=1e-4)
    # a step moves every element by ~lr: |dB C| / |A dD| ~ sqrt((m-dm)/(n-dn)) once |A| = |C|
    shape = ((m - m // 2) / (n - n // 2)) ** 0.5
    assert 0.5 < moves["balanced"] / shape < 2, moves
    assert moves["legacy"] / shape < 0.4, moves  # B (through the small C) learnt 3-6x slower


def test_basis_scale_is_part_of_the_bases_and_is_checked():
    a1, c1 = make_bases(PLPConfig(rank=8), "l", 32, 32)
    a2, c2 = make_bases(PLPConfig(rank=8, basis_scale="balanced"), "l", 32, 32)
    assert not torch.allclose(a1, a2)
    # the same directions, other lengths
    assert torch.allclose(a1 / a1.norm(), a2 / a2.norm(), atol=1e-6)
    with pytest.raises(ConfigError):
        PLPConfig(basis_scale="big")


def test_bases_are_drawn_once_per_process_and_handed_out_as_copies():
    """A second run on the same model skips the draws (same bits); a caller writing into its
    bases (loading an adapter's) does not change what the next caller gets."""
    from b4m_core.layers import _cached_bases

    cfg = PLPConfig(rank=8, rho=0.5, basis_seed=123)
    _cached_bases.cache_clear()
    a1, c1 = make_bases(cfg, "layer.x", 40, 24)
    a2, c2 = make_bases(cfg, "layer.x", 40, 24)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)
    assert _cached_bases.cache_info().hits == 1 and _cached_bases.cache_info().misses == 1
    a1.zero_()
    a3, _ = make_bases(cfg, "layer.x", 40, 24)
    assert torch.equal(a3, a2) and a3.abs().sum() > 0
    # another seed or shape is another draw
    assert not torch.equal(make_bases(PLPConfig(rank=8, rho=0.5, basis_seed=124), "layer.x", 40, 24)[0], a2)
    # principal bases depend on the weights: cached under their bytes, a changed weight
    # (or another dtype of it) is another SVD, and the cache stays within its byte bound
    from b4m_core import layers

    layers._PRINCIPAL_CACHE.clear()
    layers._principal_cached[0] = 0
    w, pcfg = torch.randn(40, 24), PLPConfig(rank=8, rho=0.5, basis_mode="principal")
    before = _cached_bases.cache_info().currsize
    p1 = make_bases(pcfg, "layer.x", 40, 24, w)
    assert _cached_bases.cache_info().currsize == before and len(layers._PRINCIPAL_CACHE) == 1
    p1[0].zero_()  # a copy
    p2 = make_bases(pcfg, "layer.x", 40, 24, w.clone())
    assert len(layers._PRINCIPAL_CACHE) == 1 and p2[0].abs().sum() > 0
    assert all(torch.equal(x, y) for x, y in zip(p2, layers._draw_bases(pcfg, "layer.x", 40, 24, w)))
    w2 = w.clone()
    w2[0, 0] += 1e-3
    p3 = make_bases(pcfg, "layer.x", 40, 24, w2)
    assert len(layers._PRINCIPAL_CACHE) == 2 and not torch.equal(p3[1], p2[1])
    make_bases(pcfg, "layer.x", 40, 24, w.half())
    assert len(layers._PRINCIPAL_CACHE) == 3
    one = layers._nbytes(p2)
    old_bound, layers.PRINCIPAL_CACHE_BYTES = layers.PRINCIPAL_CACHE_BYTES, 2 * one
    try:
        make_bases(pcfg, "layer.y", 40, 24, w)
        assert len(layers._PRINCIPAL_CACHE) == 2 and layers._principal_cached[0] <= 2 * one
    finally:
        layers.PRINCIPAL_CACHE_BYTES = old_bound


# ------------------------------------------------------------------ convolutions (LoCon-like)
def _conv_layer(basis_mode="exact", stride=1):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=stride, padding=1)
    layer = PLPLinear(conv, PLPConfig(rank=4, alpha=8, basis_mode=basis_mode), "blk.resnets.0.conv1")
    with torch.no_grad():
        layer.B.normal_()
        layer.D.normal_()
    return layer


@pytest.mark.parametrize("basis_mode", ["exact", "principal"])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_convolutions_update_is_its_matrix_update_as_a_kernel(basis_mode, stride):
    """A PLP convolution reads its weight as out x (in kh kw): its output is the base
    convolution with `delta_weight` added to the kernel, whatever the stride."""
    layer = _conv_layer(basis_mode, stride)
    assert (layer.in_features, layer.out_features) == (6 * 9, 10)
    x = torch.randn(2, 6, 8, 8)
    kernel = layer.base.weight + layer.delta_weight().view_as(layer.base.weight)
    expected = torch.nn.functional.conv2d(x, kernel, layer.base.bias, stride=stride, padding=1)
    assert torch.allclose(layer(x), expected, atol=1e-4)


def _routing_case(kind: str):
    """A PLP layer with both halves set, an input, and the layer's output for one row computed
    from explicit (possibly detached) halves, for either kind of base layer."""
    if kind == "linear":
        layer = _layer()
        with torch.no_grad():
            layer.B.normal_()
            layer.D.normal_()
        x, w = torch.randn(4, 6, 20), torch.randn(4, 6, 24)

        def row(xi, up, down):
            return layer.base(xi) + layer.scale * (xi @ down.T) @ up.T

        return layer, x, w, row
    layer = _conv_layer()
    x, w = torch.randn(4, 6, 5, 5), torch.randn(4, 10, 5, 5)

    def row(xi, up, down):
        kernel = (layer.scale * up @ down).view(10, 6, 3, 3)
        return layer.base(xi[None]) + torch.nn.functional.conv2d(xi[None], kernel, padding=1)

    return layer, x, w, row


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("primary", ["up", "down"])
def test_routing_matches_detached_reference(primary, kind):
    """One routed pass gives exactly the gradients of 'each row sees the other half detached'
    (a convolution's routed rows compute both copies and pick per row)."""
    layer, x, w, row = _routing_case(kind)
    x.requires_grad_(True)
    route = torch.tensor([True, False, False, True])
    layer.primary, layer.route = primary, route
    (layer(x) * w).sum().backward()
    g_b, g_d, g_x = layer.B.grad.clone(), layer.D.grad.clone(), x.grad.clone()
    layer.route = None
    layer.B.grad = layer.D.grad = None
    x2 = x.detach().clone().requires_grad_(True)
    total = 0
    for i in range(4):
        mine = route[i].item()
        train_up = mine if primary == "up" else not mine
        b = layer.B if train_up else layer.B.detach()
        d = layer.D.detach() if train_up else layer.D
        up, down = torch.cat([layer.A, b]), torch.cat([layer.C, d], dim=1)
        total = total + (row(x2[i], up, down) * w[i]).sum()
    total.backward()
    assert layer.B.grad.abs().sum() > 0 and layer.D.grad.abs().sum() > 0
    tol = 1e-5 if kind == "linear" else 1e-4  # a convolution sums 9x more products per output
    assert torch.allclose(g_b, layer.B.grad, atol=tol)
    assert torch.allclose(g_d, layer.D.grad, atol=tol)
    assert torch.allclose(g_x, x2.grad, atol=tol)


def test_grouped_convolutions_are_refused():
    with pytest.raises(ConfigError, match="ungrouped"):
        PLPLinear(nn.Conv2d(4, 4, 3, groups=2), PLPConfig(rank=4), "x")
