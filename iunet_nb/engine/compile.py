"""From a plan and its modules to the fused engine's steps: which step runs which module.

A specialised step computes a module with the engine's own code instead of calling
it: :class:`~iunet_nb.engine.steps.CouplingStep` computes ``(v, u + f(v))`` (with the
fused kernel where ``f`` declares itself the standard block), and
:class:`~iunet_nb.engine.steps.KernelStep` an orthogonal kernel's map on channel parts.
That is exact only for the module the step was written for.  So a module is given a
specialised step only when

* its class computes what the step computes: its ``forward`` and ``inverse`` are
  those of the class that declares the engine's interface (a subclass that
  overrides them computes something else), and
* calling it would run no hook (forward, forward-pre or backward hooks of the
  module itself, or global module hooks): a hook may read or change values and
  must fire as in plain autograd.

A module with hooks runs in a :class:`~iunet_nb.engine.steps.RecordedStep` (called
as itself with autograd, its graph kept to the backward: hooks fire exactly as in
plain autograd, at the memory cost of that graph); any other invertible module in an
:class:`~iunet_nb.engine.steps.InvertibleModuleStep` (its own ``forward`` and
``inverse``).  Hooks on the submodules of a coupling function ``f`` are handled by
the coupling step's autograd path, which calls ``f`` itself (see
:meth:`iunet_nb.nn.coupling.StandardCouplingFunction.fused_block`).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from iunet_nb import torch_internals as internals
from iunet_nb.engine.plan import CONCAT, COUPLING, DOWNSAMPLE, SPLIT, Op, Plan
from iunet_nb.engine.steps import (
    ConcatStep, CouplingStep, InvertibleModuleStep, KernelStep, RecordedStep, SplitStep,
)
from iunet_nb.nn.coupling import AdditiveCoupling
from iunet_nb.nn.interfaces import OrthogonalKernelModule

__all__ = ["compile_steps", "computes_as_declared"]


def _defining_class(cls: type, name: str) -> type | None:
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def computes_as_declared(module: nn.Module, declaring: type, methods: tuple[str, ...]) -> bool:
    """Whether none of ``methods`` is overridden below the class that defines ``declaring``'s.

    ``declaring``: the class whose methods the specialised step reproduces.
    """
    if not isinstance(module, declaring):
        return False
    return all(_defining_class(type(module), m) is _defining_class(declaring, m) for m in methods)


def _kernel_declaring_class(module: nn.Module) -> type:
    """The class that defines ``module``'s ``forward_parts`` (what a KernelStep computes)."""
    cls = _defining_class(type(module), "forward_parts")
    return cls if cls is not None else OrthogonalKernelModule


def compile_steps(plan: Plan, module_of: Callable[[Op], nn.Module | None],
                  preserve_rng_state: bool, consume_output: bool) -> list:
    """The fused engine's steps for ``plan``, one per operation.

    ``module_of(op)``: the module of an operation (None for splits and concatenations).
    """
    return [_step(op, module_of(op), preserve_rng_state, consume_output) for op in plan.ops]


def _step(op: Op, module: nn.Module | None, preserve_rng_state: bool, consume_output: bool):
    if op.kind == SPLIT:
        return SplitStep(op.kept)
    if op.kind == CONCAT:
        return ConcatStep(op.kept)
    assert module is not None
    if _hooked(module):
        return RecordedStep(module)
    if op.kind == COUPLING:
        if computes_as_declared(module, AdditiveCoupling, ("forward", "inverse")):
            return CouplingStep(module, preserve_rng_state, slabs=True, slab_forward=consume_output)
        return InvertibleModuleStep(module, preserve_rng_state)
    if isinstance(module, OrthogonalKernelModule) and computes_as_declared(
            module, _kernel_declaring_class(module), ("forward", "inverse", "forward_parts")):
        # The finest level's downsampling may hand its input back in parts (the slab-wise
        # couplings there read parts).
        return KernelStep(module, split_output=op.kind == DOWNSAMPLE and op.level == 0)
    return InvertibleModuleStep(module, preserve_rng_state)


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` itself would run a hook (its own or a global one).

    Only the module's own hooks count here: hooks of a coupling function's submodules
    fire in the coupling step's autograd path, which calls the function.
    """
    return internals.module_has_hooks(module, recurse=False)
