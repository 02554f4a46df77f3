"""Tests of iunet_nb.notebook.subbands and iunet_nb.nn.stack."""
import math

import pytest
import torch

from iunet_nb import InvertibleDownsampling, orthogonal_matrix
from iunet_nb.nn.resampling import haar_matrix
from iunet_nb.nn.stack import InvertibleSequential, random_coupling_stack
from iunet_nb.notebook.subbands import (detail_l1, distance_up_to_signed_permutation, highfreq_energy_fraction,
                               subbands, within_block_energy_fraction)


def test_subbands_selects_channel_groups():
    y = torch.arange(2 * 8 * 3 * 3, dtype=torch.float32).reshape(2, 8, 3, 3)
    assert torch.equal(subbands(y, 4, channel=1), y[:, 4:8])
    with pytest.raises(ValueError):
        subbands(y, 3)
    with pytest.raises(ValueError):
        subbands(y, 4, channel=2)


def test_detail_l1_of_haar_on_constant_image_is_zero():
    d = InvertibleDownsampling(2, stride=2, dim=2, init="haar", learnable=False)
    y = d(torch.full((1, 2, 8, 8), 3.0))
    assert detail_l1(y, 4).item() < 1e-6
    y = d(torch.randn(1, 2, 8, 8))
    assert detail_l1(y, 4).item() > 0.1
    with pytest.raises(ValueError):
        detail_l1(y, 1)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_within_block_energy_fraction(dim):
    s = 2**dim
    d_ps = InvertibleDownsampling(1, stride=2, dim=dim, init="pixel_shuffle", learnable=False)
    d_h = InvertibleDownsampling(1, stride=2, dim=dim, init="haar", learnable=False)
    coarse = torch.zeros(1, s, *([4] * dim))
    coarse[:, 0] = torch.rand(*([4] * dim)) + 0.5
    assert within_block_energy_fraction(d_h.inverse(coarse)) < 1e-12
    assert abs(within_block_energy_fraction(d_ps.inverse(coarse)) - (1 - 1 / s)) < 1e-6
    assert within_block_energy_fraction(torch.zeros(1, 1, *([4] * dim))) == 0.0


def test_highfreq_energy_fraction():
    n = 16
    checker = (torch.arange(n)[:, None] + torch.arange(n)[None]) % 2 * 2.0 - 1
    assert abs(highfreq_energy_fraction(checker[None, None]) - 1.0) < 1e-12
    assert highfreq_energy_fraction(torch.ones(1, 1, n, n)) == 0.0
    with pytest.raises(ValueError):
        highfreq_energy_fraction(checker[None, None], cutoff=1.5)


def test_distance_up_to_signed_permutation():
    H = haar_matrix((2, 2))
    P = torch.eye(4, dtype=torch.float64)[[2, 0, 3, 1]] * torch.tensor([1.0, -1, 1, -1])[:, None].double()
    assert distance_up_to_signed_permutation(P @ H, H) < 1e-15
    theta = math.pi / 4 * torch.tensor([[0, 0, -1, -1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]],
                                       dtype=torch.float64)
    assert distance_up_to_signed_permutation(orthogonal_matrix(theta, "exp"), H) < 1e-12
    assert distance_up_to_signed_permutation(torch.eye(4, dtype=torch.float64), H) > 0.1
    with pytest.raises(ValueError):
        distance_up_to_signed_permutation(H, H[:2])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
def test_random_coupling_stack_round_trip(dtype, tol):
    stack = random_coupling_stack(6, 5, dim=2, seed=1, dtype=dtype)
    x = torch.randn(2, 5, 8, 8, dtype=dtype)
    with torch.no_grad():
        for depth in (0, 1, 6):
            y = stack(x, depth=depth)
            assert (stack.inverse(y, depth=depth) - x).abs().max() < tol
        assert (stack(x) - x).abs().max() > 0.1  # random weights: not the identity
    with pytest.raises(ValueError):
        stack(x, depth=7)


def test_random_coupling_stack_is_reproducible_and_keeps_rng():
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = random_coupling_stack(3, 4, seed=2, dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    b = random_coupling_stack(3, 4, seed=2, dtype=torch.float64)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p.double(), q)


def test_invertible_sequential_rejects_non_invertible_blocks():
    with pytest.raises(TypeError, match="inverse"):
        InvertibleSequential(torch.nn.ReLU())


def test_subband_mosaic_tiles_the_bands_in_order():
    from iunet_nb.notebook.subbands import subband_mosaic

    coarse = torch.arange(4.0).reshape(1, 4, 1, 1).expand(1, 4, 3, 5)
    mosaic = subband_mosaic(coarse)
    assert mosaic.shape == (6, 10)
    assert mosaic[0, 0] == 0 and mosaic[0, 5] == 1 and mosaic[3, 0] == 2 and mosaic[3, 5] == 3
    with pytest.raises(ValueError, match="2D"):
        subband_mosaic(torch.zeros(1, 8, 2, 2, 2))
