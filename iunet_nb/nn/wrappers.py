"""Non-invertible adapters around an invertible body (the talk's Figure 5 construction).

An iUNet maps ``(N, C, *S)`` to itself, so a task whose input and output have
other channel counts (1 grey-scale channel in, 1 out; RGB in, 10 classes out)
needs a channel *lift* before it and a *projection* after it.  Only these two
1x1 convolutions store activations; everything in between can use the
memory-efficient backward.
"""
from __future__ import annotations

from torch import Tensor, nn

from iunet_nb.common import CONV, check_dim

__all__ = ["ChannelLift"]


class ChannelLift(nn.Module):
    """``(N, in_channels, *S) -> lift -> body -> project -> (N, out_channels, *S)``.

    Args:
        body: module mapping ``(N, body_channels, *S)`` to itself (e.g. an iUNet).
        in_channels, out_channels: channels of the task's input and output.
        body_channels: channels the body expects (``iunet.channels[0]``).
        dim: number of spatial dims (1, 2 or 3).
        residual: add the input to the output (needs ``in_channels == out_channels``):
            the network then learns a correction, e.g. the negative noise of a
            denoising task.  The projection starts at zero, so the model starts
            as the identity.
    """

    def __init__(self, body: nn.Module, in_channels: int, out_channels: int, body_channels: int,
                 dim: int = 2, residual: bool = False) -> None:
        super().__init__()
        check_dim(dim)
        if residual and in_channels != out_channels:
            raise ValueError(
                f"residual=True needs in_channels == out_channels, got {in_channels} and {out_channels}"
            )
        conv = CONV[dim]
        self.lift = conv(in_channels, body_channels, kernel_size=1)
        self.body = body
        self.project = conv(body_channels, out_channels, kernel_size=1)
        self.residual = residual
        if residual:
            nn.init.zeros_(self.project.weight)
            nn.init.zeros_(self.project.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.body(self.lift(x)))
        return x + y if self.residual else y
