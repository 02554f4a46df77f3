"""The layer names of the reference package's ``iunets.layers``, for code written against its docs.

Users coming from the original ``iunets`` package follow its documentation
(``from iunets.layers import InvertibleDownsampling2D`` ...); with only the
package name changed that code runs here.  Every class is a thin subclass of
the layer that :class:`iunet_nb.iUNet` itself uses, with the reference's
argument names and defaults:

=================================== ==============================================================
reference name                      here
=================================== ==============================================================
``InvertibleDownsampling{1,2,3}D``  :class:`iunet_nb.nn.resampling.InvertibleDownsampling`, ``dim`` fixed;
                                    ``init='haar'`` with stride 2: the reference's sub-band order
``InvertibleUpsampling{1,2,3}D``    :class:`iunet_nb.nn.resampling.InvertibleUpsampling`, ``dim`` fixed
``OrthogonalResamplingLayer``       a downsampling with ``(low_channel_number, stride tuple, ...)``
``OrthogonalChannelMixing``         :class:`iunet_nb.nn.mixing.OrthogonalChannelMixing`, identity init
``InvertibleChannelMixing{1,2,3}D`` the same, ``dim`` fixed (as the reference: ``weight = 0`` is the identity)
``AdditiveCoupling(F, pos)``        :class:`iunet_nb.nn.coupling.AdditiveCoupling`:
                                    ``(x1, x2) -> (x2, x1 + F(x2))``, ``x1 = x[:, :pos]``
``StandardAdditiveCoupling``        the same (the name in the reference's 0.1 release)
``StandardBlock``                   :class:`iunet_nb.compat.reference.StandardBlock` (the reference's block)
``SplitChannels(pos)``              ``x -> (x[:, :pos], x[:, pos:])``; inverse: concatenation
``ConcatenateChannels(pos)``        the inverse of ``SplitChannels``
``create_standard_module``          :func:`iunet_nb.nn.coupling.create_standard_module`
=================================== ==============================================================

Resampling keywords: ``in_channels``, ``stride`` (int or per-dimension tuple),
``method`` (``'cayley'``, ``'exp'``, ``'householder'``), ``init`` (``'haar'``,
``'squeeze'``/``'pixel_shuffle'``, ``'random'`` or an orthogonal matrix),
``learnable``; further keywords (``shared``, ``device``, ``dtype``) go to the
underlying layer, and unknown ones raise ``TypeError`` (the reference ignored them).

Checkpoints: ``load_state_dict`` of each of these layers also accepts the state
dict of the same ``iunets`` 0.1 layer (see :mod:`iunet_nb.compat.checkpoints`);
saving writes this package's format.
"""
from __future__ import annotations

from typing import Any

import torch

from iunet_nb.arch.iunet import _ConcatChannels, _SplitChannels
from iunet_nb.compat import checkpoints as _ckpt
from iunet_nb.compat.modules import AdditiveCoupling
from iunet_nb.compat.reference import StandardBlock, reorder_haar_to_reference
from iunet_nb.nn.coupling import create_memcnn_module, create_standard_module
from iunet_nb.nn.mixing import OrthogonalChannelMixing as _ChannelMixing
from iunet_nb.nn.resampling import InvertibleDownsampling, InvertibleUpsampling

__all__ = [
    "AdditiveCoupling",
    "StandardAdditiveCoupling",
    "StandardBlock",
    "create_standard_module",
    "create_memcnn_module",
    "OrthogonalResamplingLayer",
    "InvertibleDownsampling1D",
    "InvertibleDownsampling2D",
    "InvertibleDownsampling3D",
    "InvertibleUpsampling1D",
    "InvertibleUpsampling2D",
    "InvertibleUpsampling3D",
    "OrthogonalChannelMixing",
    "InvertibleChannelMixing1D",
    "InvertibleChannelMixing2D",
    "InvertibleChannelMixing3D",
    "SplitChannels",
    "ConcatenateChannels",
]


def _no_dim(kwargs: dict[str, Any], name: str, dim: int) -> None:
    if "dim" in kwargs:
        raise TypeError(f"{name} is {dim}D: it takes no dim argument (got dim={kwargs['dim']!r})")


_NUMPY_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


def _init_kwargs_dtype(init_kwargs: Any, kwargs: dict[str, Any], name: str) -> None:
    """The reference's ``init_kwargs={'dtype': 'float64'}`` as this package's ``dtype=`` (in ``kwargs``)."""
    if init_kwargs is None:
        return
    if not isinstance(init_kwargs, dict) or set(init_kwargs) - {"dtype"}:
        raise TypeError(f"{name}: init_kwargs may only hold 'dtype' (e.g. {{'dtype': 'float64'}}), "
                        f"got {init_kwargs!r}")
    if "dtype" in init_kwargs:
        dt = init_kwargs["dtype"]
        if isinstance(dt, str) and dt not in _NUMPY_DTYPES:
            raise TypeError(f"{name}: init_kwargs['dtype'] must be one of {sorted(_NUMPY_DTYPES)}, got {dt!r}")
        kwargs.setdefault("dtype", _NUMPY_DTYPES[dt] if isinstance(dt, str) else dt)


# ------------------------------------------------------------------ up-/downsampling, channel mixing
class _ReferenceOrthogonal:
    """Mixin of the reference-named orthogonal layers: its checkpoints load, ``kernel_matrix``."""

    def _reference_setup(self) -> None:
        _ckpt.register(self, _ckpt.orthogonal_pre_hook)  # type: ignore[arg-type]

    @property
    def kernel_matrix(self) -> torch.Tensor:
        """The orthogonal kernel as matrices ``(C or 1, n, n)`` (the reference's attribute)."""
        return self.kernel()  # type: ignore[attr-defined]


class _FixedDimResampling(_ReferenceOrthogonal):
    """Mixin: the reference's resampling keywords, ``dim`` fixed by the class attribute ``_dim``.

    With ``init='haar'`` and stride 2 in every dimension the sub-bands come in the
    reference's order and signs (:func:`iunet_nb.compat.reference.reference_haar`).
    """

    _dim = 0

    def __init__(self, in_channels: int, stride: Any = 2, method: str = "cayley",
                 init: Any = "haar", learnable: bool = True, init_kwargs: dict | None = None,
                 **kwargs: Any) -> None:
        _no_dim(kwargs, type(self).__name__, self._dim)
        _init_kwargs_dtype(init_kwargs, kwargs, type(self).__name__)
        super().__init__(in_channels, stride, dim=self._dim, method=method, init=init,  # type: ignore[call-arg]
                         learnable=learnable, **kwargs)
        reorder_haar_to_reference(self)  # type: ignore[arg-type]
        self._reference_setup()


class OrthogonalResamplingLayer(_ReferenceOrthogonal, InvertibleDownsampling):
    """The reference's base resampling: ``low_channel_number`` fine channels, ``stride`` a tuple.

    ``dim = len(stride)``; ``high_channel_number = low_channel_number * prod(stride)``.
    Here it is a working downsampling ``(N, low, *S) -> (N, high, *S/stride)``
    (``inverse`` upsamples); other keywords as in :class:`InvertibleDownsampling2D`.
    """

    def __init__(self, low_channel_number: int, stride: Any, method: str = "cayley",
                 init: Any = "haar", learnable: bool = True, init_kwargs: dict | None = None,
                 **kwargs: Any) -> None:
        if isinstance(stride, int) and not isinstance(stride, bool):
            raise TypeError("OrthogonalResamplingLayer: stride must be a tuple with one entry per spatial "
                            f"dimension (e.g. (2, 2) for 2D), got {stride!r}")
        _no_dim(kwargs, type(self).__name__, len(tuple(stride)))
        _init_kwargs_dtype(init_kwargs, kwargs, type(self).__name__)
        super().__init__(low_channel_number, tuple(stride), dim=len(tuple(stride)), method=method,
                         init=init, learnable=learnable, **kwargs)
        reorder_haar_to_reference(self)
        self._reference_setup()
        self.low_channel_number = self.fine_channels
        self.high_channel_number = self.coarse_channels
        self.channel_multiplier = self.block_size


class OrthogonalChannelMixing(_ReferenceOrthogonal, _ChannelMixing):
    """The reference's channel mixing: ``(in_channels, method='cayley', learnable=True)``, identity init.

    ``(N, C, *S) -> (N, C, *S)``, ``y[:, i] = sum_j Q[i, j] x[:, j]``; ``dim`` (default 2)
    may be given here (the ``InvertibleChannelMixing{1,2,3}D`` classes fix it).  Its
    reference checkpoints load (see :mod:`iunet_nb.compat.checkpoints`).
    """

    _dim = 2

    def __init__(self, in_channels: int, method: str = "cayley", learnable: bool = True,
                 **kwargs: Any) -> None:
        kwargs.setdefault("init", "identity")
        if type(self) is not OrthogonalChannelMixing:
            _no_dim(kwargs, type(self).__name__, self._dim)
        dim = kwargs.pop("dim", self._dim)
        super().__init__(in_channels, dim=dim, method=method, learnable=learnable, **kwargs)
        self.in_channels = self.out_channels = self.channels
        self._reference_setup()

    @property
    def kernel_matrix_transposed(self) -> torch.Tensor:
        """``kernel_matrix`` transposed (the reference's attribute)."""
        return self.kernel().mT


_SHAPES = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


def _fixed_dim_class(layer: type, dim: int) -> type:
    """``layer`` with ``dim`` fixed: the class the reference names ``<Layer><dim>D``."""
    is_mixing = layer is OrthogonalChannelMixing
    name = f"{'InvertibleChannelMixing' if is_mixing else layer.__name__}{dim}D"
    bases = (OrthogonalChannelMixing,) if is_mixing else (_FixedDimResampling, layer)
    doc = (f"{'OrthogonalChannelMixing' if is_mixing else layer.__name__} of inputs ``{_SHAPES[dim]}`` "
           f"with the reference's keywords; see :class:`{layer.__module__}.{layer.__name__}`.")
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
