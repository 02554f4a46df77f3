"""Pure layout arithmetic for fully invertible U-Nets (iUNets).

This module deliberately does **not** import ``torch``: the notebook widgets
use it to show channel layouts, adjustment messages and parameter counts
without building a model.

An iUNet has ``L`` levels.  Level ``i`` (0-based) has ``channels[i]``
channels and ``architecture[i]`` coupling layers on each side (left/encoder
and right/decoder).  At every non-bottom level the channels are split into
``kept`` channels (the skip connection, which stays at level ``i``) and
``sent`` channels, which are invertibly downsampled with the per-dimension
stride ``strides[i]``.  Invertible downsampling multiplies the number of
channels by ``m_i = prod(strides[i])``, so::

    channels[i + 1] = m_i * sent_i
    kept_i          = channels[i] - sent_i

and every non-bottom level must keep at least one and send at least one
channel.

Where the channel mixings go and in which order the operations run is the
plan's business (:mod:`iunet_nb.engine.plan`, built from a :class:`Layout`);
:func:`count_parameters` counts the plan's operations.  The dimension check
is this module's own (:func:`iunet_nb.common.check_dim` lives in a module
that imports torch).
"""

from __future__ import annotations

import numbers
import textwrap
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

__all__ = [
    "LevelLayout",
    "Layout",
    "normalize_strides",
    "channels_from_slice_mode",
    "compute_layout",
    "format_layout",
    "count_parameters",
    "minimal_channels",
    "SLICE_MODES",
    "MESSAGE_WIDTH",
]

#: Valid values of ``slice_mode`` and the factor by which the next level's
#: target number of channels exceeds the current level's.
SLICE_MODES = {"double": 2, "constant": 1}

#: Line width used to wrap :meth:`Layout.adjustment_message`.  Any width in
#: 74..84 reproduces the reference wording; 79 is the PEP 8 width.
MESSAGE_WIDTH = 79

StrideSpec = Union[int, Sequence[Union[int, Sequence[int]]]]


# --------------------------------------------------------------------------
# Small validation helpers
# --------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_dim(dim: Any) -> int:
    if not _is_int(dim) or int(dim) not in (1, 2, 3):
        raise ValueError(
            f"dim must be 1, 2 or 3 (the number of spatial dimensions), "
            f"got dim={dim!r}."
        )
    return int(dim)


def _positive_int_tuple(values: Any, name: str) -> tuple[int, ...]:
    if _is_int(values) or isinstance(values, (str, bytes)):
        raise TypeError(
            f"{name} must be a non-empty list or tuple of positive ints "
            f"(one per level), got {name}={values!r}."
        )
    try:
        items = tuple(values)
    except TypeError:
        raise TypeError(
            f"{name} must be a non-empty list or tuple of positive ints "
            f"(one per level), got {name}={values!r}."
        ) from None
    if len(items) == 0:
        raise ValueError(
            f"{name} must be non-empty (one entry per level), got "
            f"{name}={values!r}."
        )
    for i, v in enumerate(items):
        if not _is_int(v) or int(v) < 1:
            raise ValueError(
                f"{name} must contain positive ints only, but "
                f"{name}[{i}]={v!r} in {name}={values!r}."
            )
    return tuple(int(v) for v in items)


def _prod(values: Sequence[int]) -> int:
    result = 1
    for v in values:
        result *= v
    return result


def _round_half_up(numerator: int, denominator: int) -> int:
    """``round(numerator / denominator)`` with halves rounded up (ints only)."""
    return (2 * numerator + denominator) // (2 * denominator)


# --------------------------------------------------------------------------
# Strides
# --------------------------------------------------------------------------

def _stride_tuple(entry: Any, dim: int, where: str,
                  original: Any) -> tuple[int, ...]:
    """Turn one level's stride entry (int or per-dim tuple) into a tuple."""
    if _is_int(entry):
        if int(entry) < 1:
            raise ValueError(
                f"resampling_stride entries must be ints >= 1, but {where} is "
                f"{entry!r} (in resampling_stride={original!r}). Use e.g. 2."
            )
        stride = (int(entry),) * dim
    elif isinstance(entry, (tuple, list)):
        if len(entry) != dim:
            raise ValueError(
                f"A per-dimension stride must have one entry per spatial "
                f"dimension (dim={dim}), but {where} is {tuple(entry)!r} with "
                f"{len(entry)} entries (in resampling_stride={original!r}). "
                f"Use e.g. {(2,) * dim!r} or the int 2."
            )
        for v in entry:
            if not _is_int(v):
                raise TypeError(
                    f"resampling_stride entries must be ints, but {where} "
                    f"contains {v!r} (in resampling_stride={original!r}). "
                    f"Use e.g. {(2,) * dim!r}."
                )
            if int(v) < 1:
                raise ValueError(
                    f"resampling_stride entries must be ints >= 1, but {where} "
                    f"contains {v!r} (in resampling_stride={original!r}). "
                    f"Use e.g. {(2,) * dim!r}."
                )
        stride = tuple(int(v) for v in entry)
    else:
        raise TypeError(
            f"resampling_stride entries must be ints or tuples of {dim} ints, "
            f"but {where} is {entry!r} (in resampling_stride={original!r}). "
            f"Use e.g. 2 or {(2,) * dim!r}."
        )
    if all(s == 1 for s in stride):
        raise ValueError(
            f"{where} is {stride!r}, i.e. 1 in every dimension, so that "
            f"downsampling would not downsample (in "
            f"resampling_stride={original!r}). Every downsampling needs a "
            f"stride > 1 in at least one dimension, e.g. {(2,) * dim!r} or "
            f"{(1,) * (dim - 1) + (2,)!r}."
        )
    return stride


def normalize_strides(resampling_stride: StrideSpec, dim: int,
                      num_downsamplings: int) -> list[tuple[int, ...]]:
    """Bring ``resampling_stride`` into the standard per-level format.

    Args:
        resampling_stride: One of

            * an ``int`` -- the same stride in every dimension at every level,
              e.g. ``2``;
            * a ``tuple`` of ``dim`` ints -- a per-dimension stride used at
              every level, e.g. ``(1, 2, 2)`` in 3D;
            * a ``list`` (or a tuple that is not a ``dim``-tuple of ints) with
              one entry per downsampling, each entry an int or a per-dimension
              tuple, e.g. ``[2, 2, (1, 2, 2)]`` in 3D.

            Ambiguity rule: a *tuple* of ints of length ``dim`` is always
            per-dimension (used for all levels); a *list* is always per
            level, even when ``num_downsamplings == dim`` and it holds only
            ints (``[1, 2, 2]`` with three downsamplings means strides 1, 2
            and 2 -- and is rejected because stride 1 does not downsample).
        dim: Number of spatial dimensions (1, 2 or 3).
        num_downsamplings: Number of downsamplings, i.e. ``num_levels - 1``.

    Returns:
        A list of ``num_downsamplings`` tuples of ``dim`` ints each.

    Raises:
        ValueError / TypeError (naming ``resampling_stride``): wrong number of
            levels, per-dimension tuple of the wrong arity, non-int entries,
            entries < 1, or a level whose stride is 1 in every dimension.
    """
    dim = _check_dim(dim)
    if not _is_int(num_downsamplings) or num_downsamplings < 0:
        raise ValueError(
            f"num_downsamplings must be an int >= 0, got {num_downsamplings!r}."
        )
    n = int(num_downsamplings)
    original = resampling_stride

    if _is_int(resampling_stride):
        stride = _stride_tuple(resampling_stride, dim, "resampling_stride",
                               original)
        return [stride] * n

    if isinstance(resampling_stride, tuple) and len(resampling_stride) == dim \
            and all(_is_int(v) for v in resampling_stride):
        stride = _stride_tuple(resampling_stride, dim, "resampling_stride",
                               original)
        return [stride] * n

    if isinstance(resampling_stride, (list, tuple)):
        if len(resampling_stride) != n:
            kind = "list" if isinstance(resampling_stride, list) else "tuple"
            hint = (f" (a tuple of {dim} ints would be a per-dimension "
                    f"stride for all levels)" if kind == "tuple" else "")
            raise ValueError(
                f"resampling_stride={original!r} is a {kind} of "
                f"{len(resampling_stride)} per-level strides, but there are "
                f"{n} downsamplings (one fewer than the number of levels). "
                f"Give exactly {n} entries{hint}, or a single int such as 2, "
                f"or a tuple of {dim} ints such as {(2,) * dim!r}."
            )
        return [
            _stride_tuple(entry, dim, f"resampling_stride[{i}]", original)
            for i, entry in enumerate(resampling_stride)
        ]

    raise TypeError(
        f"resampling_stride must be an int, a tuple of {dim} ints, or a list "
        f"with one int or {dim}-tuple per downsampling, got "
        f"resampling_stride={original!r}. Use e.g. 2 or {(2,) * dim!r}."
    )


# --------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class LevelLayout:
    """The layout of one level of an iUNet.

    Attributes:
        level: 0-based level index (0 = full resolution).
        channels: Number of channels at this level.
        blocks: Number of coupling layers per side (``architecture[level]``).
        kept: Channels kept as skip connection (``channels`` at the bottom).
        sent: Channels sent to the downsampling (0 at the bottom).
        stride: Per-dimension stride of this level's downsampling, or
            ``None`` at the bottom level.
        multiplier: ``prod(stride)``, the channel multiplier of the
            downsampling, or ``None`` at the bottom level.
    """

    level: int
    channels: int
    blocks: int
    kept: int
    sent: int
    stride: Optional[tuple[int, ...]]
    multiplier: Optional[int]

    @property
    def is_bottom(self) -> bool:
        """Whether this is the lowest-resolution level."""
        return self.stride is None

    @property
    def split_string(self) -> str:
        """``'(kept/sent)'`` for non-bottom levels, ``''`` at the bottom."""
        return "" if self.is_bottom else f"({self.kept}/{self.sent})"


@dataclass(frozen=True)
class Layout:
    """The channel layout of an iUNet (see :func:`compute_layout`).

    Attributes:
        dim: Number of spatial dimensions.
        requested: The requested channels per level.
        channels: The achieved channels per level.
        architecture: Coupling layers per side, per level.
        strides: Per-dimension stride of each downsampling (length ``L - 1``).
        levels: One :class:`LevelLayout` per level.
        adjusted: Whether ``channels != requested``.
        relative_errors: ``|achieved - requested| / requested`` for levels
            ``1 .. L-1``, i.e. ``relative_errors[k]`` belongs to level
            ``k + 1`` (level 0 is never adjusted).  Length ``L - 1``.
        mean_relative_error: Mean of ``relative_errors`` over all levels
            ``1 .. L-1`` (the reference package's "Average relative error";
            0.0 if nothing was changed or there is one level).
        clamped: ``(level i, wanted sent_i, sent_i)`` for every level whose
            rounded request could not be sent (it would have kept or sent zero
            channels) and was clamped to the nearest achievable count.
    """

    dim: int
    requested: tuple[int, ...]
    channels: tuple[int, ...]
    architecture: tuple[int, ...]
    strides: list[tuple[int, ...]]
    levels: tuple[LevelLayout, ...]
    adjusted: bool
    relative_errors: tuple[float, ...]
    mean_relative_error: float
    clamped: tuple[tuple[int, int, int], ...] = ()

    @property
    def num_levels(self) -> int:
        """Number of levels ``L``."""
        return len(self.channels)

    @property
    def channel_multipliers(self) -> list[int]:
        """``m_i = prod(strides[i])`` for each downsampling."""
        return [_prod(s) for s in self.strides]

    @property
    def downsampling_factors(self) -> tuple[int, ...]:
        """Total downsampling factor per spatial dimension (product over all
        downsamplings); inputs' spatial sizes must be multiples of these."""
        factors = [1] * self.dim
        for stride in self.strides:
            for d, s in enumerate(stride):
                factors[d] *= s
        return tuple(factors)

    @property
    def kept(self) -> tuple[int, ...]:
        """Kept (skip) channels of the non-bottom levels."""
        return tuple(lv.kept for lv in self.levels[:-1])

    @property
    def sent(self) -> tuple[int, ...]:
        """Sent (downsampled) channels of the non-bottom levels."""
        return tuple(lv.sent for lv in self.levels[:-1])

    def adjustment_message(self, width: int = MESSAGE_WIDTH) -> Optional[str]:
        """Explain how the requested channels were adjusted, or ``None``.

        The first lines follow the reference ``iunets`` wording (wrapped at
        ``width`` characters without breaking inside a channels or stride
        value), then ``Average relative error: x.xxxx`` (the mean over all
        levels ``>= 1``), a line with the relative error of every level
        ``>= 1`` and, if a level was clamped, a line saying which and why.
        """
        if not self.adjusted:
            return None
        nb = "\x00"  # placeholder for spaces that must not be broken at
        requested = repr(self.requested).replace(" ", nb)
        achieved = repr(self.channels).replace(" ", nb)
        strides = repr(list(self.strides)).replace(" ", nb)
        sentence = (
            f"Could not exactly create an iUNet with channels={requested} and "
            f"resampling_stride={strides}. Instead using closest achievable "
            f"configuration: channels={achieved}."
        )
        wrapped = textwrap.fill(sentence, width=width, break_long_words=False,
                                break_on_hyphens=False).replace(nb, " ")
        per_level = ", ".join(
            f"level {k + 1}: {e:.4f}" for k, e in enumerate(self.relative_errors)
        )
        text = (f"{wrapped}\n"
                f"Average relative error: {self.mean_relative_error:.4f}\n"
                f"Relative error per level: {per_level}")
        for i, wanted, sent in self.clamped:
            c = self.channels[i]
            why = (f"at most {c - 1} of its {c} channels (it keeps >= 1 for "
                   f"the skip connection)" if wanted > sent else
                   "at least 1 channel")
            note = (f"Level {i} must send {why}, not {wanted}: "
                    f"channels[{i + 1}] clamped to {self.channels[i + 1]}.")
            text += "\n" + textwrap.fill(note, width=width)
        return text

    def text(self) -> str:
        """The layout diagram as printed by ``iUNet.print_layout()``."""
        return format_layout(self)

    def __str__(self) -> str:
        return self.text()


# --------------------------------------------------------------------------
# Layout computation
# --------------------------------------------------------------------------

def minimal_channels(strides: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The smallest channels that work with these strides.

    Keeping 1 and sending 1 channel at every non-bottom level gives
    ``(2, m_0, m_1, ..., m_{L-2})`` (``(1,)`` for a single level); each
    ``m_i >= 2`` so every non-bottom level has at least the 2 channels it
    needs.
    """
    if len(strides) == 0:
        return (1,)
    return (2,) + tuple(_prod(s) for s in strides)


def _build_layout(dim: int, requested: tuple[int, ...],
                  achieved: Sequence[int], architecture: tuple[int, ...],
                  strides: list[tuple[int, ...]],
                  clamped: tuple[tuple[int, int, int], ...] = ()) -> Layout:
    L = len(achieved)
    levels = []
    for i in range(L):
        if i < L - 1:
            m = _prod(strides[i])
            sent = achieved[i + 1] // m
            levels.append(LevelLayout(i, achieved[i], architecture[i],
                                      achieved[i] - sent, sent, strides[i], m))
        else:
            levels.append(LevelLayout(i, achieved[i], architecture[i],
                                      achieved[i], 0, None, None))
    errors = tuple(abs(a - r) / r for a, r in zip(achieved[1:], requested[1:]))
    mean = sum(errors) / len(errors) if errors else 0.0
    return Layout(
        dim=dim,
        requested=tuple(requested),
        channels=tuple(achieved),
        architecture=tuple(architecture),
        strides=list(strides),
        levels=tuple(levels),
        adjusted=tuple(achieved) != tuple(requested),
        relative_errors=errors,
        mean_relative_error=mean,
        clamped=tuple(clamped),
    )


def compute_layout(channels: Sequence[int], architecture: Sequence[int],
                   dim: int, resampling_stride: StrideSpec = 2) -> Layout:
    """Compute the (closest achievable) layout for the requested channels.

    Level 0 always gets ``channels[0]``.  Going down level by level, the
    number of sent channels is ``sent_i = round_half_up(channels[i+1] / m_i)``
    (with ``m_i = prod(strides[i])``), computed from the *achieved* channels
    of level ``i``, and clamped to ``1 <= sent_i <= achieved[i] - 1`` (every
    non-bottom level keeps >= 1 channel for the skip connection and sends
    >= 1): the achieved ``channels[i+1] = m_i * sent_i`` is the nearest
    achievable count.  If that differs from the request, ``layout.adjusted``
    is True and :meth:`Layout.adjustment_message` explains the change (and
    names the levels that were clamped).

    Raises:
        ValueError: if ``channels``/``architecture`` are empty, of different
            lengths or contain non-positive entries; if ``dim`` is not 1, 2
            or 3; for invalid strides (see :func:`normalize_strides`); and
            if no layout exists at all: ``channels[0] == 1`` with more than
            one level (level 0 cannot keep one channel and send one).  The
            message names the smallest channels that would work.
    """
    dim = _check_dim(dim)
    requested = _positive_int_tuple(channels, "channels")
    arch = _positive_int_tuple(architecture, "architecture")
    if len(requested) != len(arch):
        raise ValueError(
            f"channels and architecture must have the same length (one entry "
            f"per level), got channels={tuple(channels)!r} "
            f"({len(requested)} levels) and "
            f"architecture={tuple(architecture)!r} ({len(arch)} levels)."
        )
    L = len(requested)
    strides = normalize_strides(resampling_stride, dim, L - 1)
    smallest = minimal_channels(strides)

    if L > 1 and requested[0] < 2:
        raise ValueError(
            f"Cannot build an iUNet with channels={requested!r}: level 0 has "
            f"{requested[0]} channel, but every level above the bottom must "
            f"keep >= 1 channel for the skip connection and send >= 1 to the "
            f"downsampling, so channels[0] must be at least 2. The smallest "
            f"channels that would work are channels={smallest!r}."
        )
    achieved = [requested[0]]
    clamped = []
    for i in range(L - 1):
        m = _prod(strides[i])
        wanted = _round_half_up(requested[i + 1], m)
        # Keep >= 1 and send >= 1 channel: the nearest achievable count.
        sent = min(max(wanted, 1), achieved[i] - 1)
        if sent != wanted:
            clamped.append((i, wanted, sent))
        achieved.append(m * sent)

    return _build_layout(dim, requested, achieved, arch, strides, tuple(clamped))


def channels_from_slice_mode(in_channels: int, architecture: Sequence[int],
                             dim: int, resampling_stride: StrideSpec = 2,
                             slice_mode: str = "double") -> tuple[int, ...]:
    """Channels per level in the old ``iUNet(in_channels=..., slice_mode=...)``
    API.

    With ``slice_mode='double'`` the next level's target is twice the number
    of channels, with ``'constant'`` the same number of channels, rounded to
    the nearest achievable: with ``factor`` 2 resp. 1 and
    ``m_i = prod(strides[i])``::

        kept_i = max(1, floor(c_i * (m_i - factor) / m_i))
        sent_i = c_i - kept_i
        c_{i+1} = m_i * sent_i

    E.g. ``in_channels=64`` in 2D with 4 levels gives ``(64, 128, 256, 512)``
    and ``in_channels=7`` in 3D with stride 2 gives ``(7, 16, 32, 64)``.

    Raises:
        ValueError: for an unknown ``slice_mode`` (lists the valid ones), a
            non-positive ``in_channels``, invalid ``architecture``/``dim``/
            ``resampling_stride``, or if a level would send zero channels
            (``in_channels=1`` with more than one level).
    """
    if slice_mode not in SLICE_MODES:
        raise ValueError(
            f"Unknown slice_mode={slice_mode!r}; valid values are "
            f"{', '.join(repr(k) for k in SLICE_MODES)}."
        )
    factor = SLICE_MODES[slice_mode]
    dim = _check_dim(dim)
    if not _is_int(in_channels) or in_channels < 1:
        raise ValueError(
            f"in_channels must be a positive int, got in_channels="
            f"{in_channels!r}."
        )
    arch = _positive_int_tuple(architecture, "architecture")
    strides = normalize_strides(resampling_stride, dim, len(arch) - 1)
    channels = [int(in_channels)]
    for i, stride in enumerate(strides):
        c = channels[i]
        m = _prod(stride)
        kept = max(1, (c * (m - factor)) // m)
        sent = c - kept
        if sent < 1:
            raise ValueError(
                f"in_channels={in_channels} is too small: level {i} has {c} "
                f"channel(s) and would send none to the next level. Use "
                f"in_channels >= 2."
            )
        channels.append(m * sent)
    return tuple(channels)


# --------------------------------------------------------------------------
# Text layout
# --------------------------------------------------------------------------

def format_layout(layout: Layout) -> str:
    """The layout diagram printed by ``iUNet.print_layout()``.

    Row ``i`` is ``left + '-' * gap + right`` where ``left`` is the level's
    channel count repeated ``blocks`` times joined by ``'-'`` followed by
    ``'-(kept/sent)'`` and ``right`` mirrors it.  The gap is
    ``max(len(row i+1) - len('(kept/sent)'), 4)``; the bottom row has no
    split string and no gap (``'384-384-' + '-384-384'``).  Rows below level
    0 are centred in the width of row 0 with ``'-'`` (the left side gets the
    floor of the padding).  Rows are joined by newlines, no trailing newline.
    """
    L = layout.num_levels
    rows = [""] * L
    for i in range(L - 1, -1, -1):
        lv = layout.levels[i]
        body = "-".join([str(lv.channels)] * lv.blocks)
        split = lv.split_string
        left = body + "-" + split
        right = split + "-" + body
        gap = "" if i == L - 1 else "-" * max(len(rows[i + 1]) - len(split), 4)
        rows[i] = left + gap + right
    width = len(rows[0])
    for i in range(1, L):
        pad = width - len(rows[i])
        rows[i] = "-" * (pad // 2) + rows[i] + "-" * (pad - pad // 2)
    return "\n".join(rows)


# --------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------

def count_parameters(layout: Layout, depth: int = 1,
                     learnable_resampling: bool = True,
                     learnable_channel_mixing: bool = True,
                     channel_mixing_freq: int = -1,
                     resampling_shared: bool = False) -> dict:
    """Count the learnable parameters of the default iUNet, without torch.

    The operations of :func:`iunet_nb.engine.plan.build_plan` are counted with
    :meth:`iunet_nb.engine.plan.Plan.op_parameters`, at level ``i`` with ``c``
    channels:

    * ``2 * architecture[i]`` additive coupling layers:
      ``3**dim*b*a + 2a`` for the first block of ``f`` plus
      ``(depth-1) * (3**dim*a*a + 2a)``;
    * learnable channel mixing, ``c * c`` parameters each:
      ``channel_mixing_freq=-1`` -- one per side at every non-bottom level;
      ``k > 0`` -- one after every ``k``-th coupling on each side at every
      level (``2 * (blocks // k)``); ``0`` -- none;
    * learnable resampling at non-bottom levels: a downsampling and an
      upsampling, each with ``sent_i`` kernels of ``m_i x m_i`` parameters
      (one shared ``m_i x m_i`` kernel each if ``resampling_shared``).

    Returns:
        ``{'levels': [{'level', 'channels', 'coupling', 'channel_mixing',
        'resampling', 'total'}, ...], 'coupling': int, 'channel_mixing': int,
        'resampling': int, 'total': int}``.
    """
    # plan.py builds on this module; importing it here keeps layout.py
    # loadable on its own (without the package and torch) for layouts only.
    from iunet_nb.engine.plan import (COUPLING, DOWNSAMPLE, MIXING, UPSAMPLE,
                                    build_plan)

    if not _is_int(depth) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got depth={depth!r}.")
    plan = build_plan(layout, channel_mixing_freq)
    category = {COUPLING: "coupling", MIXING: "channel_mixing",
                DOWNSAMPLE: "resampling", UPSAMPLE: "resampling"}
    levels = [{"level": lv.level, "channels": lv.channels, "coupling": 0,
               "channel_mixing": 0, "resampling": 0, "total": 0}
              for lv in layout.levels]
    for op in plan.ops:
        n = plan.op_parameters(op, depth, learnable_resampling,
                               learnable_channel_mixing, resampling_shared)
        if n:
            levels[op.level][category[op.kind]] += n
            levels[op.level]["total"] += n
    totals = {key: sum(d[key] for d in levels)
              for key in ("coupling", "channel_mixing", "resampling", "total")}
    return {"levels": levels, **totals}
