"""Tests of iunet_nb.notebook.training and iunet_nb.nn.wrappers."""
import pytest
import torch
from torch import nn

from iunet_nb import iUNet
from iunet_nb.notebook.training import optimise, train
from iunet_nb.nn.wrappers import ChannelLift


def test_optimise_minimises_a_quadratic():
    w = torch.tensor([3.0, -2.0], requires_grad=True)
    history = optimise(lambda step: (w - 1).square().sum(), [w], steps=200, lr=0.1, progress=False)
    assert len(history) == 200 and history[-1] < 1e-3 * history[0]
    assert torch.allclose(w.detach(), torch.ones(2), atol=0.05)


@pytest.mark.parametrize("kwargs,err", [(dict(steps=0), ValueError), (dict(optimizer="lbfgs"), ValueError)])
def test_optimise_rejects_bad_arguments(kwargs, err):
    w = torch.zeros(1, requires_grad=True)
    args = dict(steps=1, progress=False)
    args.update(kwargs)
    with pytest.raises(err):
        optimise(lambda s: w.sum(), [w], **args)


def test_optimise_needs_scalar_loss():
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="scalar"):
        optimise(lambda s: w * 2, [w], steps=1, progress=False)


def test_train_fits_a_linear_map():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(64, 3)
    target = x @ torch.tensor([[1.0], [2.0], [-1.0]])
    history = train(model, lambda step: (x, target), steps=300, lr=0.05, progress=False)
    assert history[-1] < 1e-2 * history[0]


def test_channel_lift_starts_as_identity_and_trains():
    torch.manual_seed(0)
    body = iUNet(channels=(4, 8), architecture=(1, 1), dim=2, verbose=0)
    model = ChannelLift(body, 1, 1, 4, dim=2, residual=True)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model(x), x)
    history = train(model, lambda s: (x, torch.zeros_like(x)), steps=20, lr=1e-2, progress=False)
    assert history[-1] < history[0]


def test_channel_lift_shapes_and_errors():
    body = iUNet(channels=(4,), architecture=(1,), dim=1, verbose=0)
    model = ChannelLift(body, 3, 5, 4, dim=1)
    assert model(torch.randn(2, 3, 8)).shape == (2, 5, 8)
    with pytest.raises(ValueError):
        ChannelLift(body, 3, 5, 4, dim=1, residual=True)
    with pytest.raises(ValueError):
        ChannelLift(body, 1, 1, 4, dim=4)
