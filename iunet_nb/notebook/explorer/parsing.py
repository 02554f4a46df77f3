"""The explorer's text fields -> channels, strides and sizes, and back.

The parsers take what a user types (``"2, 2, (1, 2, 2)"``) or the Python value, and raise
``ValueError`` with a message that names the field and shows an example.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Optional, Sequence, Union

from iunet_nb.arch.layout import normalize_strides


def _literal(text: str, what: str, example: str) -> list:
    """``"1, (2, 3)"`` -> ``[1, (2, 3)]`` (Python literals only, never evaluated code)."""
    try:
        return ast.literal_eval("[" + text + "]")
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"Could not read {what} {text.strip()!r}: write comma-separated "
                         f"numbers, e.g. {example!r}.") from None


def as_int(value: Any) -> Optional[int]:
    """``value`` as an int if it is a whole number (``3`` or ``3.0``, not ``True``), else ``None``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_int_list(value: Union[str, Sequence[int]], what: str = "channels",
                   example: str = "64, 128, 256, 384") -> tuple[int, ...]:
    """``"64, 128, 256"`` (or ``"(64, 128, 256)"``, or a sequence) -> ints, at least one.

    Positivity is left to :func:`~iunet_nb.arch.layout.compute_layout`.
    """
    items = _literal(value, what, example) if isinstance(value, str) else list(value)
    if isinstance(value, str) and len(items) == 1 and isinstance(items[0], (list, tuple)):
        items = list(items[0])  # "(64, 128, 256)"
    if not items:
        raise ValueError(f"{what} is empty: give one number per level, e.g. {example!r}.")
    for item in items:
        if as_int(item) is None:
            raise ValueError(f"{what} must be whole numbers, one per level, but got "
                             f"{item!r}; e.g. {example!r}.")
    return tuple(as_int(item) for item in items)


def parse_strides(value: Any) -> Any:
    """The strides text -> a ``resampling_stride``; non-strings are returned unchanged.

    ``"2"`` -> ``2`` (everywhere); ``"(1, 2, 2)"`` -> ``(1, 2, 2)`` (per dimension, at every
    level); ``"2, 2, (1, 2, 2)"`` or ``"[2, 2, (1, 2, 2)]"`` -> ``[2, 2, (1, 2, 2)]`` (one
    entry per downsampling).
    """
    if not isinstance(value, str):
        return value
    items = _literal(value, "strides", "2, 2, (1, 2, 2)")
    if not items:
        raise ValueError("strides is empty: write e.g. 2 (the same stride "
                         "everywhere) or 2, 2, (1, 2, 2) (one per downsampling).")
    if len(items) == 1 and not isinstance(items[0], list):
        return _stride_entry(items[0])
    if len(items) == 1:  # "[2, 2, (1, 2, 2)]": explicitly one entry per downsampling
        items = items[0]
    return [_stride_entry(e) for e in items]


def _stride_entry(entry: Any) -> Any:
    return tuple(entry) if isinstance(entry, (list, tuple)) else entry


def parse_input_size(value: Any, dim: int) -> tuple[int, ...]:
    """``"256"`` (or ``256``) -> ``(256,) * dim``; ``"32, 256, 256"`` -> one size per dimension."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    items = parse_int_list(value, "input size", ", ".join(["256"] * dim))
    if len(items) == 1:
        items = items * dim
    if len(items) != dim:
        raise ValueError(f"input size {items!r} has {len(items)} entries but dim={dim}: "
                         f"give one size for all dimensions (e.g. 256) or {dim} sizes.")
    if min(items) < 1:
        raise ValueError(f"input sizes must be >= 1, got {items!r}.")
    return items


def _format_stride(entry: Any) -> str:
    return "(" + ", ".join(map(str, entry)) + ")" if isinstance(entry, (list, tuple)) else str(entry)


def format_field(value: Any, strides: bool = False) -> str:
    """A config value as its text field shows it: ``(64, 128)`` -> ``"64, 128"``; strides:
    ``[2, (1, 2)]`` (per downsampling) -> ``"2, (1, 2)"``, ``(1, 2)`` (per dimension) -> ``"(1, 2)"``."""
    if isinstance(value, (str, int)):
        return str(value)
    if strides and not isinstance(value, list):
        return _format_stride(value)
    return ", ".join(map(_format_stride, value))


def resize_int_list_text(text: str, n: int, multipliers: Optional[Sequence[int]] = None) -> str:
    """Resize a comma-separated list to ``n`` entries (unparsable text is returned unchanged).

    Without ``multipliers`` the last entry is repeated (architecture).  With the channel multipliers
    ``m_i`` (channels), a new level gets ``m_i * (c_i // 2)``: level ``i`` keeps and sends half.
    """
    try:
        values = list(parse_int_list(text))
    except ValueError:
        return text
    while len(values) < n:
        i = len(values) - 1
        m = 2 if multipliers is None or i >= len(multipliers) else multipliers[i]
        values.append(values[-1] if multipliers is None else m * max(1, values[-1] // 2))
    return format_field(values[:max(n, 1)])


def resize_strides_text(text: str, num_downsamplings: int) -> str:
    """Resize a per-level strides text to ``num_downsamplings`` entries (repeating the last).

    A single stride (``"2"``, ``"(1, 2, 2)"``) is for every level and kept, as is unparsable text.
    """
    try:
        spec = parse_strides(text)
    except ValueError:
        return text
    if not isinstance(spec, list):
        return text
    if num_downsamplings <= 0:
        return "2"
    entries = (spec or [2])[:num_downsamplings]
    entries += entries[-1:] * (num_downsamplings - len(entries))
    return format_field(entries if len(entries) > 1 else entries[0], strides=True)


def channel_multipliers(strides_text: str, dim: int, num_downsamplings: int) -> list[int]:
    """The channel multiplier (product of the stride) of every downsampling (``2**dim`` if unreadable)."""
    try:
        strides = normalize_strides(parse_strides(strides_text), dim, num_downsamplings)
    except (ValueError, TypeError):
        return [2**dim] * num_downsamplings
    return [math.prod(s) for s in strides]
