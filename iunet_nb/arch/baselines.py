"""Non-invertible baselines: what a user would pick instead of an iUNet.

:class:`UNet` is a plain U-Net with the same channels per level and the same
residual blocks as an iUNet's coupling functions, optionally with activation
checkpointing per level (``checkpoint_levels=True``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from iunet_nb.common import CONV, check_dim

__all__ = ["ResidualBlock", "UNet"]

_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class ResidualBlock(nn.Module):
    """``x + GroupNorm(1, c)(LeakyReLU(conv3(x)))`` with a bias-free 3^dim conv."""

    def __init__(self, channels: int, dim: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            CONV[dim](channels, channels, 3, padding=1, bias=False),
            nn.LeakyReLU(),
            nn.GroupNorm(1, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class UNet(nn.Module):
    """A plain (non-invertible) U-Net shaped like an iUNet.

    Level ``i`` works at ``channels[i]`` channels with ``architecture[i]``
    :class:`ResidualBlock` s on the down side and as many on the up side (the
    bottom level has a single sequence).  Downsampling is a bias-free strided
    conv (kernel = stride = 2) from ``channels[i]`` to ``channels[i+1]``;
    upsampling a bias-free transposed conv back to ``channels[i]``, whose
    output is concatenated with the skip connection and fused by a bias-free
    1×1 conv to ``channels[i]``.  Input and output have the shape
    ``(N, channels[0], *spatial)``, every spatial size divisible by
    ``2 ** (len(channels) - 1)``.

    Args:
        channels: channels per level; if ``None``, ``in_channels * 2**i``
            (the iUNet default of doubling per level).
        architecture: number of blocks per side at each level.
        dim: number of spatial dimensions (1, 2 or 3).
        in_channels: input channels; must equal ``channels[0]`` if both given.
        checkpoint_levels: wrap each level's block sequences (down and up side)
            in ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``,
            keeping only their inputs and recomputing them in the backward.
    """

    def __init__(
        self,
        channels: Optional[Sequence[int]],
        architecture: Sequence[int],
        dim: int = 2,
        in_channels: Optional[int] = None,
        checkpoint_levels: bool = False,
    ) -> None:
        super().__init__()
        check_dim(dim)
        if channels is None:
            if in_channels is None:
                raise ValueError("give channels or in_channels")
            channels = [in_channels * 2**i for i in range(len(architecture))]
        channels = [int(c) for c in channels]
        architecture = [int(a) for a in architecture]
        if len(channels) != len(architecture) or not channels:
            raise ValueError(
                f"channels and architecture need the same non-zero length, "
                f"got {len(channels)} and {len(architecture)}"
            )
        if min(channels) < 1 or min(architecture) < 0:
            raise ValueError("channels must be positive and architecture non-negative")
        if in_channels is not None and in_channels != channels[0]:
            raise ValueError(
                f"in_channels={in_channels} must equal channels[0]={channels[0]}"
            )
        self.channels = channels
        self.architecture = architecture
        self.dim = dim
        self.in_channels = channels[0]
        self.checkpoint_levels = checkpoint_levels

        levels = len(channels)
        self.down_blocks = nn.ModuleList(
            self._blocks(channels[i], architecture[i]) for i in range(levels)
        )
        self.up_blocks = nn.ModuleList(
            self._blocks(channels[i], architecture[i]) for i in range(levels - 1)
        )
        conv, conv_t = CONV[dim], _CONV_TRANSPOSE[dim]
        self.downsample = nn.ModuleList(
            conv(channels[i], channels[i + 1], 2, stride=2, bias=False)
            for i in range(levels - 1)
        )
        self.upsample = nn.ModuleList(
            conv_t(channels[i + 1], channels[i], 2, stride=2, bias=False)
            for i in range(levels - 1)
        )
        self.fuse = nn.ModuleList(
            conv(2 * channels[i], channels[i], 1, bias=False) for i in range(levels - 1)
        )

    def _blocks(self, channels: int, count: int) -> nn.Sequential:
        return nn.Sequential(*(ResidualBlock(channels, self.dim) for _ in range(count)))

    def _run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_levels and len(blocks) > 0 and torch.is_grad_enabled():
            return checkpoint(blocks, x, use_reentrant=False)
        return blocks(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.dim + 2:
            raise ValueError(
                f"expected a {self.dim + 2}-d input (N, C, *spatial), got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels, got {x.shape[1]}"
            )
        factor = 2 ** (len(self.channels) - 1)
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"spatial size {tuple(x.shape[2:])} must be divisible by {factor} "
                f"(2**(levels-1))"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        skips = []
        for i, down in enumerate(self.downsample):
            x = self._run(self.down_blocks[i], x)
            skips.append(x)
            x = down(x)
        x = self._run(self.down_blocks[-1], x)
        for i in reversed(range(len(self.upsample))):
            x = self.upsample[i](x)
            x = self.fuse[i](torch.cat([x, skips.pop()], dim=1))
            x = self._run(self.up_blocks[i], x)
        return x

    def parameter_count(self) -> int:
        """Number of scalar parameters."""
        return sum(p.numel() for p in self.parameters())
