"""A small, explicit training loop with a progress bar.

:func:`optimise` minimises any scalar closure over a list of parameters and
returns the loss history; :func:`train` is the supervised special case
(``model(input)`` against ``target``) the notebooks use.  Both show a
progress bar with the current loss (:func:`iunet_nb.notebook.helpers.progress`: a
text line updated in place in Jupyter, whose final state survives papermill).

The loop is the one a reader would write::

    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        loss.backward()
        opt.step()
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["optimise", "train"]

_OPTIMISERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def optimise(loss_fn: Callable[[int], Tensor], params: Iterable[Tensor], steps: int, lr: float = 1e-2,
             optimizer: str = "adam", progress: bool = True, desc: str = "optimising") -> list[float]:
    """Minimise ``loss_fn(step)`` over ``params`` for ``steps`` steps; return the loss per step.

    Args:
        loss_fn: called with the step index (0-based), returns a scalar tensor.
        params: the tensors to optimise (``requires_grad=True``).
        steps: number of optimiser steps (>= 1).
        lr: learning rate.
        optimizer: ``'adam'`` or ``'sgd'``.
        progress: show a progress bar (:func:`iunet_nb.notebook.helpers.progress`).
        desc: label of the progress bar.

    Returns:
        ``steps`` floats: the loss *before* each update.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if optimizer not in _OPTIMISERS:
        raise ValueError(f"optimizer must be one of {tuple(_OPTIMISERS)}, got {optimizer!r}")
    params = [p for p in params]
    if not params:
        raise ValueError("params is empty: nothing to optimise")
    opt = _OPTIMISERS[optimizer](params, lr=lr)
    from iunet_nb.notebook.helpers import progress as progress_bar

    history: list[float] = []
    bar = progress_bar(range(steps), desc=desc, enable=progress)
    for step in bar:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(step)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        loss.backward()
        opt.step()
        value = loss.item()
        history.append(value)
        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    bar.close()
    return history


def train(model: nn.Module, batch_fn: Callable[[int], tuple[Tensor, Tensor]], steps: int,
          lr: float = 1e-3, loss: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
          device: torch.device | str | None = None, optimizer: str = "adam", progress: bool = True,
          desc: str = "training") -> list[float]:
    """Supervised training: ``loss(model(input), target)`` for ``steps`` steps.

    Args:
        model: any module; moved to ``device`` (in place) if given.
        batch_fn: ``batch_fn(step) -> (input, target)``; tensors are moved to ``device``.
        steps, lr, optimizer, progress, desc: as in :func:`optimise`.
        loss: ``loss(prediction, target)`` returning a scalar (default: MSE).

    Returns:
        The training loss per step (before each update).
    """
    if device is not None:
        model.to(device)
    model.train()

    def closure(step: int) -> Tensor:
        inputs, target = batch_fn(step)
        if device is not None:
            inputs, target = inputs.to(device), target.to(device)
        return loss(model(inputs), target)

    return optimise(closure, model.parameters(), steps, lr=lr, optimizer=optimizer,
                    progress=progress, desc=desc)
