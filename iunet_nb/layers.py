"""The layer names of the reference package's ``iunets.layers``, for code written against its docs.

Users coming from the original ``iunets`` package follow its documentation
(``from iunets.layers import InvertibleDownsampling2D`` ...); with only the
package name changed that code runs here.  Every class is a thin subclass of
the layer that :class:`iunet_nb.iUNet` itself uses, with the reference's
argument names and defaults:

=================================== ==============================================================
reference name                      here
=================================== ==============================================================
``InvertibleDownsampling{1,2,3}D``  :class:`iunet_nb.nn.resampling.InvertibleDownsampling`, ``dim`` fixed
``InvertibleUpsampling{1,2,3}D``    :class:`iunet_nb.nn.resampling.InvertibleUpsampling`, ``dim`` fixed
``InvertibleChannelMixing{1,2,3}D`` :class:`iunet_nb.nn.mixing.OrthogonalChannelMixing`, ``dim`` fixed,
                                    identity init (as the reference: ``weight = 0`` is the identity)
``AdditiveCoupling(F, pos)``        :class:`iunet_nb.nn.coupling.AdditiveCoupling`:
                                    ``(x1, x2) -> (x2, x1 + F(x2))``, ``x1 = x[:, :pos]``
``StandardAdditiveCoupling``        the same (the name in the reference's 0.1 release)
``SplitChannels(pos)``              ``x -> (x[:, :pos], x[:, pos:])``; inverse: concatenation
``ConcatenateChannels(pos)``        the inverse of ``SplitChannels``
``create_standard_module``          :func:`iunet_nb.nn.coupling.create_standard_module`
=================================== ==============================================================

Resampling keywords: ``in_channels``, ``stride`` (int or per-dimension tuple),
``method`` (``'cayley'``, ``'exp'``, ``'householder'``), ``init`` (``'haar'``,
``'squeeze'``/``'pixel_shuffle'``, ``'random'`` or an orthogonal matrix),
``learnable``; further keywords (``shared``, ``device``, ``dtype``) go to the
underlying layer, and unknown ones raise ``TypeError`` (the reference ignored them).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from iunet_nb.nn.coupling import AdditiveCoupling as _AdditiveCoupling
from iunet_nb.nn.coupling import create_memcnn_module, create_standard_module
from iunet_nb.nn.mixing import OrthogonalChannelMixing
from iunet_nb.arch.iunet import _ConcatChannels, _SplitChannels
from iunet_nb.nn.resampling import InvertibleDownsampling, InvertibleUpsampling

__all__ = [
    "AdditiveCoupling",
    "StandardAdditiveCoupling",
    "create_standard_module",
    "create_memcnn_module",
    "InvertibleDownsampling1D",
    "InvertibleDownsampling2D",
    "InvertibleDownsampling3D",
    "InvertibleUpsampling1D",
    "InvertibleUpsampling2D",
    "InvertibleUpsampling3D",
    "InvertibleChannelMixing1D",
    "InvertibleChannelMixing2D",
    "InvertibleChannelMixing3D",
    "SplitChannels",
    "ConcatenateChannels",
]


def _no_dim(kwargs: dict[str, Any], name: str, dim: int) -> None:
    if "dim" in kwargs:
        raise TypeError(f"{name} is {dim}D: it takes no dim argument (got dim={kwargs['dim']!r})")


# ------------------------------------------------------------------ up-/downsampling, channel mixing
class _FixedDimResampling:
    """Mixin: the reference's resampling keywords, ``dim`` fixed by the class attribute ``_dim``."""

    _dim = 0

    def __init__(self, in_channels: int, stride: Any = 2, method: str = "cayley",
                 init: Any = "haar", learnable: bool = True, **kwargs: Any) -> None:
        _no_dim(kwargs, type(self).__name__, self._dim)
        super().__init__(in_channels, stride, dim=self._dim, method=method, init=init,  # type: ignore[call-arg]
                         learnable=learnable, **kwargs)


class _FixedDimMixing(OrthogonalChannelMixing):
    """The reference's channel-mixing keywords (identity init), ``dim`` fixed by ``_dim``."""

    _dim = 0

    def __init__(self, in_channels: int, method: str = "cayley", learnable: bool = True,
                 **kwargs: Any) -> None:
        _no_dim(kwargs, type(self).__name__, self._dim)
        kwargs.setdefault("init", "identity")
        super().__init__(in_channels, dim=self._dim, method=method, learnable=learnable, **kwargs)
        self.in_channels = self.out_channels = self.channels


_SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def _fixed_dim_class(layer: type, dim: int) -> type:
    """``layer`` with ``dim`` fixed: the class the reference names ``<Layer><dim>D``."""
    name = f"{layer.__name__.replace('Orthogonal', 'Invertible')}{dim}D"
    mixin = _FixedDimMixing if layer is OrthogonalChannelMixing else _FixedDimResampling
    bases = (mixin,) if mixin is _FixedDimMixing else (mixin, layer)
    doc = (f"{layer.__name__} of inputs ``{_SHAPES[dim]}`` with the reference's keywords; "
           f"see :class:`{layer.__module__}.{layer.__name__}`.")
    return type(name, bases, {"_dim": dim, "__doc__": doc, "__module__": __name__, "__qualname__": name})


InvertibleDownsampling1D = _fixed_dim_class(InvertibleDownsampling, 1)
InvertibleDownsampling2D = _fixed_dim_class(InvertibleDownsampling, 2)
InvertibleDownsampling3D = _fixed_dim_class(InvertibleDownsampling, 3)

InvertibleUpsampling1D = _fixed_dim_class(InvertibleUpsampling, 1)
InvertibleUpsampling2D = _fixed_dim_class(InvertibleUpsampling, 2)
InvertibleUpsampling3D = _fixed_dim_class(InvertibleUpsampling, 3)

InvertibleChannelMixing1D = _fixed_dim_class(OrthogonalChannelMixing, 1)
InvertibleChannelMixing2D = _fixed_dim_class(OrthogonalChannelMixing, 2)
InvertibleChannelMixing3D = _fixed_dim_class(OrthogonalChannelMixing, 3)


# ------------------------------------------------------------------ coupling, split, concatenate
def _input_channels(F: nn.Module) -> int | None:
    """``in_channels`` of the first layer of ``F`` that declares it (a convolution), else None."""
    for m in F.modules():
        c = getattr(m, "in_channels", None)
        if isinstance(c, int) and not isinstance(c, bool):
            return c
    return None


class AdditiveCoupling(_AdditiveCoupling):
    """The reference's ``AdditiveCoupling(F, channel_split_pos)``: ``(x1, x2) -> (x2, x1 + F(x2))``.

    ``x1 = x[:, :channel_split_pos]``, ``x2 = x[:, channel_split_pos:]``; ``F`` maps
    ``x2`` to the shape of ``x1``.  The number of channels ``C`` is
    ``channel_split_pos`` plus the input channels of ``F``'s first convolution,
    or given as ``channels``.  Input and output ``(N, C, *spatial)``.
    """

    def __init__(self, F: nn.Module, channel_split_pos: int, channels: int | None = None) -> None:
        if not isinstance(F, nn.Module):
            raise TypeError(f"AdditiveCoupling: F must be a torch.nn.Module, got {type(F).__name__}")
        if channels is None:
            f_in = _input_channels(F)
            if f_in is None:
                raise TypeError(
                    "AdditiveCoupling(F, channel_split_pos): cannot tell the number of channels from F "
                    "(it has no layer with in_channels); pass channels=C as well"
                )
            channels = channel_split_pos + f_in
        super().__init__(F, channels, channel_split_pos)
        self.channel_split_pos = channel_split_pos

    @property
    def F(self) -> nn.Module:
        """The coupling function (the reference's name for :attr:`f`)."""
        return self.f


#: The name of the same coupling in the reference package's 0.1 release.
StandardAdditiveCoupling = AdditiveCoupling


def _check_split(split_location: Any) -> int:
    if isinstance(split_location, bool) or not isinstance(split_location, int) or split_location < 1:
        raise ValueError(f"split_location must be a positive int, got {split_location!r}")
    return split_location


class SplitChannels(_SplitChannels):
    """``x -> (x[:, :split_location], x[:, split_location:])`` (copies); ``inverse(a, b)`` concatenates."""

    def __init__(self, split_location: int) -> None:
        super().__init__(_check_split(split_location))
        self.split_location = split_location


class ConcatenateChannels(_ConcatChannels):
    """``(a, b) -> cat([a, b], dim=1)``; ``inverse(x)`` splits at ``split_location`` again."""

    def __init__(self, split_location: int) -> None:
        super().__init__(_check_split(split_location))
        self.split_location = split_location
