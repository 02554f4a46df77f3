"""Small definitions shared by every layer of the package.

* :data:`SPATIAL_DIMS` and :func:`check_dim` -- the one check of ``dim``;
* :data:`CONV`, :data:`CONV_FN`, :data:`CONV_TRANSPOSE_FN` -- convolution
  modules and functions by number of spatial dimensions;
* :data:`KiB`, :data:`MiB`, :data:`GiB` and :func:`format_bytes` -- byte units
  (binary: 1 GiB = 1024**3 bytes);
* :func:`dense_strides`, :func:`per_sample_view`, :func:`same_strides`, :func:`follows` --
  how ``(N, C, *S)`` tensors lie in memory, for the engine's channel parts and the
  layers that work in their input's memory.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SPATIAL_DIMS", "check_dim", "CONV", "CONV_FN", "CONV_TRANSPOSE_FN",
    "KiB", "MiB", "GiB", "format_bytes", "write_bytes_atomically", "dense_strides", "per_sample_view", "same_strides", "follows",
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


def write_bytes_atomically(path: Any, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file next to it (flushed to disk), then
    ``os.replace``: readers see the old file or the whole new one, never a part."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def format_bytes(n: float, gib_digits: int = 2) -> str:
    """``n`` bytes as ``'1.23 GiB'`` (``gib_digits`` decimals), ``'4.5 MiB'``, ``'12.0 KiB'`` or ``'100 B'``."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.{gib_digits if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"


def dense_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    return torch.empty(tuple(shape), device="meta").stride()


def per_sample_view(t: Tensor, shape: Sequence[int]) -> Tensor:
    """The memory of ``t`` (``(N, ...)``, dense within each sample) seen as ``(N, *shape[1:])``,
    laid out densely within each sample and with ``t``'s batch stride and offset."""
    return t.as_strided(tuple(shape), (t.stride(0),) + dense_strides(shape)[1:], t.storage_offset())


def same_strides(a: Tensor, b: Tensor) -> bool:
    """Equal strides, the batch stride compared only with more than one sample (for one it
    is arbitrary: a slice of a buffer and the same memory seen as another level's tensor)."""
    return a.stride()[1:] == b.stride()[1:] and (a.shape[0] == 1 or a.stride(0) == b.stride(0))


def follows(prev: Tensor, t: Tensor) -> bool:
    """Whether ``t``'s channels come right after ``prev``'s in the same memory and layout
    (the batch stride counts only with more than one sample: :func:`same_strides`)."""
    return (prev.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
            and prev.shape[0] == t.shape[0] and prev.shape[2:] == t.shape[2:] and same_strides(prev, t)
            and t.storage_offset() == prev.storage_offset() + prev.shape[1] * prev.stride(1))
