"""Tests for iunet_nb.nn.mixing (orthogonal channel mixing)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call

from iunet_nb.nn.mixing import MIXING_INITS, OrthogonalChannelMixing
from iunet_nb.nn.orthogonal import METHODS, orthogonal_matrix, orthogonality_error

torch.set_num_threads(1)

SPATIAL = {1: (10,), 2: (6, 5), 3: (3, 4, 2)}


def _perturb(module: OrthogonalChannelMixing) -> None:
    if module.weight is not None:
        with torch.no_grad():
            module.weight.copy_(0.5 * torch.randn_like(module.weight))


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("init", MIXING_INITS)
@pytest.mark.parametrize("learnable", [True, False])
def test_round_trip(dim: int, method: str, init: str, learnable: bool) -> None:
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        mix = OrthogonalChannelMixing(6, dim=dim, method=method, init=init, learnable=learnable,
                                      dtype=dtype)
        _perturb(mix)
        Q = mix.kernel()
        assert Q.shape == (6, 6) and orthogonality_error(Q) <= tol
        x = torch.randn(2, 6, *SPATIAL[dim], dtype=dtype)
        y = mix(x)
        assert y.shape == x.shape and y.dtype == dtype
        assert (mix.inverse(y) - x).abs().max().item() <= tol
        assert (mix(mix.inverse(x)) - x).abs().max().item() <= tol
        # y[:, i] = sum_j Q[i, j] x[:, j]
        expected = torch.einsum("ij,nj...->ni...", Q, x)
        torch.testing.assert_close(y, expected, rtol=0, atol=10 * tol)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_gradcheck(dim: int, method: str) -> None:
    torch.manual_seed(1)
    mix = OrthogonalChannelMixing(3, dim=dim, method=method, dtype=torch.float64)
    spatial = {1: (4,), 2: (3, 2), 3: (2, 2, 2)}[dim]
    x = torch.randn(1, 3, *spatial, dtype=torch.float64, requires_grad=True)
    W = (0.3 * torch.randn(3, 3, dtype=torch.float64)).requires_grad_(True)
    assert gradcheck(lambda i, w: functional_call(mix, {"weight": w}, (i,)), (x, W))

    # inverse with a precomputed kernel: gradients reach the parameter through it
    assert gradcheck(
        lambda i, w: mix.inverse(i, kernel=mix.base @ orthogonal_matrix(w, method)), (x, W)
    )


def test_identity_init_and_fixed() -> None:
    mix = OrthogonalChannelMixing(4, init="identity")
    x = torch.randn(1, 4, 3, 3)
    assert torch.equal(mix(x), x)
    fixed = OrthogonalChannelMixing(4, learnable=False)
    assert fixed.weight is None and list(fixed.parameters()) == []
    assert fixed.kernel() is fixed.base
    assert set(fixed.state_dict()) == {"base"}


def test_kernel_once_and_precomputed(monkeypatch) -> None:
    mix = OrthogonalChannelMixing(4, dim=1)
    calls = []
    original = OrthogonalChannelMixing.kernel

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(OrthogonalChannelMixing, "kernel", counting)
    x = torch.randn(2, 4, 5)
    y = mix(x)
    mix.inverse(y)
    assert len(calls) == 2
    k = mix.kernel()
    assert torch.equal(mix(x, kernel=k), y)
    mix.inverse(y, kernel=k)
    assert len(calls) == 3
    with pytest.raises(ValueError, match=r"kernel must have shape \(4, 4\)"):
        mix(x, kernel=torch.eye(3))


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    a = OrthogonalChannelMixing(5, method="householder")
    _perturb(a)
    torch.manual_seed(1)
    b = OrthogonalChannelMixing(5, method="householder")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 5, 4, 4)
    assert torch.equal(a(x), b(x))


def test_autocast() -> None:
    mix = OrthogonalChannelMixing(4, method="exp")
    _perturb(mix)
    x = torch.randn(1, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k = mix.kernel()
        y = mix(x)
    assert k.dtype == torch.float32 and orthogonality_error(k) <= 1e-5
    torch.testing.assert_close(y.float(), mix(x), atol=5e-2, rtol=5e-2)


def test_errors() -> None:
    mix = OrthogonalChannelMixing(4, dim=2)
    with pytest.raises(ValueError, match=r"dim=2 spatial dims.*got shape \(1, 4, 3\)"):
        mix(torch.randn(1, 4, 3))
    with pytest.raises(ValueError, match="expected 4 channels"):
        mix(torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError, match="expected 4 channels"):
        mix.inverse(torch.randn(1, 5, 3, 3))
    with pytest.raises(ValueError, match="'exp', 'cayley', 'householder'"):
        OrthogonalChannelMixing(4, method="givens")
    with pytest.raises(ValueError, match="'identity', 'random'"):
        OrthogonalChannelMixing(4, init="haar")
    with pytest.raises(ValueError, match="dim must be"):
        OrthogonalChannelMixing(4, dim=0)
    with pytest.raises(ValueError, match="positive int"):
        OrthogonalChannelMixing(0)
    with pytest.raises(TypeError):
        OrthogonalChannelMixing(4, kernel_size=1)
