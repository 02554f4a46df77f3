"""Looking at invertible downsampling: sub-band images, sparsity and artefact measures.

An invertible downsampling with stride block size ``s`` turns fine channel
``c`` into the ``s`` coarse channels ``c*s + r``, ``r = 0..s-1`` (see
:mod:`iunet_nb.nn.resampling`).  For the Haar transform ``r = 0`` is the local
average ("approximation") and ``r >= 1`` are the detail sub-bands.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "subbands",
    "detail_l1",
    "within_block_energy_fraction",
    "highfreq_energy_fraction",
    "distance_up_to_signed_permutation",
    "subband_mosaic",
]


def subbands(coarse: Tensor, block_size: int, channel: int = 0) -> Tensor:
    """The ``block_size`` sub-band images of fine channel ``channel``.

    Args:
        coarse: ``(N, C*s, *S)`` output of an invertible downsampling.
        block_size: ``s = prod(stride)``.
        channel: the fine channel ``c``.

    Returns:
        ``(N, s, *S)``: channels ``c*s .. c*s + s - 1`` of ``coarse``.
    """
    if coarse.shape[1] % block_size != 0:
        raise ValueError(f"{coarse.shape[1]} channels are not a multiple of block_size={block_size}")
    if not 0 <= channel < coarse.shape[1] // block_size:
        raise ValueError(f"channel must be in [0, {coarse.shape[1] // block_size}), got {channel}")
    return coarse[:, channel * block_size:(channel + 1) * block_size]


def detail_l1(coarse: Tensor, block_size: int) -> Tensor:
    """Mean absolute value of all detail sub-bands (``r >= 1``) of every fine channel.

    The sparsity objective of the talk's Figure 4: an orthogonal transform
    keeps the 2-norm, so pushing the 1-norm of the details down moves the
    energy into the ``r = 0`` sub-band.  Returns a scalar tensor (differentiable).
    """
    n, cs = coarse.shape[:2]
    if cs % block_size != 0 or block_size < 2:
        raise ValueError(f"need block_size >= 2 dividing {cs} channels, got {block_size}")
    grouped = coarse.reshape(n, cs // block_size, block_size, *coarse.shape[2:])
    return grouped[:, :, 1:].abs().mean()


def _block_mean(x: Tensor, stride: Sequence[int]) -> Tensor:
    dim = len(stride)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dim]
    mean = pool(x, kernel_size=tuple(stride), stride=tuple(stride))
    for d, s in enumerate(stride):
        mean = mean.repeat_interleave(s, dim=2 + d)
    return mean


def within_block_energy_fraction(x: Tensor, stride: int | Sequence[int] = 2) -> float:
    """Share of the energy of ``x`` that varies *inside* the stride blocks.

    ``||x - B(x)||^2 / ||x||^2`` where ``B`` replaces every stride block by its
    mean.  A perturbation that was upsampled from one coarse pixel by the Haar
    average filter is constant on its block (0); the same perturbation
    upsampled by pixel shuffle lands on one pixel of each block, a checkerboard
    (``1 - 1/s``, 0.75 in 2D).  ``x``: ``(N, C, *S)``, sizes divisible by the stride.
    """
    dim = x.dim() - 2
    stride = (stride,) * dim if isinstance(stride, int) else tuple(stride)
    x = x.detach().to(torch.float64)
    total = x.square().sum()
    if total == 0:
        return 0.0
    return ((x - _block_mean(x, stride)).square().sum() / total).item()


def highfreq_energy_fraction(x: Tensor, cutoff: float = 0.5) -> float:
    """Share of the spectral energy of ``x`` above ``cutoff`` x Nyquist in some spatial axis.

    ``x``: ``(N, C, *S)``.  Checkerboard and Moiré patterns live near the
    Nyquist frequency, so this share jumps when they appear.
    """
    if not 0 < cutoff < 1:
        raise ValueError(f"cutoff must be in (0, 1), got {cutoff}")
    dims = tuple(range(2, x.dim()))
    power = torch.fft.fftn(x.detach().to(torch.float64), dim=dims).abs().square()
    high = torch.zeros(x.shape[2:], dtype=torch.bool)
    for d, s in enumerate(x.shape[2:]):
        f = torch.fft.fftfreq(s, dtype=torch.float64).abs() * 2  # 1 = Nyquist
        shape = [1] * len(dims)
        shape[d] = s
        high = high | (f.reshape(shape) > cutoff)
    total = power.sum()
    return 0.0 if total == 0 else (power[..., high].sum() / total).item()


def distance_up_to_signed_permutation(Q: Tensor, R: Tensor) -> float:
    """``min over signed row permutations P of max |P Q - R|`` for orthogonal ``(n, n)`` matrices.

    Filter banks that differ only in the order and sign of their filters
    (rows) are the same transform up to relabelling the sub-bands.  Rows of
    ``Q`` are matched to rows of ``R`` by largest ``|<q_i, r_j>|``; an error is
    raised if the matching is not one-to-one (then the matrices are far apart).
    """
    if Q.shape != R.shape or Q.dim() != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"need two (n, n) matrices of equal shape, got {tuple(Q.shape)}, {tuple(R.shape)}")
    Q, R = Q.detach().to(torch.float64), R.detach().to(torch.float64)
    dots = R @ Q.T  # dots[j, i] = <r_j, q_i>
    match = dots.abs().argmax(dim=1)
    if len(set(match.tolist())) != Q.shape[0]:
        return math.inf
    signs = torch.sign(dots[torch.arange(Q.shape[0]), match])
    return (signs[:, None] * Q[match] - R).abs().max().item()


def subband_mosaic(coarse: Tensor, stride: Sequence[int] = (2, 2), channel: int = 0) -> Tensor:
    """The sub-bands of fine channel ``channel`` of a 2D downsampling, tiled into one image.

    ``coarse``: ``(N, C*s, h, w)`` with ``s = stride[0] * stride[1]``; returns
    ``(stride[0]*h, stride[1]*w)`` for the first batch element, sub-band ``r``
    in tile ``(r // stride[1], r % stride[1])`` (for 2x2 Haar: average top
    left, details elsewhere).  Same size as the input image, so it can be shown
    beside it on one colour scale (the talk's Figure 4).
    """
    if coarse.dim() != 4 or len(stride) != 2:
        raise ValueError(f"need a 2D coarse tensor (N, C, h, w) and a 2D stride, got {tuple(coarse.shape)}, {stride}")
    rows, cols = stride
    bands = subbands(coarse, rows * cols, channel)[0]  # (s, h, w)
    h, w = bands.shape[-2:]
    return bands.reshape(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)
