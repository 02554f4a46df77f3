"""The fused engine: one autograd function over a chain of invertible steps.

An iUNet body is written as a flat list of *steps* (:mod:`iunet_nb.engine.steps`)
acting on a small state: the current activation and a stack of skip
activations (the channels each level keeps).  Every step is invertible, so the
backward pass can start from the body's output alone and walk the steps in
reverse, rebuilding each step's input from its output while computing the
gradients (the contract: :mod:`iunet_nb.engine.contract`).

:class:`FusedInvertibleFunction` runs the forward without recording a graph
and stores only the output.  In the backward, each additive coupling
``(u, v) -> (v, u + f(v))`` is undone *and* differentiated with a single
evaluation of ``f`` (about 4 forward-equivalents per coupling; conventional
backprop costs 3, memcnn's inverse-then-recompute 5).  Orthogonal kernels of
the up/downsampling and channel mixing are computed without a graph in the
forward and recomputed, with their graph, only inside their own backward step.
The other engine, ``memcnn`` (every step wrapped in
``memcnn.InvertibleModuleWrapper``, as in the paper), is built in
:mod:`iunet_nb.arch.iunet`.
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch
from torch import Tensor

from iunet_nb.engine.contract import Step
from iunet_nb.engine.parts import Part, State, full

__all__ = ["DOUBLE_BACKWARD_MESSAGE", "EARLY_GRADIENTS", "run_forward", "FusedInvertibleFunction",
           "apply_fused"]

#: The error for ``torch.autograd.grad(..., create_graph=True)`` through an engine.
DOUBLE_BACKWARD_MESSAGE = (
    "double backward (torch.autograd.grad(..., create_graph=True) or backward(create_graph=True), "
    "e.g. for a gradient penalty) is not supported by the memory-efficient engines, which do not "
    "record a graph of their backward. Build the model with disable_custom_gradient=True (or set "
    "model.disable_custom_gradient = True for that loss) to use plain autograd, which supports it."
)


def _tensor_slices(steps: Sequence[Step]) -> list[slice]:
    """Where each step's tensors lie in the flat list of all steps' tensors."""
    slices, start = [], 0
    for step in steps:
        n = len(step.tensors())
        slices.append(slice(start, start + n))
        start += n
    return slices


def run_forward(steps: Sequence[Step], x: Tensor, tensors: Sequence[Tensor],
                records: list[dict] | None = None) -> Tensor:
    """Run ``steps`` on ``x`` ``(N, C, *S)``; return the output (ownership note 1).

    ``tensors``: the concatenation of every step's ``tensors()``; ``records``, if
    given, receives each step's record.
    """
    st = State([Part(x, False)])
    for step, sl in zip(steps, _tensor_slices(steps)):
        record: dict = {}
        step.forward(st, tensors[sl], record)
        if records is not None:
            records.append(record)
    assert not st.stack, "unbalanced split/concat steps"
    out = full(st.cur)
    return out.tensor if out.owned else out.tensor.clone()


#: ``id(tensor) -> (weakref to tensor, callback)``: leaf tensors whose gradient the fused
#: backward hands to ``callback(tensor, grad)`` as soon as its step is back-propagated, instead
#: of returning it with all the others at the end (autograd then sees no gradient for it).
#: Used by :mod:`iunet_nb.engine.optim_in_backward`, so that all gradients never exist at once.
EARLY_GRADIENTS: dict[int, tuple["weakref.ref[Tensor]", Any]] = {}


def _early_callback(t: Tensor) -> Any:
    entry = EARLY_GRADIENTS.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else None


class FusedInvertibleFunction(torch.autograd.Function):
    """Autograd function over a chain of invertible steps that stores only its output.

    ``apply(steps, x, *tensors)`` with ``x`` of shape ``(N, C, *spatial)`` and
    ``tensors`` the flat list of every step's gradient-receiving inputs
    (the parameters of the couplings and of the orthogonal parametrisations).
    """

    @staticmethod
    def forward(ctx: Any, steps: Sequence[Step], x: Tensor, *tensors: Tensor) -> Tensor:
        records: list[dict] = []
        device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.x_meta = (x.dtype, x.requires_grad)
        # Under autocast the body runs in its parameters' dtype (an exact inverse needs it: a
        # coupling undone in bfloat16 loses the input) and returns the autocast dtype, as the
        # layers of the conventional network would.
        body_dtype = next((t.dtype for t in tensors if t.is_floating_point()), x.dtype)
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            y = run_forward(steps, x.to(body_dtype) if ctx.autocast[0] else x, tensors, records)
        ctx.steps = steps
        ctx.records = records
        ctx.device_type = device_type
        ctx.save_for_backward(y, *tensors)
        return y.to(ctx.autocast[1]) if ctx.autocast[0] else y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Any, ...]:
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_MESSAGE)
        y, *tensors = ctx.saved_tensors
        steps: Sequence[Step] = ctx.steps
        grads: list[Tensor | None] = [None] * len(tensors)
        # Ownership note 1: y and dy are the caller's; a cast dy is a new tensor of our own.
        st = State([Part(y, False)])
        gst = State([Part(dy.to(y.dtype), dy.dtype != y.dtype)])
        slices = _tensor_slices(steps)
        with torch.no_grad(), torch.autocast(ctx.device_type, enabled=False):
            for step, sl, record in zip(reversed(steps), reversed(slices), reversed(ctx.records)):
                step_grads = step.backward(st, gst, tensors[sl], record)
                for i, g in zip(range(sl.start, sl.stop), step_grads):
                    if g is not None:
                        g = g.to(tensors[i].dtype)
                        early = _early_callback(tensors[i]) if EARLY_GRADIENTS else None
                        if early is None:
                            grads[i] = g
                        else:  # handed over now (e.g. an optimizer step), not at the end
                            early(tensors[i], g)
        st.cur = []  # the rebuilt input is not needed any more: free it before joining dx
        dx = full(gst.cur).tensor.to(ctx.x_meta[0])
        # ctx.records stay (ownership note 8).
        return (None, dx, *grads)


def apply_fused(steps: Sequence[Step], x: Tensor) -> Tensor:
    """``steps`` applied to ``x`` with memory-efficient backpropagation.

    ``x``: ``(N, C, *spatial)``.  Only the output is kept for the backward, which
    rebuilds every step's input from its output.  Each step's gradient-receiving
    tensors (``step.tensors()``) get their gradients.
    """
    tensors = [t for step in steps for t in step.tensors()]
    return FusedInvertibleFunction.apply(steps, x, *tensors)
