"""Convolutions computed in tiles along the first spatial dimension.

On CPU, oneDNN convolutions on ``(N, C, *S)`` tensors allocate one or two
activation-sized reordering buffers per call.  Computing a 3^dim convolution
(stride 1, padding 1) slab by slab along the first spatial dimension, with a
one-pixel halo, keeps those buffers tile-sized.  The memory-efficient engine
uses this for the recomputation in the backward pass, where every
activation-sized buffer adds to the peak.

All functions take and return ``(N, C, *S)`` tensors and give the same result
as the untiled ``F.conv{1,2,3}d(x, weight, padding=1)`` and its gradients.

The one place where the engine's numerics depend on the device is
:func:`conv3_kernels_for`: tiled whole-tensor convolutions on CPU (sized for
ATen's CPU im2col and oneDNN paths), plain ones elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from iunet_nb.common import CONV_FN, CONV_TRANSPOSE_FN

__all__ = [
    "tile_bounds",
    "conv_tile_bounds",
    "conv3",
    "conv3_tiled",
    "transposed_kernel",
    "conv3_transpose_tiled",
    "conv3_weight_grad_tiled",
    "ChannelParts",
    "conv3_halo",
    "conv3_weight_grad_halo",
    "conv3_transpose_slab_rows",
    "Conv3Kernels",
    "TILED_CONV3",
    "TILED_CONV3_BACKWARD",
    "WHOLE_CONV3",
    "BACKWARD_TILE_DIVISOR",
    "SLAB_BACKWARD_TILE_DIVISOR",
    "backward_tile_elements",
    "conv3_kernels_for",
]

#: Elements per tile and sample (channels x pixels of one slab): 2 MiB of float32.
TILE_ELEMENTS = 1 << 19

#: The coupling backward's tiles are smaller than :data:`TILE_ELEMENTS`: its peak holds the
#: rebuilt activation, both gradients and ``f``'s recomputed activation besides the tiles, so a
#: tile costs the most there.  Where ``f``'s activation is kept whole (the coarser levels), the
#: tiles are this many times smaller -- only for activations of at least two forward tiles, as
#: smaller ones gain nothing and more calls cost time; where it is recomputed slab by slab (the
#: finest level), :data:`SLAB_BACKWARD_TILE_DIVISOR` times.  Measured on the Table-1 model at
#: 256^2 (fused): overhead 3.76 -> 3.39 input tensors at delta = 5; the step about 3.5 % slower
#: at delta = 30 (interleaved A/B; quarter-size tiles everywhere in the backward: 6-10 %).
BACKWARD_TILE_DIVISOR = 4
SLAB_BACKWARD_TILE_DIVISOR = 2


def backward_tile_elements(slabs: bool = False) -> int:
    """Elements per tile in the coupling backward (read at call time, like :data:`TILE_ELEMENTS`).

    ``slabs``: for the slab-wise recomputation (:data:`SLAB_BACKWARD_TILE_DIVISOR`), else for a
    whole activation (:data:`BACKWARD_TILE_DIVISOR`).
    """
    divisor = SLAB_BACKWARD_TILE_DIVISOR if slabs else BACKWARD_TILE_DIVISOR
    return max(1, TILE_ELEMENTS // divisor)


def tile_bounds(size: int, plane: int, tile_elements: int | None = None,
                min_rows: int = 1) -> list[tuple[int, int]]:
    """Split ``range(size)`` into slabs of about ``tile_elements / plane`` rows (at least ``min_rows``).

    ``plane`` is the number of elements of one row (channels x remaining spatial sizes).
    """
    if tile_elements is None:
        tile_elements = TILE_ELEMENTS  # read at call time, so tests can shrink it
    rows = max(min_rows, tile_elements // max(plane, 1))
    n_tiles = max(1, math.ceil(size / rows))
    step = math.ceil(size / n_tiles)
    return [(lo, min(lo + step, size)) for lo in range(0, size, step)]


#: ATen's CPU convolution takes oneDNN for a batch-1, 3^dim float32 convolution only
#: when N * C * S0 * S1 of its input exceeds this (``use_mkldnn`` in ConvUtils.h);
#: below it, the native path unfolds the input into a 3^dim times larger column buffer.
_ONEDNN_MIN_ELEMENTS = 20480


def _unfolds_input(shape: Sequence[int], dtype: torch.dtype, device: torch.device, rows: int) -> bool:
    """Whether a CPU 3^dim convolution of ``rows`` rows (plus a 2-row halo) of an
    ``(N, C, *S)`` tensor takes ATen's native im2col path instead of oneDNN."""
    if device.type != "cpu":
        return False
    if dtype != torch.float32 or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return True
    if shape[0] > 1:
        return False
    second = shape[3] if len(shape) > 3 else 1
    return shape[1] * (rows + 2) * second <= _ONEDNN_MIN_ELEMENTS


def _rows_as_batch_possible(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a slab's rows can be convolved as a batch of 3-row windows in oneDNN
    (:func:`_row_windows`): CPU, float32, oneDNN on, one sample."""
    return (device.type == "cpu" and dtype == torch.float32 and shape[0] == 1
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def conv_tile_bounds(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                     tile_elements: int | None = None,
                     out_channels: int | None = None) -> list[tuple[int, int]]:
    """Slabs of rows (first spatial dimension) for a 3^dim convolution of an ``(N, C, *S)`` tensor.

    About ``tile_elements`` elements of working memory per slab and sample: the
    slab itself where the convolution runs in oneDNN.  A slab too small for oneDNN
    (one sample, few channels) is convolved as a batch of its 3-row windows
    (:func:`_row_windows`: three times the slab, which oneDNN copies once more; at
    least 2 rows); where that is not
    possible it takes ATen's native path, whose unfolded columns are ``3^dim`` times
    the slab -- in 3D 27 input tensors of the slab, the largest allocation of a step.
    ``out_channels``: the convolution's output channels, where they may outnumber the input's.
    """
    if tile_elements is None:
        tile_elements = TILE_ELEMENTS
    size, plane = shape[2], shape[1] * math.prod(shape[3:])
    rows = min(size, max(1, tile_elements // max(plane, 1)))
    if _unfolds_input(shape, dtype, device, rows):
        if _rows_as_batch_possible(shape, dtype, device):
            # the windows (3 times the slab) and oneDNN's reordered copy of them, or of the
            # output's slab where the convolution widens the channels
            widest = max(shape[1], out_channels or 0) * math.prod(shape[3:])
            return tile_bounds(size, 6 * widest, tile_elements, min_rows=2)
        plane *= 3 ** (len(shape) - 2)
    return tile_bounds(size, plane, tile_elements)


def _row_windows(x: Tensor) -> Tensor:
    """``(1, C, R, *S)`` -> ``(R - 2, C, 3, *S)``: every 3-row window of ``x`` as a sample.

    A 3^dim convolution that is valid along the rows (no padding there) gives the same
    rows from the windows, one row per sample; as a batch of more than one sample,
    a small slab takes oneDNN on CPU instead of ATen's native path, which unfolds it
    27 times in 3D and is several times slower.
    """
    t = x[0].unfold(1, 3, 1)  # (C, R - 2, *S, 3)
    order = [1, 0, t.dim() - 1] + list(range(2, t.dim() - 1))
    return t.permute(*order).contiguous()


def _batched_rows(x: Tensor, weight: Tensor) -> bool:
    """Whether the valid-along-rows convolution of ``x`` ``(N, C, R, *S)`` runs as row windows."""
    rows = x.shape[2] - 2
    return (rows >= 2 and _rows_as_batch_possible(x.shape, x.dtype, x.device)
            and _unfolds_input(x.shape, x.dtype, x.device, rows) and weight.dtype == x.dtype)


def _conv_valid_rows(x: Tensor, weight: Tensor) -> Tensor:
    """3^dim convolution of ``x`` ``(N, C, R, *S)``, valid along the rows, padding 1 elsewhere:
    ``(N, C_out, R - 2, *S)`` (a view of the row-window batch's result where that is used)."""
    dim = x.dim() - 2
    padding = (0,) + (1,) * (dim - 1)
    if not _batched_rows(x, weight):
        return CONV_FN[dim](x, weight, padding=padding)
    y = CONV_FN[dim](_row_windows(x), weight, padding=padding)  # (R - 2, C_out, 1, *S)
    return y.transpose(0, 2)  # (1, C_out, R - 2, *S)


def _halo(x: Tensor, lo: int, hi: int) -> Tensor:
    """Rows ``lo-1 .. hi`` of ``x`` along dim 2, zero-padded at the borders."""
    return ChannelParts(x).halo(lo, hi)


def _bounds(x: Tensor, tile_elements: int | None, out_channels: int) -> list[tuple[int, int]]:
    """Slabs of ``x`` along its first spatial dimension (see :func:`conv_tile_bounds`)."""
    return conv_tile_bounds(x.shape, x.dtype, x.device, tile_elements, out_channels)


def _slabwise(x: Tensor, out_channels: int, whole: Any, slab: Any,
              tile_elements: int | None, out: Tensor | None) -> Tensor:
    """``whole(x)`` computed as ``slab(halo)`` per slab of rows; added into ``out`` if given."""
    bounds = _bounds(x, tile_elements, out_channels)
    if len(bounds) == 1:
        y = whole(x)
        return y if out is None else out.add_(y)
    accumulate = out is not None
    if out is None:
        out = x.new_empty(x.shape[0], out_channels, *x.shape[2:])
    for lo, hi in bounds:
        y = slab(_halo(x, lo, hi))
        if accumulate:
            out[:, :, lo:hi] += y
        else:
            out[:, :, lo:hi] = y
    return out


def conv3_tiled(x: Tensor, weight: Tensor, tile_elements: int | None = None,
                out: Tensor | None = None) -> Tensor:
    """``F.conv{d}d(x, weight, padding=1)`` for a 3^dim kernel, computed slab by slab.

    With ``out`` given, the result is *added* to ``out`` (slab by slab, so no
    full-size temporary) and ``out`` is returned.
    """
    conv = CONV_FN[x.dim() - 2]
    return _slabwise(x, weight.shape[0], lambda t: conv(t, weight, padding=1),
                     lambda h: conv3_halo(h, weight), tile_elements, out)


def transposed_kernel(weight: Tensor) -> Tensor:
    """The kernel whose convolution is the transposed convolution with ``weight``.

    For a 3^dim kernel with stride 1, ``conv_transpose(dy, W, padding=p)`` equals
    ``conv(dy, W', padding=2 - p)`` with ``W'`` the kernel flipped in every spatial
    dimension and its two channel dimensions swapped: ``(C_out, C_in, 3, ...)`` ->
    ``(C_in, C_out, 3, ...)``.  Computing input gradients as plain convolutions lets
    them take the same oneDNN path as the forward on CPU, where ATen's 3D transposed
    convolution always unfolds its input into a 27 times larger buffer.
    """
    return weight.flip(list(range(2, weight.dim()))).transpose(0, 1).contiguous()


def conv3_transpose_tiled(dy: Tensor, weight: Tensor, tile_elements: int | None = None,
                          out: Tensor | None = None) -> Tensor:
    """Input gradient of :func:`conv3_tiled`: ``conv_transpose(dy, weight, padding=1)``.

    Computed as the convolution with :func:`transposed_kernel`, slab by slab, where
    that kernel's copy is smaller than ``dy`` (see :func:`_flip_pays`); otherwise
    as the transposed convolution, slab by slab.  With ``out`` given, the result is
    added to it slab by slab.
    """
    if _flip_pays(dy, weight):
        return conv3_tiled(dy, transposed_kernel(weight), tile_elements, out)
    dim = dy.dim() - 2
    conv_t = CONV_TRANSPOSE_FN[dim]
    # On a slab that carries its own one-row halo, the transposed convolution needs
    # padding k - 1 - 0 = 2 along the tiled dimension to return exactly the slab's rows.
    pad = (2,) + (1,) * (dim - 1)
    return _slabwise(dy, weight.shape[1], lambda t: conv_t(t, weight, padding=1),
                     lambda h: conv_t(h, weight, padding=pad), tile_elements, out)


def _flip_pays(dy: Tensor, weight: Tensor) -> bool:
    """Whether to compute a transposed convolution of ``dy`` as a plain one with
    :func:`transposed_kernel`: when the kernel's copy is no larger than ``dy`` (at the
    coarse levels of wide networks the weights outweigh the activations)."""
    return weight.nbytes <= dy.nbytes


def conv3_weight_grad_tiled(x: Tensor, dy: Tensor, weight: Tensor,
                            tile_elements: int | None = None) -> Tensor:
    """Weight gradient of :func:`conv3_tiled` for output gradient ``dy``, summed over slabs."""
    bounds = _bounds(x, tile_elements, weight.shape[0])
    if len(bounds) == 1:
        return _weight_grad(x, dy, weight, padding_first=1)
    grad = None
    for lo, hi in bounds:
        g = conv3_weight_grad_halo(_halo(x, lo, hi), dy[:, :, lo:hi], weight)
        grad = g if grad is None else grad.add_(g)
    return grad


class _Conv3Tiled(torch.autograd.Function):
    """Autograd wrapper: tiled forward, tiled input and weight gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return conv3_tiled(x, weight)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dx = conv3_transpose_tiled(dy, weight) if ctx.needs_input_grad[0] else None
        dw = conv3_weight_grad_tiled(x, dy, weight) if ctx.needs_input_grad[1] else None
        return dx, dw


@dataclass(frozen=True)
class Conv3Kernels:
    """How whole-tensor 3^dim convolutions (stride 1, padding 1, no bias) are computed.

    ``tiled``: slab by slab along the first spatial dimension (:func:`conv3_tiled`
    and its gradients), which keeps the CPU convolution's reordering and im2col
    buffers tile-sized; otherwise one call on the whole tensor.  Both give the
    same values.
    """

    tiled: bool
    #: tiles of :func:`backward_tile_elements` instead of :data:`TILE_ELEMENTS`
    backward: bool = False

    def _tile(self) -> int | None:
        return backward_tile_elements() if self.backward else None

    def conv(self, x: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
        """``(N, C_in, *S) -> (N, C_out, *S)``; added into ``out`` if given."""
        if self.tiled:
            return conv3_tiled(x, weight, self._tile(), out=out)
        y = CONV_FN[x.dim() - 2](x, weight, padding=1)
        return y if out is None else out.add_(y)

    def conv_parts(self, parts: Sequence[Tensor], weight: Tensor) -> Tensor:
        """The convolution of ``cat(parts, dim=1)``: one convolution per part with its
        slice of ``weight``'s input channels, summed -- or, where copying those slices
        would cost more than the concatenation (the weight is larger than the input),
        one convolution of the concatenated parts."""
        if len(parts) > 1 and weight.nbytes >= sum(p.nbytes for p in parts):
            parts = [torch.cat(list(parts), dim=1)]
        out, offset = None, 0
        for p in parts:
            w = weight[:, offset:offset + p.shape[1]]
            offset += p.shape[1]
            out = self.conv(p, w if len(parts) == 1 else w.contiguous(), out)
        assert out is not None and offset == weight.shape[1], "parts do not match the weight"
        return out

    def conv_transpose(self, dy: Tensor, weight: Tensor, out: Tensor | None = None) -> Tensor:
        """Input gradient ``(N, C_out, *S) -> (N, C_in, *S)``; added into ``out`` if given."""
        if self.tiled:
            return conv3_transpose_tiled(dy, weight, self._tile(), out=out)
        dx = CONV_TRANSPOSE_FN[dy.dim() - 2](dy, weight, padding=1)
        return dx if out is None else out.add_(dx)

    def weight_grad(self, x: Tensor, dy: Tensor, weight: Tensor) -> Tensor:
        """Weight gradient for input ``x`` and output gradient ``dy``."""
        if self.tiled:
            return conv3_weight_grad_tiled(x, dy, weight, self._tile())
        return _weight_grad(x, dy, weight, padding_first=1)


TILED_CONV3 = Conv3Kernels(tiled=True)
TILED_CONV3_BACKWARD = Conv3Kernels(tiled=True, backward=True)
WHOLE_CONV3 = Conv3Kernels(tiled=False)


def conv3_kernels_for(device: torch.device, backward_elements: int = 0) -> Conv3Kernels:
    """The kernels for ``device``: tiled on CPU, whole-tensor elsewhere (GPU convolutions
    allocate no activation-sized reordering buffers).

    ``backward_elements``: in the coupling backward, the elements per sample of ``f``'s
    activation; from two forward tiles on, the backward's smaller tiles are used
    (:data:`BACKWARD_TILE_DIVISOR`).
    """
    if device.type != "cpu":
        return WHOLE_CONV3
    return TILED_CONV3_BACKWARD if backward_elements >= 2 * TILE_ELEMENTS else TILED_CONV3


def conv3(x: Tensor, weight: Tensor) -> Tensor:
    """3^dim convolution, stride 1, padding 1, no bias, with autograd (see :func:`conv3_kernels_for`).

    Tiled only where the kernels for ``x``'s device are and the call is not
    under autocast (the tiled function does not cast its inputs).
    """
    tiled = conv3_kernels_for(x.device).tiled
    if tiled and not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype:
        return _Conv3Tiled.apply(x, weight)
    return CONV_FN[x.dim() - 2](x, weight, padding=1)


class ChannelParts:
    """A ``(N, C, *S)`` tensor held as channel parts ``(N, C_k, *S)`` (concatenated along dim 1).

    The memory-efficient engine keeps activations in parts to avoid copies;
    the slab-wise computations only ever need a slab of rows of the whole
    tensor, which this class assembles (a small copy) or updates in place.
    """

    def __init__(self, parts: Tensor | list[Tensor]) -> None:
        self.parts = [parts] if isinstance(parts, Tensor) else list(parts)
        first = self.parts[0]
        self.shape = (first.shape[0], sum(p.shape[1] for p in self.parts), *first.shape[2:])

    def rows(self, lo: int, hi: int) -> Tensor:
        """Rows ``lo:hi`` of the first spatial dimension, all channels."""
        pieces = [p[:, :, lo:hi] for p in self.parts]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    def halo(self, lo: int, hi: int) -> Tensor:
        """Rows ``lo-1 .. hi``, zero-padded at the borders: the input a slab of a padded 3^dim convolution reads."""
        size = self.shape[2]
        t = self.rows(max(lo - 1, 0), min(hi + 1, size))
        top, bottom = (1 if lo == 0 else 0), (1 if hi == size else 0)
        if top or bottom:
            t = F.pad(t, [0, 0] * (len(self.shape) - 3) + [top, bottom])
        return t

    def _split(self, value: Tensor) -> list[Tensor]:
        out, c0 = [], 0
        for p in self.parts:
            out.append(value[:, c0:c0 + p.shape[1]])
            c0 += p.shape[1]
        return out

    def add_rows_(self, lo: int, hi: int, value: Tensor, alpha: float = 1.0) -> None:
        """``self[:, :, lo:hi] += alpha * value`` in place, part by part."""
        for p, v in zip(self.parts, self._split(value)):
            p[:, :, lo:hi].add_(v, alpha=alpha)

    def addcmul_rows_(self, lo: int, hi: int, a: Tensor, b: Tensor, value: float) -> None:
        """``self[:, :, lo:hi] += value * a * b`` in place, part by part (``b`` may broadcast)."""
        for p, a_k, b_k in zip(self.parts, self._split(a), self._split(b)):
            p[:, :, lo:hi].addcmul_(a_k, b_k, value=value)

    def channel_sums(self) -> Tensor:
        """``(N, C)`` sums over all spatial positions."""
        return torch.cat([p.reshape(p.shape[0], p.shape[1], -1).sum(-1) for p in self.parts], dim=1)


def conv3_halo(halo: Tensor, weight: Tensor) -> Tensor:
    """The rows of a 3^dim convolution (padding 1) computed from a slab with its halo."""
    return _conv_valid_rows(halo, weight)


def conv3_weight_grad_halo(halo: Tensor, dy_slab: Tensor, weight: Tensor) -> Tensor:
    """Weight gradient contributed by a slab of output rows, from the input slab with its halo."""
    return _weight_grad(halo, dy_slab, weight, padding_first=0)


def _weight_grad(x: Tensor, dy: Tensor, weight: Tensor, padding_first: int) -> Tensor:
    """Weight gradient of a 3^dim convolution with padding ``padding_first`` along dim 2, 1 elsewhere."""
    dim = x.dim() - 2
    ones = (1,) * dim
    if padding_first == 0 and _batched_rows(x, weight):  # summed over the row windows
        x, dy = _row_windows(x), dy.transpose(0, 2)
    _, g, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, None, ones, (padding_first,) + (1,) * (dim - 1), ones, False,
        (0,) * dim, 1, [False, True, False])
    return g


def conv3_transpose_slab_rows(dy_slab: Tensor, weight: Tensor, lo: int, hi: int,
                              size: int) -> tuple[int, int, Tensor]:
    """Input-gradient contribution of output rows ``lo:hi``: ``(first_row, end_row, rows)``.

    ``weight`` is the forward kernel; the rows ``lo-1 .. hi`` are the transposed
    convolution of ``dy_slab`` (as a plain one with :func:`transposed_kernel`, padded
    by 2 along the slab's dimension, where :func:`_flip_pays`).
    """
    dim = dy_slab.dim() - 2
    if _flip_pays(dy_slab, weight):
        padded = F.pad(dy_slab, [0, 0] * (dim - 1) + [2, 2])
        y = _conv_valid_rows(padded, transposed_kernel(weight))
    else:
        y = CONV_TRANSPOSE_FN[dim](dy_slab, weight, padding=(0,) + (1,) * (dim - 1))
    first, last = lo - 1, hi + 1
    y = y[:, :, (1 if first < 0 else 0): y.shape[2] - (1 if last > size else 0)]
    return max(first, 0), min(last, size), y
