"""Loading state dicts saved from ``iunets`` 0.1 objects (``load_state_dict`` pre-hooks).

The reference stores, for every orthogonal layer, only its unconstrained weight
``W`` (its kernel is ``cayley(W - W^T)`` or ``expm(W - W^T)``), wraps every module
of an iUNet in memcnn's ``InvertibleModuleWrapper`` (key infix ``._fn``) and
keeps each standard block's layers twice (``F.seq.k`` and ``F.F.k``).  This
package stores a fixed buffer ``base`` and a parameter ``weight`` with kernel
``base @ orthogonal(weight)``.  A reference checkpoint is converted while it is
loaded, before the module's own keys are checked, so ``strict=True`` holds:

* orthogonal layers: ``base`` := the reference's kernel (float64, then the
  buffer's dtype), ``weight`` := 0 (dropped for fixed layers); the layer then
  computes the reference's output and trains on from there;
* couplings: ``F.seq.k.*`` -> ``f.k.*`` (the duplicate ``F.F.k.*`` must be equal and
  is dropped); a standard coupling takes the reference's GroupNorm ``eps``, and
  is rebuilt as the reference's block where its split or widths differ;
* an iUNet: the ``._fn`` infix is dropped and the decoder's channel mixing
  moves behind the first coupling of its level, where the reference has it.

Saving always writes this package's format; such checkpoints load unchanged.
An iUNet's ``state_dict()`` records its structure in ``_metadata[prefix]``
under :data:`STRUCTURE_KEY` (``{"mixing_placement": "reference" | "mirrored",
"groupnorm_eps": {module name: eps}}``), so a converted model's checkpoint loads
strictly into a fresh model of the same constructor arguments: the fresh model
takes the recorded placement, rebuilds couplings whose stored shapes are the
reference's block and takes the recorded GroupNorm eps.  Without the record
(old checkpoints, or a copy of the dict that dropped ``_metadata``) the placement
is read from the keys, and a reference placement implies the reference's eps.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from iunet_nb.compat.reference import (
    REFERENCE_GROUPNORM_EPS, StandardBlock, block_pre_hook, convert_block, reference_kernel,
    use_reference_mixing_placement,
)
from iunet_nb.engine.plan import COUPLING, DECODER, MIXING
from iunet_nb.nn.coupling import AdditiveCoupling, StandardCouplingFunction
from iunet_nb.nn.orthogonal import OrthogonalBaseMixin

__all__ = [
    "is_reference_orthogonal",
    "convert_orthogonal",
    "convert_coupling",
    "convert_block",
    "convert_iunet",
    "orthogonal_pre_hook",
    "coupling_pre_hook",
    "block_pre_hook",
    "iunet_pre_hook",
    "iunet_state_dict_hook",
    "register",
    "STRUCTURE_KEY",
]

#: Key of an iUNet's structure record in ``state_dict()._metadata[prefix]``.
STRUCTURE_KEY = "iunet_nb_structure"



def _keys_under(state_dict: dict, prefix: str) -> list[str]:
    return [k for k in state_dict if k.startswith(prefix)]


def is_reference_orthogonal(state_dict: dict, prefix: str) -> bool:
    """True if ``state_dict`` holds a reference orthogonal layer at ``prefix`` (``weight``, no ``base``)."""
    return prefix + "weight" in state_dict and prefix + "base" not in state_dict


def convert_orthogonal(module: OrthogonalBaseMixin, state_dict: dict, prefix: str) -> None:
    """Turn a reference resampling / channel-mixing ``weight`` at ``prefix`` into ``base`` (+ zero ``weight``).

    Raises:
        ValueError: the stored weight's shape is not the module's kernel shape.
    """
    if not is_reference_orthogonal(state_dict, prefix):
        return
    W = state_dict.pop(prefix + "weight")
    if tuple(W.shape) != tuple(module.base.shape):
        raise ValueError(
            f"{prefix}weight: the reference checkpoint has shape {tuple(W.shape)}, this "
            f"{type(module).__name__} has a kernel of shape {tuple(module.base.shape)}; build it with the "
            "same channels and stride"
        )
    Q = reference_kernel(W, module.method).to(module.base.dtype)
    state_dict[prefix + "base"] = Q
    if module.weight is not None:
        state_dict[prefix + "weight"] = torch.zeros_like(Q)


def _block_shapes(state_dict: dict, prefix: str) -> list[tuple[int, ...]]:
    """Shapes of the convolution weights of a (converted) block at ``prefix``, in order."""
    shapes, k = [], 0
    while prefix + f"{k}.weight" in state_dict:
        shapes.append(tuple(state_dict[prefix + f"{k}.weight"].shape))
        k += 3
    return shapes


def _module_conv_shapes(f: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(f[k].weight.shape) for k in range(0, len(f), 3)]


def convert_coupling(module: AdditiveCoupling, state_dict: dict, prefix: str) -> None:
    """A reference ``StandardAdditiveCoupling`` at ``prefix`` -> this package's ``AdditiveCoupling``.

    Renames ``F.`` to ``f.``; a standard block ``f`` takes the reference's GroupNorm
    eps, and is replaced by a :class:`StandardBlock` of the checkpoint's shapes
    (with ``split`` updated) if its own shapes differ.
    """
    if not any(k.startswith(prefix + "F.") for k in state_dict):
        return
    for key in _keys_under(state_dict, prefix + "F."):
        state_dict[prefix + "f." + key[len(prefix + "F."):]] = state_dict.pop(key)
    convert_block(state_dict, prefix + "f.")
    match_block_shapes(module, state_dict, prefix)
    if isinstance(module.f, StandardCouplingFunction):
        _set_reference_eps(module)


def _set_reference_eps(module: AdditiveCoupling) -> None:
    for layer in module.f:
        if isinstance(layer, nn.GroupNorm):
            layer.eps = REFERENCE_GROUPNORM_EPS


def match_block_shapes(module: AdditiveCoupling, state_dict: dict, prefix: str) -> None:
    """Rebuild ``module.f`` as the reference's :class:`StandardBlock` if the stored ``f.k.weight`` shapes say so.

    Only a standard block is rebuilt; it gets the checkpoint's widths and depth
    and ``split`` becomes its output channels.

    Raises:
        ValueError: the stored block does not fit the coupling's channels.
    """
    f = module.f
    if not isinstance(f, StandardCouplingFunction):
        return
    shapes = _block_shapes(state_dict, prefix + "f.")
    if shapes and shapes != _module_conv_shapes(f):
        dim = len(shapes[0]) - 2
        f_in, f_out = shapes[0][1], shapes[-1][0]
        if f_in + f_out != module.channels:
            raise ValueError(
                f"{prefix}: the reference coupling maps {f_in} to {f_out} channels, this layer has "
                f"{module.channels} channels"
            )
        new = StandardBlock(dim, f_in, f_out, block_depth=len(shapes))
        module.f = new.to(device=f[0].weight.device, dtype=f[0].weight.dtype)
        module.split = f_out
        if hasattr(module, "channel_split_pos"):
            module.channel_split_pos = f_out


def _strip_wrapper(state_dict: dict, prefix: str) -> bool:
    """Drop memcnn's ``._fn`` infix from the keys under ``prefix``; True if there was one."""
    found = False
    for key in _keys_under(state_dict, prefix):
        if "._fn." in key[len(prefix):]:
            state_dict[prefix + key[len(prefix):].replace("._fn.", ".")] = state_dict.pop(key)
            found = True
    return found


def _stored_placement(model: nn.Module, state_dict: dict, prefix: str) -> str | None:
    """``'reference'`` or ``'mirrored'`` as the keys show it (slot 0 of a decoder level), None if they cannot tell.

    Only ``channel_mixing_freq=-1`` places the mixings differently.  A decoder
    level whose slot 0 is a mixing in this model tells by a coupling there in the
    checkpoint (``f.`` keys: the reference's placement); one whose slot 0 is a
    coupling followed by a mixing tells by a mixing there (``base``: this package's).
    """
    if model.plan.channel_mixing_freq != -1:
        return None
    for level in range(model.num_levels):
        kinds = [op.kind for op in model.plan.module_ops(level, DECODER)]
        if len(kinds) < 2:
            continue
        slot0 = f"{prefix}decoder_modules.{level}.0."
        if kinds[0] == MIXING and any(k.startswith(slot0 + "f.") for k in state_dict):
            return "reference"
        if kinds[0] == MIXING and slot0 + "base" in state_dict:
            return "mirrored"
        if kinds[:2] == [COUPLING, MIXING] and slot0 + "base" in state_dict:
            return "mirrored"
    return None


def _restore_structure(model: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Give ``model`` the structure recorded with (or shown by) one of this package's iUNet state dicts."""
    record = local_metadata.get(STRUCTURE_KEY) if isinstance(local_metadata, dict) else None
    placement = record.get("mixing_placement") if isinstance(record, dict) else None
    if placement is None:
        placement = _stored_placement(model, state_dict, prefix)
    current = getattr(model, "mixing_placement", "mirrored")
    if placement == "mirrored" and current == "reference" and model.plan.channel_mixing_freq == -1:
        raise ValueError(
            f"{prefix or 'state_dict'}: this checkpoint has iunet_nb.iUNet's own decoder mixing placement "
            "(before each level's first coupling), this model the reference's (after it); load it into an "
            "iunet_nb.iUNet built with the same arguments"
        )
    if placement != "reference":
        return
    use_reference_mixing_placement(model)
    couplings = [(f"{prefix}{name}.{level}.{slot}.", module)
                 for name in ("encoder_modules", "decoder_modules")
                 for level, mods in enumerate(getattr(model, name))
                 for slot, module in enumerate(mods) if isinstance(module, AdditiveCoupling)]
    for key, module in couplings:
        match_block_shapes(module, state_dict, key)
    eps = record.get("groupnorm_eps") if isinstance(record, dict) else None
    if isinstance(eps, dict):
        modules = dict(model.named_modules())
        for name, value in eps.items():
            if isinstance(modules.get(name), nn.GroupNorm):
                modules[name].eps = float(value)
    else:  # no record: a reference placement comes from a converted reference checkpoint
        for _, module in couplings:
            if isinstance(module.f, StandardCouplingFunction):
                _set_reference_eps(module)


def convert_iunet(model: nn.Module, state_dict: dict, prefix: str, local_metadata: dict | None = None) -> None:
    """Prepare ``model`` (an :class:`iunet_nb.iUNet`) for the iUNet state dict at ``prefix``.

    A reference ``iunets.iUNet`` state dict is converted (keys and kernels) and
    the model takes the reference's structure; one of this package's takes the
    structure recorded in ``local_metadata`` (see :data:`STRUCTURE_KEY`) or shown by its keys.
    """
    if not _strip_wrapper(state_dict, prefix):
        _restore_structure(model, state_dict, prefix, local_metadata or {})
        return
    use_reference_mixing_placement(model)
    for name in ("encoder_modules", "decoder_modules"):
        for level, mods in enumerate(getattr(model, name)):
            for slot, module in enumerate(mods):
                _convert_any(module, state_dict, f"{prefix}{name}.{level}.{slot}.")
    for name in ("downsampling_layers", "upsampling_layers"):
        for level, module in enumerate(getattr(model, name)):
            _convert_any(module, state_dict, f"{prefix}{name}.{level}.")


def _convert_any(module: nn.Module, state_dict: dict, prefix: str) -> None:
    if isinstance(module, OrthogonalBaseMixin):
        convert_orthogonal(module, state_dict, prefix)
    elif isinstance(module, AdditiveCoupling):
        convert_coupling(module, state_dict, prefix)


# ------------------------------------------------------------------ the hooks (module, state_dict, prefix, ...)
def orthogonal_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a resampling or channel mixing: accept the reference's format."""
    convert_orthogonal(module, state_dict, prefix)  # type: ignore[arg-type]


def coupling_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a coupling: accept the reference's format."""
    convert_coupling(module, state_dict, prefix)  # type: ignore[arg-type]


def iunet_pre_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict | None = None,
                   *args: Any) -> None:
    """``load_state_dict`` pre-hook of an iUNet: accept the reference's format and restore a recorded structure."""
    convert_iunet(module, state_dict, prefix, local_metadata)


def iunet_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook of an iUNet: record its structure in ``local_metadata`` (:data:`STRUCTURE_KEY`).

    The GroupNorm eps are recorded by module name (relative to the iUNet).
    """
    local_metadata[STRUCTURE_KEY] = {
        "mixing_placement": getattr(module, "mixing_placement", "mirrored"),
        "groupnorm_eps": {name: float(m.eps) for name, m in module.named_modules() if isinstance(m, nn.GroupNorm)},
    }


def register(module: nn.Module, hook: Any) -> None:
    """Register ``hook(module, state_dict, prefix, ...)`` as a ``load_state_dict`` pre-hook of ``module``."""
    module.register_load_state_dict_pre_hook(hook)
