"""Data for the notebooks: synthetic smooth images and a real photograph, nothing downloaded.

* :func:`smooth_random_images` -- Gaussian random fields with a chosen
  correlation length, in 1D, 2D or 3D: a cheap, endless source of "natural
  looking" images for toy training tasks.
* :func:`denoising_batch` -- (noisy, clean) pairs built from them.
* :func:`wiener_denoise` -- the best *linear* denoiser for those images (it
  knows their power spectrum): the baseline a learned denoiser has to beat,
  and for Gaussian fields the best denoiser of all (minimum mean squared error).
* :func:`load_photograph` -- a real photograph shipped with matplotlib
  (``grace_hopper.jpg`` from ``matplotlib.cbook.get_sample_data``), as a
  grey-scale or RGB tensor.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from iunet_nb.common import check_dim

__all__ = ["smooth_random_images", "denoising_batch", "wiener_denoise", "wiener_mse", "load_photograph",
           "PHOTOGRAPHS"]

#: Photographs shipped with matplotlib's sample data that :func:`load_photograph` accepts.
PHOTOGRAPHS: tuple[str, ...] = ("grace_hopper.jpg",)


def _size_tuple(size: int | Sequence[int], dim: int) -> tuple[int, ...]:
    check_dim(dim)
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size,) * dim
    size = tuple(int(s) for s in size)
    if len(size) != dim or any(s < 1 for s in size):
        raise ValueError(f"size must be a positive int or {dim} positive ints, got {size!r}")
    return size


def smooth_random_images(n: int, size: int | Sequence[int], channels: int = 1, dim: int = 2,
                         correlation_length: float = 6.0, generator: torch.Generator | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Random smooth images of shape ``(n, channels, *size)``.

    White Gaussian noise is low-pass filtered in the Fourier domain with a
    Gaussian of width ``correlation_length`` pixels (periodic boundaries), then
    every image-channel is shifted and scaled to mean 0 and standard deviation 1.
    """
    size = _size_tuple(size, dim)
    if n < 1 or channels < 1:
        raise ValueError(f"n and channels must be >= 1, got n={n}, channels={channels}")
    if correlation_length <= 0:
        raise ValueError(f"correlation_length must be > 0 pixels, got {correlation_length}")
    noise = torch.randn(n, channels, *size, generator=generator, dtype=torch.float64)
    axes = tuple(range(2, 2 + dim))
    spectrum = torch.fft.fftn(noise, dim=axes)
    k2 = torch.zeros(size, dtype=torch.float64)
    for d, s in enumerate(size):
        k = 2 * math.pi * torch.fft.fftfreq(s, dtype=torch.float64)
        shape = [1] * dim
        shape[d] = s
        k2 = k2 + k.reshape(shape) ** 2
    field = torch.fft.ifftn(spectrum * torch.exp(-0.5 * k2 * correlation_length**2), dim=axes).real
    field = field - field.mean(dim=axes, keepdim=True)
    field = field / field.std(dim=axes, keepdim=True).clamp_min(1e-12)
    return field.to(dtype)


def _signal_spectrum(size: tuple[int, ...], correlation_length: float) -> Tensor:
    """Power spectrum of :func:`smooth_random_images` per DFT frequency, normalised to mean 1 (unit variance)."""
    k2 = torch.zeros(size, dtype=torch.float64)
    for d, s in enumerate(size):
        k = 2 * math.pi * torch.fft.fftfreq(s, dtype=torch.float64)
        shape = [1] * len(size)
        shape[d] = s
        k2 = k2 + k.reshape(shape) ** 2
    power = torch.exp(-k2 * correlation_length**2)  # |Gaussian filter|^2
    power[(0,) * len(size)] = 0.0                    # every image has mean 0
    return power / power.mean()


def wiener_mse(size: int | Sequence[int], noise_std: float, correlation_length: float = 6.0,
               dim: int = 2) -> float:
    """Expected MSE per pixel of :func:`wiener_denoise` on :func:`denoising_batch` data: mean of S σ² / (S + σ²)."""
    size = _size_tuple(size, dim)
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    power = _signal_spectrum(size, correlation_length)
    return (power * noise_std**2 / (power + noise_std**2)).mean().item() if noise_std > 0 else 0.0


def wiener_denoise(noisy: Tensor, noise_std: float, correlation_length: float = 6.0) -> Tensor:
    """The Wiener filter for :func:`denoising_batch` images: ``(N, C, *S)`` -> same shape.

    Each frequency is multiplied by ``S / (S + σ²)``, where ``S`` is the power
    spectrum of the clean images (known exactly here) and ``σ²`` that of the
    white noise.  It is the linear filter with the smallest expected squared
    error, and for Gaussian images the best estimator of any kind; the clean
    images here are Gaussian fields rescaled to unit variance, so it is a
    (very nearly) optimal reference for a learned denoiser.  Periodic boundaries,
    like the images.
    """
    if noise_std <= 0:
        raise ValueError(f"noise_std must be > 0 (the noise level of the data), got {noise_std}")
    if noisy.dim() < 3:
        raise ValueError(f"noisy must be (N, C, *spatial), got shape {tuple(noisy.shape)}")
    size = tuple(noisy.shape[2:])
    axes = tuple(range(2, noisy.dim()))
    power = _signal_spectrum(size, correlation_length)
    gain = power / (power + noise_std**2)
    spectrum = torch.fft.fftn(noisy.to(torch.float64), dim=axes)
    return torch.fft.ifftn(spectrum * gain.to(noisy.device), dim=axes).real.to(noisy.dtype)


def denoising_batch(n: int, size: int | Sequence[int], noise_std: float = 0.5, channels: int = 1,
                    dim: int = 2, correlation_length: float = 6.0,
                    generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``(noisy, clean)``, both ``(n, channels, *size)``: clean smooth images plus Gaussian noise.

    The clean images have unit standard deviation, so ``noise_std`` is the
    noise-to-signal ratio (the MSE of the identity "denoiser" is ``noise_std**2``).
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    clean = smooth_random_images(n, size, channels, dim, correlation_length, generator, dtype)
    noise = torch.randn(clean.shape, generator=generator, dtype=dtype)
    return clean + noise_std * noise, clean


def load_photograph(size: int | None = 256, name: str = "grace_hopper.jpg", gray: bool = True,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """A real photograph from matplotlib's sample data, shape ``(1, 1 or 3, size, size)``, values in [0, 1].

    The image is centre-cropped to a square and, if ``size`` is given, resized
    with anti-aliased bilinear interpolation.  ``gray`` converts RGB to
    luminance (ITU-R BT.601 weights).
    """
    if name not in PHOTOGRAPHS:
        raise ValueError(f"unknown photograph {name!r}; available: {', '.join(PHOTOGRAPHS)}")
    import matplotlib.cbook as cbook
    import matplotlib.image as mpimg

    with cbook.get_sample_data(name) as fh:
        array = mpimg.imread(fh, format=name.rsplit(".", 1)[-1])
    img = torch.as_tensor(array.copy()).to(torch.float64)
    if img.max() > 1.0:
        img = img / 255.0
    if img.dim() == 2:
        img = img[..., None].expand(*img.shape, 3)
    img = img[..., :3].permute(2, 0, 1)  # (3, H, W)
    if gray:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype).reshape(3, 1, 1)
        img = (img * weights).sum(dim=0, keepdim=True)
    h, w = img.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    img = img[:, top:top + side, left:left + side][None]
    if size is not None:
        if size < 1:
            raise ValueError(f"size must be a positive int or None, got {size}")
        img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return img.clamp(0.0, 1.0).to(dtype)
