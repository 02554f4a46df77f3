"""A 3^dim convolution (stride 1, padding 1) whose CPU forward and backward run slab by slab.

``nn.Conv3d`` on CPU hands the whole tensor to oneDNN (or to ATen's im2col path), which
allocates activation-sized buffers on top of the result: the backward of a 16 -> 1
convolution, for example, briefly holds two 16-channel buffers besides its saved input and
the input gradient it returns.  :class:`TiledConv` computes the same convolution with
:func:`iunet_nb.nn.tiled.conv3` (slabs along the first spatial dimension on CPU, one
plain call on other devices and under autocast), so the step needs no more than the output,
the gradients and a few tile-sized buffers.  It is a drop-in replacement for
``nn.ConvNd(in, out, 3, padding=1)``: same parameter names, shapes and initialisation, so the
state dicts of the two load into each other.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from iunet_nb.common import check_dim
from iunet_nb.nn.tiled import conv3

__all__ = ["TiledConv"]

_SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def _check_channels(value: Any, name: str) -> int:
    """Return ``value`` if it is a positive int (not a bool); else raise ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    return value


class TiledConv(nn.Module):
    """``(N, in_channels, *S) -> (N, out_channels, *S)``: a 3^dim convolution, stride 1, padding 1.

    The same function as ``nn.Conv{dim}d(in_channels, out_channels, 3, padding=1, bias=bias)``,
    computed by :func:`iunet_nb.nn.tiled.conv3` (slab by slab on CPU, forward and
    backward); the bias is added to the convolution's result in place.

    Args:
        in_channels: channels ``C_in`` of the input (a positive int).
        out_channels: channels ``C_out`` of the output (a positive int).
        dim: number of spatial dimensions (1, 2 or 3).
        bias: whether to add a learnable bias per output channel.

    Parameters:
        weight: ``(C_out, C_in, 3, ..., 3)`` (``dim`` threes).
        bias: ``(C_out,)``, or ``None`` if ``bias=False``.

    Both are initialised as ``nn.Conv{dim}d`` initialises them (same draws from torch's
    generator in the same order).
    """

    def __init__(self, in_channels: int, out_channels: int, dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_channels = _check_channels(in_channels, "in_channels")
        self.out_channels = _check_channels(out_channels, "out_channels")
        self.dim = check_dim(dim)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *(3,) * dim))
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.ConvNd``'s initialisation: Kaiming-uniform weight (``a = sqrt(5)``), bias
        uniform in ``+-1/sqrt(fan_in)`` with ``fan_in = in_channels * 3^dim``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * 3**self.dim)
            nn.init.uniform_(self.bias, -bound, bound)

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != self.dim + 2 or x.shape[1] != self.in_channels:
            expected = ", ".join(("N", str(self.in_channels)) + _SPATIAL_NAMES[self.dim])
            raise ValueError(f"{type(self).__name__}(in_channels={self.in_channels}, dim={self.dim}) "
                             f"expects input of shape ({expected}), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C_in, *S) -> (N, C_out, *S)``."""
        self._check_input(x)
        y = conv3(x, self.weight)
        if self.bias is not None:
            # conv3's backward needs its input and weight, never its output: adding in
            # place is safe for autograd and saves an output-sized temporary.
            y.add_(self.bias.view(-1, *(1,) * self.dim))
        return y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, dim={self.dim}"
                + ("" if self.bias is not None else ", bias=False"))
