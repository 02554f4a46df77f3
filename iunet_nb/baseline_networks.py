"""``iunets.baseline_networks`` under this package's name: ``StandardUNet``.

The reference's non-invertible comparison U-Net, built from this package's
:class:`iunet_nb.arch.baselines.UNet`: a 3^dim input convolution to
``2 * base_filters`` channels, a U-Net whose level ``i`` has
``2 * base_filters * 2**i`` channels and ``architecture[i]`` blocks per side, and,
with ``skip_connection``, a 3^dim output convolution back to the input channels
plus the input.  Output ``(N, 2 * base_filters, *S)``, or ``(N, C, *S)`` with
``skip_connection`` -- the reference's shapes; the parameter count is of the
same order as the reference's (the blocks differ: residual blocks here).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from iunet_nb.arch.baselines import UNet
from iunet_nb.common import CONV, check_dim
from iunet_nb.compat.reference import StandardBlock
from iunet_nb.utils import get_num_channels

__all__ = ["StandardUNet"]


class StandardUNet(nn.Module):
    """A plain U-Net with the reference's signature.

    Args:
        input_shape_or_channels: ``C`` or the input shape ``(C, *S)`` (then ``dim`` may be left out).
        dim: 1, 2 or 3.
        architecture: blocks per side at each level.
        base_filters: half the channels of level 0.
        skip_connection: add the input to a convolution of the output (output has ``C`` channels).
        block_type: accepted for the reference's signature; only its :class:`StandardBlock` is supported.
        zero_init: start the output convolution at zero (with ``skip_connection``: the identity).

    Spatial sizes must be divisible by ``2 ** (len(architecture) - 1)``.
    """

    def __init__(self, input_shape_or_channels: Any, dim: int | None = None,
                 architecture: Sequence[int] = (2, 2, 2, 2), base_filters: int = 32,
                 skip_connection: bool = False, block_type: type = StandardBlock,
                 zero_init: bool = False) -> None:
        super().__init__()
        if dim is None and isinstance(input_shape_or_channels, (tuple, list)):
            dim = len(input_shape_or_channels) - 1
        dim = check_dim(dim)
        if block_type is not StandardBlock:
            raise TypeError(f"StandardUNet: block_type must be iunet_nb.layers.StandardBlock, got {block_type!r}")
        if isinstance(base_filters, bool) or not isinstance(base_filters, int) or base_filters < 1:
            raise ValueError(f"base_filters must be a positive int, got {base_filters!r}")
        self.input_channels = get_num_channels(input_shape_or_channels)
        self.dim, self.architecture, self.base_filters = dim, list(architecture), base_filters
        self.skip_connection = bool(skip_connection)
        width = 2 * base_filters
        self.input_layer = CONV[dim](self.input_channels, width, 3, padding=1)
        self.unet = UNet([width * 2 ** i for i in range(len(self.architecture))], self.architecture, dim=dim)
        self.output_layer = CONV[dim](width, self.input_channels, 3, padding=1) if self.skip_connection else None
        if zero_init and self.output_layer is not None:
            nn.init.zeros_(self.output_layer.weight)
            nn.init.zeros_(self.output_layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, *S) -> (N, 2 * base_filters, *S)``, or ``(N, C, *S)`` with ``skip_connection``."""
        y = self.unet(self.input_layer(x))
        return self.output_layer(y) + x if self.output_layer is not None else y
