"""What the reference package ``iunets`` 0.1 does differently, written as data and small helpers.

* :func:`reference_kernel` -- the orthogonal matrix the reference computes from its
  stored weight ``W`` (Cayley transform ``(I + A)^{-1} (I - A)`` or ``expm(A)``
  of ``A = W - W^T``), evaluated here in float64.
* :func:`reference_haar` -- the reference's Haar kernel for stride 2: the rows of
  :func:`iunet_nb.nn.resampling.haar_matrix` in another order and with other
  signs, which depend on the dimension and on the parametrisation method.
* :class:`StandardBlock` and :func:`create_reference_module` -- the reference's
  standard coupling (its split parity, its intermediate widths, GroupNorm
  ``eps = 1e-3``) built from this package's coupling modules.
* :func:`use_reference_mixing_placement` -- the reference puts the decoder's
  channel mixing after the first coupling of a level, not before it.

The tables were derived by evaluating the reference's initial weights (see
``tests/test_reference_oracle.py``, which checks them against the installed
package).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from iunet_nb.engine.plan import COUPLING, DECODER, MIXING, Plan
from iunet_nb.common import CONV, check_dim
from iunet_nb.nn.coupling import StandardCouplingFunction
from iunet_nb.nn.resampling import haar_matrix

__all__ = [
    "REFERENCE_METHODS",
    "REFERENCE_GROUPNORM_EPS",
    "reference_kernel",
    "reference_haar_rows",
    "reference_haar",
    "StandardBlock",
    "reference_split",
    "use_reference_mixing_placement",
]

#: Parametrisations whose stored weights the reference can load and evaluate
#: (its Householder option only ever builds random matrices).
REFERENCE_METHODS: tuple[str, ...] = ("cayley", "exp")

#: The GroupNorm epsilon of the reference's standard block.
REFERENCE_GROUPNORM_EPS: float = 1e-3

# Row r of the reference's stride-2 Haar kernel is sign * haar_matrix((2,)*dim)[row]:
# {(dim, method): ((row, sign) for r = 0, 1, ...)}.  Householder uses the Cayley order.
_HAAR_ROWS: dict[tuple[int, str], tuple[tuple[int, int], ...]] = {
    (1, "cayley"): ((1, -1), (0, -1)),
    (1, "exp"): ((0, 1), (1, -1)),
    (2, "cayley"): ((2, 1), (0, 1), (1, 1), (3, 1)),
    (2, "exp"): ((0, 1), (2, 1), (3, -1), (1, -1)),
    (3, "cayley"): tuple((r, s) for r, s in enumerate((1, -1, -1, 1, -1, 1, 1, -1))),
    (3, "exp"): tuple((r, s) for r, s in enumerate((1, -1, -1, 1, -1, 1, 1, -1))),
}


def reference_kernel(weight: Tensor, method: str) -> Tensor:
    """The reference's orthogonal matrix for its stored ``weight`` ``(..., n, n)``, in float64.

    ``A = W - W^T``; ``'cayley'``: ``(I + A)^{-1} (I - A)``, ``'exp'``: ``expm(A)``.

    Raises:
        ValueError: ``method`` is not one of :data:`REFERENCE_METHODS`, or ``weight`` is not square.
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(
            f"a reference checkpoint can be converted for method 'cayley' or 'exp', got method={method!r} "
            "(the reference's 'householder' layers are random and cannot be rebuilt from their weight)"
        )
    if weight.dim() < 2 or weight.shape[-1] != weight.shape[-2]:
        raise ValueError(f"expected square matrices (..., n, n), got shape {tuple(weight.shape)}")
    W = weight.detach().to(device="cpu", dtype=torch.float64)
    A = W - W.mT
    if method == "exp":
        return torch.linalg.matrix_exp(A)
    eye = torch.eye(A.shape[-1], dtype=torch.float64)
    return torch.linalg.solve(eye + A, eye - A)


def reference_haar_rows(dim: int, method: str) -> tuple[tuple[int, int], ...]:
    """``(row, sign)`` of ``haar_matrix((2,) * dim)`` for each row of the reference's Haar kernel."""
    check_dim(dim)
    return _HAAR_ROWS[(dim, method if method in REFERENCE_METHODS else "cayley")]


def reference_haar(dim: int, method: str) -> Tensor:
    """The reference's Haar kernel for stride 2 in ``dim`` dims, float64, shape ``(2^dim, 2^dim)``."""
    H = haar_matrix((2,) * dim)
    rows = reference_haar_rows(dim, method)
    return torch.stack([sign * H[row] for row, sign in rows])


# ------------------------------------------------------------------ the standard coupling
def _keys_under(state_dict: dict, prefix: str) -> list[str]:
    return [k for k in state_dict if k.startswith(prefix)]


def _block_layer_keys(state_dict: dict, prefix: str) -> bool:
    return any(k.startswith(prefix + "seq.") or k.startswith(prefix + "F.") for k in state_dict)


def convert_block(state_dict: dict, prefix: str) -> None:
    """Reference ``StandardBlock`` keys at ``prefix``: ``seq.k.*`` -> ``k.*``; ``F.k.*`` checked, dropped."""
    if not _block_layer_keys(state_dict, prefix):
        return
    for key in _keys_under(state_dict, prefix + "F."):
        twin = prefix + "seq." + key[len(prefix + "F."):]
        value = state_dict.pop(key)
        if twin not in state_dict:
            state_dict[twin] = value
        elif not torch.equal(state_dict[twin], value):
            raise ValueError(f"{key} and {twin} differ; in a reference checkpoint they are the same tensor")
    for key in _keys_under(state_dict, prefix + "seq."):
        state_dict[prefix + key[len(prefix + "seq."):]] = state_dict.pop(key)


def block_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a :class:`StandardBlock`: accept the reference's format."""
    convert_block(state_dict, prefix)


class StandardBlock(StandardCouplingFunction):
    """The reference's coupling function ``(N, num_in_channels, *S) -> (N, num_out_channels, *S)``.

    ``block_depth`` times (bias-free 3^dim convolution -> LeakyReLU -> GroupNorm(1, c,
    eps=1e-3)); the inner layers have ``max(num_in_channels, num_out_channels)``
    channels.  Convolutions are Kaiming-uniform initialised (``fan_out``, leaky
    ReLU slope 0.01); with ``zero_init`` the last GroupNorm is zero, so ``f = 0``.
    It is a :class:`iunet_nb.nn.coupling.StandardCouplingFunction` (an
    ``nn.Sequential`` of those layers), so both engines run it as their own.
    """

    def __init__(self, dim: int, num_in_channels: int, num_out_channels: int,
                 block_depth: int = 1, zero_init: bool = True) -> None:
        check_dim(dim)
        for name, value in (("num_in_channels", num_in_channels), ("num_out_channels", num_out_channels),
                            ("block_depth", block_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StandardBlock: {name} must be a positive int, got {value!r}")
        widths = [num_in_channels] + [max(num_in_channels, num_out_channels)] * (block_depth - 1)
        widths.append(num_out_channels)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:]):
            conv = CONV[dim](c_in, c_out, kernel_size=3, padding=1, bias=False)
            nn.init.kaiming_uniform_(conv.weight, a=0.01, mode="fan_out", nonlinearity="leaky_relu")
            layers += [conv, nn.LeakyReLU(inplace=True),
                       nn.GroupNorm(1, c_out, eps=REFERENCE_GROUPNORM_EPS)]
        nn.Sequential.__init__(self, *layers)
        if zero_init:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
        self.dim = dim
        self.depth = block_depth
        self.num_in_channels = num_in_channels
        self.num_out_channels = num_out_channels
        self.register_load_state_dict_pre_hook(block_pre_hook)  # the reference's keys (seq.k / F.k) load too

    @property
    def F(self) -> nn.Sequential:
        """The layers as one sequence (the reference's attribute name)."""
        return self

    @property
    def seq(self) -> nn.Sequential:
        """The layers (the reference's other attribute name)."""
        return self


def reference_split(channels: int, module_index: int) -> int:
    """Channels of the transformed part ``u`` of the reference's coupling ``module_index``.

    ``floor(C/2)`` for an even index, ``ceil(C/2)`` for an odd one (the opposite of
    :func:`iunet_nb.nn.coupling.create_standard_module` for odd ``C``); the
    reference numbers each side of a level from 0.
    """
    return channels // 2 if module_index % 2 == 0 else channels - channels // 2


def _reference_decoder_order(ops: list) -> list:
    """A decoder level's module ops with a leading mixing moved behind the first coupling."""
    if len(ops) >= 2 and ops[0].kind == MIXING and ops[1].kind == COUPLING:
        return [ops[1], ops[0]] + ops[2:]
    return ops


def _reference_plan(plan: Plan) -> Plan:
    """``plan`` with every decoder level's mixing after its first coupling (slots renumbered)."""
    out, k, ops = [], 0, list(plan.ops)
    while k < len(ops):
        op = ops[k]
        if op.side == DECODER and op.kind in (COUPLING, MIXING):
            run = [op]
            while k + len(run) < len(ops) and ops[k + len(run)].side == DECODER \
                    and ops[k + len(run)].kind in (COUPLING, MIXING) and ops[k + len(run)].level == op.level:
                run.append(ops[k + len(run)])
            out += [dataclasses.replace(o, slot=slot) for slot, o in enumerate(_reference_decoder_order(run))]
            k += len(run)
        else:
            out.append(op)
            k += 1
    return dataclasses.replace(plan, ops=tuple(out))


def use_reference_mixing_placement(model: nn.Module) -> bool:
    """Move each decoder mixing of ``model`` (an iUNet) behind the level's first coupling.

    The reference applies a level's decoder modules as ``coupling 0, mixing,
    coupling 1, ...``; this package mirrors the encoder (``mixing, coupling 0,
    ...``).  Only ``channel_mixing_freq=-1`` differs.  The modules are reordered
    in ``decoder_modules`` and the plan is rebuilt; the parameters stay the
    same objects.  ``model.mixing_placement`` becomes ``'reference'`` (also where
    nothing moves; a state dict records it).  Returns True if anything moved.
    """
    if getattr(model, "mixing_placement", "mirrored") == "reference":
        return False
    if model.plan.channel_mixing_freq != -1:  # both placements are the same; mark the reference's structure
        model.mixing_placement = "reference"
        return False
    moved = False
    for level in range(model.num_levels):
        mods = model.decoder_modules[level]
        kinds = [op.kind for op in model.plan.module_ops(level, DECODER)]
        if len(kinds) >= 2 and kinds[0] == MIXING and kinds[1] == COUPLING:
            first, second = mods[0], mods[1]
            mods[0], mods[1] = second, first
            moved = True
    model.plan = _reference_plan(model.plan)
    model.mixing_placement = "reference"
    return moved


def reorder_haar_to_reference(module: nn.Module) -> None:
    """Give a freshly built Haar resampling (stride 2 everywhere) the reference's sub-band order.

    Rewrites the buffer ``base`` of ``module`` (an ``InvertibleDownsampling`` or
    ``InvertibleUpsampling`` with ``init='haar'``); other layers are left alone.
    Call it before training: it changes the function.
    """
    stride = getattr(module, "stride", ())
    if getattr(module, "init", None) != "haar" or not stride or set(stride) != {2}:
        return
    with torch.no_grad():
        ref = reference_haar(len(stride), module.method).to(module.base.dtype)
        module.base.copy_(ref.expand_as(module.base))
