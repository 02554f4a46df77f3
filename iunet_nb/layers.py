"""Compatibility module: ``from iunet_nb.layers import create_standard_module``.

The seeds import ``create_standard_module`` from ``iunets.layers``; here it
lives in :mod:`iunet_nb.coupling` and is re-exported so the seeds' code runs
with only the package name changed.
"""
from .coupling import AdditiveCoupling, create_memcnn_module, create_standard_module

__all__ = ["AdditiveCoupling", "create_standard_module", "create_memcnn_module"]
