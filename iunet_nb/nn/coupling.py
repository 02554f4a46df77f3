"""Additive coupling layers: the invertible blocks inside each iUNet level.

The default is the single-function additive coupling from the iUNet talk
(equation (1) of seed 002): split ``x`` along the channels into ``(u, v)`` and
map it to ``(v, u + f(v))``.  Its inverse is ``(y2 - f(y1), y1)``.  This is the
coupling behind the paper's Table 1 and the reference implementation.

``create_standard_module`` builds it with the reference configuration
``f = depth x (conv 3^dim, no bias -> LeakyReLU -> GroupNorm(1, c))`` whose last
GroupNorm is zero-initialised, so every coupling starts as a channel swap that
leaves the values unchanged.  ``create_memcnn_module`` builds memcnn's
two-function ``AdditiveCoupling`` instead (y1 = x1 + F(x2), y2 = x2 + G(y1)).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from iunet_nb.engine.tiled import (
    ChannelParts,
    conv3,
    conv3_halo,
    conv3_transpose_slab_rows,
    conv3_weight_grad_halo,
    conv3_tiled,
    conv3_transpose_tiled,
    conv3_weight_grad_tiled,
    conv_tile_bounds,
)

__all__ = [
    "AdditiveCoupling",
    "StandardCouplingFunction",
    "create_standard_module",
    "create_memcnn_module",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _check_dim(dim: int) -> None:
    if dim not in (1, 2, 3):
        raise ValueError(f"dim must be 1, 2 or 3 (number of spatial dimensions), got dim={dim!r}")


class AdditiveCoupling(nn.Module):
    """Single-function additive coupling ``(u, v) -> (v, u + f(v))``.

    Args:
        f: module mapping ``(N, channels - split, *spatial)`` to ``(N, split, *spatial)``.
        channels: number of input (= output) channels ``C``.
        split: number of channels of ``u`` (the part that is transformed).

    Shapes: input and output ``(N, C, *spatial)``.  The output's first
    ``C - split`` channels are ``v``, the last ``split`` are ``u + f(v)``.
    """

    def __init__(self, f: nn.Module, channels: int, split: int) -> None:
        super().__init__()
        if not 0 < split < channels:
            raise ValueError(
                f"split must be between 1 and channels - 1 = {channels - 1}, got split={split} "
                f"(a coupling needs at least 2 channels)"
            )
        self.f = f
        self.channels = int(channels)
        self.split = int(split)

    def _check(self, x: Tensor, name: str) -> None:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(
                f"AdditiveCoupling expects {name} of shape (N, {self.channels}, *spatial), "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self._check(x, "x")
        u, v = x[:, : self.split], x[:, self.split :]
        return torch.cat([v, u + self.f(v)], dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        self._check(y, "y")
        r = self.channels - self.split
        v, w = y[:, :r], y[:, r:]
        return torch.cat([w - self.f(v), v], dim=1)


class StandardCouplingFunction(nn.Sequential):
    """``depth`` x (convolution 3^dim without bias -> LeakyReLU -> GroupNorm(1, c)).

    Maps ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)``.  With
    ``zero_init`` the last GroupNorm's affine weight is zero, so the function
    is identically zero at initialisation.
    """

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2, depth: int = 1,
                 zero_init: bool = True) -> None:
        _check_dim(dim)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be a positive int, got depth={depth!r}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for _ in range(depth):
            layers += [
                _CONV[dim](c_in, out_channels, kernel_size=3, padding=1, bias=False),
                nn.LeakyReLU(inplace=True),  # saves its output; no extra buffer
                nn.GroupNorm(1, out_channels),
            ]
            c_in = out_channels
        super().__init__(*layers)
        # The last layer is a GroupNorm, whose backward does not read its output:
        # the memory-efficient engine may free the output once it has used it.
        self.output_not_needed_for_backward = True
        if zero_init:
            last_norm = layers[-1]
            nn.init.zeros_(last_norm.weight)
            nn.init.zeros_(last_norm.bias)
        self.dim = dim
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, *S) -> (N, out_channels, *S)``; convolutions tiled on CPU."""
        for i in range(0, len(self), 3):
            conv, act, norm = self[i], self[i + 1], self[i + 2]
            x = norm(act(conv3(x, conv.weight)))
        return x

    def can_fuse_backward(self, v: Tensor) -> bool:
        """Whether :meth:`recompute_and_backward` applies (depth 1, float32/64, no autocast)."""
        return (
            self.depth == 1
            and v.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(v.device.type)
            and self[0].weight.dtype == v.dtype
            and v.device.type == "cpu"
        )

    @torch.no_grad()
    def recompute_and_backward(self, v: Tensor, grad: Tensor, target: Tensor,
                               grad_v: Tensor | None = None) -> tuple[Tensor | None, list[Tensor]]:
        """Recompute ``f(v)``, subtract it from ``target`` in place, and back-propagate ``grad``.

        The memory-efficient engine's inner loop for the standard coupling
        (conv -> LeakyReLU -> GroupNorm(1, c)).  It keeps a single
        ``(N, out, *S)`` buffer alive: the LeakyReLU output ``a``, which becomes
        the gradient with respect to ``a`` in place; ``f(v)`` is never
        materialised (it is subtracted slice by slice), the LeakyReLU derivative
        is kept as a boolean mask, and the input gradient is accumulated into
        ``grad_v`` slab by slab when given.

        Args:
            v: ``(N, in, *S)`` input of ``f``.
            grad: ``(N, out, *S)`` gradient with respect to ``f(v)``.
            target: ``(N, out, *S)`` tensor that receives ``target -= f(v)``.
            grad_v: optional ``(N, in, *S)`` tensor that receives ``+= dL/dv``.

        Returns:
            ``(dL/dv or None if accumulated into grad_v, [dL/dconv.weight,
            dL/dnorm.weight, dL/dnorm.bias])``.
        """
        conv, act, norm = self[0], self[1], self[2]
        slope = act.negative_slope
        a = conv3_tiled(v, conv.weight)
        torch.nn.functional.leaky_relu_(a, slope)
        negative = a.lt(0)
        n, c = a.shape[0], a.shape[1]
        count = a[0].numel()
        shape = (n,) + (1,) * (a.dim() - 1)
        # GroupNorm(1, c) statistics per sample, two-pass for accuracy.
        mean = a.reshape(n, -1).mean(1)
        var = torch.zeros_like(mean)
        for sl in _channel_slices(a):
            d = a[:, sl] - mean.view(shape)
            var += d.square().reshape(n, -1).sum(1)
        rstd = (var / count + norm.eps).rsqrt()
        gamma = norm.weight.view((1, c) + (1,) * (a.dim() - 2))
        beta = norm.bias.view_as(gamma)
        scale = rstd.view(shape) * gamma  # (N, c, 1, ...)
        for sl in _channel_slices(a):
            fv = (a[:, sl] - mean.view(shape)) * scale[:, sl] + beta[:, sl]
            target[:, sl].sub_(fv)
        del fv
        # GroupNorm backward, written into a's storage.
        g = grad
        s1 = g.reshape(n, c, -1).sum(-1)  # sum_S g            (N, c)
        s2 = torch.einsum("ncl,ncl->nc", g.reshape(n, c, -1), a.reshape(n, c, -1))  # sum_S g a
        gx = rstd.view(n, 1) * (s2 - mean.view(n, 1) * s1)  # sum_S g x_hat  (N, c)
        dbeta = s1.sum(0)
        dgamma = gx.sum(0)
        A = (norm.weight.view(1, c) * s1).sum(1) / count  # (N,)
        B = (norm.weight.view(1, c) * gx).sum(1) / count  # (N,)
        a.sub_(mean.view(shape)).mul_((-(rstd * rstd) * B).view(shape))
        a.addcmul_(g, scale).sub_((rstd * A).view(shape))
        da = a
        del a
        # LeakyReLU derivative: 1 where its output was >= 0, slope elsewhere.
        slope_t, one = da.new_tensor(slope), da.new_tensor(1.0)  # in da's dtype, not float32
        for sl in _channel_slices(da):
            da[:, sl].mul_(torch.where(negative[:, sl], slope_t, one))
        del negative
        dw = conv3_weight_grad_tiled(v, da, conv.weight)
        dv = conv3_transpose_tiled(da, conv.weight, out=grad_v)
        return (None if grad_v is not None else dv), [dw, dgamma, dbeta]


    @torch.no_grad()
    def recompute_and_backward_slabs(self, v: Tensor | list[Tensor], grad: Tensor | list[Tensor],
                                     target: Tensor | list[Tensor],
                                     grad_v: Tensor | list[Tensor] | None = None
                                     ) -> tuple[Tensor | None, list[Tensor]]:
        """:meth:`recompute_and_backward` computed slab by slab, for the largest activations.

        Nothing of size ``(N, out, *S)`` is allocated: a first pass over slabs of
        the first spatial dimension computes GroupNorm's statistics (and the
        sums its backward needs), a second pass recomputes each slab of the
        convolution and finishes subtraction and back-propagation on it.  This
        costs one extra convolution per coupling, so the engine uses it only for
        large activations (``iunet_nb.engine.fused.SLAB_MIN_BYTES``).  ``v``, ``grad``,
        ``target`` and ``grad_v`` may be given as lists of channel parts (the
        engine's representation), which are read and updated in place.
        """
        conv, act, norm = self[0], self[1], self[2]
        vp, gp, tp = ChannelParts(v), ChannelParts(grad), ChannelParts(target)
        slope = act.negative_slope
        W = conv.weight
        n, c = gp.shape[0], gp.shape[1]
        size = gp.shape[2]
        count = c
        for d in gp.shape[2:]:
            count *= d
        first = gp.parts[0]
        bounds = conv_tile_bounds(vp.shape, first.dtype, first.device)
        acc = torch.float64
        sum_a = torch.zeros(n, dtype=acc, device=first.device)
        sum_aa = torch.zeros(n, dtype=acc, device=first.device)
        s2 = torch.zeros(n, c, dtype=acc, device=first.device)
        for lo, hi in bounds:
            a = torch.nn.functional.leaky_relu_(conv3_halo(vp.halo(lo, hi), W), slope)
            a64 = a.reshape(n, c, -1).to(acc)
            sum_a += a64.sum((1, 2))
            sum_aa += a64.square().sum((1, 2))
            s2 += torch.einsum("ncl,ncl->nc", gp.rows(lo, hi).reshape(n, c, -1).to(acc), a64)
            del a, a64
        mean64 = sum_a / count
        var64 = (sum_aa / count - mean64.square()).clamp_min(0)
        rstd64 = (var64 + norm.eps).rsqrt()
        s1 = gp.channel_sums().to(acc)
        gx = rstd64.view(n, 1) * (s2 - mean64.view(n, 1) * s1)
        w64 = norm.weight.to(acc).view(1, c)
        A = (w64 * s1).sum(1) / count
        B = (w64 * gx).sum(1) / count
        dt = first.dtype
        ndim = len(gp.shape)
        shape = (n,) + (1,) * (ndim - 1)
        mean, rstd = mean64.to(dt).view(shape), rstd64.to(dt).view(shape)
        gamma = norm.weight.view((1, c) + (1,) * (ndim - 2))
        beta = norm.bias.view_as(gamma)
        scale = rstd * gamma
        coef_a = (-(rstd64 * rstd64) * B).to(dt).view(shape)
        shift = (rstd64 * A).to(dt).view(shape)
        slope_t, one = first.new_tensor(slope), first.new_tensor(1.0)
        if grad_v is None:
            dv: Tensor | None = first.new_zeros(vp.shape)
            dvp = ChannelParts(dv)
        else:
            dv, dvp = None, ChannelParts(grad_v)
        dw = torch.zeros_like(W)
        for lo, hi in bounds:
            halo = vp.halo(lo, hi)
            a = torch.nn.functional.leaky_relu_(conv3_halo(halo, W), slope)
            negative = a.lt(0)
            a.sub_(mean)
            tp.add_rows_(lo, hi, a * scale + beta, alpha=-1.0)
            a.mul_(coef_a).addcmul_(gp.rows(lo, hi), scale).sub_(shift)
            a.mul_(torch.where(negative, slope_t, one))
            dw += conv3_weight_grad_halo(halo, a, W)
            del halo
            r0, r1, rows = conv3_transpose_slab_rows(a, W, lo, hi, size)
            dvp.add_rows_(r0, r1, rows)
            del a, negative, rows
        return dv, [dw, gx.sum(0).to(dt), s1.sum(0).to(dt)]


_SLICE_ELEMENTS = 1 << 16


def _channel_slices(t: Tensor) -> list[slice]:
    """Channel ranges of ``t`` with about ``_SLICE_ELEMENTS`` elements per sample each."""
    per_channel = max(1, t[0, 0].numel())
    step = max(1, _SLICE_ELEMENTS // per_channel)
    return [slice(c, min(c + step, t.shape[1])) for c in range(0, t.shape[1], step)]


def _resolve_depth(depth: int | None, block_depth: int | None) -> int:
    if depth is not None and block_depth is not None:
        raise TypeError(
            "give either depth= or its alias block_depth= (seed-001 name), not both "
            f"(got depth={depth}, block_depth={block_depth})"
        )
    return 1 if depth is None and block_depth is None else (depth if depth is not None else block_depth)


def create_standard_module(in_channels: int, dim: int = 2, depth: int | None = None,
                           module_index: int = 0, zero_init: bool = True, *,
                           block_depth: int | None = None, LR: str | None = None,
                           level: int | None = None, architecture: Any = None,
                           branch: str | None = None) -> AdditiveCoupling:
    """Build the default coupling layer for ``in_channels`` channels.

    ``u`` gets ``ceil(C/2)`` channels when ``module_index`` is even and
    ``floor(C/2)`` when it is odd, so consecutive layers transform alternate
    halves even for odd ``C`` (7 channels: 4/3, then 3/4).  ``depth`` (alias
    ``block_depth``) is the number of conv blocks in ``f`` (default 1).  The
    keyword-only ``LR``/``branch``, ``level`` and ``architecture`` are the
    coordinates an iUNet passes to every ``create_module_fn``.  On the decoder
    side the parity continues the encoder's numbering (``architecture[level] +
    module_index``): with odd ``C`` the zero-initialised couplings are channel
    rotations by ``ceil(C/2)`` and ``floor(C/2)``, and only alternating them
    across both sides makes a level start as the identity.
    """
    if (LR == "R" or branch == "decoder") and architecture is not None and level is not None:
        module_index = module_index + tuple(architecture)[level]
    depth = _resolve_depth(depth, block_depth)
    _check_dim(dim)
    if not isinstance(in_channels, int) or in_channels < 2:
        raise ValueError(f"a coupling layer needs in_channels >= 2, got in_channels={in_channels!r}")
    split = math.ceil(in_channels / 2) if module_index % 2 == 0 else in_channels // 2
    f = StandardCouplingFunction(in_channels - split, split, dim=dim, depth=depth, zero_init=zero_init)
    return AdditiveCoupling(f, in_channels, split)


def create_memcnn_module(in_channels: int, dim: int = 2, depth: int | None = None,
                         module_index: int = 0, zero_init: bool = True, *,
                         block_depth: int | None = None, LR: str | None = None,
                         level: int | None = None, architecture: Any = None,
                         branch: str | None = None) -> nn.Module:
    """memcnn's two-function ``AdditiveCoupling(Fm, Gm)`` with standard F and G.

    memcnn splits with ``torch.chunk``: ``x1`` gets ``ceil(C/2)`` channels.
    ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``.
    """
    from iunet_nb.engine.memcnn import import_memcnn

    memcnn = import_memcnn()
    depth = _resolve_depth(depth, block_depth)
    _check_dim(dim)
    if not isinstance(in_channels, int) or in_channels < 2:
        raise ValueError(f"a coupling layer needs in_channels >= 2, got in_channels={in_channels!r}")
    c1 = math.ceil(in_channels / 2)
    c2 = in_channels - c1
    fm = StandardCouplingFunction(c2, c1, dim=dim, depth=depth, zero_init=zero_init)
    gm = StandardCouplingFunction(c1, c2, dim=dim, depth=depth, zero_init=zero_init)
    return memcnn.AdditiveCoupling(Fm=fm, Gm=gm)


CreateModuleFn = Callable[..., nn.Module]
