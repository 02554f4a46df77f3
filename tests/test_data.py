"""Tests of iunet_nb.notebook.data."""
import pytest
import torch

from iunet_nb.notebook.data import denoising_batch, load_photograph, smooth_random_images


@pytest.mark.parametrize("dim,size", [(1, 32), (2, 16), (3, (4, 8, 8))])
def test_smooth_random_images_shape_and_normalisation(dim, size):
    g = torch.Generator().manual_seed(0)
    x = smooth_random_images(3, size, channels=2, dim=dim, correlation_length=2.0, generator=g)
    expected = (size,) * dim if isinstance(size, int) else size
    assert x.shape == (3, 2, *expected) and x.dtype == torch.float32
    dims = tuple(range(2, 2 + dim))
    assert torch.allclose(x.mean(dim=dims), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(x.std(dim=dims), torch.ones(3, 2), atol=1e-4)


def test_smooth_random_images_are_smooth_and_reproducible():
    a = smooth_random_images(2, 64, correlation_length=6.0, generator=torch.Generator().manual_seed(1))
    b = smooth_random_images(2, 64, correlation_length=6.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # neighbouring pixels are strongly correlated, unlike white noise
    corr = (a[..., 1:] * a[..., :-1]).mean() / a.square().mean()
    assert corr > 0.9


@pytest.mark.parametrize("kwargs", [dict(correlation_length=0), dict(n=0), dict(size=(4, 4, 4))])
def test_smooth_random_images_rejects_bad_arguments(kwargs):
    args = dict(n=1, size=8, dim=2)
    args.update(kwargs)
    with pytest.raises(ValueError):
        smooth_random_images(**args)


def test_denoising_batch_noise_level():
    noisy, clean = denoising_batch(4, 64, noise_std=0.5, generator=torch.Generator().manual_seed(0))
    assert noisy.shape == clean.shape == (4, 1, 64, 64)
    assert abs((noisy - clean).std().item() - 0.5) < 0.02
    with pytest.raises(ValueError):
        denoising_batch(1, 8, noise_std=-1)


def test_load_photograph():
    img = load_photograph(64)
    assert img.shape == (1, 1, 64, 64) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.std() > 0.05
    rgb = load_photograph(32, gray=False)
    assert rgb.shape == (1, 3, 32, 32)
    full = load_photograph(None)
    assert full.shape[-1] == full.shape[-2] >= 256
    with pytest.raises(ValueError):
        load_photograph(32, name="lena.png")


def test_wiener_filter_is_the_best_linear_denoiser_and_matches_its_expected_error():
    from iunet_nb.notebook.data import denoising_batch, wiener_denoise, wiener_mse

    gen = torch.Generator().manual_seed(0)
    noisy, clean = denoising_batch(32, 32, noise_std=0.5, correlation_length=3.0, generator=gen)
    mse = (wiener_denoise(noisy, 0.5, 3.0) - clean).square().mean().item()
    assert mse == pytest.approx(wiener_mse(32, 0.5, 3.0), rel=0.1)
    assert mse < 0.1 * 0.25  # far better than doing nothing (sigma^2)
    # mis-specified filters (wrong noise level or correlation length) are worse
    for sigma, length in ((0.35, 3.0), (0.7, 3.0), (0.5, 2.4), (0.5, 3.75)):
        assert (wiener_denoise(noisy, sigma, length) - clean).square().mean().item() > mse
    with pytest.raises(ValueError, match="noise_std"):
        wiener_denoise(noisy, 0.0)
    assert wiener_denoise(noisy, 0.5, 3.0).shape == noisy.shape
