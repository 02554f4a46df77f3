"""The plan of an iUNet: its layout written once as an ordered list of invertible operations.

A :class:`iunet_nb.arch.layout.Layout` says how many channels each level has,
how many it keeps and sends, the strides and the couplings per level.  The
plan adds the option that places the channel mixings (``channel_mixing_freq``)
and lists every operation of the network in the order the forward runs them::

    encoder side, per level           decoder side, per level
    (level 0 down to the bottom)      (the bottom up to level 0)
    couplings and mixings             upsample    } not at
    split       } not at              concat      } the bottom
    downsample  } the bottom          couplings and mixings

With ``channel_mixing_freq=-1`` every non-bottom level has one mixing per
side: on the encoder side after the couplings (just before the split), on
the decoder side before them (just after the concatenation); with ``k > 0``
a mixing follows every ``k``-th coupling on each side of every level; ``0``
means no mixing.

Everything that needs the structure of the network reads it here: the
model's construction, forward, inverse, encode and decode, both engines'
step lists, the memory predictor and the parameter count.  The plan is
plain data (frozen dataclasses, no torch), so it can be built and inspected
for configurations that would not fit in memory.

Shapes along the plan, for a batch of ``N`` samples at level ``i`` with
spatial size ``S_i``: couplings and mixings map ``(N, c_i, *S_i)`` to itself;
a split maps it to ``(N, kept_i, *S_i)`` (the skip, kept for the concat of
the same level) and ``(N, sent_i, *S_i)`` (sent on); a downsampling maps
``(N, sent_i, *S_i)`` to ``(N, c_{i+1}, *S_{i+1})`` with
``S_{i+1} = S_i / stride_i`` and ``c_{i+1} = sent_i * prod(stride_i)``; the
upsampling and the concatenation undo these two on the decoder side.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Iterator, Optional

#: What the plan reads of an :class:`iunet_nb.arch.layout.Layout` and of its levels: their
#: fields only (duck-typed, so that the engine does not depend on the architecture layer).
Layout = Any
LevelLayout = Any

__all__ = [
    "COUPLING", "MIXING", "DOWNSAMPLE", "UPSAMPLE", "SPLIT", "CONCAT", "OP_KINDS",
    "ENCODER", "DECODER",
    "Op", "Plan", "build_plan", "check_channel_mixing_freq",
    "coupling_halves", "coupling_parameters",
]

COUPLING = "coupling"
MIXING = "mixing"
DOWNSAMPLE = "downsample"
UPSAMPLE = "upsample"
SPLIT = "split"
CONCAT = "concat"
#: Every kind of operation a plan holds.
OP_KINDS = (COUPLING, MIXING, DOWNSAMPLE, UPSAMPLE, SPLIT, CONCAT)

#: The two sides of the U, named as ``create_module_fn``'s ``LR`` coordinate.
ENCODER = "L"
DECODER = "R"

_SHORT_NAMES = {COUPLING: "coupling", MIXING: "mix", DOWNSAMPLE: "down", UPSAMPLE: "up",
                SPLIT: "split", CONCAT: "concat"}


# ---------------------------------------------------------------------------- the standard coupling
def coupling_halves(channels: int, chain_index: int) -> tuple[int, int]:
    """``(a, b)``: the channels a standard coupling transforms and those it conditions on.

    The coupling ``(u, v) -> (v, u + f(v))`` on ``channels = a + b`` channels
    transforms ``a = ceil(channels / 2)`` channels when ``chain_index`` is
    even and ``floor(channels / 2)`` when it is odd (see
    :func:`iunet_nb.nn.coupling.create_standard_module`); ``f`` maps ``b``
    channels to ``a``.
    """
    hi, lo = (channels + 1) // 2, channels // 2
    return (hi, lo) if chain_index % 2 == 0 else (lo, hi)


def coupling_parameters(channels: int, chain_index: int, dim: int, depth: int = 1) -> int:
    """Parameters of one standard additive coupling on ``channels`` channels.

    Its ``f: b -> a`` channels (:func:`coupling_halves`) is ``depth`` blocks
    of a bias-free ``3**dim`` convolution, a LeakyReLU and a ``GroupNorm(1, a)``
    with affine weight and bias: ``3**dim * b * a + 2a`` for the first block
    plus ``(depth - 1) * (3**dim * a * a + 2a)``.
    """
    a, b = coupling_halves(channels, chain_index)
    k = 3 ** dim
    return k * b * a + 2 * a + (depth - 1) * (k * a * a + 2 * a)


# ---------------------------------------------------------------------------- operations
@dataclass(frozen=True)
class Op:
    """One invertible operation of the network.

    Attributes:
        kind: one of :data:`OP_KINDS`.
        level: the level the operation belongs to (an upsampling belongs to the
            finer level it restores, like the downsampling it undoes).
        side: :data:`ENCODER` (``'L'``) or :data:`DECODER` (``'R'``).
        channels: the channels the operation's module is built for: the level's
            channels for couplings, mixings, splits and concats; the sent
            channels for a downsampling; the coarse channels
            ``sent * prod(stride)`` for an upsampling.
        index: couplings: ``module_index`` ``0 .. blocks - 1`` on each side (the
            coordinate ``create_module_fn`` receives); mixings: ``0, 1, ...`` on
            their side of the level; 0 for the other kinds.
        slot: couplings and mixings: position of the module in its side's
            module list of the level (``model.encoder_modules[level][slot]``
            or ``model.decoder_modules[level][slot]``); -1 for the other kinds.
        chain_index: couplings: position among the level's ``2 * blocks``
            couplings, encoder ``j`` and decoder ``blocks + j``; the standard
            coupling alternates the transformed half with it
            (:func:`coupling_halves`).  0 for the other kinds.
        stride: per-dimension stride of a down- or upsampling, else ``None``.
        kept, sent: the level's skip and sent channels for splits, concats and
            resamplings; 0 for the other kinds.
    """

    kind: str
    level: int
    side: str
    channels: int
    index: int = 0
    slot: int = -1
    chain_index: int = 0
    stride: Optional[tuple[int, ...]] = None
    kept: int = 0
    sent: int = 0

    @property
    def has_module(self) -> bool:
        """Whether the model holds a module for this operation (splits and concats are slicing)."""
        return self.kind not in (SPLIT, CONCAT)

    @property
    def multiplier(self) -> int:
        """``prod(stride)``, the channel factor of a resampling (1 for the other kinds)."""
        m = 1
        for s in self.stride or ():
            m *= s
        return m

    @property
    def out_channels(self) -> int:
        """Channels of the output that goes on (a split's skip of ``kept`` channels waits for its concat)."""
        return {SPLIT: self.sent, DOWNSAMPLE: self.sent * self.multiplier,
                UPSAMPLE: self.sent}.get(self.kind, self.channels)

    @property
    def couplings_before(self) -> int:
        """Couplings of the same level and side that run before this coupling or mixing."""
        return self.index if self.kind == COUPLING else self.slot - self.index

    @property
    def name(self) -> str:
        """Short label, e.g. ``'L0.coupling1'``, ``'L0.mix'``, ``'L0.down'``, ``'R0.up'``."""
        suffix = str(self.index) if self.kind == COUPLING else ""
        return f"{self.side}{self.level}.{_SHORT_NAMES[self.kind]}{suffix}"


@dataclass(frozen=True)
class Plan:
    """The ordered operations of an iUNet (see the module docstring).

    Attributes:
        layout: the channel layout the plan was built from.
        channel_mixing_freq: where the mixings are (-1, 0 or ``k > 0``).
        ops: every operation, in the order of the forward pass.
    """

    layout: "Layout"
    channel_mixing_freq: int
    ops: tuple[Op, ...]

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def dim(self) -> int:
        """Number of spatial dimensions."""
        return self.layout.dim

    @property
    def num_levels(self) -> int:
        """Number of levels."""
        return len(self.layout.levels)

    @property
    def encoder_ops(self) -> tuple[Op, ...]:
        """The down branch, level 0 to the bottom: what :meth:`iUNet.encode` runs."""
        return tuple(op for op in self.ops if op.side == ENCODER)

    @property
    def decoder_ops(self) -> tuple[Op, ...]:
        """The up branch, bottom to level 0: what :meth:`iUNet.decode` runs."""
        return tuple(op for op in self.ops if op.side == DECODER)

    def level_ops(self, level: int) -> tuple[Op, ...]:
        """The operations of one level, both sides, in forward order."""
        return tuple(op for op in self.ops if op.level == level)

    def module_ops(self, level: int, side: str) -> tuple[Op, ...]:
        """Couplings and mixings of one level and side in module-list (= forward) order."""
        return tuple(op for op in self.ops
                     if op.level == level and op.side == side and op.kind in (COUPLING, MIXING))

    def of_kind(self, kind: str) -> tuple[Op, ...]:
        """The operations of one kind, in forward order."""
        return tuple(op for op in self.ops if op.kind == kind)

    def count(self, kind: str) -> int:
        """Number of operations of one kind."""
        return len(self.of_kind(kind))

    @property
    def code_channels(self) -> tuple[int, ...]:
        """Channels of the codes of ``encode()``: the skip kept at each split, then the bottom."""
        return tuple(op.kept for op in self.of_kind(SPLIT)) + (self.layout.levels[-1].channels,)

    def op_parameters(self, op: Op, depth: int = 1, learnable_resampling: bool = True,
                      learnable_channel_mixing: bool = True, resampling_shared: bool = False) -> int:
        """Learnable parameters of ``op`` in the default iUNet.

        Couplings: :func:`coupling_parameters`; a learnable mixing: ``c * c``; a
        learnable down- or upsampling: ``sent`` kernels of ``m x m`` with
        ``m = prod(stride)`` (one kernel if ``resampling_shared``); splits and
        concats: none.
        """
        if op.kind == COUPLING:
            return coupling_parameters(op.channels, op.chain_index, self.dim, depth)
        if op.kind == MIXING:
            return op.channels ** 2 if learnable_channel_mixing else 0
        if op.kind in (DOWNSAMPLE, UPSAMPLE) and learnable_resampling:
            return (1 if resampling_shared else op.sent) * op.multiplier ** 2
        return 0


# ---------------------------------------------------------------------------- building the plan
def check_channel_mixing_freq(value: Any) -> int:
    """``value`` as an int if it is a valid ``channel_mixing_freq`` (-1, 0 or ``k > 0``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < -1:
        raise ValueError(
            "channel_mixing_freq must be -1 (one mixing per side at every non-bottom level), "
            "0 (none) or a positive int k (after every k-th coupling), "
            f"got channel_mixing_freq={value!r}"
        )
    return int(value)


def _module_kinds(lv: "LevelLayout", side: str, freq: int) -> list[str]:
    """Kinds of the couplings and mixings of one level and side, in forward order."""
    per_level = freq == -1 and not lv.is_bottom
    kinds = [MIXING] if per_level and side == DECODER else []
    for j in range(lv.blocks):
        kinds.append(COUPLING)
        if freq > 0 and (j + 1) % freq == 0:
            kinds.append(MIXING)
    if per_level and side == ENCODER:
        kinds.append(MIXING)
    return kinds


def _module_ops(lv: "LevelLayout", side: str, freq: int) -> list[Op]:
    ops: list[Op] = []
    counts = {COUPLING: 0, MIXING: 0}
    for slot, kind in enumerate(_module_kinds(lv, side, freq)):
        index = counts[kind]
        counts[kind] += 1
        chain = index + (lv.blocks if side == DECODER else 0) if kind == COUPLING else 0
        ops.append(Op(kind, lv.level, side, lv.channels, index=index, slot=slot, chain_index=chain))
    return ops


def _encoder_level(lv: "LevelLayout", freq: int) -> list[Op]:
    ops = _module_ops(lv, ENCODER, freq)
    if not lv.is_bottom:
        ops.append(Op(SPLIT, lv.level, ENCODER, lv.channels, kept=lv.kept, sent=lv.sent))
        ops.append(Op(DOWNSAMPLE, lv.level, ENCODER, lv.sent, stride=lv.stride,
                      kept=lv.kept, sent=lv.sent))
    return ops


def _decoder_level(lv: "LevelLayout", freq: int) -> list[Op]:
    ops: list[Op] = []
    if not lv.is_bottom:
        ops.append(Op(UPSAMPLE, lv.level, DECODER, lv.sent * lv.multiplier, stride=lv.stride,
                      kept=lv.kept, sent=lv.sent))
        ops.append(Op(CONCAT, lv.level, DECODER, lv.channels, kept=lv.kept, sent=lv.sent))
    return ops + _module_ops(lv, DECODER, freq)


def build_plan(layout: "Layout", channel_mixing_freq: int = -1) -> Plan:
    """The plan of the iUNet with this layout and channel mixing option."""
    freq = check_channel_mixing_freq(channel_mixing_freq)
    ops: list[Op] = []
    for lv in layout.levels:
        ops += _encoder_level(lv, freq)
    for lv in reversed(layout.levels):
        ops += _decoder_level(lv, freq)
    return Plan(layout, freq, tuple(ops))
