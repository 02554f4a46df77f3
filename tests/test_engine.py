"""Memory-efficient backprop (fused and memcnn engines) against plain autograd."""
from __future__ import annotations

import copy
import io
import random

import pytest
import torch
from torch import nn

from iunet_nb.nn.coupling import AdditiveCoupling
from iunet_nb.arch.iunet import iUNet

ENGINES = ("fused", "memcnn")


def _randomize(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _grads(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y * weight).sum().backward()
    return y.detach(), x.grad.detach(), [None if p.grad is None else p.grad.detach().clone()
                                        for p in model.parameters()]


def _compare(model: iUNet, x: torch.Tensor, engine: str, tol: float = 1e-10) -> float:
    with torch.no_grad():
        y0 = model(x)
    weight = torch.randn(y0.shape, dtype=x.dtype) / y0.numel() ** 0.5
    model.disable_custom_gradient = True
    y_ref, gx_ref, gp_ref = _grads(model, x, weight)
    model.disable_custom_gradient = False
    model.me_backend = engine
    y, gx, gp = _grads(model, x, weight)
    worst = (y - y_ref).abs().max().item()
    worst = max(worst, (gx - gx_ref).abs().max().item())
    for a, b in zip(gp, gp_ref):
        assert (a is None) == (b is None)
        if a is not None:
            worst = max(worst, (a - b).abs().max().item())
    assert worst <= tol, f"max abs difference {worst:.3g} > {tol}"
    return worst


def _random_config(rng: random.Random) -> tuple[dict, tuple[int, ...]]:
    dim = rng.choice([1, 2, 3])
    levels = rng.choice([2, 3])
    strides = []
    for _ in range(levels - 1):
        if dim == 1:
            strides.append(rng.choice([2, 3]))
        else:
            s = [rng.choice([1, 2]) for _ in range(dim)]
            if all(v == 1 for v in s):
                s[-1] = 2
            strides.append(tuple(s))
    init = rng.choice(["haar", "pixel_shuffle", "random"])
    if any(v > 2 for st in strides for v in ((st,) if isinstance(st, int) else st)) and init == "haar":
        init = "pixel_shuffle"
    c0 = rng.choice([4, 5, 6])
    channels = [c0]
    for st in strides:
        m = st if isinstance(st, int) else int(torch.tensor(st).prod())
        sent = max(1, channels[-1] // 2)
        channels.append(m * sent)
    config = dict(
        channels=tuple(channels),
        architecture=tuple(rng.choice([1, 2]) for _ in range(levels)),
        dim=dim,
        resampling_stride=strides,
        resampling_method=rng.choice(["exp", "cayley", "householder"]),
        resampling_init=init,
        learnable_resampling=rng.choice([True, False]),
        channel_mixing_freq=rng.choice([-1, 0, 1]),
        channel_mixing_method=rng.choice(["exp", "cayley", "householder"]),
        verbose=0,
    )
    factors = [1] * dim
    for st in strides:
        st = (st,) * dim if isinstance(st, int) else st
        factors = [f * s for f, s in zip(factors, st)]
    # odd sizes that need padding in some configurations
    sizes = tuple(f * rng.choice([1, 2]) + rng.choice([0, 1]) for f in factors)
    if dim == 3:
        sizes = tuple(min(s, 9) if s > 9 else s for s in sizes)
    batch = rng.choice([1, 3])
    return config, (batch, channels[0]) + sizes


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", range(10))
def test_randomized_gradient_equality(engine: str, seed: int) -> None:
    rng = random.Random(1000 + seed)
    config, shape = _random_config(rng)
    torch.manual_seed(seed)
    model = iUNet(**config).double()
    _randomize(model, seed=seed)
    x = torch.randn(shape, dtype=torch.float64)
    _compare(model, x, engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_gradient_equality_anisotropic_3d_odd(engine: str) -> None:
    torch.manual_seed(1)
    model = iUNet(channels=(5, 16, 32), architecture=(2, 1, 2), dim=3,
                  resampling_stride=[(2, 2, 2), (1, 2, 2)], resampling_init="haar",
                  resampling_method="exp", verbose=0).double()
    _randomize(model)
    x = torch.randn(1, 5, 5, 7, 9, dtype=torch.float64)
    _compare(model, x, engine)


def _small_model(**kw) -> iUNet:
    torch.manual_seed(0)
    m = iUNet(channels=(4, 8, 16), architecture=(2, 1, 1), dim=2, verbose=0, **kw).double()
    _randomize(m)
    return m


@pytest.mark.parametrize("engine", ENGINES)
def test_caller_input_is_never_freed_or_modified(engine: str) -> None:
    model = _small_model(me_backend=engine)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    x_copy = x.detach().clone()
    y = model(x)
    y.sum().backward()
    assert x.untyped_storage().nbytes() == x.numel() * x.element_size()
    assert torch.equal(x.detach(), x_copy)
    g1 = x.grad.clone()
    # reuse the same input: read it, run and backpropagate through it again
    x.grad = None
    y2 = model(x)
    y2.sum().backward()
    assert torch.allclose(x.grad, g1, rtol=0, atol=1e-12)
    assert torch.equal(y.detach(), y2.detach())


@pytest.mark.parametrize("engine", ENGINES)
def test_as_subnetwork_with_and_without_input_grad(engine: str) -> None:
    torch.manual_seed(0)
    body = _small_model(me_backend=engine)
    pre, post = nn.Conv2d(3, 4, 3, padding=1).double(), nn.Conv2d(4, 2, 3, padding=1).double()
    net = nn.Sequential(pre, body, post)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)

    def grads(custom: bool) -> list[torch.Tensor]:
        body.disable_custom_gradient = not custom
        net.zero_grad(set_to_none=True)
        net(x).square().sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    for a, b in zip(grads(True), grads(False)):
        assert (a - b).abs().max().item() < 1e-10
    # the iUNet as first layer, input without requires_grad
    body.disable_custom_gradient = False
    net2 = nn.Sequential(body, post)
    xin = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    net2.zero_grad(set_to_none=True)
    net2(xin).sum().backward()
    assert all(p.grad is not None for p in body.parameters() if p.requires_grad)


@pytest.mark.parametrize("engine", ENGINES)
def test_two_forwards_then_one_backward(engine: str) -> None:
    model = _small_model(me_backend=engine)
    x1 = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    loss = model(x1).square().sum() + 2 * model(x2).square().sum()
    loss.backward()
    got = [x1.grad.clone(), x2.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    model.disable_custom_gradient = True
    model.zero_grad(set_to_none=True)
    x1.grad = x2.grad = None
    (model(x1).square().sum() + 2 * model(x2).square().sum()).backward()
    want = [x1.grad, x2.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() < 1e-9


def test_no_grad_does_not_build_engine_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _small_model()
    from iunet_nb.engine import fused as engine

    calls = []
    monkeypatch.setattr(engine.FusedInvertibleFunction, "apply",
                        lambda *a: calls.append(1) or (_ for _ in ()).throw(AssertionError("used")))
    with torch.no_grad():
        y = model(torch.randn(1, 4, 8, 8, dtype=torch.float64))
    assert not y.requires_grad and not calls


def test_autocast_bfloat16_runs_and_kernels_are_float32() -> None:
    torch.manual_seed(0)
    model = iUNet(channels=(4, 8, 16), architecture=(1, 1, 1), dim=2, verbose=0)
    _randomize(model)
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    for down in model.downsampling_layers:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert down.kernel().dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_state_dict_round_trip_weights_only(tmp_path) -> None:
    model = _small_model()
    path = tmp_path / "iunet.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    clone = iUNet(channels=(4, 8, 16), architecture=(2, 1, 1), dim=2, verbose=0).double()
    clone.load_state_dict(state)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))


class _BNCoupling(AdditiveCoupling):
    pass


def _bn_dropout_module(in_channels: int, **coords) -> nn.Module:
    u = (in_channels + 1) // 2
    v = in_channels - u
    f = nn.Sequential(nn.Conv2d(v, u, 3, padding=1), nn.BatchNorm2d(u), nn.Dropout(0.3))
    return AdditiveCoupling(f, in_channels, u)


@pytest.mark.parametrize("engine", ENGINES)
def test_batchnorm_stats_updated_once_and_dropout_replayed(engine: str) -> None:
    torch.manual_seed(0)
    model = iUNet(channels=(4, 8), architecture=(2, 1), dim=2, verbose=0,
                  create_module_fn=_bn_dropout_module).double()
    ref = copy.deepcopy(model)
    ref.disable_custom_gradient = True
    model.me_backend = engine
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    torch.manual_seed(123)
    model(x).square().sum().backward()
    torch.manual_seed(123)
    ref(x).square().sum().backward()
    for (name, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, b_ref), f"buffer {name} differs (BatchNorm updated twice?)"
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        assert (p.grad - p_ref.grad).abs().max().item() < 1e-9  # same dropout masks


def test_engine_output_is_not_an_input_alias() -> None:
    model = _small_model()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    y = model(x)
    assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    buf = io.BytesIO()
    torch.save(y.detach(), buf)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_slab_recompute_and_tiled_convolutions_match_autograd(dim: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the slab-wise recomputation and many convolution tiles on a small model."""
    from iunet_nb.engine import steps
    from iunet_nb.nn import tiled

    monkeypatch.setattr(steps, "SLAB_MIN_BYTES", 0)
    monkeypatch.setattr(tiled, "TILE_ELEMENTS", 24)
    torch.manual_seed(dim)
    model = iUNet(channels=(6, 3 * 2 ** dim), architecture=(3, 1), dim=dim, verbose=0).double()
    _randomize(model, seed=dim)
    x = torch.randn((2, 6) + (7,) * dim, dtype=torch.float64)
    _compare(model, x, "fused")
    # and the tiled convolutions themselves against torch's
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[dim]
    w = torch.randn((4, 3) + (3,) * dim, dtype=torch.float64, requires_grad=True)
    xi = torch.randn((2, 3) + (9,) * dim, dtype=torch.float64, requires_grad=True)
    g = torch.randn((2, 4) + (9,) * dim, dtype=torch.float64)
    conv(xi, w, padding=1).backward(g)
    assert len(tiled.tile_bounds(9, 4 * 9 ** (dim - 1))) > 1
    assert torch.allclose(tiled.conv3_tiled(xi.detach(), w.detach()), conv(xi, w, padding=1), atol=1e-12)
    assert torch.allclose(tiled.conv3_transpose_tiled(g, w.detach()), xi.grad, atol=1e-12)
    assert torch.allclose(tiled.conv3_weight_grad_tiled(xi.detach(), g, w.detach()), w.grad, atol=1e-10)
