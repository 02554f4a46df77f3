r"""The fused recompute-and-backward of the standard additive coupling.

The standard coupling maps ``x = (x1, x2)`` to ``y = (y1, y2) = (x2, x1 + f(x2))``
(the talk's equation (1), channels reordered so the untouched half comes first)
with the single block

.. math::

    a = \mathrm{LeakyReLU}(W * v), \qquad
    f(v) = \gamma \odot \hat a + \beta, \qquad
    \hat a = (a - \mu) \, r, \quad r = (\sigma^2 + \epsilon)^{-1/2},

where ``W * v`` is a 3^dim convolution (padding 1, no bias) and ``mu``,
``sigma^2`` are the mean and variance of ``a`` over all channels and positions
of one sample (GroupNorm with one group, ``M = c |S|`` elements).

Given the output ``y`` and its gradient ``(dy1, dy2)``, the backward needs the
input ``x`` and its gradient:

* ``x2 = v = y1``; ``x1 = u = y2 - f(v)`` -- so ``f(v)`` is recomputed, once;
* ``dx1 = dy2``; ``dx2 = dy1 + J_f(v)^T dy2`` -- the same evaluation of ``f`` is
  back-propagated with ``g = dy2``.

:func:`recompute_and_backward` does both in two passes over ``a``, writing
``u`` into ``target`` (which holds ``y2``) and accumulating ``J_f^T g`` into
``grad_v`` (which holds ``dy1``).  GroupNorm's backward, with the per-sample,
per-channel sums ``s1 = sum_S g``, ``s2 = sum_S g a`` and
``s_hat = sum_S g \hat a = r (s2 - mu s1)``:

.. math::

    \partial\beta_c = \sum_n s1_{nc}, \qquad
    \partial\gamma_c = \sum_n \hat s_{nc}, \qquad
    \partial a = \gamma r g - r A - (a - \mu) r^2 B,

    A_n = \tfrac1M \sum_c \gamma_c s1_{nc}, \qquad
    B_n = \tfrac1M \sum_c \gamma_c \hat s_{nc}.

Then LeakyReLU's derivative (1 where ``a >= 0``, the slope elsewhere) and the
convolution's: ``dW = sum v (x) da`` (correlation) and ``dv = W^T * da``
(transposed convolution).

*Pass 1* computes ``a`` and the statistics ``mu, sigma^2, s2`` (sums over
chunks of ``a`` in the data's dtype, added up in float64, and shifted by a
first estimate of the mean, so that no cancellation occurs); *pass 2*
subtracts ``f(v)`` from ``target`` and turns ``a`` into ``da`` in place, then
back-propagates through the convolution.

``slabs=False`` computes ``a`` once for the whole tensor and keeps it between
the passes: one activation-sized buffer ``(N, c, *S)``, plus a boolean mask.
``slabs=True`` computes it slab by slab along the first spatial dimension in
both passes: one extra convolution, but nothing activation-sized.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from iunet_nb.engine.contract import ConvLeakyReLUGroupNorm
from iunet_nb.nn.tiled import (
    ChannelParts,
    Conv3Kernels,
    backward_tile_elements,
    conv3_halo,
    conv3_kernels_for,
    conv3_transpose_slab_rows,
    conv3_weight_grad_halo,
    conv_tile_bounds,
)

__all__ = ["recompute_and_backward", "add_block_output", "add_block_output_slabwise"]

#: Elements per sample of one chunk of the elementwise loops (statistics, LeakyReLU mask).
CHUNK_ELEMENTS = 1 << 16

_ACCUMULATE = torch.float64


@torch.no_grad()
def recompute_and_backward(block: ConvLeakyReLUGroupNorm, v: list[Tensor], grad_fv: list[Tensor],
                           target: list[Tensor], grad_v: list[Tensor] | None, *, slabs: bool,
                           kernels: Conv3Kernels | None = None) -> tuple[Tensor | None, list[Tensor]]:
    """Recompute ``f(v)``, subtract it from ``target`` and back-propagate ``grad_fv`` through it.

    Args:
        block: ``f`` (see the module docstring).
        v: ``f``'s input ``(N, c_in, *S)`` as channel parts.
        grad_fv: ``dL/df(v)``, ``(N, c, *S)`` as channel parts (read only).
        target: ``(N, c, *S)`` channel parts that receive ``target -= f(v)`` in place.
        grad_v: ``(N, c_in, *S)`` channel parts that receive ``+= dL/dv`` in place, or None.
        slabs: recompute ``a`` slab by slab instead of keeping it (module docstring).
        kernels: the whole-tensor convolutions of ``slabs=False``
            (default: :func:`~iunet_nb.nn.tiled.conv3_kernels_for` the device and the
            size of ``f``'s activation: the backward's tiles).

    Returns:
        ``(dL/dv or None if accumulated into grad_v, [dL/dW, dL/dgamma, dL/dbeta])``.
    """
    v_parts, g_parts = ChannelParts(v), ChannelParts(grad_fv)
    if kernels is None:
        per_sample = sum(g.shape[1] for g in grad_fv) * math.prod(grad_fv[0].shape[2:])
        kernels = conv3_kernels_for(v[0].device, backward_elements=per_sample)
    if slabs:
        source: _WholeActivation | _SlabwiseActivation = _SlabwiseActivation(block, v_parts, grad_v)
    else:
        source = _WholeActivation(block, v_parts, grad_v, kernels)
    stats = _statistics(block, source, g_parts)
    target_parts = ChannelParts(target)
    for lo, hi in source.bounds:
        da = _subtract_and_norm_backward(block, stats, source.activation(lo, hi), g_parts,
                                         target_parts, lo, hi)
        source.backward_conv(lo, hi, da)
        del da
    dtype = stats.scale.dtype
    return source.input_grad, [source.weight_grad, stats.grad_gamma.to(dtype), stats.grad_beta.to(dtype)]


@dataclass
class _NormStatistics:
    """GroupNorm's per-sample statistics and the coefficients of its backward.

    Shapes: ``mean``, ``coef_centered``, ``shift``: ``(N, 1, ..., 1)``;
    ``scale`` (``r gamma``): ``(N, c, 1, ..., 1)``; ``beta``: ``(1, c, 1, ..., 1)``;
    ``grad_gamma``, ``grad_beta``: ``(c,)`` in float64.
    """

    mean: Tensor
    scale: Tensor
    beta: Tensor
    coef_centered: Tensor  # -r^2 B, the factor of (a - mu) in da
    shift: Tensor  # r A, subtracted from da
    grad_gamma: Tensor
    grad_beta: Tensor


def _chunks(a: Tensor) -> list[slice]:
    """Channel ranges of ``a`` with about :data:`CHUNK_ELEMENTS` elements per sample each."""
    per_channel = max(1, a[0, 0].numel())
    step = max(1, CHUNK_ELEMENTS // per_channel)
    return [slice(c, min(c + step, a.shape[1])) for c in range(0, a.shape[1], step)]


class _ShiftedMoments:
    """Per-sample mean and variance of chunks of an ``(N, c, *S)`` activation.

    Sums of each chunk are taken in the data's dtype and added up in float64,
    shifted by the first chunk's mean so that the sum of squares does not cancel.
    """

    def __init__(self, n: int, device: torch.device) -> None:
        zeros = dict(dtype=_ACCUMULATE, device=device)
        self.shift: Tensor | None = None
        self.sum_centered, self.sum_squares = torch.zeros(n, **zeros), torch.zeros(n, **zeros)

    def add(self, chunk: Tensor) -> None:
        """Add a chunk ``(N, channels, positions)``."""
        if self.shift is None:  # the first chunk's mean: shifted sums do not cancel
            self.shift = chunk.mean((1, 2), keepdim=True)
        centered = chunk - self.shift
        self.sum_centered += centered.sum((1, 2)).to(_ACCUMULATE)
        self.sum_squares += centered.square().sum((1, 2)).to(_ACCUMULATE)

    def add_activation(self, a: Tensor) -> None:
        """Add all of ``a`` ``(N, c, *S)``, chunk by chunk (:func:`_chunks`)."""
        n = a.shape[0]
        for sl in _chunks(a):
            self.add(a[:, sl].reshape(n, sl.stop - sl.start, -1))

    def normalization(self, block: ConvLeakyReLUGroupNorm, shape: Sequence[int],
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``(mean, scale, bias)`` in ``dtype``, broadcastable to an activation of ``shape``
        ``(N, c, *S)`` whose chunks were all added: ``f = (a - mean) * scale + bias``."""
        n, c = shape[0], shape[1]
        mean, rstd = self.mean_rstd(c * math.prod(shape[2:]), block.eps)
        per_sample = (n,) + (1,) * (len(shape) - 1)
        per_channel = (1, c) + (1,) * (len(shape) - 2)
        scale = rstd.to(dtype).view(per_sample) * block.norm_weight.view(per_channel)
        return mean.to(dtype).view(per_sample), scale, block.norm_bias.view(per_channel)

    def mean_rstd(self, count: int, eps: float) -> tuple[Tensor, Tensor]:
        """``(mu, (sigma^2 + eps)^-1/2)``, each ``(N,)`` float64, over ``count`` elements per sample."""
        assert self.shift is not None
        mean_shifted = self.sum_centered / count
        var = (self.sum_squares / count - mean_shifted.square()).clamp_min(0)
        mean = self.shift.reshape(-1).to(_ACCUMULATE) + mean_shifted
        return mean, (var + eps).rsqrt()


def _statistics(block: ConvLeakyReLUGroupNorm, source: "_WholeActivation | _SlabwiseActivation",
                g: ChannelParts) -> _NormStatistics:
    """Pass 1: ``mu``, ``r`` and the sums of GroupNorm's backward (module docstring)."""
    n, c = g.shape[0], g.shape[1]
    moments = _ShiftedMoments(n, g.parts[0].device)
    sum_ga = torch.zeros(n, c, dtype=_ACCUMULATE, device=g.parts[0].device)  # s2 = sum_S g a
    for lo, hi in source.bounds:
        a, g_rows = source.activation(lo, hi), g.rows(lo, hi)
        for sl in _chunks(a):
            a_chunk = a[:, sl].reshape(n, sl.stop - sl.start, -1)
            moments.add(a_chunk)
            g_chunk = g_rows[:, sl].reshape(n, sl.stop - sl.start, -1)
            sum_ga[:, sl] += torch.linalg.vecdot(g_chunk, a_chunk).to(_ACCUMULATE)
        del a, g_rows
    count = c * math.prod(g.shape[2:])  # M
    mean, rstd = moments.mean_rstd(count, block.eps)
    return _backward_coefficients(block, g, mean, rstd, sum_ga, count)


@torch.no_grad()
def add_block_output(block: ConvLeakyReLUGroupNorm, v: list[Tensor], u: list[Tensor], u_owned: bool,
                     kernels: Conv3Kernels | None = None) -> Tensor:
    """The coupling's forward ``u + f(v)`` with one activation-sized temporary.

    Args:
        block: ``f`` (see the module docstring).
        v: ``f``'s input ``(N, c_in, *S)`` as channel parts (not concatenated).
        u: ``(N, c, *S)`` as channel parts; a single part is updated in place and
            returned when ``u_owned``.
        u_owned: whether that part may be overwritten (ownership note 2).
        kernels: the convolutions (default: :func:`~iunet_nb.nn.tiled.conv3_kernels_for`).

    ``a = LeakyReLU(W * v)`` is computed once; its statistics are summed in chunks,
    then it is normalised in place and added to ``u`` (or ``u`` is added to it,
    when ``u`` is not ours): no separate buffers for the activation, the
    normalised output and the sum, as a layer-by-layer forward has.
    """
    if kernels is None:
        kernels = conv3_kernels_for(v[0].device)
    a = F.leaky_relu_(kernels.conv_parts(v, block.conv_weight), block.negative_slope)
    moments = _ShiftedMoments(a.shape[0], a.device)
    moments.add_activation(a)
    mean, scale, bias = moments.normalization(block, a.shape, a.dtype)
    a.sub_(mean).mul_(scale).add_(bias)
    if len(u) == 1 and u_owned:
        return u[0].add_(a)
    _add_parts_into(a, u)
    return a


@torch.no_grad()
def add_block_output_slabwise(block: ConvLeakyReLUGroupNorm, v: list[Tensor], target: list[Tensor]) -> None:
    """The coupling's forward ``target += f(v)`` in place, with nothing activation-sized.

    Args:
        block: ``f`` (see the module docstring).
        v: ``f``'s input ``(N, c_in, *S)`` as channel parts (read only; not ``target``'s memory).
        target: ``(N, c, *S)`` channel parts the step may overwrite (``u``).

    Two passes over slabs of rows, as the slab-wise backward makes them: the first
    computes ``a = LeakyReLU(W * v)`` slab by slab for GroupNorm's statistics only,
    the second computes it again, normalises it and adds it to ``target``'s rows.
    One more convolution than :func:`add_block_output`, which keeps ``a`` whole.
    """
    v_parts, out = ChannelParts(v), ChannelParts(target)
    bounds = _slab_bounds(block, v_parts)
    moments = _ShiftedMoments(out.shape[0], v[0].device)
    for lo, hi in bounds:
        moments.add_activation(_slab_activation(block, v_parts.halo(lo, hi)))
    mean, scale, bias = moments.normalization(block, out.shape, v[0].dtype)
    for lo, hi in bounds:
        out.add_rows_(lo, hi, _slab_activation(block, v_parts.halo(lo, hi)).sub_(mean).mul_(scale).add_(bias))


def _slab_bounds(block: ConvLeakyReLUGroupNorm, v: ChannelParts) -> list[tuple[int, int]]:
    """The slabs of rows in which ``f``'s activation is computed without keeping it whole."""
    first = v.parts[0]
    return conv_tile_bounds(v.shape, first.dtype, first.device, backward_tile_elements(slabs=True),
                            out_channels=block.conv_weight.shape[0])


def _slab_activation(block: ConvLeakyReLUGroupNorm, halo: Tensor) -> Tensor:
    """``a = LeakyReLU(W * v)`` on the rows of a slab, from the slab with its halo."""
    return F.leaky_relu_(conv3_halo(halo, block.conv_weight), block.negative_slope)


def _add_parts_into(a: Tensor, parts: list[Tensor]) -> None:
    """``a += cat(parts, dim=1)`` without the concatenation."""
    offset = 0
    for p in parts:
        a.narrow(1, offset, p.shape[1]).add_(p)
        offset += p.shape[1]


def _backward_coefficients(block: ConvLeakyReLUGroupNorm, g: ChannelParts, mean: Tensor,
                           rstd: Tensor, sum_ga: Tensor, count: int) -> _NormStatistics:
    """``A``, ``B``, ``s_hat`` and the parameter gradients from the float64 statistics."""
    n, c, ndim = g.shape[0], g.shape[1], len(g.shape)
    sum_g = g.channel_sums().to(_ACCUMULATE)  # s1, (N, c)
    sum_g_normalized = rstd.view(n, 1) * (sum_ga - mean.view(n, 1) * sum_g)  # s_hat, (N, c)
    gamma64 = block.norm_weight.to(_ACCUMULATE).view(1, c)
    mean_gamma_g = (gamma64 * sum_g).sum(1) / count  # A, (N,)
    mean_gamma_g_normalized = (gamma64 * sum_g_normalized).sum(1) / count  # B, (N,)
    dtype = g.parts[0].dtype
    per_sample = (n,) + (1,) * (ndim - 1)
    per_channel = (1, c) + (1,) * (ndim - 2)
    rstd_data = rstd.to(dtype).view(per_sample)
    return _NormStatistics(
        mean=mean.to(dtype).view(per_sample),
        scale=rstd_data * block.norm_weight.view(per_channel),
        beta=block.norm_bias.view(per_channel),
        coef_centered=(-(rstd * rstd) * mean_gamma_g_normalized).to(dtype).view(per_sample),
        shift=(rstd * mean_gamma_g).to(dtype).view(per_sample),
        grad_gamma=sum_g_normalized.sum(0),
        grad_beta=sum_g.sum(0),
    )


def _subtract_and_norm_backward(block: ConvLeakyReLUGroupNorm, stats: _NormStatistics, a: Tensor,
                                g: ChannelParts, target: ChannelParts, lo: int, hi: int) -> Tensor:
    """Pass 2 on rows ``lo:hi``: ``target -= f(v)``, then ``a`` becomes ``dL/d(W * v)`` in place."""
    negative = a.lt(0)
    a.sub_(stats.mean)  # a - mu
    target.addcmul_rows_(lo, hi, a, stats.scale, value=-1.0)  # target -= (a - mu) r gamma ...
    target.add_rows_(lo, hi, stats.beta, alpha=-1.0)  # ... + beta
    # dL/da = (a - mu)(-r^2 B) + r gamma g - r A
    a.mul_(stats.coef_centered).addcmul_(g.rows(lo, hi), stats.scale).sub_(stats.shift)
    # LeakyReLU's derivative: da *= slope where a < 0, as da += (slope - 1) da [a < 0], chunk
    # by chunk (the boolean mask is converted to a's dtype, a chunk-sized temporary).
    for sl in _chunks(a):
        a[:, sl].addcmul_(a[:, sl], negative[:, sl], value=block.negative_slope - 1.0)
    return a


class _WholeActivation:
    """``a`` for the whole tensor, computed once and kept between the two passes.

    ``input_grad``: after :meth:`backward_conv`, ``dL/dv`` or None if added into ``grad_v``.
    """

    def __init__(self, block: ConvLeakyReLUGroupNorm, v: ChannelParts, grad_v: list[Tensor] | None,
                 kernels: Conv3Kernels) -> None:
        self.block, self.kernels, self.grad_v = block, kernels, grad_v
        self.v = v.rows(0, v.shape[2])
        self.bounds = [(0, v.shape[2])]
        self._kept: Tensor | None = None
        self.weight_grad: Tensor | None = None
        self.input_grad: Tensor | None = None

    def activation(self, lo: int, hi: int) -> Tensor:
        """``a`` (computed on the first call, handed over on the second)."""
        if self._kept is None:
            a = self.kernels.conv(self.v, self.block.conv_weight)
            self._kept = F.leaky_relu_(a, self.block.negative_slope)
            return self._kept
        a, self._kept = self._kept, None
        return a

    def backward_conv(self, lo: int, hi: int, da: Tensor) -> None:
        """``dW`` and ``dv = W^T * da`` (added into ``grad_v`` when given)."""
        weight = self.block.conv_weight
        self.weight_grad = self.kernels.weight_grad(self.v, da, weight)
        if self.grad_v is not None and len(self.grad_v) == 1:
            self.kernels.conv_transpose(da, weight, out=self.grad_v[0])
            return
        dv = self.kernels.conv_transpose(da, weight)
        if self.grad_v is None:
            self.input_grad = dv
        else:
            ChannelParts(self.grad_v).add_rows_(0, dv.shape[2], dv)


class _SlabwiseActivation:
    """``a`` computed slab by slab from the input rows with their halo, in both passes.

    ``input_grad``: as for :class:`_WholeActivation`; with ``grad_v`` given, the
    gradient is added into it row by row, so nothing activation-sized is allocated.
    """

    def __init__(self, block: ConvLeakyReLUGroupNorm, v: ChannelParts,
                 grad_v: list[Tensor] | None) -> None:
        self.block, self.v = block, v
        first = v.parts[0]
        self.bounds = _slab_bounds(block, v)
        self.weight_grad = torch.zeros_like(block.conv_weight)
        self.input_grad: Tensor | None = None
        if grad_v is None:
            self.input_grad = first.new_zeros(v.shape)
            grad_v = [self.input_grad]
        self._grad_v = ChannelParts(grad_v)
        self._halo: Tensor | None = None

    def activation(self, lo: int, hi: int) -> Tensor:
        self._halo = self.v.halo(lo, hi)
        return _slab_activation(self.block, self._halo)

    def backward_conv(self, lo: int, hi: int, da: Tensor) -> None:
        """``dW`` of these rows, and their contribution to ``dv`` added into its rows."""
        weight = self.block.conv_weight
        self.weight_grad += conv3_weight_grad_halo(self._halo, da, weight)
        self._halo = None
        first, end, rows = conv3_transpose_slab_rows(da, weight, lo, hi, self.v.shape[2])
        self._grad_v.add_rows_(first, end, rows)
