"""The invertible-block contract, checked by running the block.

Every block of an iUNet (a coupling layer from ``create_module_fn``, a
resampling or a channel mixing) MUST

1. be an ``nn.Module`` with ``forward(x)`` and ``inverse(y)``;
2. map ``(N, C, *spatial)`` to a tensor of the same shape;
3. satisfy ``inverse(forward(x)) == x`` for any parameters, not just at
   initialisation (a zero-initialised coupling is a channel permutation, so
   a wrong ``inverse`` only shows once the parameters move);
4. for :class:`~iunet_nb.nn.coupling.AdditiveCoupling`: ``f`` maps the
   ``C - split`` channels of ``v`` to the ``split`` channels of ``u``.

:func:`check_invertible` tests this on a copy of the block whose parameters
are moved off their initialisation (in float64, eval mode, so that dropout
and batch statistics do not change between forward and inverse) and raises a
:class:`ValueError` or :class:`TypeError` saying what is wrong.  The iUNet
runs it once per distinct block at construction (``check_blocks=True``).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from iunet_nb.nn.coupling import AdditiveCoupling

__all__ = ["check_invertible", "require_inverse_method", "probe_input"]

#: ``inverse(forward(x))`` must match ``x`` to this relative accuracy (float64).
RELATIVE_TOLERANCE = 1e-8


def probe_input(channels: int, dim: int, size: int = 4, batch: int = 2, seed: int = 0) -> Tensor:
    """A random float64 probe ``(batch, channels, size, ..., size)`` with ``dim`` spatial dims."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *([size] * dim), generator=g, dtype=torch.float64)


def _perturbed_copy(module: nn.Module, scale: float, seed: int) -> nn.Module:
    probe = copy.deepcopy(module).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in probe.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return probe


def _check_coupling_function(module: AdditiveCoupling, x: Tensor, where: str) -> None:
    """Clause 4: ``f`` maps ``C - split`` channels to ``split`` channels, same spatial size."""
    v = x[:, module.split:]
    fv = module.f(v)
    if not isinstance(fv, Tensor) or fv.shape != x[:, : module.split].shape:
        got = tuple(fv.shape) if isinstance(fv, Tensor) else type(fv).__name__
        raise ValueError(
            f"{where}: the coupling function f of this AdditiveCoupling(channels={module.channels}, "
            f"split={module.split}) must map v of shape {tuple(v.shape)} to the shape of u, "
            f"{tuple(x[:, : module.split].shape)}, but returned {got}. Make f's output have "
            f"{module.split} channels (and keep the spatial size, e.g. padding=1 for 3x3 convolutions)."
        )


def require_inverse_method(module: Any, where: str = "block") -> nn.Module:
    """Clause 1 alone (no run): ``module`` is an ``nn.Module`` with an ``inverse`` method."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where} must return a torch.nn.Module, got {type(module).__name__}")
    if not callable(getattr(module, "inverse", None)):
        raise TypeError(
            f"{where} returned {type(module).__name__}, which has no inverse() method; every block "
            "of an iUNet must be invertible (forward and inverse). Wrap your function in "
            "iunet_nb.nn.coupling.AdditiveCoupling(f, channels, split) or return a memcnn coupling."
        )
    return module


def check_invertible(module: Any, x: Tensor, where: str = "block", scale: float = 0.1,
                     seed: int = 0, same_shape: bool = True) -> None:
    """Check the invertible-block contract (module docstring) by running ``module`` on ``x``.

    Args:
        module: the block to check; it is not modified (a perturbed float64 copy is run).
        x: a probe input ``(N, C, *spatial)``; see :func:`probe_input`.
        where: how to name the block in error messages (e.g. ``"create_module_fn"``).
        scale: standard deviation of the perturbation added to the copy's parameters.
        seed: seed of the perturbation.
        same_shape: require clause 2; False for a resampling, whose output has
            another shape (its inverse must still map back to ``x``'s shape).

    Raises:
        TypeError: not an ``nn.Module`` or no ``inverse`` method.
        ValueError: wrong output shape, wrong coupling-function channels, or
            ``inverse(forward(x))`` differs from ``x``.
    """
    require_inverse_method(module, where)
    probe = _perturbed_copy(module, scale, seed)
    x = x.detach().to(torch.float64)
    with torch.no_grad():
        if isinstance(probe, AdditiveCoupling):
            _check_coupling_function(probe, x, where)
        y = probe(x)
        if not isinstance(y, Tensor) or (same_shape and y.shape != x.shape):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(
                f"{where}: a block must map its input to a tensor of the same shape, but "
                f"{type(module).__name__} maps {tuple(x.shape)} to {got}"
            )
        x_rec = probe.inverse(y)
        if not isinstance(x_rec, Tensor) or x_rec.shape != x.shape:
            got = tuple(x_rec.shape) if isinstance(x_rec, Tensor) else type(x_rec).__name__
            raise ValueError(
                f"{where}: {type(module).__name__}.inverse() maps the output {tuple(y.shape)} to {got}, "
                f"not back to the input shape {tuple(x.shape)}"
            )
    scale_ref = max(1.0, x.abs().max().item(), y.abs().max().item())
    error = (x_rec - x).abs().max().item()
    if not error <= RELATIVE_TOLERANCE * scale_ref:  # also catches NaN
        raise ValueError(
            f"{where}: {type(module).__name__}.inverse() does not invert its forward(): with its "
            f"parameters moved off the initialisation (+{scale}·randn, float64, eval mode), "
            f"max |inverse(forward(x)) - x| = {error:.3g} on a random input of shape {tuple(x.shape)} "
            f"(allowed: {RELATIVE_TOLERANCE * scale_ref:.1g}). Fix inverse(), or build the iUNet with "
            "check_blocks=False to skip this check."
        )
