"""The iUNet behaves like any nn.Module under autograd, and bad input is a clear, early error."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from iunet_nb import AdditiveCoupling, check_invertible, iUNet
from iunet_nb.nn.checks import probe_input
from iunet_nb.nn.coupling import create_standard_module

ENGINES = ("fused", "memcnn")
MODES = ("conventional",) + ENGINES


def model_for(mode: str, channels=(5, 8), **kwargs) -> iUNet:
    """A small float64 2D iUNet (level 0 keeps fewer channels than it sends), off its init."""
    torch.manual_seed(0)
    model = iUNet(channels=channels, architecture=(2, 1), dim=2, verbose=0,
                  disable_custom_gradient=mode == "conventional",
                  me_backend="fused" if mode == "conventional" else mode, **kwargs).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def x_for(model: iUNet, batch: int = 2, size: int = 8, requires_grad: bool = True) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, model.channels[0], size, size, dtype=torch.float64, requires_grad=requires_grad)


@pytest.mark.parametrize("engine", ENGINES)
def test_double_backward_is_a_clear_error(engine: str) -> None:
    model = model_for(engine)
    x = x_for(model)
    y = model(x)
    with pytest.raises(RuntimeError, match="disable_custom_gradient=True"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


def test_double_backward_works_with_plain_autograd() -> None:
    model = model_for("conventional")
    x = x_for(model)
    (g,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()  # a gradient penalty
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_memcnn_engine_refuses_a_second_backward_clearly() -> None:
    model = model_for("memcnn")
    loss = model(x_for(model)).pow(2).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("mode", ["conventional", "fused"])
def test_backward_twice_with_retain_graph_accumulates(mode: str) -> None:
    model = model_for(mode)
    x = x_for(model)
    loss = model(x).pow(2).sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    loss.backward()
    second = [x.grad] + [p.grad for p in model.parameters()]
    for a, b in zip(first, second):
        torch.testing.assert_close(b, 2 * a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [8, 7])  # 7: padded and cropped output (a view)
def test_in_place_change_of_output_is_detected(engine: str, size: int) -> None:
    model = model_for(engine)
    y = model(x_for(model, size=size))
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation|modified in place"):
        y.pow(2).sum().backward()


@pytest.mark.parametrize("mode", MODES)
def test_empty_batch_gives_empty_output_and_zero_gradients(mode: str) -> None:
    model = model_for(mode)
    x = x_for(model, batch=0, size=7)
    y = model(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in model.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    with torch.no_grad():
        assert model.inverse(model(x)).shape == x.shape


@pytest.mark.parametrize("dtype, match", [(torch.int64, "floating-point"), (torch.uint8, "floating-point"),
                                          (torch.float16, "parameters are float32"),
                                          (torch.float64, "parameters are float32")])
def test_wrong_input_dtype_is_a_clear_error(dtype: torch.dtype, match: str) -> None:
    model = iUNet(channels=(4, 8), architecture=(1, 1), dim=2, verbose=0)
    with pytest.raises(TypeError, match=match):
        model(torch.zeros(1, 4, 8, 8, dtype=dtype))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(architecture=1), TypeError, "architecture must be a sequence"),
    (dict(architecture=(1, 10**9)), ValueError, r"architecture\[1\]"),
    (dict(verbose="yes"), TypeError, "verbose must be an int"),
    (dict(padding_value="a"), TypeError, "padding_value must be a number"),
    (dict(check_blocks="no"), TypeError, "check_blocks"),
])
def test_bad_constructor_arguments_are_clear_errors(kwargs: dict, error: type, match: str) -> None:
    base = dict(channels=(4, 8), architecture=(1, 1), dim=2)
    base.update(kwargs)
    with pytest.raises(error, match=match):
        iUNet(**base)


# ----------------------------------------------------------------------------- the block contract
class _WrongInverse(AdditiveCoupling):
    """``inverse`` adds f(v) where it must subtract: right at init (f = 0), wrong after."""

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        r = self.channels - self.split
        v, w = y[:, :r], y[:, r:]
        return torch.cat([w + self.f(v), v], dim=1)


def _wrong_inverse_block(c: int, dim: int, **_: object) -> nn.Module:
    return _WrongInverse(nn.Conv2d(c - c // 2, c // 2, 3, padding=1), c, c // 2)


def _wrong_channels_block(c: int, dim: int, **_: object) -> nn.Module:
    return AdditiveCoupling(nn.Conv2d(c - c // 2, c // 2 + 1, 3, padding=1), c, c // 2)


class _Grow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x[:, :1]], 1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, :-1]


@pytest.mark.parametrize("fn, match", [
    (_wrong_inverse_block, "does not invert its forward"),
    (_wrong_channels_block, "must map v of shape"),
    (lambda c, dim, **_: _Grow(), "same shape"),
    (lambda c, dim, **_: nn.Identity(), "no inverse"),
])
def test_wrong_user_block_is_rejected_at_construction(fn, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        iUNet(channels=(4, 8), architecture=(1, 1), dim=2, create_module_fn=fn, verbose=0)


def test_check_blocks_false_skips_the_run_check() -> None:
    model = iUNet(channels=(4, 8), architecture=(1, 1), dim=2, create_module_fn=_wrong_inverse_block,
                  verbose=0, check_blocks=False)
    assert isinstance(model.encoder_modules[0][0], _WrongInverse)


def test_check_invertible_accepts_the_standard_blocks_and_leaves_them_unchanged() -> None:
    for dim in (1, 2, 3):
        for c in (2, 3, 8):
            block = create_standard_module(c, dim=dim, depth=2, module_index=c)
            before = {k: v.clone() for k, v in block.state_dict().items()}
            check_invertible(block, probe_input(c, dim))
            after = block.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
