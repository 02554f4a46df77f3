"""The reference's coupling modules with its constructor signatures, loading its checkpoints.

* :class:`AdditiveCoupling` -- ``AdditiveCoupling(F, channel_split_pos)``, the reference's
  signature, over :class:`iunet_nb.nn.coupling.AdditiveCoupling`;
* :func:`create_reference_module` -- the reference's standard coupling for a level.

Both load state dicts saved from ``iunets`` 0.1 (:mod:`iunet_nb.compat.checkpoints`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from iunet_nb.compat import checkpoints as _ckpt
from iunet_nb.compat.reference import StandardBlock, reference_split
from iunet_nb.nn.coupling import AdditiveCoupling as _AdditiveCoupling

__all__ = ["AdditiveCoupling", "create_reference_module"]


def _input_channels(F: nn.Module) -> int | None:
    """``in_channels`` of the first layer of ``F`` that declares it (a convolution), else None."""
    for m in F.modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int) and not isinstance(c, bool):
            return c
    return None


class AdditiveCoupling(_AdditiveCoupling):
    """The reference's ``AdditiveCoupling(F, channel_split_pos)``: ``(x1, x2) -> (x2, x1 + F(x2))``.

    ``x1 = x[:, :channel_split_pos]``, ``x2 = x[:, channel_split_pos:]``; ``F`` maps
    ``x2`` to the shape of ``x1``.  The number of channels ``C`` is
    ``channel_split_pos`` plus the input channels of ``F``'s first convolution,
    or given as ``channels``.  Input and output ``(N, C, *spatial)``.
    """

    def __init__(self, F: nn.Module, channel_split_pos: int, channels: int | None = None) -> None:
        if not isinstance(F, nn.Module):
            raise TypeError(f"AdditiveCoupling: F must be a torch.nn.Module, got {type(F).__name__}")
        if channels is None:
            f_in = _input_channels(F)
            if f_in is None:
                raise TypeError(
                    "AdditiveCoupling(F, channel_split_pos): cannot tell the number of channels from F "
                    "(it has no layer with in_channels); pass channels=C as well"
                )
            channels = channel_split_pos + f_in
        super().__init__(F, channels, channel_split_pos)
        self.channel_split_pos = channel_split_pos
        _ckpt.register(self, _ckpt.coupling_pre_hook)

    @property
    def F(self) -> nn.Module:
        """The coupling function (the reference's name for :attr:`f`)."""
        return self.f


def create_reference_module(in_channels: Any, dim: int = 2, block_depth: int | None = None,
                            module_index: int = 0, zero_init: bool = True, *,
                            depth: int | None = None, LR: str | None = None, level: int | None = None,
                            architecture: Any = None, branch: str | None = None) -> AdditiveCoupling:
    """The reference's standard coupling for ``in_channels`` channels (or an input shape ``(C, *S)``).

    ``(u, v) -> (v, u + f(v))`` with ``u = x[:, :split]``, ``split`` from
    :func:`reference_split` and ``f`` a :class:`StandardBlock` of ``block_depth``
    (alias ``depth``) layers.  The coordinates (``LR``, ``branch``, ``level``,
    ``architecture``) are accepted and, as in the reference, not used.
    """
    channels = in_channels[0] if isinstance(in_channels, (tuple, list, torch.Size)) else in_channels
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
        raise ValueError(f"a coupling layer needs in_channels >= 2, got in_channels={in_channels!r}")
    if depth is not None and block_depth is not None:
        raise TypeError(f"give block_depth= or its alias depth=, not both (got {block_depth}, {depth})")
    blocks = 1 if depth is None and block_depth is None else (depth if block_depth is None else block_depth)
    split = reference_split(channels, module_index)
    f = StandardBlock(dim, channels - split, split, block_depth=blocks, zero_init=zero_init)
    return AdditiveCoupling(f, split, channels=channels)


# ------------------------------------------------------------------ decoder mixing placement
