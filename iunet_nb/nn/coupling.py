"""Additive coupling layers: the invertible blocks inside each iUNet level.

The default is the single-function additive coupling of the iUNet talk's
equation (1): split ``x`` along the channels into ``(u, v)`` and
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

from iunet_nb import torch_internals as internals
from iunet_nb.common import CONV, check_dim
from iunet_nb.nn.interfaces import ConvLeakyReLUGroupNorm, DeclaredCouplingFunction
from iunet_nb.nn.tiled import conv3

__all__ = [
    "AdditiveCoupling",
    "StandardCouplingFunction",
    "create_standard_module",
    "create_memcnn_module",
]


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


class StandardCouplingFunction(nn.Sequential, DeclaredCouplingFunction):
    """``depth`` x (convolution 3^dim without bias -> LeakyReLU -> GroupNorm(1, c)).

    Maps ``(N, in_channels, *spatial)`` to ``(N, out_channels, *spatial)``.  With
    ``zero_init`` the last GroupNorm's affine weight is zero, so the function
    is identically zero at initialisation.  At ``depth=1`` the memory-efficient
    engine recomputes and back-propagates it with its fused kernel
    (:meth:`fused_block`, :mod:`iunet_nb.engine.coupling_backward`).
    """

    #: The last layer is a GroupNorm, whose backward does not read its output.
    output_not_needed_for_backward = True

    def __init__(self, in_channels: int, out_channels: int, dim: int = 2, depth: int = 1,
                 zero_init: bool = True) -> None:
        check_dim(dim)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"depth must be a positive int, got depth={depth!r}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for _ in range(depth):
            layers += [
                CONV[dim](c_in, out_channels, kernel_size=3, padding=1, bias=False),
                nn.LeakyReLU(inplace=True),  # saves its output; no extra buffer
                nn.GroupNorm(1, out_channels),
            ]
            c_in = out_channels
        super().__init__(*layers)
        if zero_init:
            last_norm = layers[-1]
            nn.init.zeros_(last_norm.weight)
            nn.init.zeros_(last_norm.bias)
        self.dim = dim
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, *S) -> (N, out_channels, *S)``; standard convolutions tiled on CPU.

        A layer that was replaced or hooked since construction runs as the module it is.
        """
        if not self._standard_triples():
            return super().forward(x)
        for i in range(0, len(self), 3):
            conv, act, norm = self[i], self[i + 1], self[i + 2]
            y = conv3(x, conv.weight) if _is_standard_conv(conv, self.dim) else conv(x)
            x = norm(act(y))
        return x

    def _standard_triples(self) -> bool:
        """Whether the layers are still (convolution, activation, normalisation) triples."""
        return len(self) % 3 == 0 and all(
            isinstance(self[i], nn.modules.conv._ConvNd) for i in range(0, len(self), 3))

    def fused_block(self) -> ConvLeakyReLUGroupNorm | None:
        """The block for the engine's fused kernel, or None where the kernel would not compute ``f``.

        The kernel computes exactly ``GroupNorm(1, c, eps, affine)(LeakyReLU(slope)(conv3(v, w)))``
        with a bias-free 3^dim convolution of stride 1, padding 1, dilation 1, one group and
        zero padding.  Anything else -- ``depth > 1``, a replaced layer (``GroupNorm(2, c)``,
        ``BatchNorm``, another activation or convolution), a subclass with its own ``forward``,
        a hook on ``f`` or on one of its layers -- gets None, and the engine runs ``f`` itself.
        """
        if type(self).forward is not StandardCouplingFunction.forward or len(self) != 3:
            return None
        conv, act, norm = self[0], self[1], self[2]
        exact = (_is_standard_conv(conv, self.dim)
                 and type(act) is nn.LeakyReLU
                 and type(norm) is nn.GroupNorm and norm.num_groups == 1 and norm.affine
                 and norm.num_channels == conv.out_channels)
        if not exact or internals.module_has_hooks(self):
            return None
        return ConvLeakyReLUGroupNorm(conv.weight, act.negative_slope, norm.weight, norm.bias, norm.eps)


def _is_standard_conv(conv: nn.Module, dim: int) -> bool:
    """Whether ``conv`` is exactly ``CONV[dim](c_in, c, 3, padding=1, bias=False)`` without hooks."""
    return (type(conv) is CONV[dim] and conv.kernel_size == (3,) * dim
            and conv.stride == (1,) * dim and conv.padding in ((1,) * dim, 1)
            and conv.dilation == (1,) * dim and conv.groups == 1 and conv.bias is None
            and conv.padding_mode == "zeros" and not conv.transposed
            and not internals.module_has_hooks(conv, recurse=False))


def _resolve_depth(depth: int | None, block_depth: int | None) -> int:
    if depth is not None and block_depth is not None:
        raise TypeError(
            "give either depth= or its alias block_depth= (the older API's name), not both "
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
    check_dim(dim)
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
    from iunet_nb.nn.memcnn_library import import_memcnn

    memcnn = import_memcnn()
    depth = _resolve_depth(depth, block_depth)
    check_dim(dim)
    if not isinstance(in_channels, int) or in_channels < 2:
        raise ValueError(f"a coupling layer needs in_channels >= 2, got in_channels={in_channels!r}")
    c1 = math.ceil(in_channels / 2)
    c2 = in_channels - c1
    fm = StandardCouplingFunction(c2, c1, dim=dim, depth=depth, zero_init=zero_init)
    gm = StandardCouplingFunction(c1, c2, dim=dim, depth=depth, zero_init=zero_init)
    return memcnn.AdditiveCoupling(Fm=fm, Gm=gm)


CreateModuleFn = Callable[..., nn.Module]
