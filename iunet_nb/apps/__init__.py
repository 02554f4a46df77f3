"""The paper's applications as training tasks for :mod:`iunet_nb.train`.

A task bundles data, model, loss and metrics (see :class:`iunet_nb.apps.task.Task`).
Tasks are looked up by name and imported only when asked for, so that
``import iunet_nb`` does not pull scikit-image, MONAI or FrEIA.
"""
from __future__ import annotations

import importlib

from iunet_nb.apps.task import Task

__all__ = ["Task", "TASK_MODULES", "get_task"]

#: task name -> module defining ``TASK: Task``
TASK_MODULES = {
    "ct": "iunet_nb.apps.ct",
    "segmentation3d": "iunet_nb.apps.segmentation",
    "flow": "iunet_nb.apps.flow",
}


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name`` (one of :data:`TASK_MODULES`)."""
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASK_MODULES)}")
    task = importlib.import_module(TASK_MODULES[name]).TASK
    if not isinstance(task, Task) or task.name != name:
        raise TypeError(f"{TASK_MODULES[name]}.TASK must be a Task named {name!r}")
    return task
