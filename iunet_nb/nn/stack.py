"""A plain chain of invertible blocks, for experiments on coupling layers.

:class:`InvertibleSequential` runs its blocks in order and undoes them in
reverse order; :func:`random_coupling_stack` fills one with randomly
initialised standard additive couplings (alternating halves), the object
notebook 01 uses to watch rounding errors pile up with depth.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from iunet_nb.nn.coupling import create_standard_module

__all__ = ["InvertibleSequential", "random_coupling_stack"]


class InvertibleSequential(nn.Sequential):
    """``nn.Sequential`` of blocks that each have ``inverse``; maps ``(N, C, *S)`` to itself.

    ``forward`` applies the blocks first to last, ``inverse`` the inverses last
    to first.  ``forward(x, depth=k)`` / ``inverse(y, depth=k)`` use only the
    first ``k`` blocks, so one stack serves every depth up to its length.
    """

    def __init__(self, *blocks: nn.Module) -> None:
        for i, b in enumerate(blocks):
            if not callable(getattr(b, "inverse", None)):
                raise TypeError(f"block {i} ({type(b).__name__}) has no inverse() method")
        super().__init__(*blocks)

    def _depth(self, depth: int | None) -> int:
        if depth is None:
            return len(self)
        if not 0 <= depth <= len(self):
            raise ValueError(f"depth must be between 0 and {len(self)}, got {depth}")
        return depth

    def forward(self, x: Tensor, depth: int | None = None) -> Tensor:  # type: ignore[override]
        for block in list(self)[: self._depth(depth)]:
            x = block(x)
        return x

    def inverse(self, y: Tensor, depth: int | None = None) -> Tensor:
        for block in reversed(list(self)[: self._depth(depth)]):
            y = block.inverse(y)
        return y


def random_coupling_stack(depth: int, channels: int, dim: int = 2, seed: int = 0,
                          dtype: torch.dtype = torch.float64, block_depth: int = 1) -> InvertibleSequential:
    """``depth`` standard additive couplings with random (not zero) initial weights.

    Layer ``i`` transforms the first or second half of the channels
    alternately.  The weights are drawn with ``torch.manual_seed(seed)``
    restored afterwards, so the stack is reproducible and does not disturb the
    caller's random stream; convert with ``.to(dtype)`` to get the *same* stack
    in another precision.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        blocks = [create_standard_module(channels, dim=dim, depth=block_depth, module_index=i,
                                         zero_init=False) for i in range(depth)]
    return InvertibleSequential(*blocks).to(dtype)
