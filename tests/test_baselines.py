"""Tests of the plain U-Net baseline in iunet_nb.arch.baselines."""

from __future__ import annotations

import pytest
import torch

from iunet_nb.arch.baselines import UNet
from iunet_nb.measure.meter import measure_step

torch.set_num_threads(1)


@pytest.mark.parametrize(
    "dim, shape",
    [(1, (2, 4, 32)), (2, (2, 4, 16, 24)), (3, (1, 4, 8, 8, 16))],
)
def test_output_shape(dim: int, shape: tuple[int, ...]) -> None:
    net = UNet([4, 8, 16], [1, 2, 1], dim=dim)
    x = torch.randn(*shape)
    assert net(x).shape == x.shape


def test_channels_from_in_channels_and_parameter_count() -> None:
    net = UNet(None, [1, 1, 1], in_channels=4)
    assert net.channels == [4, 8, 16]
    # blocks: 3x3 convs + GroupNorm affine; resampling 2x2 convs; 1x1 fuse convs
    blocks = sum(c * c * 9 + 2 * c for c in (4, 8)) * 2 + (16 * 16 * 9 + 2 * 16)
    resampling = 2 * (4 * 8 * 4 + 8 * 16 * 4)
    fuse = 2 * 4 * 4 + 2 * 8 * 8
    assert net.parameter_count() == blocks + resampling + fuse
    assert net.parameter_count() == sum(p.numel() for p in net.parameters())


def test_checkpointed_matches_plain_float64() -> None:
    torch.manual_seed(0)
    plain = UNet([3, 6, 12], [2, 1, 2]).double()
    ckpt = UNet([3, 6, 12], [2, 1, 2], checkpoint_levels=True).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    target = torch.randn_like(x)
    grads = []
    outs = []
    for net in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        y = net(xi)
        ((y - target) ** 2).mean().backward()
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-10, atol=1e-12)


def test_checkpointing_saves_activation_memory() -> None:
    torch.manual_seed(0)
    plain = UNet([16, 32, 64], [3, 3, 3])
    ckpt = UNet([16, 32, 64], [3, 3, 3], checkpoint_levels=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 16, 64, 64)
    m_plain = measure_step(plain, x)
    m_ckpt = measure_step(ckpt, x)
    assert m_plain.grad_bytes == m_ckpt.grad_bytes
    assert m_ckpt.activation_bytes < 0.75 * m_plain.activation_bytes


def test_errors() -> None:
    with pytest.raises(ValueError, match="same non-zero length"):
        UNet([4, 8], [1, 1, 1])
    with pytest.raises(ValueError, match="in_channels"):
        UNet([4, 8], [1, 1], in_channels=3)
    with pytest.raises(ValueError, match="dim"):
        UNet([4, 8], [1, 1], dim=4)
    net = UNet([4, 8, 16], [1, 1, 1])
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 4, 16, 18))
    with pytest.raises(ValueError, match="4-d input"):
        net(torch.randn(4, 16, 16))
