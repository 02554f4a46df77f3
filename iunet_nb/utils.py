"""``iunets.utils`` under this package's name: the helpers its documentation and scripts use."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["get_num_channels", "print_iunet_layout", "eye_like"]


def get_num_channels(input_shape_or_channels: Any) -> int:
    """``C`` from ``C`` or from an input shape ``(C, *spatial)`` (no batch dimension).

    Raises:
        TypeError: neither a positive int nor a non-empty sequence starting with one.
    """
    value = input_shape_or_channels
    if isinstance(value, (tuple, list, torch.Size)) and len(value) > 0:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError(f"expected the number of channels or an input shape (C, *spatial), "
                        f"got {input_shape_or_channels!r}")
    return value


def print_iunet_layout(iunet: nn.Module) -> None:
    """Print the layout of an iUNet (its :meth:`print_layout`)."""
    iunet.print_layout()  # type: ignore[operator]


def eye_like(M: Tensor, device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    """Identity matrices shaped like ``M``: ``(n, n)`` for ``(n, n)``, ``(m, n, n)`` (expanded) for ``(m, n, n)``.

    Raises:
        ValueError: ``M`` is not one square matrix or a batch of them.
    """
    if M.dim() not in (2, 3) or M.shape[-1] != M.shape[-2]:
        raise ValueError(f"eye_like expects (n, n) or (m, n, n), got shape {tuple(M.shape)}")
    eye = torch.eye(M.shape[-1], device=M.device if device is None else device,
                    dtype=M.dtype if dtype is None else dtype)
    return eye if M.dim() == 2 else eye.expand(M.shape[0], -1, -1)
