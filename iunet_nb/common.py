"""Small definitions shared by every layer of the package.

* :data:`SPATIAL_DIMS` and :func:`check_dim` -- the one check of ``dim``;
* :data:`CONV`, :data:`CONV_FN`, :data:`CONV_TRANSPOSE_FN` -- convolution
  modules and functions by number of spatial dimensions;
* :data:`KiB`, :data:`MiB`, :data:`GiB` and :func:`format_bytes` -- byte units
  (binary: 1 GiB = 1024**3 bytes).
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import nn

__all__ = [
    "SPATIAL_DIMS", "check_dim", "CONV", "CONV_FN", "CONV_TRANSPOSE_FN",
    "KiB", "MiB", "GiB", "format_bytes",
]

SPATIAL_DIMS: tuple[int, ...] = (1, 2, 3)

CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN: dict[int, Callable[..., Any]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSE_FN: dict[int, Callable[..., Any]] = {
    1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d,
}

KiB = 1024
MiB = 1024**2
GiB = 1024**3


def check_dim(dim: Any, allowed: tuple[int, ...] = SPATIAL_DIMS, name: str = "dim") -> int:
    """Return ``dim`` if it is one of ``allowed`` (an int, not a bool); else raise ``ValueError``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in allowed:
        choices = ", ".join(map(str, allowed[:-1])) + f" or {allowed[-1]}" if len(allowed) > 1 else str(allowed[0])
        raise ValueError(f"{name} must be {choices} (the number of spatial dimensions), got {name}={dim!r}")
    return dim


def format_bytes(n: float, gib_digits: int = 2) -> str:
    """``n`` bytes as ``'1.23 GiB'`` (``gib_digits`` decimals), ``'4.5 MiB'``, ``'12.0 KiB'`` or ``'100 B'``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.{gib_digits if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"
