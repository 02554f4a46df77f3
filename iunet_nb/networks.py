"""``iunets.networks`` under this package's name: the reference's iUNet, with both of its APIs.

``from iunet_nb.networks import iUNet, create_standard_module`` builds the
reference's structure on this package's engine (:class:`iunet_nb.iUNet`):

* its standard coupling (:func:`create_standard_module`: the reference's split
  parity, widths and GroupNorm ``eps = 1e-3``), its Haar sub-band order
  (stride 2) and its placement of the decoder's channel mixing (after the
  level's first coupling), so a state dict saved from ``iunets.iUNet`` loads
  strictly and computes the same numbers;
* the 0.1 API, ``iUNet(in_channels, architecture, dim, create_module_fn, ...,
  slice_mode='double', ...)``, unchanged;
* the first public API, ``iUNet(input_shape_or_channels, create_module_fn, dim,
  architecture, slice_fraction=2, learnable_downsampling=True,
  disable_custom_gradient=False)``: at every level ``c // slice_fraction``
  channels go down (``c_next = (c // slice_fraction) * 2**dim``) and the rest is
  kept; a shape ``(C, *S)`` instead of ``C`` gives ``dim = len(shape) - 1``.
  It warns once per model (``FutureWarning``) with the modern call that builds
  the same model, which has no channel mixing.

The first API is recognised by ``slice_fraction=``, ``learnable_downsampling=``,
an input shape, or a callable second positional argument; anything else is the
0.1 API.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

import iunet_nb.layers  # noqa: F401  (as in the reference, ``networks`` makes ``layers`` available)
from iunet_nb.arch.iunet import iUNet as _iUNet
from iunet_nb.compat.modules import create_reference_module
from iunet_nb.compat.reference import (
    reorder_haar_to_reference, use_reference_mixing_placement,
)

__all__ = ["iUNet", "create_standard_module", "first_api_channels"]

#: The reference's standard coupling (``create_standard_module(in_channels, dim=2, block_depth=1, ...)``).
create_standard_module = create_reference_module

_FIRST_API_ONLY = ("slice_fraction", "learnable_downsampling")
_FIRST_API_ORDER = ("create_module_fn", "dim", "architecture", "slice_fraction",
                    "learnable_downsampling", "disable_custom_gradient")


def first_api_channels(channels: int, architecture: Sequence[int], dim: int, slice_fraction: int) -> tuple[int, ...]:
    """Channels per level in the first API: ``c_{i+1} = (c_i // slice_fraction) * 2**dim``.

    Raises:
        ValueError: a level would send no channel down (``c_i < slice_fraction``) or keep none.
    """
    if isinstance(slice_fraction, bool) or not isinstance(slice_fraction, int) or slice_fraction < 2:
        raise ValueError(f"slice_fraction must be an int >= 2, got slice_fraction={slice_fraction!r}")
    out = [channels]
    for level in range(len(architecture) - 1):
        c = out[-1]
        if c // slice_fraction < 1:
            raise ValueError(
                f"level {level} has {c} channels, fewer than slice_fraction={slice_fraction}: it would send "
                f"no channel down; use at least {slice_fraction} input channels or a smaller slice_fraction"
            )
        out.append((c // slice_fraction) * 2 ** dim)
    return tuple(out)


def _is_shape(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and len(value) >= 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _first_api_arguments(args: tuple, kwargs: dict) -> dict | None:
    """The first API's arguments by name if this call uses it, else None."""
    first = args[0] if args else kwargs.get("input_shape_or_channels")
    uses_first = (any(k in kwargs for k in _FIRST_API_ONLY) or "input_shape_or_channels" in kwargs
                  or _is_shape(first) or (len(args) > 1 and callable(args[1])))
    if not uses_first:
        return None
    if len(args) > 1 + len(_FIRST_API_ORDER):
        raise TypeError(f"iUNet() takes at most {1 + len(_FIRST_API_ORDER)} positional arguments in the "
                        f"first API, got {len(args)}")
    named = dict(zip(("input_shape_or_channels",) + _FIRST_API_ORDER, args))
    for key, value in kwargs.items():
        if key in named:
            raise TypeError(f"iUNet() got multiple values for argument {key!r}")
        named[key] = value
    unknown = sorted(set(named) - {"input_shape_or_channels", *_FIRST_API_ORDER})
    if unknown:
        raise TypeError(
            f"iUNet() got unexpected keyword argument(s) {', '.join(map(repr, unknown))} in the first API "
            f"(input_shape_or_channels, {', '.join(_FIRST_API_ORDER)}); for the other options use the "
            "modern call iunet_nb.iUNet(channels=..., ...)"
        )
    return named


def _modern_call(channels: tuple, architecture: Sequence[int], dim: int, fn_name: str,
                 learnable: bool, disable: bool) -> str:
    return (f"iunet_nb.networks.iUNet(channels={channels}, architecture={tuple(architecture)}, dim={dim}, "
            f"create_module_fn={fn_name}, learnable_resampling={learnable}, "
            f"disable_custom_gradient={disable}, channel_mixing_freq=0)")


class iUNet(_iUNet):
    """The reference's iUNet (``iunets.networks.iUNet``) on this package's engine.

    Input and output ``(N, C, *S)``.  Accepts the 0.1 API and the first public
    API (see the module docstring) and every keyword of :class:`iunet_nb.iUNet`;
    the default ``create_module_fn`` is the reference's :func:`create_standard_module`.
    Built like this, a fresh model has the reference's structure; a state dict
    saved from ``iunets.iUNet`` with the same arguments loads with ``strict=True``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        first = _first_api_arguments(args, kwargs)
        if first is not None:
            args, kwargs = (), self._from_first_api(first)
        elif len(args) < 4 and "create_module_fn" not in kwargs:
            kwargs["create_module_fn"] = create_standard_module
        super().__init__(*args, **kwargs)
        use_reference_mixing_placement(self)
        for layer in list(self.downsampling_layers) + list(self.upsampling_layers):
            reorder_haar_to_reference(layer)

    @staticmethod
    def _from_first_api(named: dict) -> dict:
        shape_or_channels = named["input_shape_or_channels"]
        dim = named.get("dim")
        if _is_shape(shape_or_channels):
            shape_dim = len(shape_or_channels) - 1
            if dim is not None and dim != shape_dim:
                raise ValueError(f"input shape {tuple(shape_or_channels)} has {shape_dim} spatial dims but "
                                 f"dim={dim}; leave dim out or pass the number of channels")
            channels0, dim = int(shape_or_channels[0]), shape_dim
        elif isinstance(shape_or_channels, int) and not isinstance(shape_or_channels, bool):
            channels0 = shape_or_channels
            if dim is None:
                raise TypeError("iUNet(channels, ...): give dim= (1, 2 or 3) or an input shape (C, *spatial) "
                                "instead of the number of channels")
        else:
            raise TypeError("input_shape_or_channels must be the number of channels or the input shape "
                            f"(C, *spatial) without the batch dimension, got {shape_or_channels!r}")
        architecture = tuple(named.get("architecture", (2, 3, 4)))
        channels = first_api_channels(channels0, architecture, dim, named.get("slice_fraction", 2))
        fn: Callable[..., nn.Module] = named.get("create_module_fn", create_standard_module)
        learnable = named.get("learnable_downsampling", True)
        disable = named.get("disable_custom_gradient", False)
        fn_name = "iunet_nb.networks.create_standard_module" if fn is create_standard_module \
            else getattr(fn, "__qualname__", repr(fn))
        warnings.warn(
            "iUNet(input_shape_or_channels, ..., slice_fraction=...) is the reference's first API; the same "
            f"model is {_modern_call(channels, architecture, dim, fn_name, learnable, disable)}",
            FutureWarning, stacklevel=4)
        return dict(channels=channels, architecture=architecture, dim=dim, create_module_fn=fn,
                    learnable_resampling=learnable, disable_custom_gradient=disable,
                    channel_mixing_freq=0)
