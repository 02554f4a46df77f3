"""What a training task must provide to :mod:`iunet_nb.train`.

A task is data + model + loss + metrics, each a plain function of the parsed
command-line options (an ``argparse.Namespace``: the loop's own options such
as ``--batch-size``, ``--seed`` and ``--device`` plus the task's own, added by
``add_arguments``).  The loop owns everything else: devices, samplers,
``DistributedDataParallel``, optimiser, checkpoints, resume, metrics CSV and
progress bars.  The notebooks call the same functions.

Contract (MUST):
- ``datasets(opts)`` returns ``(train, val)`` map-style datasets whose items
  are tuples of tensors; it is deterministic given ``opts.seed`` (every process
  of a distributed run builds the same data).
- ``model(opts)`` returns a fresh ``nn.Module``; its parameter initialisation
  uses the global torch RNG (the loop seeds it).
- ``loss(model, batch)`` returns a scalar tensor, the mean over the batch, so
  that averaging over processes gives the loss of the global batch.
- ``evaluate(model, loader)`` returns ``{metric name: float}`` on the loader's
  data, computed under ``torch.no_grad()``.
- ``loss`` runs the forward pass by calling ``model(...)`` (under
  :mod:`iunet_nb.train` that is the ``DistributedDataParallel`` wrapper, which
  synchronises gradients only for calls of its ``forward``).
CAN: ``add_arguments(parser)`` adds task options (with defaults that run on a
laptop CPU in minutes).  The loop's option ``opts.engine`` (``'fused'``,
``'memcnn'`` or ``'conventional'``) is meant for the iUNets a task builds:
``iUNet(..., **engine_kwargs(opts.engine))``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["Task", "ENGINES", "engine_kwargs", "positive_int", "non_negative_int"]

#: values of the loop's ``--engine`` option
ENGINES = ("fused", "memcnn", "conventional")


def engine_kwargs(engine: str) -> dict:
    """iUNet keyword arguments for ``engine``: ``'fused'``/``'memcnn'`` (memory-efficient backward,
    ``me_backend=engine``) or ``'conventional'`` (plain autograd, ``disable_custom_gradient=True``)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got engine={engine!r}")
    if engine == "conventional":
        return {"disable_custom_gradient": True}
    return {"me_backend": engine}


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


@dataclass(frozen=True)
class Task:
    """One application: data, model, loss and metrics (see the module docstring)."""

    name: str
    description: str
    datasets: Callable[[argparse.Namespace], tuple[Dataset, Dataset]]
    model: Callable[[argparse.Namespace], nn.Module]
    loss: Callable[[nn.Module, tuple[Tensor, ...]], Tensor]
    evaluate: Callable[[nn.Module, DataLoader], dict[str, float]]
    add_arguments: Callable[[argparse.ArgumentParser], None] = field(default=_no_arguments)


# ---------------------------------------------------------------- option types for add_arguments
def positive_int(text: object) -> int:
    """``argparse`` type: an int >= 1."""
    value = int(text)  # type: ignore[arg-type]
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def non_negative_int(text: object) -> int:
    """``argparse`` type: an int >= 0."""
    value = int(text)  # type: ignore[arg-type]
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value
