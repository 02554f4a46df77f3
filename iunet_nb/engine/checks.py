"""The step conformance checker: run a step forward and backward and compare with autograd.

:func:`check_step` checks the contract of :class:`~iunet_nb.engine.contract.Step`
on one probe: the step's backward rebuilds its input from its output, its
input gradient and its tensors' gradients equal what autograd gives for the
step's own forward (run with a graph), and the caller's tensors are left
untouched (ownership note 1).  Use float64 modules and probes, so that
"equal" can mean equal to ~1e-10.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from iunet_nb.engine.contract import Step
from iunet_nb.engine.parts import Part, State, split_like

__all__ = ["check_step", "TOLERANCE"]

#: Largest max-abs difference accepted, relative to the largest value compared (float64).
TOLERANCE = 1e-10


def _state(x: Tensor, skip: Tensor | None, owned: bool) -> State:
    """The state ``cur = x`` with ``skip`` on the stack (if given)."""
    stack = [[Part(skip, owned)]] if skip is not None else []
    return State([Part(x, owned)], stack)


def _as_tensor(state: State) -> Tensor:
    """The state as one tensor: stack parts (bottom first), then the current activation."""
    return torch.cat([p.tensor for p in state.all_parts()], dim=1)


def _mirror(state: State, grad: Tensor) -> State:
    """``grad`` cut into parts like ``state`` (views, not owned: ownership note 1)."""
    parts = split_like(grad, state.all_parts())
    it = iter(parts)
    stack = [[Part(next(it), False) for _ in level] for level in state.stack]
    return State([Part(next(it), False) for _ in state.cur], stack)


def _reference(step: Step, inputs: list[Tensor], skip_given: bool, tensors: Sequence[Tensor],
               grad: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    """The step's output and autograd's gradients (inputs first, then tensors)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    state = _state(leaves[-1], leaves[0] if skip_given else None, owned=False)
    with torch.enable_grad():
        step.forward(state, tensors, {})
        y = _as_tensor(state)
    wanted = leaves + [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad(y, wanted, grad, allow_unused=True)
    return y.detach(), list(grads)


def _compare(name: str, got: Tensor | None, want: Tensor | None, scale: float) -> None:
    if got is None or want is None:
        if not (got is None and (want is None or not want.any())):
            raise AssertionError(f"{name}: got {got is not None and 'a tensor'}, expected {want is not None and 'a tensor'}")
        return
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    error = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    if not error <= TOLERANCE * scale:
        raise AssertionError(f"{name}: max abs difference {error:.3g} > {TOLERANCE * scale:.3g}")


def check_step(step: Step, x: Tensor, skip: Tensor | None = None, *, input_owned: bool = False,
               seed: int = 0) -> Tensor:
    """Check ``step`` on the probe ``x`` ``(N, C, *S)``; return its output as one tensor.

    Args:
        step: the step; its modules should be float64.
        x: the current activation; ``skip``: a skip activation on the stack
            (needed by a concatenation).
        input_owned: hand the engine run owned copies of the inputs, which it
            may overwrite (exercises the in-place paths).
        seed: seed of the random output gradient.

    Raises:
        AssertionError: output, rebuilt input, or a gradient differs from autograd,
            or the caller's tensors were modified.
    """
    tensors = step.tensors()
    inputs = ([skip] if skip is not None else []) + [x]  # the state's order: stack, then cur
    originals = [t.detach().clone() for t in inputs]
    with torch.no_grad():
        probe = State([Part(x, False)], [[Part(skip, False)]] if skip is not None else [])
        step.forward(probe, tensors, {})
        out_shape = _as_tensor(probe).shape
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(out_shape, generator=g, dtype=x.dtype)
    y_ref, grads_ref = _reference(step, inputs, skip is not None, tensors, grad)
    grad_original = grad.clone()
    record: dict = {}
    with torch.no_grad():
        run = [t.clone() for t in inputs] if input_owned else inputs
        state = _state(run[-1], run[0] if skip is not None else None, owned=input_owned)
        step.forward(state, tensors, record)
        y = _as_tensor(state)
        grad_state = _mirror(state, grad)
        param_grads = step.backward(state, grad_state, tensors, record)
    scale = max(1.0, y_ref.abs().max().item())
    _compare("output", y, y_ref, scale)
    _compare("rebuilt input", _as_tensor(state), torch.cat(originals, dim=1), scale)
    _compare("input gradient", _as_tensor(grad_state),
             torch.cat([gr if gr is not None else torch.zeros_like(t) for gr, t in
                        zip(grads_ref[:len(inputs)], inputs)], dim=1), scale)
    wanted_grads = iter(grads_ref[len(inputs):])
    if len(param_grads) != len(tensors):
        raise AssertionError(f"backward returned {len(param_grads)} gradients for {len(tensors)} tensors")
    for i, (t, got) in enumerate(zip(tensors, param_grads)):
        _compare(f"gradient of tensor {i}", got, next(wanted_grads) if t.requires_grad else None, scale)
    for name, now, before in (("input", x, originals[-1]), ("skip input", skip, originals[0]),
                              ("output gradient", grad, grad_original)):
        if now is not None and not torch.equal(now, before):
            raise AssertionError(f"the step modified the caller's {name} (ownership note 1)")
    return y
