"""The original repository's scripts, with ``iunets`` replaced by ``iunet_nb``, at a tiny CPU size.

GitHub ``cetmann/iunets`` had two scripts, in one version each (added in its first
commit, March 2020, deleted in September 2020); both use the first public API
(``iUNet(channels, dim=..., architecture=..., create_module_fn=..., slice_fraction=...,
learnable_downsampling=..., disable_custom_gradient=...)``):

* ``test_3d.py`` -- a 3D iUNet of 24 channels with ``slice_fraction=4``, seven levels of
  ten couplings, the reference's ``layers.create_standard_module``; one forward of a
  normalised ramp of shape ``(1, 24, 256, 256, 256)`` on CUDA, the sum of the output
  as loss, one backward, then the inverse of the output compared with a copy of the
  input (made because memcnn frees the input);
* ``test_mnist.py`` -- MNIST classification: a 1x1 convolution from 1 to 16 channels
  with constant weights ``1/16``, a 2D iUNet (16 channels, ``slice_fraction=2``, five
  levels of two couplings, ``networks.create_standard_module``), a convolution with the
  full ``32 x 32`` kernel as pooling, flatten, a linear layer to ten classes;
  cross-entropy; Adam (``lr=1e-4``, ``weight_decay=1e-6``); replication padding 28 -> 32.

Here: the same construction calls with only the package name changed; CPU; no
torchvision and no download (inputs synthesised with the scripts' shapes: the ramp,
and 28 x 28 one-channel images whose class shows in them); fewer levels and a smaller
volume for the 3D script, a batch of eight images for MNIST.  Checked: output
shapes, exact inversion, that the caller's input is neither freed nor changed
(the 3D script's copy is not needed), that every parameter gets a finite
gradient, and that a few optimiser steps lower the loss.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import iunet_nb
from iunet_nb import networks
from iunet_nb.networks import iUNet

torch.set_num_threads(1)


def _build(*args, **kwargs) -> iUNet:
    """The scripts' first-API call; it warns once with the modern equivalent."""
    with pytest.warns(FutureWarning, match="channels="):
        return iUNet(*args, **kwargs)


def _ramp(n_channels: int, side: int) -> torch.Tensor:
    """The 3D script's input: ``0, 1, ..., n-1`` over ``n`` voxels, divided by ``n``, ``(1, C, s, s, s)``."""
    n = n_channels * side ** 3
    return (torch.arange(n).float().view(1, n_channels, side, side, side) / n).contiguous()


@pytest.mark.parametrize("me_backend", ["fused", "memcnn"])
def test_3d_script(me_backend):
    n_channels, side = 24, 8  # the script: 24 channels, 256^3 voxels, 7 levels of 10 couplings
    x = _ramp(n_channels, side)
    x_orig = x.clone()
    model = _build(n_channels, dim=3, architecture=[2, 2, 2], create_module_fn=iunet_nb.layers.create_standard_module,
                   slice_fraction=4, learnable_downsampling=True, disable_custom_gradient=False)
    model.me_backend = me_backend
    assert model.channels == (24, 48, 96)  # (c // slice_fraction) * 2**3 channels go down
    y = model(x)
    assert y.shape == x.shape
    loss = torch.sum(y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().max() > 0 for g in grads)
    model.zero_grad()
    assert x.untyped_storage().size() > 0 and torch.equal(x, x_orig)  # memcnn would have freed x
    with torch.no_grad():
        z = model.inverse(y)
    assert torch.mean((x_orig - z) ** 2).item() < 1e-10

    # a few steps towards a target (the script's loss, the sum, has no minimum): shrink the output
    target = torch.zeros_like(x_orig)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        step_loss = torch.mean((model(x) - target) ** 2)
        step_loss.backward()
        optimizer.step()
        losses.append(step_loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    with torch.no_grad():
        assert (model.inverse(model(x)) - x).abs().max().item() < 1e-4


def _digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-shaped ``(n, 1, 28, 28)`` normalised images and labels ``(n,)``: class ``k`` lights row band ``k``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = 0.1 * torch.rand(n, 1, 28, 28, generator=g)
    for i, k in enumerate(labels.tolist()):
        images[i, 0, 2 + 2 * k: 4 + 2 * k, 4:24] += 1.0
    return (images - 0.1307) / 0.3081, labels


def test_mnist_script():
    n_blowup_channels, size, dim = 16, 32, 2
    padding = torch.nn.ReplicationPad2d(2)
    blowup_layer = torch.nn.Conv2d(1, n_blowup_channels, 1)
    blowup_layer.weight.data = torch.ones_like(blowup_layer.weight) / n_blowup_channels
    iunet = _build(n_blowup_channels, dim=dim, slice_fraction=2, architecture=[2, 2, 2, 2, 2],
                   disable_custom_gradient=False, create_module_fn=networks.create_standard_module,
                   learnable_downsampling=True)
    assert iunet.channels == (16, 32, 64, 128, 256)
    pooling_layer = torch.nn.Conv2d(n_blowup_channels, n_blowup_channels, size, bias=False)
    model = torch.nn.Sequential(blowup_layer, iunet, pooling_layer, torch.nn.Flatten(),
                                torch.nn.Linear(n_blowup_channels, 10))
    model.zero_grad()
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-6)  # as the script (20 epochs there)

    images, labels = _digits(8, seed=0)
    x = padding(images)
    assert x.shape == (8, 1, size, size)
    h = blowup_layer(x)
    with torch.no_grad():
        assert (iunet.inverse(iunet(h)) - h).abs().max().item() < 1e-4
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        output = model(x)
        assert output.shape == (8, 10)
        loss = loss_fn(output, labels)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        losses.append(loss.item())
        optimizer.step()
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    with torch.no_grad():  # still invertible after training
        h = blowup_layer(x)
        assert (iunet.inverse(iunet(h)) - h).abs().max().item() < 1e-4


def test_first_api_warning_names_the_modern_call():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        iUNet(16, dim=2, slice_fraction=2, architecture=[1, 1], create_module_fn=networks.create_standard_module,
              learnable_downsampling=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert len(messages) == 1 and "channels=(16, 32)" in messages[0] and "learnable_resampling=False" in messages[0]
