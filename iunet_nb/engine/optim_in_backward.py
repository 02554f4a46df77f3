"""The optimizer step inside the backward pass: each parameter is updated as soon as its
gradient is complete, and the gradient is freed at once.

With the usual ``loss.backward(); optimizer.step()`` every parameter's gradient is alive at
the end of the backward: for the Table-1 model at delta = 30 that is 0.71 GiB, as much as the
weights.  Applied per parameter during the backward, at most the gradients of one step of
the network exist at a time.

Usage::

    from iunet_nb.engine.optim_in_backward import optimizer_in_backward

    opt = optimizer_in_backward(model, "adamw", lr=1e-3, weight_decay=1e-2)
    for x, target in data:
        loss = loss_fn(model(x), target)
        loss.backward()          # the parameters are updated here; no opt.step()
    opt.remove()                 # or use it as a context manager: ``with optimizer_in_backward(...)``

How it works: one optimizer per parameter (``torch.optim.SGD``/``Adam``/``AdamW`` or any
``torch.optim.Optimizer`` class), stepped from the parameter's
``Tensor.register_post_accumulate_grad_hook`` -- the hook autograd calls once the
parameter's gradient has been accumulated -- and the gradient is then set to ``None``.  The
fused engine computes the gradients of all coupling parameters inside one autograd function;
for those it hands each gradient over as soon as its coupling is back-propagated
(:data:`iunet_nb.engine.fused.EARLY_GRADIENTS`) instead of returning them all at the end.

Numerically the same as one optimizer over all parameters followed by ``step()``: SGD and
Adam(W) update each parameter from its own gradient and state only (tested in float64).
Constraints:

* Gradient-*norm* clipping (``torch.nn.utils.clip_grad_norm_``) needs every gradient at once
  and is therefore not possible here (``max_norm`` raises); element-wise clipping
  (``clip_value``, as ``torch.nn.utils.clip_grad_value_``) is applied per parameter before
  its update.
* No gradient accumulation over several backward passes: every backward updates.
* Each parameter must be used once per forward (no weight sharing inside the fused body),
  and no backward with ``create_graph=True``.
* Learning-rate schedules: :meth:`OptimizerInBackward.set_lr`.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from iunet_nb.engine import fused as engine

__all__ = ["OPTIMIZERS", "OptimizerInBackward", "optimizer_in_backward"]

#: optimizer names accepted by :func:`optimizer_in_backward`
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


class OptimizerInBackward:
    """Per-parameter optimizers stepped during the backward (see the module docstring).

    Attributes:
        optimizers: ``{parameter: optimizer}`` (one optimizer per parameter).
        clip_value: element-wise gradient clipping applied before each update (or ``None``).
        steps: number of parameter updates applied so far (all parameters, all steps).
    """

    def __init__(self, params: Iterable[Tensor], optimizer_class: type[torch.optim.Optimizer],
                 clip_value: Optional[float] = None, **kwargs: Any) -> None:
        self.params = _unique(params)
        self.clip_value = clip_value
        self.steps = 0
        self.optimizers: dict[Tensor, torch.optim.Optimizer] = {
            p: optimizer_class([p], **kwargs) for p in self.params
        }
        self._by_id = {id(p): self.optimizers[p] for p in self.params}
        self._handles = []
        me = weakref.ref(self)
        for p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(_hook(me)))
            engine.EARLY_GRADIENTS[id(p)] = (weakref.ref(p), _early(me))

    # -- the update ----------------------------------------------------------------------
    def _step(self, p: Tensor) -> None:
        """Clip, update and free the gradient of ``p`` (nothing if it has none)."""
        if p.grad is None:
            return
        if self.clip_value is not None:
            p.grad.clamp_(-self.clip_value, self.clip_value)
        self._by_id[id(p)].step()
        p.grad = None
        self.steps += 1

    def _accumulate(self, p: Tensor, grad: Tensor) -> None:
        """What autograd's AccumulateGrad does, then the update (fused engine's early path)."""
        if p.grad is None:
            p.grad = grad.detach()
        else:
            p.grad.add_(grad)
        self._step(p)

    # -- management ----------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter's optimizer (for a schedule)."""
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def state_dict(self) -> list[dict]:
        """The state of each parameter's optimizer, in parameter order."""
        return [self._by_id[id(p)].state_dict() for p in self.params]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.params):
            raise ValueError(f"states has {len(states)} entries, expected {len(self.params)}")
        for p, s in zip(self.params, states):
            self._by_id[id(p)].load_state_dict(s)

    def remove(self) -> None:
        """Unregister the hooks: ``backward()`` leaves gradients in ``.grad`` again."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in self.params:
            entry = engine.EARLY_GRADIENTS.get(id(p))
            if entry is not None and entry[0]() is p:
                del engine.EARLY_GRADIENTS[id(p)]

    def __enter__(self) -> "OptimizerInBackward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        name = type(next(iter(self.optimizers.values()))).__name__ if self.optimizers else "-"
        return f"OptimizerInBackward({name}, {len(self.params)} parameters, steps={self.steps})"


def _hook(me: "weakref.ref[OptimizerInBackward]") -> Any:
    def hook(p: Tensor) -> None:
        owner = me()
        if owner is not None:
            owner._step(p)
    return hook


def _early(me: "weakref.ref[OptimizerInBackward]") -> Any:
    def early(p: Tensor, grad: Tensor) -> None:
        owner = me()
        if owner is not None:
            owner._accumulate(p, grad)
        elif p.grad is None:  # the owner is gone: behave like autograd
            p.grad = grad.detach()
        else:
            p.grad.add_(grad)
    return early


def _unique(params: Iterable[Tensor]) -> list[Tensor]:
    out, seen = [], set()
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters must be tensors, got {type(p).__name__}")
        if id(p) in seen or not p.requires_grad:
            continue
        if not p.is_leaf:
            raise ValueError("parameters must be leaf tensors (e.g. nn.Parameter)")
        seen.add(id(p))
        out.append(p)
    if not out:
        raise ValueError("no parameters that require a gradient")
    return out


def optimizer_in_backward(
    model_or_params: Union[nn.Module, Iterable[Tensor]],
    optimizer: Union[str, type[torch.optim.Optimizer]] = "sgd",
    *,
    clip_value: Optional[float] = None,
    max_norm: Optional[float] = None,
    **kwargs: Any,
) -> OptimizerInBackward:
    """Train with the update applied per parameter during ``backward()``.

    Args:
        model_or_params: a module (its parameters that require grad) or an iterable of
            leaf tensors.
        optimizer: ``'sgd'``, ``'adam'``, ``'adamw'`` or a ``torch.optim.Optimizer`` class.
        clip_value: clip every gradient element to ``[-clip_value, clip_value]`` before the
            update (``torch.nn.utils.clip_grad_value_``); ``None``: no clipping.
        max_norm: not supported (a ``ValueError`` says why): a global gradient norm needs
            every gradient at once.
        **kwargs: the optimizer's arguments (``lr``, ``momentum``, ``weight_decay``, ...).

    Returns:
        an :class:`OptimizerInBackward`; ``remove()`` it (or use ``with``) to stop.
    """
    if max_norm is not None:
        raise ValueError(
            "max_norm: gradient-norm clipping needs every gradient at once, which the update "
            "in the backward never has; use clip_value=... (element-wise clipping) or the usual "
            "loss.backward(); clip_grad_norm_(...); optimizer.step()"
        )
    if clip_value is not None and not (isinstance(clip_value, (int, float)) and clip_value > 0):
        raise ValueError(f"clip_value must be a positive number or None, got {clip_value!r}")
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r}: use one of {sorted(OPTIMIZERS)} or a "
                             f"torch.optim.Optimizer class")
        cls = OPTIMIZERS[key]
    elif isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        cls = optimizer
    else:
        raise ValueError(f"optimizer must be a name {sorted(OPTIMIZERS)} or a torch.optim.Optimizer "
                         f"class, got {optimizer!r}")
    if "lr" not in kwargs and cls is torch.optim.SGD:
        raise ValueError("lr: SGD needs a learning rate, e.g. lr=1e-2")
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    return OptimizerInBackward(params, cls, clip_value=clip_value, **kwargs)
